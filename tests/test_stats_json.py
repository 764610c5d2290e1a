"""``stats --json`` is the library's ``profile_stats``: one subsample-stability record (with its sample size),
shared with the profile-set rows."""

import json
import math

from moe_sieve.profiling import Profile
from moe_sieve.profiling.profile_set import profile_stats, set_stats

from .conftest import run_cli


def test_stats_json_is_the_library_report(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from moe_sieve.tiny import write_demo_corpus

    calib = write_demo_corpus(tmp_path / "calib.jsonl", n=24)
    prof_dir = tmp_path / "prof"
    args = ["profile", "--model", tiny_model_dir, "--data", calib, "--batch-size", 4, "--device", "cpu"]
    assert run_cli(monkeypatch, capsys, *args, "--out", prof_dir)[0] == 0
    stats = ["stats", prof_dir, "--json", "--stability-trials", 7, "--stability-fraction", 0.3, "--seed", 3]
    code, out, err = run_cli(monkeypatch, capsys, *stats)
    assert code == 0, err
    cli = json.loads(out)

    prof = Profile.load(prof_dir)
    library = profile_stats(prof, "25%", 0.3, 7, 3, path=prof_dir)
    assert cli == json.loads(json.dumps(library))
    stability = cli["subsample_stability"]
    sample_size = max(1, math.floor(0.3 * prof.num_examples + 0.5))  # 0.3 * 24 = 7.2 -> 7 examples per draw
    assert stability["sample_size"] == sample_size == 7
    assert (stability["fraction"], stability["trials"], stability["seed"]) == (0.3, 7, 3)
    row = set_stats({"calib": prof}, "25%", 0.3, 7, 3)["datasets"][0]
    assert row["subsample_stability"] == stability

    code, out, err = run_cli(monkeypatch, capsys, "stats", prof_dir, "--json", "--stability-trials", 0)
    assert code == 0 and "subsample_stability" not in json.loads(out), err
