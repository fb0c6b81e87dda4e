"""Ship the code of embedforge's modules inside a saved model directory, so that it loads without embedforge.

With ``trust_remote_code=True`` sentence-transformers resolves a ``modules.json`` type of the form
``<file>.<Class>`` to the class in ``<file>.py`` at the top of the model directory (through transformers' dynamic
modules, the way hub models with custom code work). :func:`ship_module_code` therefore copies the source files of
the embedforge modules a model uses into its directory as ``embedforge_<name>.py`` (imports between them become
relative imports, which transformers copies along) and points ``modules.json`` at those copies. The copies import
only the standard library, torch and sentence-transformers; :func:`shipped_source` checks that before writing.

embedforge itself never runs the shipped copies: :func:`installed_class` maps both the shipped types and the
``embedforge.modules.*`` types of directories written before to the installed classes, which
:func:`embedforge.modules.load_embedder` hands to sentence-transformers, with ``trust_remote_code`` left off.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "embedforge.modules"
SHIPPED_PREFIX = "embedforge_"

#: The module classes that can be shipped, and the ``embedforge.modules`` file that defines each.
SHIPPABLE: dict[str, str] = {
    "LatentAttentionPooling": "latent_attention",
    "MultiLayerPooling": "multilayer",
    "EchoTransformer": "echo",
    "EchoPooling": "echo",
    "SignBinarizer": "binarizer",
    "LearnedBinarizer": "binarizer",
}

#: Top-level packages a shipped file may import besides the standard library.
ALLOWED_PACKAGES = frozenset({"torch", "sentence_transformers"})


class NotShippable(RuntimeError):
    """A module file imports something a model directory cannot carry (a bug in embedforge, not in the model)."""


def shipped_name(module: str) -> str:
    """The file stem of a shipped ``embedforge.modules`` file (``echo`` -> ``embedforge_echo``)."""
    return SHIPPED_PREFIX + module


def shipped_type(class_name: str) -> str:
    """The ``modules.json`` type of a shipped class (``embedforge_echo.EchoPooling``)."""
    return f"{shipped_name(SHIPPABLE[class_name])}.{class_name}"


def class_name_of(ref: str) -> str | None:
    """The shippable class a ``modules.json`` type names, in either form (installed or shipped); else None."""
    module, _, class_name = ref.rpartition(".")
    home = SHIPPABLE.get(class_name)
    if home is None:
        return None
    if module in (f"{PACKAGE}.{home}", shipped_name(home)):
        return class_name
    return None


def installed_class(ref: str) -> type | None:
    """The installed embedforge class a ``modules.json`` type refers to, or None for anyone else's type.

    Accepts ``embedforge.*`` references (directories saved before module code was shipped) and the shipped form
    ``embedforge_<module>.<Class>``; the latter resolves to ``embedforge.modules.<module>.<Class>``.
    """
    module_name, _, class_name = ref.rpartition(".")
    if ref.startswith("embedforge."):
        return getattr(importlib.import_module(module_name), class_name)
    if class_name_of(ref) is not None:
        return getattr(importlib.import_module(f"{PACKAGE}.{SHIPPABLE[class_name]}"), class_name)
    return None


def _source_file(module: str) -> Path:
    spec = importlib.util.find_spec(f"{PACKAGE}.{module}")
    if spec is None or spec.origin is None:
        raise NotShippable(f"{PACKAGE}.{module} has no source file to ship")
    return Path(spec.origin)


def _relative_import(node: ast.ImportFrom) -> str:
    names = ", ".join(f"{a.name} as {a.asname}" if a.asname else a.name for a in node.names)
    target = shipped_name((node.module or "").rpartition(".")[2])
    return f"from .{target} import {names}"


def rewrite_imports(text: str, filename: str, siblings: set[str]) -> tuple[str, tuple[str, ...]]:
    """Turn the source of a module file into its shipped form; returns the text and the siblings it imports.

    Imports from ``embedforge.modules.<x>`` (``x`` in ``siblings``) become ``from .embedforge_<x> import ...``.
    Raises :class:`NotShippable` when the file imports anything besides the standard library, torch,
    sentence-transformers and its siblings, anywhere (also inside functions: transformers checks every import of a
    file before it loads it).
    """
    lines = text.splitlines(keepends=True)
    needs: list[str] = []
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith(PACKAGE + "."):
                sibling = node.module[len(PACKAGE) + 1:]
                if sibling not in siblings:
                    raise NotShippable(f"{filename} line {node.lineno} imports {node.module}, which is not a module "
                                       "file that can be shipped")
                needs.append(sibling)
                indent = lines[node.lineno - 1][: node.col_offset]
                edits.append((node.lineno, node.end_lineno or node.lineno, f"{indent}{_relative_import(node)}\n"))
                continue
            names = [node.module]
        else:
            continue
        bad = [n for n in names if n.split(".")[0] not in ALLOWED_PACKAGES | sys.stdlib_module_names]
        if bad:
            raise NotShippable(f"{filename} line {node.lineno} imports {', '.join(bad)}: a shipped module may only "
                               "import the standard library, torch and sentence-transformers")
    for start, end, replacement in sorted(edits, reverse=True):
        lines[start - 1: end] = [replacement]
    return "".join(lines), tuple(dict.fromkeys(needs))


@functools.lru_cache(maxsize=None)
def shipped_source(module: str) -> tuple[str, tuple[str, ...]]:
    """The text of ``embedforge/modules/<module>.py`` as shipped (see :func:`rewrite_imports`), with a header, and
    the sibling modules it needs."""
    path = _source_file(module)
    siblings = {p.stem for p in path.parent.glob("*.py") if p.stem != "__init__"}
    text, needs = rewrite_imports(path.read_text(encoding="utf-8"), path.name, siblings)
    from embedforge import __version__

    header = (f"# Shipped by embedforge {__version__} from {PACKAGE}.{module} so that this model loads with\n"
              "# SentenceTransformer(path, trust_remote_code=True) without embedforge. Needs torch and "
              "sentence-transformers.\n")
    return header + text, needs


def _files_for(modules: list[str]) -> dict[str, str]:
    """``{file name: text}`` for ``modules`` and everything they import, transitively."""
    files: dict[str, str] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        name = shipped_name(module) + ".py"
        if name in files:
            continue
        text, needs = shipped_source(module)
        files[name] = text
        todo.extend(needs)
    return files


def ship_module_code(model_dir: str | os.PathLike[str]) -> list[str]:
    """Copy the code of the embedforge modules ``model_dir`` uses into it and point ``modules.json`` at it.

    Types already in the shipped form get their files (re)written too (a model loaded from shipped code and saved
    again by sentence-transformers names them so). A module whose code cannot be shipped keeps its
    ``embedforge.modules`` type, so the directory still loads with embedforge, and a warning says so. Returns the
    names of the files written.
    """
    root = Path(model_dir)
    modules_json = root / "modules.json"
    if not modules_json.is_file():
        return []
    entries = json.loads(modules_json.read_text(encoding="utf-8"))
    written: list[str] = []
    changed = False
    for entry in entries:
        class_name = class_name_of(entry.get("type", ""))
        if class_name is None:
            continue
        try:
            files = _files_for([SHIPPABLE[class_name]])
        except NotShippable as exc:
            logger.warning("%s stays an embedforge-only module (it loads with embedforge, not with plain "
                           "sentence-transformers): %s", class_name, exc)
            new_type = f"{PACKAGE}.{SHIPPABLE[class_name]}.{class_name}"
        else:
            for name, text in files.items():
                if name not in written:
                    (root / name).write_text(text, encoding="utf-8")
                    written.append(name)
            new_type = shipped_type(class_name)
        if entry["type"] != new_type:
            entry["type"] = new_type
            changed = True
    if changed:
        modules_json.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    if written:
        logger.debug("shipped %s in %s", ", ".join(written), root)
    return written
