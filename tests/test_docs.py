"""Every shell and Python block of README.md and docs/*.md runs in a test or says what it needs.

The convention (docs/contributing.md, "Code blocks in the docs are run or marked"): directly above each block stands
``<!-- tested: tests/FILE.py::TEST -->`` (or ``.ci/run``) or ``<!-- needs: VALUE, ...; why -->``. Blocks marked
``tests/test_docs.py::test_doc_blocks_run`` run here, a page's blocks in order in one directory, on the embedded
model with one torch thread; the other ``tested:`` blocks run in the test they name. Every ``moe-sieve`` line of
every block, marked or not, must name a real command and only options it has.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_LANGUAGES = {"bash", "sh", "shell", "console", "python", "py"}
NEEDS = {
    "gpu": "a CUDA GPU (or several)",
    "hub": "models or datasets from the Hugging Face hub",
    "download": "files downloaded from elsewhere",
    "pypi": "installs packages",
    "long": "a measurement or a full run: minutes to hours on the CPU box",
    "slurm": "a SLURM cluster",
    "axolotl": "axolotl, not installable next to moe-sieve's pins",
    "issue-19": "an extension point landing with issue 19's refactor",
}
HERE = "tests/test_docs.py::test_doc_blocks_run"
MARKER = re.compile(r"^<!-- (tested|needs): (.*?) -->$")
# What a page's run must print: the figures its text states.
EXPECTED_OUTPUT = {
    "README.md": ["Sieve LoRA (r=32, alpha=64, experts=selected)", "mean layer CV"],
    "docs/recipe.md": ["routed (tokens x top-k)", "counted tokens", "Top-k Jaccard", "OlmoeForCausalLM 16 2"],
    "docs/adapters.md": ["311.5M", "85.0M", "merged checkpoint written", "PEFT adapter written", "Routed-PEFT R"],
    "docs/training.md": ["done: 2 steps"],
    "docs/evaluation.md": ["gsm8k: accuracy", "hellaswag: accuracy", "spider: accuracy", "facts: accuracy"],
    "docs/contributing.md": ["{0: [1, 3], 1: [0, 2]}", "capitals: accuracy 0.00 on 2 rows", "'merged', 'npz')"],
}
# Of those, the figures the page's text states: the run must reproduce them.
STATED = {"docs/adapters.md": ["311.5M", "85.0M"]}


@dataclass
class Block:
    doc: str
    line: int
    language: str
    code: str
    kind: str | None  # "tested", "needs" or None
    value: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} ({self.language or 'no language'})"

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.value.split(",")] if self.kind == "tested" else []

    @property
    def needs(self) -> list[str]:
        return [v.strip() for v in self.value.split(";", 1)[0].split(",")] if self.kind == "needs" else []


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    doc = str(path.relative_to(ROOT))
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        language, start = lines[i][3:].strip(), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{doc}:{i + 1}: unclosed code block"
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        match = MARKER.match(previous)
        kind, value = (match.group(1), match.group(2)) if match else (None, "")
        blocks.append(Block(doc, start + 1, language, "\n".join(lines[start + 1 : end]) + "\n", kind, value))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in _blocks(path)]


def test_the_docs_have_blocks_of_every_kind():
    assert len(DOCS) > 10 and {b.kind for b in ALL_BLOCKS} >= {"tested", "needs"}
    assert any(HERE in b.targets for b in ALL_BLOCKS)


def test_every_block_names_its_language():
    assert [str(b) for b in ALL_BLOCKS if not b.language] == []


def test_every_code_block_is_tested_or_marked():
    unmarked = [str(b) for b in ALL_BLOCKS if b.language in CODE_LANGUAGES and b.kind is None]
    assert unmarked == [], "add <!-- tested: tests/FILE.py::TEST --> or <!-- needs: gpu, hub; why --> above them"


def test_needs_markers_use_the_known_values():
    unknown = [(str(b), v) for b in ALL_BLOCKS for v in b.needs if v not in NEEDS]
    assert unknown == [], f"known values: {', '.join(NEEDS)}"


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_tested_markers_name_tests_that_exist():
    missing = []
    for block in ALL_BLOCKS:
        for target in block.targets:
            if target == ".ci/run":
                continue
            file, _, name = target.partition("::")
            path = ROOT / file
            if not (file.startswith("tests/") and path.is_file() and name in _test_names(path)):
                missing.append((str(block), target))
    assert missing == []


def _commands(code: str) -> list[list[str]]:
    """A block's shell lines as argument lists: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [args for line in joined.splitlines() if (args := shlex.split(line, comments=True))]


def test_ci_runs_the_documented_test_commands():
    ci = re.sub(r"\s-q\b", "", (ROOT / ".ci" / "run").read_text())
    blocks = [b for b in ALL_BLOCKS if ".ci/run" in b.targets]
    assert blocks
    for block in blocks:
        checks = [line for line in block.code.splitlines() if "pytest" in line or "ruff" in line]
        assert checks, str(block)
        for line in checks:
            for part in line.split("#", 1)[0].split("&&"):
                assert re.sub(r"\s-q\b", "", " " + part.strip()).strip() in ci, (str(block), part)


