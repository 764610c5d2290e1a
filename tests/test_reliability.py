"""Fault injection and run-directory integrity: kill train/profile/select at chosen points (MOE_SIEVE_FAULT makes
the process SIGKILL itself there) and check that no finished result is lost, nothing partial loads, and
``--resume`` ends with the bit-identical adapter of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_sieve._io import (
    ArtifactExistsError,
    RunLockedError,
    UnsafePathError,
    atomic_dir,
    atomic_write_json,
    clean_stale_temps,
    run_lock,
)
from moe_sieve.profiling import Profile
from moe_sieve.selection import Selection
from moe_sieve.training import train
from moe_sieve.training.trainer import COMPLETE_MARKER, checkpoint_complete, last_complete_checkpoint

from .conftest import small_train_config
from .test_cli import run_cli

SRC = Path(__file__).resolve().parents[1] / "src"
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    rng = random.Random(1)
    lines = []
    for _ in range(20):
        a = rng.randint(0, 9)
        lines.append(json.dumps({"prompt": f"copy {a}:", "completion": f" {a}{a}{a}"}) + "\n")
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(lines))
    return path


def _cli(*args, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MOE_SIEVE_FAULT": fault or "",
    }
    cmd = [sys.executable, "-m", "moe_sieve.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _train_args(model_dir, data, out):
    # 20 rows / batch 8 = 3 steps per epoch (8, 8, 4), so the final step 4 falls inside an epoch: the case where
    # transformers' resume used to run a fifth step.
    return [
        "train", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 4, "--save-steps", 2,
        "--batch-size", 8, "--micro-batch-size", 8, "--r", 4, "--alpha", 8, "--device", "cpu", "--warmup", 0,
        "--learning-rate", "3e-3", "--logging-steps", 1, "--profile-subsample", 0.5, "--save-total-limit", 2,
    ]  # fmt: skip


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter.safetensors")


def test_train_killed_anywhere_resumes_to_the_same_adapter(tiny_model_dir, rows, tmp_path):
    """Kills during a checkpoint save, right after the final-step checkpoint and while the adapter is being
    swapped in; each --resume continues from the newest complete checkpoint and the end result is
    bit-identical to an uninterrupted run."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = _cli(*_train_args(tiny_model_dir, rows, ref))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((ref / "metrics.json").read_text())["steps"] == 4

    # 1. killed while writing checkpoint-4 (adapter factors written, optimizer/trainer state not yet)
    cut = _cli(*_train_args(tiny_model_dir, rows, run), fault="checkpoint-save@2")
    assert cut.returncode == KILLED, cut.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert checkpoint_complete(ckpts / "checkpoint-2") and not checkpoint_complete(ckpts / "checkpoint-4")
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    Selection.load(run / "selection.json")  # what exists is complete
    Profile.load(run / "profile")

    # 2. resume falls back to checkpoint-2 (saying so); killed right after checkpoint-4 (the final step) is complete
    cut = _cli(*_train_args(tiny_model_dir, rows, run), "--resume", fault="checkpoint-after-marker@1")
    assert cut.returncode == KILLED, cut.stderr[-2000:]
    assert "checkpoint-4 is incomplete" in cut.stderr and "resuming from" in cut.stderr
    assert cut.stderr.split("resuming from", 1)[1].split()[0].endswith("checkpoint-2")
    assert checkpoint_complete(ckpts / "checkpoint-4") and not (run / "adapter").exists()

    # 3. resume from the final-step checkpoint runs no step; killed while the adapter directory is swapped in
    cut = _cli(*_train_args(tiny_model_dir, rows, run), "--resume", fault="atomic-dir-swap@1")
    assert cut.returncode == KILLED, cut.stderr[-2000:]
    assert not (run / "adapter").exists() and list(run.glob(".adapter.*"))  # a stale staging directory

    # 4. the last resume finishes: 4 steps, bit-identical adapter, stale temporaries cleaned
    end = _cli(*_train_args(tiny_model_dir, rows, run), "--resume")
    assert end.returncode == 0, end.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert not list(run.glob(".adapter.*"))
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_profile_and_select_killed_lose_nothing(monkeypatch, capsys, tiny_model_dir, rows, tmp_path):
    prof, sel = tmp_path / "prof", tmp_path / "prof" / "mine.json"
    args = ["--model", tiny_model_dir, "--data", rows, "--device", "cpu", "--batch-size", 4]
    code, _, err = run_cli(monkeypatch, capsys, "profile", *args, "--out", prof, "--max-examples", 10)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "select", prof, "--out", sel, "--k", 2)
    assert code == 0, err
    old = Profile.load(prof).fingerprint
    selection_bytes = sel.read_bytes()

    # profile --overwrite killed just before its new directory is swapped in: the old profile and the
    # selection kept beside it are untouched
    cut = _cli("profile", *args, "--out", prof, "--overwrite", fault="atomic-dir-swap")
    assert cut.returncode == KILLED, cut.stderr[-2000:]
    assert Profile.load(prof).fingerprint == old and sel.read_bytes() == selection_bytes
    assert list(tmp_path.glob(".prof.*"))

    # select --overwrite killed before its rename: the old selection stays, the temporary never loads
    cut = _cli("select", prof, "--out", sel, "--k", 3, "--overwrite", fault="atomic-rename")
    assert cut.returncode == KILLED, cut.stderr[-2000:]
    assert sel.read_bytes() == selection_bytes and list(prof.glob(".mine.json.*.tmp"))

    # the next run of each stage replaces only the profile's own files and cleans the leftovers
    code, _, err = run_cli(monkeypatch, capsys, "profile", *args, "--out", prof, "--overwrite")
    assert code == 0, err
    assert Profile.load(prof).fingerprint != old and sel.read_bytes() == selection_bytes
    assert not list(tmp_path.glob(".prof.*"))
    code, _, err = run_cli(monkeypatch, capsys, "select", prof, "--out", sel, "--k", 3, "--overwrite")
    assert code == 0, err
    assert Selection.load(sel).per_layer_k == {0: 3, 1: 3, 2: 3} and not list(prof.glob(".mine.json.*"))


