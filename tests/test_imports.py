"""The package's public seams, read from the source with ``ast`` (nothing is imported).

Rules, each a test below:

(a) **No private names across modules.** A module never imports a ``_name`` from another moe-sieve module,
    nor reads ``module._name`` off one it imported: a helper two modules need gets a public name in its one
    home. Importing a *private module* (``moe_sieve._io``, ``._version``, ``._peft_hook``) is fine: the leading
    underscore there keeps the module out of the user-facing API, and its public names are the package's
    internal API. Dunders (``__version__``) are public.
(b) **No import cycle at module level.** Imports inside functions are lazy and cannot deadlock an import, but a
    lazy import that closes a cycle (the imported module reaches the importer through module-level imports)
    hides a two-way dependency, so each one must be listed in ``LAZY_CYCLES`` with the reason laziness is the
    point. Imports under ``if TYPE_CHECKING:`` never run and are left out of (b). The edge of
    ``from pkg import name`` goes to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``);
    a submodule's implicit import of its parent package is not counted.
(c) **No upward import.** Every top-level unit (subpackage or module of ``moe_sieve``) sits on a layer of
    ``LAYERS``; a module imports only from its own unit or from units on strictly lower layers (siblings on
    one layer stay independent). This holds for lazy imports too: laziness changes when, not what, a module
    depends on.

Violations in files another branch is rewriting are listed in ``KNOWN_VIOLATIONS``; a listed violation that no
longer occurs fails the test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layer of each top-level unit, bottom (0) to top. Read upwards: each layer may use everything below it.
LAYERS: dict[str, int] = {
    # 0: files and versions
    "_io": 0,
    "_version": 0,
    # 1: model-family knowledge and pure statistics, no model loading
    "arch": 1,
    "routing_stats": 1,  # routing statistics of a profile
    "seed_stats": 1,  # multi-seed statistics of runs
    "tables": 1,  # rich tables for the terminal
    "cputhreads": 1,
    "tiny": 1,
    # 2: loading models, choosing experts, datasets, generated tasks
    "modeling": 2,
    "selection": 2,
    "data": 2,
    "minitasks": 2,
    # 3: routing profiles
    "profiling": 3,
    # 4: adapters (attach, save, load, export)
    "adapters": 4,
    # 5: what uses adapters: training and evaluation
    "training": 5,
    "evaluation": 5,
    # 6: the study report (reads run directories and training traces)
    "report": 6,
    # 7: sweeps and studies (run training/evaluation, write the report)
    "sweep": 7,
    # 8: the demo (runs a small study end to end)
    "demo": 8,
    # 9: the user-facing entry points: the CLI and the PEFT post-import hook
    "cli": 9,
    "_peft_hook": 9,  # registers the PEFT methods when peft is imported
    # 10: the package's public API (moe_sieve/__init__.py re-exports; nothing inside imports it)
    "moe_sieve": 10,
}

# Violations waiting for a fix elsewhere: (rule, importer, imported). Empty since issue 19 landed; keep it so.
KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()

# Lazy imports that close a cycle, each with why it must stay lazy: (importer, imported).
_PEFT_HOOK = (
    "PEFT registration runs from the import hook when peft is imported: config, routed and tuner import the type "
    "names from _registry, which imports them only inside register(), so `import moe_sieve` never imports peft"
)
LAZY_CYCLES: dict[tuple[str, str], str] = {
    ("moe_sieve.adapters.peft_method._registry", f"moe_sieve.adapters.peft_method.{name}"): _PEFT_HOOK
    for name in ("config", "routed", "tuner")
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    source: str  # the module named in the statement (``X`` of ``from X import name``)
    target: str  # dotted module the edge points at (``X.name`` when that is a module)
    name: str | None  # the imported name for ``from X import name`` (None for ``import X``)
    lazy: bool  # inside a function
    typing_only: bool  # under ``if TYPE_CHECKING:``
    line: int


@dataclass
class Package:
    modules: dict[str, Path]
    packages: set[str]  # modules that are packages (``__init__.py``)
    imports: list[Import]
    private_attrs: list[tuple[str, str, str, int]]  # (importer, module, attribute, line)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def scan(src: Path, root: str) -> Package:
    """Every import between modules of package ``root`` under ``src``."""
    modules: dict[str, Path] = {}
    packages: set[str] = set()
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        modules[".".join(parts)] = path
    imports: list[Import] = []
    private_attrs: list[tuple[str, str, str, int]] = []
    for module, path in modules.items():
        package = module if module in packages else module.rpartition(".")[0]
        bound: dict[str, str] = {}  # local name -> moe-sieve module it is bound to

        def visit(
            node: ast.AST,
            lazy: bool,
            typing_only: bool,
            module: str = module,
            package: str = package,
            bound: dict = bound,
        ) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                lazy = True
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, lazy, True)
                for child in node.orelse:
                    visit(child, lazy, typing_only)
                return
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source == root or source.startswith(root + "."):
                    for alias in node.names:
                        sub = f"{source}.{alias.name}"
                        target = sub if sub in modules else source
                        if sub in modules:
                            bound[alias.asname or alias.name] = sub
                        imports.append(Import(module, source, target, alias.name, lazy, typing_only, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + "."):
                        imports.append(Import(module, alias.name, alias.name, None, lazy, typing_only, node.lineno))
                        if alias.asname:
                            bound[alias.asname] = alias.name
            for child in ast.iter_child_nodes(node):
                visit(child, lazy, typing_only)

        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visit(tree, False, False)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _private(node.attr)
            ):
                private_attrs.append((module, bound[node.value.id], node.attr, node.lineno))
    return Package(modules, packages, imports, private_attrs)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def private_imports(pkg: Package) -> list[tuple[str, str, str]]:
    found = [
        ("private", imp.importer, f"{imp.source}.{imp.name}")
        for imp in pkg.imports
        if imp.name and _private(imp.name) and f"{imp.source}.{imp.name}" not in pkg.modules
    ]
    found += [("private", importer, f"{mod}.{attr}") for importer, mod, attr, _ in pkg.private_attrs]
    return sorted(set(found))


def _graph(pkg: Package, lazy: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in pkg.imports:
        if imp.typing_only or imp.lazy != lazy or imp.target == imp.importer:
            continue
        edges[imp.importer].add(imp.target)
    return edges


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def module_cycles(pkg: Package) -> list[list[str]]:
    """The strongly connected groups (two or more modules) of the module-level import graph."""
    edges = _graph(pkg, lazy=False)
    reach = {m: _reachable(edges, m) for m in pkg.modules}
    groups, done = [], set()
    for m in sorted(pkg.modules):
        if m in done or m not in reach[m]:
            continue
        group = sorted(n for n in reach[m] if m in reach[n])
        done.update(group)
        groups.append(group)
    return groups


def lazy_cycle_edges(pkg: Package) -> list[tuple[str, str]]:
    """Lazy imports whose target reaches the importer through module-level imports."""
    edges = _graph(pkg, lazy=False)
    return sorted(
        {(a, b) for a, targets in _graph(pkg, lazy=True).items() for b in targets if a in _reachable(edges, b) | {b}}
    )


def upward_imports(pkg: Package, layers: dict[str, int]) -> list[tuple[str, str, str]]:
    found = set()
    for imp in pkg.imports:
        mine, theirs = unit_of(imp.importer), unit_of(imp.target)
        if mine != theirs and layers[theirs] >= layers[mine]:
            found.add(("upward", imp.importer, imp.target))
    return sorted(found)


@pytest.fixture(scope="module")
def package() -> Package:
    return scan(SRC, "moe_sieve")


def _check(found: list[tuple[str, str, str]], rule: str) -> None:
    known = {v for v in KNOWN_VIOLATIONS if v[0] == rule}
    new = [v for v in found if v not in known]
    stale = sorted(known - set(found))
    assert not new, f"{rule} imports (see this file's docstring): " + "; ".join(f"{a} -> {b}" for _, a, b in new)
    assert not stale, f"fixed, remove from KNOWN_VIOLATIONS: {stale}"


def test_scan_sees_the_package(package):
    """Not vacuous: the walk finds the modules and the edges everybody knows are there."""
    assert {"moe_sieve", "moe_sieve.cli", "moe_sieve.arch.registry", "moe_sieve.report.render"} <= set(package.modules)
    edges = {(i.importer, i.target) for i in package.imports}
    assert ("moe_sieve.arch.layers", "moe_sieve.arch.registry") in edges
    assert ("moe_sieve.report", "moe_sieve.report.render") in edges
    assert any(i.lazy for i in package.imports) and any(not i.lazy for i in package.imports)


def test_every_unit_has_a_layer(package):
    missing = sorted({unit_of(m) for m in package.modules} - set(LAYERS))
    assert not missing, f"give these top-level modules a layer in LAYERS: {missing}"


def test_no_private_names_across_modules(package):
    _check(private_imports(package), "private")


def test_no_module_level_import_cycles(package):
    assert module_cycles(package) == []


def test_lazy_imports_closing_a_cycle_are_allowlisted(package):
    found = lazy_cycle_edges(package)
    assert sorted(set(LAZY_CYCLES) - set(found)) == [], "no longer a cycle: remove from LAZY_CYCLES"
    _check([("lazy-cycle", a, b) for a, b in found if (a, b) not in LAZY_CYCLES], "lazy-cycle")


def test_no_upward_imports(package):
    _check(upward_imports(package, LAYERS), "upward")


def test_checks_catch_planted_violations(tmp_path):
    """Each rule fires on a tiny package built to break it (and stays quiet on what it allows)."""
    files = {
        "pkg/__init__.py": "",
        "pkg/_io.py": "def write(): ...\n",
        "pkg/low.py": "from ._io import write\nfrom .high import thing\n",  # upward + cycle with high
        "pkg/high.py": (
            "from . import low, _io\nfrom .low import _helper\nthing = low._secret\ndef f():\n    from .mid import x\n"
        ),
        "pkg/mid.py": (
            "from .high import thing\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .low import y\n"
        ),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    pkg = scan(tmp_path, "pkg")
    assert private_imports(pkg) == [
        ("private", "pkg.high", "pkg.low._helper"),
        ("private", "pkg.high", "pkg.low._secret"),
    ]
    assert module_cycles(pkg) == [["pkg.high", "pkg.low"]]
    assert lazy_cycle_edges(pkg) == [("pkg.high", "pkg.mid")]
    layers = {"pkg": 4, "_io": 0, "low": 1, "mid": 2, "high": 3}
    assert upward_imports(pkg, layers) == [
        ("upward", "pkg.low", "pkg.high"),
        ("upward", "pkg.mid", "pkg.high"),
    ]
