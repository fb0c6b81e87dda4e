"""The package layering, enforced: every ``embedforge`` import is read from the source (AST), none is run.

Rules (docs/internals.md, "Layout and ownership"):

- a workflow (``convert``, ``distill``, ``compress``, ``export``) imports no other workflow;
- the core (every other module: ``embedforge/*.py``, ``modules/``, ``training/``, ``backbone``) imports no workflow;
- no two modules import each other, directly or through others, neither at import time nor through imports inside
  functions (imports under ``if TYPE_CHECKING:`` are annotations, never run, and form no cycle).

Imports inside functions count for the arrows: hiding an import in a function does not change who depends on whom.
Run ``python tests/test_layering.py`` for the whole report (package-level arrows, counts, cycles).
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "embedforge"
WORKFLOWS = ("convert", "distill", "compress", "export")


@dataclass(frozen=True)
class Edge:
    """One ``import`` of an embedforge module by another."""

    source: str
    target: str
    line: int
    at_import: bool
    """True when the import runs when ``source`` is imported (not inside a function, not under TYPE_CHECKING)."""
    type_only: bool = False
    """True for imports under ``if TYPE_CHECKING:`` (annotations only: never run, so they form no cycle)."""


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package at ``root``."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: dict[str, Path]) -> list[str]:
    """The embedforge modules an import statement names (``from pkg import submodule`` names the submodule)."""
    top = next(iter(known)).split(".")[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == top]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module.split(".")[0] != top:
        return []
    found = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
    return found if len(found) == len(node.names) else [*found, module]


def import_edges(root: Path = ROOT) -> list[Edge]:
    """Every import of one package module by another, with whether it runs at import time."""
    known = module_names(root)
    edges: list[Edge] = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, at_import: bool, type_only: bool) -> None:
            for child in ast.iter_child_nodes(node):
                runs = at_import
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    runs = False
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, package, known):
                        if target != name:
                            edges.append(Edge(name, target, child.lineno, at_import, type_only))
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), False, True)
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), at_import, type_only)
                    continue
                visit(child, runs, type_only)

        visit(ast.parse(path.read_text(), filename=str(path)), True, False)
    return edges


def layer(module: str) -> str:
    """The workflow a module belongs to, or ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WORKFLOWS else "core"


def forbidden(edges: list[Edge]) -> list[str]:
    """Arrows that break the layering, as ``source:line -> target (why)``."""
    bad = []
    for e in edges:
        src, dst = layer(e.source), layer(e.target)
        if dst == "core" or src == dst:
            continue
        why = "core imports a workflow" if src == "core" else "a workflow imports another workflow"
        bad.append(f"{e.source}:{e.line} -> {e.target} ({why})")
    return sorted(set(bad))


