"""Every Python block of docs/trl.md runs, except those marked ``<!-- needs: ... -->`` (GPU, Hub, axolotl)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")

DOC = Path(__file__).resolve().parent.parent / "docs" / "trl.md"
BLOCK = re.compile(r"(<!-- needs:[^>]*-->\n)?```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[bool, str]]:
    return [(marker is not None and marker != "", code) for marker, code in BLOCK.findall(DOC.read_text())]


def test_docs_mark_every_block_they_do_not_run():
    blocks = _blocks()
    assert len(blocks) == 3 and [skip for skip, _ in blocks] == [True, False, True]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_docs_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runnable = [code for skip, code in _blocks() if not skip]
    for code in runnable:
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_trl"})
    assert (tmp_path / "out" / "adapter" / "README.md").is_file()
