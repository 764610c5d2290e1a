"""A small recipe run reproduces the committed manifest: refactors keep every artifact byte for byte.

The manifest (tests/fixtures/golden_recipe.json) was written by ``scripts/golden_recipe.py`` on the code before
issue 19's refactor. A change that is meant to alter an artifact regenerates it in the same commit and says why:
``python scripts/golden_recipe.py /tmp/golden --manifest tests/fixtures/golden_recipe.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "tests" / "fixtures" / "golden_recipe.json"


def test_recipe_artifacts_match_the_golden_manifest(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import golden_recipe
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    got = golden_recipe.main([str(tmp_path / "recipe")])
    want = json.loads(MANIFEST.read_text())
    changed = sorted(name for name in want if got.get(name) != want[name])
    added = sorted(set(got) - set(want))
    assert not changed and not added, f"artifacts differ from {MANIFEST.name}: changed {changed}, new {added}"