# --- run-directory integrity (findings 1, 2, 5), in process ----------------------------------------------------


def _config(model_dir, data, out, **kw):
    values = dict(micro_batch_size=8, max_steps=2, save_steps=1, profile_subsample=0.5)
    return small_train_config(model_dir, data, out, **{**values, **kw})


class _Stop(Exception):
    pass


def _killed_run(model_dir, data, out, **kw):
    """A run interrupted after its first checkpoint (no adapter, no metrics)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Stop

    with pytest.raises(_Stop):
        train(_config(model_dir, data, out, **kw), callbacks=[Stop()])


def test_unfinished_run_is_not_reused_with_other_settings(tiny_model_dir, rows, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _killed_run(tiny_model_dir, rows, run, k="2")
    before = {p.name: p.read_bytes() for p in (run / "config.json", run / "selection.json")}
    import moe_sieve.training.run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda spec: pytest.fail("the model must not be loaded"))
    # without --resume an unfinished run is never continued silently, whatever the settings
    for kw in ({"k": "2"}, {"k": "4"}, {"seed": 1}, {"strategy": "random"}, {"rank_by": "mass"}):
        with pytest.raises(ArtifactExistsError, match="unfinished run.*--resume.*--overwrite"):
            train(_config(tiny_model_dir, rows, run, **kw))
    # --resume with other selection settings is refused too, naming what changed
    with pytest.raises(ValueError, match=r"k: '2' -> '4'"):
        train(_config(tiny_model_dir, rows, run, k="4"), resume=True)
    assert {p.name: p.read_bytes() for p in (run / "config.json", run / "selection.json")} == before
    record = json.loads((run / "config.json").read_text())
    assert record["train"]["k"] == "2" and len(record["selection_fingerprint"]) == 16
    # a changed --selection file (same path, other content) counts as a change
    monkeypatch.undo()
    sel = tmp_path / "sel.json"
    Selection({0: [1], 1: [2], 2: [3]}, num_experts=8, strategy="topk").save(sel)
    _killed_run(tiny_model_dir, rows, tmp_path / "given", selection=str(sel))
    Selection({0: [4], 1: [2], 2: [3]}, num_experts=8, strategy="topk").save(sel, overwrite=True)
    with pytest.raises(ValueError, match="changed since the run started"):
        train(_config(tiny_model_dir, rows, tmp_path / "given", selection=str(sel)), resume=True)


def test_overwrite_keeps_the_old_run_until_the_new_one_exists(tiny_model_dir, rows, tmp_path):
    run = tmp_path / "run"
    train(_config(tiny_model_dir, rows, run, max_steps=1))
    finished = {p: p.read_bytes() for p in [run / "metrics.json", run / "adapter" / "adapter.safetensors"]}
    # bad inputs of every kind fail before anything of the old run is touched
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "x"}\n')
    for kw, error in (
        ({"data": str(tmp_path / "typo.jsonl")}, ValueError),
        ({"data": str(bad_data)}, ValueError),
        ({"model": str(tmp_path / "no-model")}, FileNotFoundError),
        ({"k": "99"}, ValueError),
        ({"selection": str(tmp_path / "none.json")}, FileNotFoundError),
    ):
        given = {"model": tiny_model_dir, "data": rows, **kw}
        model_dir, data = given.pop("model"), given.pop("data")
        with pytest.raises(error):
            train(_config(model_dir, data, run, max_steps=1, **given), overwrite=True)
        assert {p: p.read_bytes() for p in finished} == finished, kw
        assert not list(tmp_path.glob(".run.*")), kw  # no staging directory left behind
    # the old run's own selection and profile can be reused by the run that replaces it
    for kw in ({"profile": str(run / "profile")}, {"selection": str(run / "selection.json")}):
        result = train(_config(tiny_model_dir, rows, run, max_steps=2, **kw), overwrite=True)
        assert result.metrics["steps"] == 2 and json.loads((run / "metrics.json").read_text())["steps"] == 2
        assert Selection.load(run / "selection.json").per_layer_k == {0: 2, 1: 2, 2: 2}
    assert not list(tmp_path.glob(".run.*"))


def test_run_directory_lock(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with run_lock(run):
        with pytest.raises(RunLockedError, match="in use by another moe-sieve process"):
            train(_config(tiny_model_dir, rows, run))
        code, _, err = run_cli(monkeypatch, capsys, "train", "--model", tiny_model_dir, "--data", rows, "--out", run)
        assert code == 2 and err.startswith("Error:") and "in use" in err
    with run_lock(run):  # released after the block
        pass
    # across processes: a second `train` into the same --out fails at once
    with run_lock(run):
        proc = _cli("train", "--model", tiny_model_dir, "--data", rows, "--out", run, "--device", "cpu")
    assert proc.returncode == 2 and "in use by another moe-sieve process" in proc.stderr


def test_incomplete_checkpoints_are_skipped_and_cleaned(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        path = ckpts / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "adapter.safetensors").write_bytes(b"x" * step)
        if complete:
            atomic_write_json(path / COMPLETE_MARKER, {"step": step, "files": {"adapter.safetensors": step}})
    (ckpts / "checkpoint-4" / "adapter.safetensors").write_bytes(b"short")  # a file the marker lists, truncated
    assert last_complete_checkpoint(ckpts) == ckpts / "checkpoint-2"
    assert "checkpoint-6 is incomplete" in capsys.readouterr().err
    assert last_complete_checkpoint(ckpts, clean=True) == ckpts / "checkpoint-2"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]


# --- files: umask, stale temporaries -------------------------------------------------------------------------


def test_artifacts_honour_the_umask_and_stale_temporaries_are_cleaned(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".a.json.{pid}.xyz.tmp", tmp_path / f".d.{pid}.abc"]
    stale[0].write_text("partial")
    stale[1].mkdir()
    live = tmp_path / f".a.json.{os.getpid()}.live.tmp"
    live.write_text("in progress")
    clean_stale_temps(tmp_path / "a.json")
    atomic_write_json(tmp_path / "d.json", {})
    with atomic_dir(tmp_path / "d", overwrite=True):
        pass
    assert not stale[0].exists() and not stale[1].exists() and live.exists()


# --- finding 8: a huge row is not tokenized whole ----------------------------------------------------------------


def _reference_sft(example, tokenizer, max_length):
    """The definition: tokenize everything (prompt with special tokens, completion without), drop a doubled
    BOS, add EOS, then cut to max_length."""
    ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    flags = [False] * len(ids)
    if example.completion:
        comp = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        ids, flags = ids + comp, flags + [True] * len(comp)
    bos = tokenizer.bos_token_id
    if (
        tokenizer.bos_token
        and example.prompt.startswith(tokenizer.bos_token)
        and len(ids) > 1
        and ids[0] == ids[1] == bos
    ):
        ids, flags = ids[1:], flags[1:]
    eos = tokenizer.eos_token_id
    if eos is not None and not (flags and flags[-1] and ids[-1] == eos):
        ids, flags = [*ids, eos], [*flags, True]
    truncated = len(ids) > max_length
    ids, flags = ids[:max_length], flags[:max_length]
    if not any(flags):
        return None
    return ids, [t if f else -100 for t, f in zip(ids, flags, strict=True)], truncated


def _tokenizers(byte_tokenizer):
    from transformers import AutoTokenizer

    from moe_sieve.demo import default_model_path

    return {"byte": byte_tokenizer, "bpe": AutoTokenizer.from_pretrained(default_model_path())}


def test_truncating_tokenization_equals_full_tokenization(byte_tokenizer):
    from moe_sieve.data.sft import tokenize_for_sft
    from moe_sieve.data.tasks import Example

    rng = random.Random(0)
    words = ["the", "cat", "12345", "sat", "ünïcode", "\n", "on", "mat.", "x" * 40, "  ", "Sum:", "7+8=15"]
    examples = [Example("What is 2+2?", " 4", "s:1"), Example("", "plain text only", "s:2")]
    for i in range(40):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
        completion = " ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))
        examples.append(Example(prompt, completion, f"r:{i}"))
    examples.append(Example("q" * 5000, "a" * 5000, "nospace"))  # no whitespace to cut at
    for name, tokenizer in _tokenizers(byte_tokenizer).items():
        for example in examples:
            for max_length in (1, 3, 16, 64, 300, 5000):
                got = tokenize_for_sft(example, tokenizer, max_length)
                want = _reference_sft(example, tokenizer, max_length)
                if want is None:
                    assert got is None, (name, example.source, max_length)
                else:
                    assert (got.input_ids, got.labels, got.truncated) == want, (name, example.source, max_length)


def test_a_huge_row_is_not_tokenized_whole(byte_tokenizer):
    import time

    from moe_sieve.data.calibration import tokenize_example
    from moe_sieve.data.sft import tokenize_for_sft
    from moe_sieve.data.tasks import Example

    text = ("lorem ipsum dolor sit amet 12345 " * 1_600_000)[:50_000_000]  # one 50 MB row
    huge, head = Example("Q:", text, "big:1"), Example("Q:", text[:20_000], "big:1")
    for tokenizer in _tokenizers(byte_tokenizer).values():
        start = time.perf_counter()
        item = tokenize_for_sft(huge, tokenizer, 16)
        profiled = tokenize_example(huge, tokenizer, 16)
        assert time.perf_counter() - start < 2.0
        assert (item.input_ids, item.labels, item.truncated) == _reference_sft(head, tokenizer, 16)
        full = tokenizer("Q:")["input_ids"] + tokenizer(text[:20_000], add_special_tokens=False)["input_ids"]
        assert profiled.input_ids == full[:16] and profiled.cut


# --- finding 10: checks happen before the expensive work -----------------------------------------------------


def test_checks_come_before_profiling_and_model_loading(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    import moe_sieve.profiling as profiling
    import moe_sieve.training.run as run_module

    monkeypatch.setattr(run_module, "profile_examples", lambda *a, **k: pytest.fail("profiled before checking --k"))
    with pytest.raises(ValueError, match="--k '99'"):
        train(_config(tiny_model_dir, rows, tmp_path / "k", k="99"))
    assert not (tmp_path / "k" / "config.json").exists()  # a failed check leaves no run record behind
    monkeypatch.setattr(run_module, "load_model", lambda spec: pytest.fail("model loaded before checking the data"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train(_config(tiny_model_dir, bad, tmp_path / "data"))
    monkeypatch.setattr(profiling, "run_profile", lambda *a, **k: pytest.fail("profiled before checking --out"))
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(
        monkeypatch, capsys, "profile", "--model", tiny_model_dir, "--data", rows, "--out", tmp_path / "file" / "p"
    )
    assert code == 2 and "is not a directory" in err


# --- hardening round 3 (issue 18) --------------------------------------------------------------------------------


def test_a_planted_link_never_redirects_a_write_out_of_the_run(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    """The audit's repro: a finished run whose .lock is a symbolic link to a file outside it. A refused `train`,
    `--overwrite` and `--resume` each stop with one error naming the link; the outside file is unchanged."""
    run, outside = tmp_path / "run", tmp_path / "outside.txt"
    train(_config(tiny_model_dir, rows, run, max_steps=1, monitor_every=0))
    outside.write_text("precious\n")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(outside)
    args = ["train", "--model", tiny_model_dir, "--data", rows, "--out", run, "--max-steps", 1, "--device", "cpu"]
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, _, err = run_cli(monkeypatch, capsys, *args, *extra)
        assert code == 2 and ".lock is a symbolic link" in err and "Traceback" not in err, (extra, err)
        assert outside.read_text() == "precious\n", extra
    # a hard link to the outside file, or a file that is no pid file, is refused the same way (never truncated)
    (run / ".lock").unlink()
    os.link(outside, run / ".lock")
    with pytest.raises(UnsafePathError, match="hard links"):
        train(_config(tiny_model_dir, rows, run, max_steps=1))
    (run / ".lock").unlink()
    (run / ".lock").write_text("notes of the user\n")
    with pytest.raises(UnsafePathError, match="not a moe-sieve lock file"):
        train(_config(tiny_model_dir, rows, run, max_steps=1))
    assert (run / ".lock").read_text() == "notes of the user\n" and outside.read_text() == "precious\n"
    # a sweep worker's log is appended to, never through a link
    from moe_sieve.sweep.executors import WORKER_LOG, run_worker

    (run / WORKER_LOG).symlink_to(outside)
    with pytest.raises(UnsafePathError, match="worker.log is a symbolic link"):
        run_worker(str(run))
    assert outside.read_text() == "precious\n"


def test_checkpoints_are_written_fresh_never_through_a_planted_link(tiny_model_dir, rows, tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    _killed_run(tiny_model_dir, rows, run, monitor_every=0)  # stopped after checkpoint-1
    (run / "checkpoints" / "checkpoint-2").symlink_to(outside, target_is_directory=True)
    train(_config(tiny_model_dir, rows, run, monitor_every=0), resume=True)  # saves checkpoint-2
    assert not list(outside.iterdir())  # nothing written through the link
    assert not (run / "checkpoints" / "checkpoint-2").is_symlink()
    assert checkpoint_complete(run / "checkpoints" / "checkpoint-2")
    _killed_run(tiny_model_dir, rows, tmp_path / "linked", monitor_every=0)
    checkpoints = tmp_path / "linked" / "checkpoints"
    checkpoints.rename(tmp_path / "elsewhere")
    checkpoints.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="checkpoints is a symbolic link"):
        train(_config(tiny_model_dir, rows, tmp_path / "linked", monitor_every=0), resume=True)
    checkpoints.unlink()
    (tmp_path / "elsewhere").rename(checkpoints)
    (tmp_path / "linked" / "tensorboard").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="tensorboard is a symbolic link"):
        train(_config(tiny_model_dir, rows, tmp_path / "linked", monitor_every=0), resume=True)
    assert not list(outside.iterdir())


def test_a_failed_lock_holder_leaves_no_trace(tmp_path):
    created = tmp_path / "a" / "b"
    with pytest.raises(_Stop), run_lock(created):
        raise _Stop
    assert not (tmp_path / "a").exists()  # every directory the lock created is gone again
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(_Stop), run_lock(kept):
        raise _Stop
    assert kept.is_dir() and not list(kept.iterdir())
    with run_lock(kept):
        pass
    assert (kept / ".lock").read_text() == f"{os.getpid()}\n"  # a finished holder keeps its lock file
    with pytest.raises(_Stop), run_lock(kept):
        (kept / "config.json").write_text("{}")
        raise _Stop
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "config.json"]


def test_resume_of_a_finished_run_keeps_its_metrics_and_segments_add_up(tiny_model_dir, rows, tmp_path):
    """Interrupted after step 3 of 4 (the checkpoint of step 2 survives), resumed: the metrics count steps, time
    and tokens of both segments. A --resume of the finished run changes nothing; a longer schedule adds one."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    run, ref = tmp_path / "run", tmp_path / "ref"
    config = _config(tiny_model_dir, rows, run, max_steps=4, save_steps=2, monitor_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[CtrlC()])
    metrics = train(config, resume=True).metrics
    uninterrupted = train(_config(tiny_model_dir, rows, ref, max_steps=4, save_steps=2, monitor_every=0)).metrics
    segments = metrics["segments"]
    assert [s["steps"] for s in segments] == [2, 2] and metrics["steps"] == 4
    assert metrics["tokens_seen"] == sum(s["tokens_seen"] for s in segments) == uninterrupted["tokens_seen"]
    assert metrics["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in segments), abs=2e-3)
    assert metrics["tokens_per_s"] == pytest.approx(metrics["tokens_seen"] / metrics["wall_time_s"], rel=1e-3)
    assert uninterrupted["segments"] == [{k: uninterrupted[k] for k in ("steps", "wall_time_s", "tokens_seen")}]

    before = (run / "metrics.json").read_bytes()
    again = train(config, resume=True)
    assert again.already_finished and again.metrics == json.loads(before)
    assert (run / "metrics.json").read_bytes() == before  # not rewritten
    longer = train(_config(tiny_model_dir, rows, run, max_steps=6, save_steps=2, monitor_every=0), resume=True)
    assert [s["steps"] for s in longer.metrics["segments"]] == [2, 2, 2] and longer.metrics["steps"] == 6


def test_ctrl_c_in_train_prints_how_to_continue(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    """Exit 130 with one line: --resume once a checkpoint exists, --overwrite before (and the plain rerun and
    --resume of such a run say --overwrite at once)."""
    from transformers import TrainerCallback

    import moe_sieve.training as training

    real_train = training.train

    def interrupted_at(event):
        def ctrl_c(self, *args, **kwargs):
            raise KeyboardInterrupt

        callback = type("CtrlC", (TrainerCallback,), {event: ctrl_c})()
        return lambda config, **kw: real_train(config, callbacks=[callback], **kw)

    args = ["train", "--model", tiny_model_dir, "--data", rows, "--device", "cpu", "--max-steps", 2]
    args += ["--save-steps", 1, "--batch-size", 8, "--micro-batch-size", 8, "--monitor-every", 0]
    for event, run, hint in (
        ("on_save", tmp_path / "saved", f"--resume continues {tmp_path / 'saved'} from checkpoint-1"),
        ("on_train_begin", tmp_path / "early", "no complete checkpoint yet, so there is nothing to resume"),
    ):
        monkeypatch.setattr(training, "train", interrupted_at(event))
        code, _, err = run_cli(monkeypatch, capsys, *args, "--out", run)
        errors = [line for line in err.splitlines() if "Error:" in line]
        assert code == 130 and len(errors) == 1 and "interrupted;" in errors[0] and hint in errors[0], err[-2000:]
        monkeypatch.setattr(training, "train", real_train)
    for extra in ([], ["--resume"]):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "early", *extra)
        assert code == 2 and "--overwrite to start it again" in err and "pass --resume" not in err, err[-2000:]


def test_a_damaged_optimizer_state_names_the_checkpoint(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(_config(tiny_model_dir, rows, run, max_steps=2, save_steps=1, monitor_every=0))
    optimizer = run / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size: the completeness marker still matches
    args = ["train", "--model", tiny_model_dir, "--data", rows, "--out", run, "--device", "cpu", "--max-steps", 3]
    args += ["--save-steps", 1, "--batch-size", 8, "--micro-batch-size", 8, "--monitor-every", 0, "--resume"]
    args += ["--r", 4, "--alpha", 8, "--warmup", 0, "--logging-steps", 1, "--profile-subsample", 0.5]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    errors = [line for line in err.splitlines() if "Error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "checkpoint-2: its optimizer/scheduler state does not load" in errors[0]
    assert "continue from checkpoint-1" in errors[0]


def test_safetensors_artifacts_get_the_umask_permissions(tiny_model_dir, rows, tmp_path):
    """Profile, adapter, checkpoints, routing trace and every export: 0644 under umask 022 (safetensors' own
    writer creates 0600), like the JSON files beside them."""
    from transformers import AutoModelForCausalLM

    from moe_sieve._io import atomic_dir
    from moe_sieve.adapters import export_peft_adapter, load_sieve_adapter, merge_sieve_lora
    from moe_sieve.adapters.serving import export_serving_adapter

    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(_config(tiny_model_dir, rows, run, max_steps=2, save_steps=1, monitor_every=1))
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        load_sieve_adapter(model, run / "adapter")
        export_peft_adapter(model, tmp_path / "peft")
        export_serving_adapter(model, tmp_path / "vllm", engine="vllm")
        with atomic_dir(tmp_path / "merged") as tmp:
            merge_sieve_lora(model).save_pretrained(tmp)
    finally:
        os.umask(old)
    files = sorted(tmp_path.rglob("*.safetensors"))
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    expected = {"run/profile/profile.safetensors", "run/adapter/adapter.safetensors", "run/routing_trace.safetensors"}
    expected |= {"run/checkpoints/checkpoint-2/adapter.safetensors", "merged/model.safetensors"}
    assert expected <= names and any(n.startswith("peft/") for n in names) and any(n.startswith("vllm/") for n in names)
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        n: oct(0o644) for n in names
    }
    assert oct((run / "metrics.json").stat().st_mode & 0o777) == oct(0o644)


def test_overwrite_keeps_files_it_does_not_own_and_its_own_inputs(tiny_model_dir, rows, tmp_path):
    """A sweep's run.json and worker.log (earlier attempts' logs included) and a --profile RUN/profile input
    survive `train --overwrite`; the new run's routing trace is written into the new run."""
    run = tmp_path / "run"
    train(_config(tiny_model_dir, rows, run, max_steps=1, monitor_every=0))
    (run / "run.json").write_text('{"run_id": "r"}\n')
    (run / "worker.log").write_text("attempt 1\n")
    old_profile = Profile.load(run / "profile").fingerprint
    result = train(_config(tiny_model_dir, rows, run, max_steps=2, profile=str(run / "profile")), overwrite=True)
    assert result.metrics["steps"] == 2
    assert (run / "run.json").read_text() == '{"run_id": "r"}\n' and (run / "worker.log").read_text() == "attempt 1\n"
    record = json.loads((run / "config.json").read_text())
    assert Profile.load(record["train"]["profile"]).fingerprint == old_profile  # the input config.json names
    assert (run / "routing_trace.safetensors").exists()  # was written into the old run and lost with it
    assert not list(tmp_path.glob(".run.*"))


def test_rows_with_an_empty_text_are_left_out_and_counted(byte_tokenizer, tmp_path):
    from moe_sieve.data.sft import build_sft_dataset
    from moe_sieve.data.tasks import Example

    examples = [Example("", "some text", "d.jsonl:1"), Example("", "", "d.jsonl:2"), Example("Q:", " ", "d.jsonl:3")]
    dataset, report = build_sft_dataset(examples, byte_tokenizer, 64)
    assert (len(dataset), report.kept, report.empty, report.empty_sources) == (1, 1, 2, ["d.jsonl:2", "d.jsonl:3"])
    assert "2 left out with an empty text (e.g. d.jsonl:2)" in report.summary()
    with pytest.raises(ValueError, match="all 2 examples have an empty text"):
        build_sft_dataset(examples[1:], byte_tokenizer, 64)


def test_inputs_made_on_another_model_warn_with_both_fingerprints(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    from moe_sieve.arch import config_fingerprint
    from moe_sieve.modeling import ModelSpec, load_model

    ours = config_fingerprint(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")).config)
    selection = Selection({0: [1], 1: [2], 2: [3]}, num_experts=8, strategy="topk")
    selection.source = {"model_config_fingerprint": "0123456789abcdef"}
    selection.save(tmp_path / "sel.json")
    args = ["train", "--model", tiny_model_dir, "--data", rows, "--device", "cpu", "--max-steps", 1]
    args += ["--batch-size", 8, "--micro-batch-size", 8, "--monitor-every", 0]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "run", "--selection", tmp_path / "sel.json")
    warnings = [line for line in err.splitlines() if line.startswith("Warning:")]
    assert code == 0 and len(warnings) == 1, err[-2000:]
    assert "sel.json" in warnings[0] and "0123456789abcdef" in warnings[0] and ours in warnings[0]
