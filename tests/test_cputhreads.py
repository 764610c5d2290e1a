"""The torch thread count of CPU jobs: the user's OMP_NUM_THREADS, else the free cores shared among the jobs."""

from __future__ import annotations

from moe_sieve.cputhreads import choose_cpu_threads


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choice = choose_cpu_threads(2, load=0.0, cores=8)
    assert choice.threads == 3 and choice.env() == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert "OMP_NUM_THREADS" in choice.line("sweep")


def test_free_cores_are_shared(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_cpu_threads(1, load=0.0, cores=2).threads == 2  # idle box: every core
    assert choose_cpu_threads(1, load=1.2, cores=2).threads == 1  # another job holds a core
    assert choose_cpu_threads(2, load=0.0, cores=2).threads == 1  # two jobs share the cores
    assert choose_cpu_threads(2, load=9.0, cores=16).threads == 3  # 7 free cores over 2 jobs
    assert choose_cpu_threads(4, load=20.0, cores=2).threads == 1  # never below one
    assert "load 1.2" in choose_cpu_threads(1, load=1.2, cores=2).reason
