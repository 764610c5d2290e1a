"""``moe-sieve sweep``: prepare inputs, expand the grid, run what is not finished, gather the table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from .config import RunSpec, SweepConfig, expand
from .executors import EXECUTORS, SweepInterrupted, run_local, run_submitit
from .gather import gather
from .pipeline import INTERRUPTED, RUN_FILE, is_finished


@dataclass
class SweepOptions:
    """How to execute a sweep (command-line options of ``moe-sieve sweep``)."""

    executor: str = "local"
    jobs: int = 1
    cluster: str | None = None  # submitit: None (SLURM when available, else local), slurm, local, debug
    submitit_parameters: dict[str, Any] | None = None
    continue_command: str | None = None  # what Ctrl-C tells the user to rerun (default: the sweep command)
    overwrite: bool = False  # redo finished runs whose settings changed

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")


def prepare(config: SweepConfig, out: Path, log: Callable[[str], None] = print) -> None:
    """The inputs every run shares: mini tasks (generated, deterministic) and the routing-study profiles."""
    from .config import substitute

    variables = {"study": str(out), "sweep_dir": str(Path(config.source).resolve().parent)}
    if config.minitasks is not None and not (out / "minitasks" / "manifest.json").exists():
        from .._io import atomic_dir
        from ..minitasks.generate import generate_minitasks

        log(f"generating mini tasks into {out / 'minitasks'}")
        with atomic_dir(out / "minitasks") as tmp:
            generate_minitasks(tmp, seed=config.minitasks.seed, sizes=config.minitasks.sizes)
    if config.profiles is not None:
        p = config.profiles
        todo = {name: data for name, data in p.data.items() if not (out / "profiles" / name / "profile.json").exists()}
        if todo:
            from ..modeling import ModelSpec, load_model, load_tokenizer
            from ..profiling import ProfileConfig, run_profile

            paths = {m.name: m.path for m in config.models}
            model_path = substitute(paths.get(p.model, p.model), variables)
            spec = ModelSpec(model=model_path, device="cpu" if _cpu_only() else "auto")
            model, tokenizer = load_model(spec), load_tokenizer(spec)  # one load for every dataset
            for name, data in todo.items():
                started = time.perf_counter()
                profile = run_profile(
                    ProfileConfig(
                        model=model_path,
                        data=substitute(data, variables),
                        split=p.split,
                        max_examples=p.max_examples,
                        batch_size=p.batch_size,
                        max_length=p.max_length,
                        device=spec.device,
                    ),
                    model=model,
                    tokenizer=tokenizer,
                    progress=False,
                )
                profile.save(out / "profiles" / name)
                log(f"profiled {name}: {profile.num_examples} examples in {time.perf_counter() - started:.1f} s")


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def check_finished_settings(runs: list[RunSpec], out: Path, overwrite: bool) -> None:
    """A finished run made with other settings is never silently reused or replaced."""
    stale = []
    for spec in runs:
        run_dir = out / "runs" / spec.run_id
        if is_finished(run_dir) and not is_finished(run_dir, spec):
            stale.append(spec.run_id)
    if stale and not overwrite:
        raise ValueError(
            f"{out / 'runs'}: {len(stale)} finished runs were made with other settings than the sweep now asks "
            f"for ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); pass --overwrite to redo them "
            "or use another --out"
        )


def run_sweep(
    config: SweepConfig,
    out: str | Path,
    options: SweepOptions | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every unfinished run of ``config`` under ``out``; returns the gathered rows."""
    options = options or SweepOptions()
    out = Path(out)
    runs = expand(config, out)  # validates every run's settings before anything runs
    out.mkdir(parents=True, exist_ok=True)
    check_finished_settings(runs, out, options.overwrite)
    atomic_write_json(out / "sweep.json", {"config": asdict(config), "runs": [r.run_id for r in runs]})
    prepare(config, out, log)
    todo = [spec for spec in runs if not is_finished(out / "runs" / spec.run_id, spec)]
    log(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run")
    for spec in todo:
        run_dir = out / "runs" / spec.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / RUN_FILE, spec.to_json())
    gather(runs, out)
    by_dir = {str(out / "runs" / s.run_id): s for s in todo}
    done = [0]

    def on_done(run_dir: str, code: int) -> None:
        done[0] += 1
        spec = by_dir[run_dir]
        status = "finished" if code == 0 else "interrupted" if code == INTERRUPTED else f"FAILED (exit {code})"
        log(f"[{done[0]}/{len(todo)}] {spec.run_id}: {status}")
        gather(runs, out)

    if options.executor == "local":
        try:
            run_local(list(by_dir), jobs=options.jobs, on_done=on_done)
        except KeyboardInterrupt:
            rows = gather(runs, out)
            counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "interrupted", "pending")}
            again = options.continue_command or f"moe-sieve sweep {config.source} --out {out}"
            raise SweepInterrupted(
                f"sweep interrupted: {counts['finished']} runs finished, {counts['interrupted']} interrupted, "
                f"{counts['pending']} not started; run `{again}` again to "
                "continue (finished runs are kept, interrupted ones resume from their last checkpoint)"
            ) from None
    else:
        run_submitit(
            list(by_dir),
            folder=out / "submitit",
            cluster=options.cluster,
            parameters=options.submitit_parameters,
            on_done=on_done,
        )
    rows = gather(runs, out)
    failed = [r for r in rows if r["status"] == "failed"]
    log(
        f"results: {out / 'results.csv'} ({sum(r['status'] == 'finished' for r in rows)} finished, "
        f"{len(failed)} failed)"
    )
    return rows
