"""Typed sweep configuration: models x tasks x conditions x seeds, read from YAML with every key checked."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._io import fingerprint
from ..evaluation.config import EvalConfig
from ..training.config import TrainConfig

# TrainConfig fields a condition may not set: the sweep owns them (one directory and one seed per run).
_SWEEP_OWNED = ("model", "out", "seed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


def _check_keys(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(known)}")
    return data


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: name {name!r} must be letters, digits, '.', '_', '+' or '-' (it names directories)")
    return name


def _check_train_options(options: Any, where: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise ValueError(f"{where}: expected a mapping of train options, got {type(options).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(_SWEEP_OWNED)
    for key in options:
        if key in _SWEEP_OWNED:
            raise ValueError(
                f"{where}: {key!r} is set by the sweep (models, seeds, run directories), not per condition"
            )
        if key not in known:
            raise ValueError(f"{where}: unknown train option {key!r}; known: {', '.join(sorted(known))}")
    return dict(options)


def _check_metrics(value: Any, source: str) -> list[str]:
    if value is None:
        return ["accuracy"]
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m.isidentifier() for m in value):
        raise ValueError(f"{source}: metrics must be a non-empty list of column names, got {value!r}")
    return list(value)


@dataclass
class EvalSettings(EvalConfig):
    """Held-out evaluation after training: ``moe-sieve eval``'s options (:class:`EvalConfig`, the same defaults
    and checks) with the sweep's defaults for ``data`` and ``batch_size``, plus ``also``."""

    data: str | None = _help("Evaluation data (default: the task's training data, at its held-out split).", None)
    batch_size: int = _help("Prompts per batch.", 16)
    also: dict[str, str] | None = _help(
        "Further evaluation data scored by the same trained model, name -> data string (e.g. the facts task's "
        "paraphrase split); results.csv gets NAME_METRIC columns (paraphrase_gold_prob, ...).",
        None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, data in (self.also or {}).items():
            if not str(name).isidentifier() or not isinstance(data, str) or not data:
                raise ValueError(
                    f"eval also: {name!r} -> {data!r} must map a name (letters, digits, _) to a data string"
                )

    @classmethod
    def from_dict(cls, data: Any, where: str, base: EvalSettings | None = None) -> EvalSettings:
        merged = {**(dataclasses.asdict(base) if base else {}), **_check_keys(cls, data or {}, where)}
        try:
            return cls(**merged)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass
class ModelEntry:
    """A base model: ``name`` (used in run ids and results) and ``path`` (hub id, directory or alias)."""

    name: str = _help("Short name used in run ids and the results table.")
    path: str = _help("Hub id, local directory or built-in alias.")


@dataclass
class TaskEntry:
    """A fine-tuning task: training data and how it is evaluated."""

    name: str = _help("Short name used in run ids and the results table.")
    data: str = _help("Training data (task, TASK:PATH or JSONL), as `train --data`.")
    train: dict[str, Any] = _help("Train options for this task (e.g. spider_dir, profile).", None)
    eval: EvalSettings = _help("Evaluation of this task.", None)


@dataclass
class Condition:
    """One arm of the comparison: a name and the train options that define it."""

    name: str = _help("Condition name (full, hot-25, random-25, attention-only, ...).")
    train: dict[str, Any] = _help("Train options (TrainConfig fields) of this condition.", None)
    eval: dict[str, Any] = _help("Evaluation overrides for this condition.", None)


@dataclass
class MinitasksSettings:
    """Generate the mini tasks into ``{study}/minitasks`` before the runs (``generate_minitasks``)."""

    seed: int = _help("Generator seed.", 0)
    sizes: dict[str, int] = _help("Overrides of the generator's sizes (arith_test, corpus_train_docs, ...).", None)


@dataclass
class ProfileStudySettings:
    """Profile several datasets with one model load into ``{study}/profiles/<name>`` (the routing study)."""

    model: str = _help("Model to profile (a name from `models`, or a path).")
    data: dict[str, str] = _help("Dataset name -> data string (TASK:PATH or task).")
    split: str | None = _help("Split to profile (the task's training split by default).", None)
    max_examples: int | None = _help("Examples per dataset.", None)
    batch_size: int = _help("Examples per forward pass.", 16)
    max_length: int = _help("Truncate examples to this many tokens.", 512)


@dataclass
class SweepConfig:
    """models x tasks x conditions x seeds; ``train`` and ``eval`` are shared defaults that tasks and
    conditions override. Strings may use ``{study}`` (the output directory) and ``{sweep_dir}`` (the
    YAML's folder)."""

    name: str = _help("Sweep name.")
    models: list[ModelEntry] = _help("Base models.")
    tasks: list[TaskEntry] = _help("Tasks.")
    conditions: list[Condition] = _help("Conditions.")
    seeds: list[int] = _help("Seeds; every condition runs once per seed.")
    train: dict[str, Any] = _help("Train options shared by every run.", None)
    eval: EvalSettings = _help("Evaluation settings shared by every run.", None)
    minitasks: MinitasksSettings | None = _help("Generate the mini tasks first (optional).", None)
    profiles: ProfileStudySettings | None = _help("Routing study run before the sweep (optional).", None)
    metrics: list[str] = _help(
        "Metric columns `study` compares and reports (each gets compare.json / report files; the first is the "
        "headline). Any numeric column of results.csv (accuracy, gold_prob, paraphrase_gold_prob, ...).",
        None,
    )
    source: str = _help("Where this configuration was read from.", "<dict>")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SweepConfig:
        data = dict(_check_keys(cls, data, source))
        data.pop("source", None)
        for key in ("name", "models", "tasks", "conditions", "seeds"):
            if key not in data:
                raise ValueError(f"{source}: missing key {key!r}")
        name = _check_name(data["name"], f"{source}: name")
        train = _check_train_options(data.get("train") or {}, f"{source}: train")
        base_eval = EvalSettings.from_dict(data.get("eval"), f"{source}: eval")

        def as_list(key: str) -> list[Any]:
            value = data[key]
            if not isinstance(value, list) or not value:
                raise ValueError(f"{source}: {key!r} must be a non-empty list")
            return value

        models = []
        for i, item in enumerate(as_list("models")):
            where = f"{source}: models[{i}]"
            if isinstance(item, str):
                item = {"name": re.sub(r"[^A-Za-z0-9._+-]", "-", item.rstrip("/").split("/")[-1]), "path": item}
            item = _check_keys(ModelEntry, item, where)
            models.append(ModelEntry(name=_check_name(item.get("name"), where), path=str(item.get("path", ""))))
            if not models[-1].path:
                raise ValueError(f"{where}: missing 'path'")
        tasks = []
        for i, item in enumerate(as_list("tasks")):
            where = f"{source}: tasks[{i}]"
            item = _check_keys(TaskEntry, item, where)
            if "data" not in item:
                raise ValueError(f"{where}: missing 'data'")
            tasks.append(
                TaskEntry(
                    name=_check_name(item.get("name"), where),
                    data=str(item["data"]),
                    train=_check_train_options(item.get("train") or {}, f"{where}.train"),
                    eval=EvalSettings.from_dict(item.get("eval"), f"{where}.eval", base_eval),
                )
            )
        conditions = []
        for i, item in enumerate(as_list("conditions")):
            where = f"{source}: conditions[{i}]"
            item = _check_keys(Condition, item, where)
            options = _check_train_options(item.get("train") or {}, f"{where}.train")
            overrides = _check_keys(EvalSettings, item.get("eval") or {}, f"{where}.eval")
            conditions.append(Condition(name=_check_name(item.get("name"), where), train=options, eval=overrides))
        seeds = as_list("seeds")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"{source}: seeds must be integers, got {seeds}")
        for key, items in (("models", models), ("tasks", tasks), ("conditions", conditions)):
            names = [x.name for x in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{source}: duplicate {key} names in {names}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{source}: duplicate seeds in {seeds}")
        minitasks = None
        if data.get("minitasks") is not None:
            m = _check_keys(MinitasksSettings, data["minitasks"], f"{source}: minitasks")
            minitasks = MinitasksSettings(seed=int(m.get("seed", 0)), sizes=dict(m.get("sizes") or {}))
        profiles = None
        if data.get("profiles") is not None:
            p = dict(_check_keys(ProfileStudySettings, data["profiles"], f"{source}: profiles"))
            if not isinstance(p.get("data"), dict) or not p["data"]:
                raise ValueError(f"{source}: profiles.data must map dataset names to data strings")
            for key in p["data"]:
                _check_name(key, f"{source}: profiles.data")
            if "model" not in p:
                raise ValueError(f"{source}: profiles: missing 'model'")
            profiles = ProfileStudySettings(**p)
        return cls(
            name=name,
            models=models,
            tasks=tasks,
            conditions=conditions,
            seeds=list(seeds),
            train=train,
            eval=base_eval,
            minitasks=minitasks,
            profiles=profiles,
            metrics=_check_metrics(data.get("metrics"), source),
            source=source,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: sweep file not found") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read the sweep YAML ({err})") from err
        return cls.from_dict(data, source=str(path))


@dataclass
class RunSpec:
    """One run of the sweep, fully resolved: everything the worker needs, and nothing else."""

    run_id: str
    model: str
    task: str
    condition: str
    seed: int
    train: dict[str, Any]  # complete TrainConfig.to_json()
    eval: dict[str, Any]  # complete EvalSettings

    @property
    def fingerprint(self) -> str:
        return fingerprint({"train": {k: v for k, v in self.train.items() if k != "out"}, "eval": self.eval})

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def run_id(model: str, task: str, condition: str, seed: int) -> str:
    """Deterministic and readable: the same model/task/condition/seed always lands in the same directory."""
    return f"{model}__{task}__{condition}__s{seed}"


def substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in variables.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, list | tuple):
        return [substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    return value


def expand(config: SweepConfig, out: str | Path) -> list[RunSpec]:
    """Every (model, task, condition, seed) as a validated RunSpec, in a stable order: seed before condition,
    so a study cut short has every condition at its first seeds (paired comparisons need both)."""
    from ..evaluation.evaluate import check_eval_data

    out = Path(out)
    variables = {"study": str(out), "sweep_dir": str(Path(config.source).resolve().parent)}
    runs = []
    for model in config.models:
        for task in config.tasks:
            for seed in config.seeds:
                for cond in config.conditions:
                    rid = run_id(model.name, task.name, cond.name, seed)
                    options = {**config.train, **(task.train or {}), **(cond.train or {})}
                    options = substitute(options, variables)
                    options.update(
                        model=substitute(model.path, variables),
                        data=substitute(task.data, variables),
                        out=str(out / "runs" / rid),
                        seed=seed,
                    )
                    where = f"{config.source}: condition {cond.name!r}, task {task.name!r}"
                    try:
                        train = TrainConfig.from_dict(options, source=where)
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"{where}: {err}") from err
                    ev = EvalSettings.from_dict(cond.eval, f"{where}.eval", task.eval)
                    ev_json = substitute(dataclasses.asdict(ev), variables)
                    if ev_json["data"] is None:
                        ev_json["data"] = train.data
                    if ev_json["spider_dir"] is None:
                        ev_json["spider_dir"] = train.spider_dir
                    try:  # e.g. a Math50K task evaluated on its own training mix: fail now, not after training
                        for data in (ev_json["data"], *(ev_json["also"] or {}).values()):
                            check_eval_data(data)
                    except ValueError as err:
                        raise ValueError(f"{where}.eval: {err}") from err
                    runs.append(RunSpec(rid, model.name, task.name, cond.name, seed, train.to_json(), ev_json))
    return runs