def _cli_calls() -> list[tuple[Block, list[str]]]:
    """Every ``moe-sieve ...`` / ``python -m moe_sieve.cli ...`` call in a shell block (also under launchers)."""
    calls = []
    for block in ALL_BLOCKS:
        if block.language not in ("bash", "sh", "shell", "console"):
            continue
        for args in _commands(block.code):
            for i, arg in enumerate(args):
                if arg == "moe-sieve" or (arg == "moe_sieve.cli" and i and args[i - 1] == "-m"):
                    calls.append((block, args[i + 1 :]))
                    break
    return calls


def test_documented_commands_and_options_exist():
    """A renamed command or option fails here, in blocks that run and in blocks marked as needing a GPU alike."""
    import typer

    from moe_sieve.cli import app

    group = typer.main.get_command(app)
    calls = _cli_calls()
    assert len(calls) > 50
    wrong = []
    for block, args in calls:
        if not args:
            continue
        command = getattr(group, "commands", {}).get(args[0])
        if command is None:
            wrong.append((str(block), args[0]))
            continue
        known = {"--help"} | {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for arg in args[1:]:
            name = arg.split("=", 1)[0]
            if name.startswith("-") and not re.fullmatch(r"-[\d.]+", name) and name not in known:
                wrong.append((str(block), f"{args[0]} {name}"))
    assert wrong == []


def test_lm_eval_commands_pass_add_bos_token():
    """Without ``add_bos_token=True`` lm-eval's HFLM scores other inputs than ``eval`` (issue 19: GSM8K generations
    matched on 12 of 46 rows, HellaSwag log-likelihoods differed by up to 3.77 nats; with it 46/46 and 2.7e-5)."""
    found = []
    for path in DOCS:
        for value in re.findall(r"--model_args[ =]+([^`\s|]+)", path.read_text(encoding="utf-8")):
            found.append((path.name, value))
    assert len(found) >= 4
    assert [f for f in found if "add_bos_token=True" not in f[1]] == []


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    anchors = {}
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        anchors[path] = {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors.get(dest, set())):
                broken.append((path.name, target))
    assert broken == []


# --- running the blocks marked for this file ----------------------------------------------------------------


def _run_cli(monkeypatch, capsys, args: list[str]) -> str:
    from moe_sieve.cli import main

    monkeypatch.setattr(sys, "argv", ["moe-sieve", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    assert code == 0, (args, captured.err[-2000:])
    return captured.out


def _run_shell(block: Block, monkeypatch, capsys) -> str:
    out = []
    for args in _commands(block.code):
        if args[0] == "moe-sieve":
            out.append(_run_cli(monkeypatch, capsys, args[1:]))
        elif args[:3] == ["python", "-m", "moe_sieve.cli"]:
            out.append(_run_cli(monkeypatch, capsys, args[3:]))
        elif args[:3] == ["python", "-m", "moe_sieve.minitasks.generate"]:
            from moe_sieve.minitasks.generate import main as generate

            assert generate(args[3:]) == 0
            out.append(capsys.readouterr().out)
        else:
            pytest.fail(f"{block}: a block run here may only call moe-sieve or python -m moe_sieve...: {args}")
    return "".join(out)


def _registries() -> list[dict]:
    """The global registries a doc block may extend (restored after each page)."""
    from moe_sieve import selection
    from moe_sieve.adapters import export
    from moe_sieve.arch import registry
    from moe_sieve.data import tasks
    from moe_sieve.evaluation import registry as eval_registry

    found = [registry.ARCHS, tasks.TASKS, eval_registry.EVAL_TASKS, export._FORMATS]
    strategies = getattr(selection, "STRATEGIES", None)
    if isinstance(strategies, dict):
        found.append(strategies)
    return found


PAGES_RUN_HERE = sorted({b.doc for b in ALL_BLOCKS if HERE in b.targets})


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("doc", PAGES_RUN_HERE)
def test_doc_blocks_run(doc, tmp_path, monkeypatch, capsys):
    import torch

    blocks = [b for b in ALL_BLOCKS if b.doc == doc and HERE in b.targets]
    for shared in ("tests/fixtures", "docs/configs"):  # the checkout's files the blocks name, as from its root
        (tmp_path / shared).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / shared).symlink_to(ROOT / shared)
    monkeypatch.chdir(tmp_path)
    for name, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = [(registry, dict(registry)) for registry in _registries()]
    output = []
    try:
        for block in blocks:
            if block.language in ("python", "py"):
                exec(compile(block.code, f"{block.doc}:{block.line}", "exec"), {"__name__": "docs"})
                output.append(capsys.readouterr().out)
            else:
                output.append(_run_shell(block, monkeypatch, capsys))
    finally:
        torch.set_num_threads(threads)
        for registry, content in saved:
            registry.clear()
            registry.update(content)
    printed = "".join(output)
    missing = [figure for figure in EXPECTED_OUTPUT.get(doc, []) if figure not in printed]
    assert missing == [], printed[-3000:]
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert [figure for figure in STATED.get(doc, []) if figure not in text] == []


def test_the_pages_with_expected_output_run_here():
    assert set(EXPECTED_OUTPUT) <= set(PAGES_RUN_HERE)