def cycles(edges: list[Edge], *, at_import_only: bool = True) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of two or more; Tarjan).

    ``at_import_only``: count only imports that run when the module is imported; otherwise imports inside functions
    count too. Imports under ``TYPE_CHECKING`` never count (they are annotations).
    """
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_only and (e.at_import or not at_import_only):
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


# ------------------------------------------------------------------------------------------ the rules


def test_no_workflow_imports_another_and_core_imports_no_workflow() -> None:
    bad = forbidden(import_edges())
    assert not bad, "imports that break the layering (move what is shared into the core, modules/ or training/):\n" \
        + "\n".join(bad)


def test_no_import_cycles_at_import_time() -> None:
    found = cycles(import_edges(), at_import_only=True)
    assert not found, f"modules that import each other at import time: {found}"


def test_no_import_cycles_through_function_imports() -> None:
    """Even deferred imports form no loop: every module can be read knowing only the ones below it."""
    found = cycles(import_edges(), at_import_only=False)
    assert not found, f"modules that import each other (counting imports inside functions): {found}"


def test_every_workflow_and_the_training_package_are_scanned() -> None:
    names = module_names(ROOT)
    for package in (*WORKFLOWS, "training", "modules"):
        assert f"embedforge.{package}" in names, f"embedforge/{package}/ not found"
    edges = import_edges()
    assert any(e.target.startswith("embedforge.training") and layer(e.source) != "core" for e in edges)
    assert any(not e.at_import for e in edges)  # imports inside functions are read too


def lineage_writers(root: Path = ROOT) -> list[str]:
    """Places outside ``model.py`` that build or write ``embedforge.json`` themselves, as ``module:line``."""
    found = []
    for name, path in module_names(root).items():
        if name == f"{root.name}.model":
            continue
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = (ast.get_source_segment(src, func.value) or "") if isinstance(func, ast.Attribute) else ""
            if called == "make_lineage" or (
                    called in ("write_text", "write_bytes") and ("LINEAGE_FILE" in target or "embedforge.json" in target)):
                found.append(f"{name}:{node.lineno}")
    return found


def test_only_model_py_writes_the_lineage_file() -> None:
    """Every stage writes ``embedforge.json`` through ``model.save_model`` / ``model.write_lineage``."""
    assert lineage_writers() == []


# ------------------------------------------------------------------------------------------ the checker itself


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "embedforge" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "embedforge"


def test_checker_finds_forbidden_arrows_hidden_in_functions(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "recipe.py": "def run():\n    from embedforge.convert.train import go\n",
        "convert/__init__.py": "", "convert/train.py": "from embedforge import model\n",
        "distill/__init__.py": "", "distill/pipe.py": "from ..convert import train\n",
        "model.py": "import embedforge.recipe\n",
    })
    assert forbidden(import_edges(root)) == [
        "embedforge.distill.pipe:1 -> embedforge.convert.train (a workflow imports another workflow)",
        "embedforge.recipe:2 -> embedforge.convert.train (core imports a workflow)",
    ]


def test_checker_finds_cycles_and_tells_deferred_ones_apart(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from embedforge import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from embedforge import a\n"
                "def f():\n    from embedforge.c import x\n",
        "c.py": "import embedforge.b\nx = 1\n",
    })
    edges = import_edges(root)
    assert cycles(edges, at_import_only=True) == []  # b -> c runs only when f is called
    assert cycles(edges, at_import_only=False) == [["embedforge.b", "embedforge.c"]]  # b -> a only type-checks
    assert any(e.type_only and e.target == "embedforge.a" for e in edges)  # ... but it is an arrow all the same


def test_checker_finds_hand_rolled_lineage_writers(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "model.py": "def make_lineage(**kw):\n    return kw\n",
        "export/__init__.py": "",
        "export/pipe.py": "from embedforge.model import LINEAGE_FILE, make_lineage\n"
                          "def run(tmp):\n    lineage = make_lineage(stage='x')\n"
                          "    (tmp / LINEAGE_FILE).write_text(str(lineage))\n"
                          "    (tmp / 'embedforge.json').write_text('{}')\n    (tmp / 'manifest.json').write_text('{}')\n",
    })
    assert lineage_writers(root) == ["embedforge.export.pipe:3", "embedforge.export.pipe:4", "embedforge.export.pipe:5"]


# ------------------------------------------------------------------------------------------ report


def report(root: Path = ROOT) -> str:
    """Package-level arrows (with counts; ``*`` = at import time), forbidden arrows and cycles, as text."""
    edges = import_edges(root)
    arrows: Counter[tuple[str, str]] = Counter()
    eager: set[tuple[str, str]] = set()
    for e in edges:
        pair = (_package_of(e.source), _package_of(e.target))
        if pair[0] != pair[1]:
            arrows[pair] += 1
            if e.at_import:
                eager.add(pair)
    lines = [f"{len(module_names(root))} modules, {len(edges)} internal imports "
             f"({sum(not e.at_import and not e.type_only for e in edges)} inside functions, "
             f"{sum(e.type_only for e in edges)} under TYPE_CHECKING)", "",
             "package arrows (count; * = some run at import time):"]
    lines += [f"  {a} -> {b}: {n}{' *' if (a, b) in eager else ''}" for (a, b), n in sorted(arrows.items())]
    lines += ["", "forbidden arrows:"] + ([f"  {b}" for b in forbidden(edges)] or ["  none"])
    for label, only in (("cycles at import time", True), ("cycles counting imports inside functions", False)):
        found = cycles(edges, at_import_only=only)
        lines += ["", f"{label}:"] + ([f"  {{{', '.join(c)}}}" for c in found] or ["  none"])
    return "\n".join(lines)


def _package_of(module: str) -> str:
    """``core`` for ``embedforge/*.py``, else the subpackage (``convert``, ``modules``, ``training`` ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "core"


if __name__ == "__main__":  # pragma: no cover - the report for humans
    print(report(Path(sys.argv[1]) / "embedforge" if len(sys.argv) > 1 else ROOT))
