"""Where runs execute: here (one after another, or N at a time with one GPU each) or on a cluster via submitit.

Every run is its own ``python -m moe_sieve.sweep.pipeline RUN_DIR`` process, so a crash, an out-of-memory or a
kill takes down that run only; its error is recorded in the run directory and the others go on. Ctrl-C is the
exception: it stops the whole sweep (see :func:`run_local`).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._io import Interrupted, atomic_write_json, open_log, read_json_object
from ..cputhreads import choose_cpu_threads
from .pipeline import ERROR_FILE, INTERRUPTED, record_interrupted

EXECUTORS = ("local", "submitit")
WORKER_LOG = "worker.log"
INTERRUPT_GRACE_S = 60.0  # how long an interrupted worker may take to record itself before it is killed


class SweepInterrupted(Interrupted):
    """Ctrl-C stopped the sweep: the running runs were interrupted (resumable), the others never started."""


class _Workers:
    """The worker processes a local sweep runs, so that Ctrl-C reaches each of them exactly once.

    Workers run in their own session: the terminal's Ctrl-C reaches only the sweep, which passes one SIGINT
    to every worker, stops starting new ones, and waits until each has recorded its run as interrupted.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def interrupt(self) -> None:
        with self.lock:
            self.stopping.set()
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the sweep process dies, so a killed sweep leaves no orphan run
    writing into a directory that the resumed sweep will use."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_command(run_dir: Path) -> list[str]:
    """The worker process of one run (``pipeline.main``)."""
    return [sys.executable, "-m", "moe_sieve.sweep.pipeline", str(run_dir)]


def run_worker(
    run_dir: str, env: dict[str, str] | None = None, die_with_parent: bool = True, workers: _Workers | None = None
) -> int:
    """One run in its own process; a death without an error record (killed, segfault) is recorded here.
    The log is appended to (earlier attempts' logs are kept), never through a link."""
    run_dir_path = Path(run_dir)
    cmd = worker_command(run_dir_path)
    full_env = {**os.environ, **(env or {})}
    with open_log(run_dir_path / WORKER_LOG) as log:
        if workers is None:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )  # fmt: skip
        else:
            with workers.lock:
                if workers.stopping.is_set():
                    return INTERRUPTED
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                    preexec_fn=_die_with_parent if die_with_parent else None,
                )  # fmt: skip
                workers.procs.add(proc)
        try:
            code = proc.wait()
        finally:
            if workers is not None:
                with workers.lock:
                    workers.procs.discard(proc)
    if code != 0 and workers is not None and workers.stopping.is_set():
        record_interrupted(run_dir_path)  # killed after the grace period: still resumable
        return INTERRUPTED
    if code != 0 and read_json_object(run_dir_path / ERROR_FILE) is None:
        atomic_write_json(
            run_dir_path / ERROR_FILE,
            {"error": f"worker exited with status {code} (see {run_dir_path / WORKER_LOG})"},
        )
    return code


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU slots
        return 0


def run_local(run_dirs: Sequence[str], jobs: int = 1, on_done: Callable[[str, int], None] | None = None) -> None:
    """``jobs`` runs at a time: each holds one GPU (``CUDA_VISIBLE_DEVICES``) when there are GPUs, else an
    equal share of the free CPU cores (``OMP_NUM_THREADS``, see ``cputhreads.choose_cpu_threads``).

    Ctrl-C (or a worker that reports an interrupt) stops the sweep: no new run starts, each running worker
    gets one SIGINT and records its run as interrupted (it resumes from its checkpoint next time), and
    :class:`SweepInterrupted` is raised once they have all exited.
    """
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
    workers = _Workers()

    def one(run_dir: str) -> None:
        if workers.stopping.is_set():
            return
        env = slots.get()
        try:
            code = run_worker(run_dir, env, workers=workers)
        finally:
            slots.put(env)
        if code == INTERRUPTED:
            workers.interrupt()  # a worker interrupted on its own stops the sweep too
        if on_done is not None:
            with lock:
                on_done(run_dir, code)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(one, d) for d in run_dirs]:
            future.result()
    except KeyboardInterrupt:
        workers.interrupt()
        pool.shutdown(wait=False, cancel_futures=True)
        workers.wait(INTERRUPT_GRACE_S)
        raise SweepInterrupted from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if workers.stopping.is_set():
        raise SweepInterrupted


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
            if read_json_object(Path(run_dir) / ERROR_FILE) is None:
                atomic_write_json(Path(run_dir) / ERROR_FILE, {"error": f"submitit job {job.job_id} failed: {err}"})
        if on_done is not None:
            on_done(run_dir, code)
