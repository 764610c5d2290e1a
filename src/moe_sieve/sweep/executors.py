"""Where runs execute: here (one after another, or N at a time with one GPU each) or on a cluster via submitit.

Every run is its own ``python -m moe_sieve.sweep.pipeline RUN_DIR`` process, so a crash, an out-of-memory or a
kill takes down that run only; its error is recorded in the run directory and the others go on.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..cputhreads import choose_cpu_threads
from .pipeline import ERROR_FILE, _read_json

EXECUTORS = ("local", "submitit")
WORKER_LOG = "worker.log"


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the sweep process dies, so a killed sweep leaves no orphan run
    writing into a directory that the resumed sweep will use."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_worker(run_dir: str, env: dict[str, str] | None = None, die_with_parent: bool = True) -> int:
    """One run in its own process; a death without an error record (killed, segfault) is recorded here."""
    run_dir_path = Path(run_dir)
    cmd = [sys.executable, "-m", "moe_sieve.sweep.pipeline", str(run_dir_path)]
    full_env = {**os.environ, **(env or {})}
    with open(run_dir_path / WORKER_LOG, "ab") as log:
        proc = subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=_die_with_parent if die_with_parent else None,
            check=False,
        )
    if proc.returncode != 0 and _read_json(run_dir_path / ERROR_FILE) is None:
        atomic_write_json(
            run_dir_path / ERROR_FILE,
            {"error": f"worker exited with status {proc.returncode} (see {run_dir_path / WORKER_LOG})"},
        )
    return proc.returncode


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU slots
        return 0


def run_local(run_dirs: Sequence[str], jobs: int = 1, on_done: Callable[[str, int], None] | None = None) -> None:
    """``jobs`` runs at a time: each holds one GPU (``CUDA_VISIBLE_DEVICES``) when there are GPUs, else an
    equal share of the free CPU cores (``OMP_NUM_THREADS``, see ``cputhreads.choose_cpu_threads``)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    gpus = _gpu_count()
    if gpus and jobs > gpus:
        raise ValueError(f"--jobs {jobs}: only {gpus} GPUs are visible (one run per GPU)")
    slots: queue.Queue[dict[str, str]] = queue.Queue()
    threads = None if gpus else choose_cpu_threads(jobs)
    if threads is not None:
        print(threads.line(f"sweep: {jobs} CPU run(s) at a time"), file=sys.stderr)
    for i in range(jobs):
        slots.put({"CUDA_VISIBLE_DEVICES": str(i)} if threads is None else threads.env())
    lock = threading.Lock()

    def one(run_dir: str) -> None:
        env = slots.get()
        try:
            code = run_worker(run_dir, env)
        finally:
            slots.put(env)
        if on_done is not None:
            with lock:
                on_done(run_dir, code)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, d) for d in run_dirs]:
            future.result()


def run_submitit(
    run_dirs: Sequence[str],
    folder: str | Path,
    cluster: str | None = None,
    parameters: dict[str, Any] | None = None,
    on_done: Callable[[str, int], None] | None = None,
) -> None:
    """Submit every run as a job through submitit (SLURM, or its ``local`` / ``debug`` executors) and wait."""
    try:
        import submitit
    except ImportError as err:
        raise ValueError("--executor submitit needs the submitit package (pip install submitit)") from err
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**{"timeout_min": 24 * 60, **(parameters or {})})
    with executor.batch():
        jobs = [executor.submit(run_worker, d, None, False) for d in run_dirs]
    for run_dir, job in zip(run_dirs, jobs, strict=True):
        try:
            code = job.result()
        except Exception as err:  # noqa: BLE001 - the scheduler lost the job: record it, go on
            code = -1
            if _read_json(Path(run_dir) / ERROR_FILE) is None:
                atomic_write_json(Path(run_dir) / ERROR_FILE, {"error": f"submitit job {job.job_id} failed: {err}"})
        if on_done is not None:
            on_done(run_dir, code)
