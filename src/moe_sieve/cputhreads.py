"""How many torch threads a CPU job gets: the user's ``OMP_NUM_THREADS`` when set, else a share of the cores
that other work leaves free.

On a small shared machine, more threads than free cores is far worse than fewer: OpenMP workers spin while
they wait for a descheduled sibling, and the sieve experts path (many small ops) suffers most (measured on the
2-core dev box: the demo ran 20x slower with 2 threads than with 1 while another job held a core).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def env(self) -> dict[str, str]:
        return dict.fromkeys(THREAD_VARIABLES, str(self.threads))

    def line(self, what: str) -> str:
        return f"{what}: {self.threads} torch thread(s) each ({self.reason}; set OMP_NUM_THREADS to choose)"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_cpu_threads(jobs: int = 1, *, load: float | None = None, cores: int | None = None) -> ThreadChoice:
    """Threads per job for ``jobs`` concurrent CPU jobs.

    ``OMP_NUM_THREADS`` wins when set; otherwise each job gets an equal share of the cores not already busy
    (the 1-minute load average counts as busy cores), never less than one."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return ThreadChoice(int(given), "OMP_NUM_THREADS")
    cores = cores or usable_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    free = max(1, int(cores - load + 0.5))
    threads = max(1, min(cores // max(jobs, 1), free // max(jobs, 1)))
    return ThreadChoice(threads, f"{cores} cores, load {load:.1f}, {jobs} job(s)")


def apply_cpu_threads(choice: ThreadChoice) -> None:
    """Use ``choice`` in this process (torch's intra-op pool) and in the processes it starts."""
    import torch

    os.environ.update(choice.env())
    torch.set_num_threads(choice.threads)
