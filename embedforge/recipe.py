"""YAML recipes: a list of stages, each mapped to one typed config, validated before anything runs.

A recipe looks like this::

    # embedforge run recipes/quickstart.yaml
    name: quickstart
    vars:
      out: runs/quickstart
    stages:
      - name: embedder            # optional; defaults to the stage type
        stage: convert            # a registered stage (embedforge recipes list-stages)
        out: ${vars.out}/model    # where the stage writes its result
        model: smollm2-135m       # every other key is a field of the stage's config
        pooling: mean
      - stage: eval
        model: ${stages.embedder.out}
        out: ${vars.out}/eval
        tasks: [stsb-dev]

``${vars.NAME}``, ``${stages.NAME.out}`` (or any key of an earlier stage), ``${env:NAME}`` and ``${recipe_dir}``
are substituted; ``key=value`` overrides (``vars.out=/tmp/x``, ``embedder.pooling=last_token``) are applied
first. Every error names the file, the line and the key. A rerun skips stages whose output is complete (same
config) unless ``force``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedforge.configs import ConfigError, StageContext
from embedforge.typed_config import build_config, coerce, describe_config  # noqa: F401 (re-exported)
from embedforge import stages as stage_registry
from embedforge.errors import UsageError, from_os_error

logger = logging.getLogger(__name__)

RESERVED = ("name", "stage", "out")
TOP_LEVEL = ("name", "description", "vars", "stages")
_REF = re.compile(r"\$\{([^}]+)\}")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gguf", ".txt", ".yaml", ".yml", ".npy", ".npz")


class RecipeError(UsageError, ValueError):
    """A recipe problem, located as ``file:line: key: message``."""


# ------------------------------------------------------------------------------------- YAML with lines


#: The most values (after expanding aliases) one YAML document may hold; recipes have a few hundred.
MAX_YAML_NODES = 100_000
_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_STD + t for t in ("null", "bool", "int", "float", "str", "timestamp")}


class _Builder:
    """Builds plain Python values from a composed YAML node, recording the line of every key path.

    Only plain YAML is accepted: explicit tags (``!custom``, ``!!python/name:...``, a tag on a list) are refused,
    a key given twice in one mapping is refused, and aliases may expand to at most :data:`MAX_YAML_NODES` values
    (the expanded size is counted once per node, so an alias bomb is refused at once instead of expanded).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self.sizes: dict[int, int] = {}
        self.scalars = yaml.SafeLoader("")

    def where(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}"

    def size(self, node: yaml.Node, active: frozenset[int] = frozenset()) -> int:
        """How many values ``node`` expands to (memoized by node, so shared aliases cost nothing to count)."""
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in active:
            raise RecipeError(f"{self.where(node)}: an alias refers to the node that contains it; remove the cycle")
        inner = active | {key}
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(self.size(k, inner) + self.size(v, inner) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(self.size(v, inner) for v in node.value)
        else:
            total = 1
        if total > MAX_YAML_NODES:
            raise RecipeError(f"{self.where(node)}: aliases expand this document to more than {MAX_YAML_NODES} "
                              "values; write the values out or use fewer nested aliases")
        self.sizes[key] = total
        return total

    def check_tag(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            ok = node.tag == _STD + "map"
        elif isinstance(node, yaml.SequenceNode):
            ok = node.tag == _STD + "seq"
        else:
            ok = node.tag in _SCALAR_TAGS
        if not ok:
            tag = node.tag.replace(_STD, "!!")
            raise RecipeError(f"{self.where(node)}: YAML tag {tag} is not supported in recipes; remove it "
                              "(values are plain text, numbers, true/false, null, lists and mappings)")

    def key(self, node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise RecipeError(f"{self.where(node)}: a mapping key must be plain text, not a list or mapping")
        self.check_tag(node)
        return str(self.scalar(node))

    def build(self, node: yaml.Node, path: str = "") -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode) and node.tag == _STD + "map":
            out: dict[str, Any] = {}
            merged: dict[str, Any] = {}
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _STD + "merge":  # <<: *base (or a list of them): keys written here win
                    sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for src in sources:
                        if not isinstance(src, yaml.MappingNode):
                            raise RecipeError(f"{self.where(src)}: '<<' merges mappings only")
                        for k, v in self.build(src, path).items():
                            merged.setdefault(k, v)
                    continue
                key = self.key(key_node)
                line = key_node.start_mark.line + 1
                sub = f"{path}.{key}" if path else key
                if key in first:
                    raise RecipeError(f"{self.source}:{line}: {sub}: duplicate key (first given at line "
                                      f"{first[key]}); keep one")
                first[key] = line
                self.lines[sub] = line
                out[key] = self.build(value_node, sub)
            return {**{k: v for k, v in merged.items() if k not in out}, **out}
        self.check_tag(node)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        return self.scalar(node)

    def scalar(self, node: yaml.Node) -> Any:
        try:
            return self.scalars.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. the date 2024-13-45
            message = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
            raise RecipeError(f"{self.where(node)}: invalid value {node.value!r}: {message}; quote it to keep "
                              "it as text") from None


def load_yaml(text: str, source: str = "<recipe>") -> tuple[Any, dict[str, int]]:
    """Parse YAML into plain values plus a map from key path (``stages[0].pooling``) to line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if node is None:
        raise RecipeError(f"{source}: the recipe is empty")
    builder = _Builder(source)
    builder.size(node)
    return builder.build(node), builder.lines


# ---------------------------------------------------------------------------------------- recipes


@dataclass
class Stage:
    """One validated stage of a recipe."""

    name: str
    stage: str
    out: Path
    config: Any
    raw: dict[str, Any]


@dataclass
class Recipe:
    """A validated recipe: stages in order, with the hash of the resolved document."""

    name: str
    path: Path | None
    stages: list[Stage]
    hash: str
    resolved: dict[str, Any] = field(default_factory=dict)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "x=[1,2]"]`` -> ``{"a.b": 1, "x": [1, 2]}`` (values parsed as YAML scalars/flows)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _apply_overrides(doc: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    stages = doc.get("stages") or []
    by_name = {}
    for st in stages:
        if isinstance(st, dict):
            by_name[str(st.get("name") or st.get("stage"))] = st
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head == "vars" and rest:
            variables = doc.get("vars")
            known = list(variables) if isinstance(variables, dict) else []
            var = rest.split(".")[0]
            if var not in known:
                close = difflib.get_close_matches(var, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(f"{source}: override {key!r}: the recipe has no var {var!r}{hint}; "
                                  f"vars: {', '.join(known) or 'none'}")
            if "." in rest and not isinstance(variables[var], dict):
                raise RecipeError(f"{source}: override {key!r}: var {var!r} is not a mapping; use vars.{var}=...")
            set_dotted(variables, rest, value)
        elif head == "stages" and rest:
            name, _, sub = rest.partition(".")
            if name not in by_name or not sub:
                raise RecipeError(f"{source}: override {key!r}: no stage named {name!r} (stages: {', '.join(by_name)})")
            set_dotted(by_name[name], sub, value)
        elif head in by_name and rest:
            set_dotted(by_name[head], rest, value)
        elif head in ("name", "description") and not rest:
            doc[head] = value
        else:
            raise RecipeError(
                f"{source}: override {key!r}: use vars.NAME=..., STAGE.KEY=... or stages.STAGE.KEY=... "
                f"(stages: {', '.join(by_name) or 'none'})"
            )


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings (``train.learning_rate=1e-4`` -> ``{"train": {"learning_rate": 1e-4}}``)."""
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise RecipeError(f"override {dotted}: {'.'.join(parts[:i + 1])} is not a mapping")
    target[parts[-1]] = value


def _substitute(value: Any, scope: dict[str, Any], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, scope, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, scope, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(ref: str) -> Any:
        ref = ref.strip()
        if ref.startswith("env:"):
            name = ref[4:]
            if name not in os.environ:
                raise RecipeError(f"{where}: ${{{ref}}}: environment variable {name} is not set")
            return os.environ[name]
        cur: Any = scope
        for part in ref.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                known = ", ".join(sorted(scope.get("stages", {}))) or "none yet"
                raise RecipeError(f"{where}: ${{{ref}}} does not name a var or an earlier stage key "
                                  f"(earlier stages: {known})")
        return cur

    whole = _REF.fullmatch(value)
    if whole:
        return lookup(whole.group(1))

    def text(match: re.Match[str]) -> str:
        found = lookup(match.group(1))
        if found is None or isinstance(found, (dict, list)):
            shown = "null" if found is None else f"a {type(found).__name__}"
            raise RecipeError(f"{where}: ${{{match.group(1).strip()}}} is {shown} and cannot be part of the text "
                              f"{value!r}; give it a text value")
        return str(found)

    return _REF.sub(text, value)


# ------------------------------------------------------------------------------ the local paths a stage reads


_TASK = re.compile(r"(sts|classification|retrieval):(.+)", re.S)
#: keys that name a folder the way ``model`` does, besides the per-stage model keys of :mod:`embedforge.preflight`
_FOLDER_KEYS: dict[str, tuple[str, ...]] = {"eval": ("export",)}


@dataclass(frozen=True)
class LocalInput:
    """A local file or folder that a stage's config names."""

    key: str
    """Where in the config it is written: ``model``, ``tasks[0]``, ``data[1].path``."""
    text: str
    """The path as written (for a task spec or a ``beir:`` source, its file or folder part)."""
    path: Path
    """The same path, absolute (relative paths are taken from the current directory)."""
    must_exist: bool
    """True: it must exist, or an earlier stage must write it; False: a hub id unless a folder of that name exists."""

    def present(self, produced: typing.Iterable[Path] = ()) -> bool:
        """Whether it exists now or lies in (or is) one of ``produced``, the outs of earlier stages."""
        try:
            if self.path.exists():
                return True
        except (OSError, ValueError):  # a name no file system accepts
            return False
        return any(self.path == p or p in self.path.parents for p in produced)


def _key_roles(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The keys of stage ``kind`` that name models (or a model's folder) and those that name data sources, as
    :mod:`embedforge.preflight` knows them."""
    from embedforge.preflight import DATA_KEYS, DATA_LIST_KEYS, MODEL_KEYS

    models = ("model", *MODEL_KEYS.get(kind, ()), *_FOLDER_KEYS.get(kind, ()))
    data = tuple(key for key, _ in (*DATA_LIST_KEYS.get(kind, ()), *DATA_KEYS.get(kind, ())))
    return models, data


def _is_task_key(key: str) -> bool:
    """Keys holding evaluation task specs: ``tasks`` of the eval stage, ``eval_tasks`` of training stages."""
    return re.split(r"[.\[]", key, maxsplit=1)[0].endswith("tasks")


def _task_file(value: str) -> str | None:
    """The file or folder part of ``sts:FILE``, ``classification:FILE`` or ``retrieval:FOLDER[:split]``."""
    m = _TASK.fullmatch(value)
    if not m:
        return None
    kind, rest = m.groups()
    if kind == "retrieval" and ":" in rest and not Path(rest).exists():
        rest = rest.rsplit(":", 1)[0]
    return rest


def _path_text(key: str, value: str, role: str | None) -> tuple[str, bool] | None:
    """``(path, must_exist)`` when the config string ``value`` at ``key`` names a local file or folder, else None.

    ``role`` is ``"model"`` for a value of a model key, ``"data"`` for a data source (an item of a data key, or
    the ``path`` of a data mapping), else None. Task specs and ``beir:FOLDER[:split]`` data sources name their
    file or folder part; built-in data sets, built-in tasks and model aliases are names, whatever folders exist; a
    string shaped like a path (``/``, ``./``, ``../``, ``~``, a data file suffix) and a data source without a ``/``
    (no hub name) must exist; a model, and any other string with a ``/``, is a local folder when one exists and a
    hub id otherwise.
    """
    if not value or "\n" in value or len(value) >= 400:
        return None
    if _is_task_key(key):
        part = _task_file(value)
        return (part, True) if part else None
    if role == "data" and value.startswith("beir:"):  # read as embedforge.data does: the folder ends at ':'
        folder = value[len("beir:"):].partition(":")[0]
        return (folder, True) if folder else None
    from embedforge.data import BUILTINS
    from embedforge.sources import ALIASES

    if value in BUILTINS or value in ALIASES:
        return None
    if value.startswith(("/", "./", "../", "~")) or value.lower().endswith(_FILE_SUFFIXES):
        return value, True
    slash = "/" in value or os.sep in value
    if (role == "model" and value in (".", "..")) or (role == "data" and not slash):
        return value, True
    if role == "model" or slash:
        return value, False
    return None


def _walk_strings(value: Any, key: str) -> typing.Iterator[tuple[str, str]]:
    """Every string inside a config value, with its key path (``tasks[1]``, ``data.path``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, f"{key}[{i}]")
    elif isinstance(value, str):
        yield key, value


def _absolute(value: str) -> Path:
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of no known user
        path = Path(value)
    path = path if path.is_absolute() else Path.cwd() / path
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: kept as written
        return path


def local_inputs(kind: str, values: dict[str, Any]) -> list[LocalInput]:
    """The local files and folders that a stage of type ``kind`` with config ``values`` (the recipe's keys;
    ``name``, ``stage`` and ``out`` are skipped) names, in key order.

    This one list decides three things: which paths must exist when the recipe is validated (``must_exist``),
    which paths no stage's ``out`` may be or contain, and whose identities decide whether a finished stage is
    current (:func:`stage_inputs`). The last two take the entries that are :meth:`LocalInput.present`.
    """
    model_keys, data_keys = _key_roles(kind)
    found: list[LocalInput] = []
    for key, value in values.items():
        if key in RESERVED:
            continue
        source = re.compile(rf"{re.escape(key)}(\[\d+\])?(\.path)?")  # a data source, not its kind or columns
        for sub, text in _walk_strings(value, key):
            role = "model" if key in model_keys else "data" if key in data_keys and source.fullmatch(sub) else None
            hit = _path_text(sub, text, role)
            if hit is not None:
                found.append(LocalInput(key=sub, text=hit[0], path=_absolute(hit[0]), must_exist=hit[1]))
    return found


def stage_inputs(stage: Stage, produced: list[Path] | tuple[Path, ...] = ()) -> list[str]:
    """The local files and folders ``stage`` reads (absolute paths): those that exist now and those that earlier
    stages (``produced``: their outputs) will write. Their identities decide whether its output is current."""
    found = {os.fspath(item.path) for item in local_inputs(stage.stage, stage.raw) if item.present(produced)}
    found.discard(os.fspath(stage.out))
    return sorted(found)


def _check_out(out: Path, name: str, inputs: list[Path], earlier: list[Stage], reads: list[tuple[str, Path]],
               where: str) -> None:
    """A stage's ``out`` may not be, contain or sit inside another stage's ``out``, nor be or contain a path that
    this or an earlier stage reads (replacing it would delete that input)."""

    def inside(parent: Path, child: Path) -> bool:
        return child == parent or parent in child.parents

    for other in earlier:
        if out == other.out:
            raise RecipeError(f"{where}: {out} is also the out of stage {other.name!r}; give each stage its own out")
        if inside(other.out, out) or inside(out, other.out):
            inner, outer = (out, other.out) if inside(other.out, out) else (other.out, out)
            raise RecipeError(f"{where}: {inner} is inside {outer}, the out of another stage "
                              f"({other.name!r} and {name!r}); give each stage a separate directory")
    reads.extend((name, p) for p in inputs)
    for reader, path in reads:
        if inside(out, path):
            raise RecipeError(f"{where}: {out} is (or contains) {path}, which stage {reader!r} reads; "
                              "writing there would delete it: choose another out")


def validate_recipe(doc: Any, lines: dict[str, int], source: str = "<recipe>", *,
                    recipe_dir: Path | None = None) -> Recipe:
    """Check a parsed recipe document completely and build every stage's typed config."""

    def at(path: str) -> str:
        line = lines.get(path)
        while line is None and path:
            path = path.rsplit(".", 1)[0] if "." in path else ""
            line = lines.get(path)
        return f"{source}:{line}" if line else source

    if not isinstance(doc, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys {', '.join(TOP_LEVEL)}")
    for key in doc:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(key, TOP_LEVEL, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{at(key)}: {key}: unknown top-level key{hint}; valid keys: {', '.join(TOP_LEVEL)}")
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError(f"{at('stages')}: stages: expected a non-empty list of stages")
    variables = doc.get("vars") or {}
    if not isinstance(variables, dict):
        raise RecipeError(f"{at('vars')}: vars: expected a mapping")
    base = recipe_dir or Path.cwd()
    scope: dict[str, Any] = {"vars": {}, "stages": {}, "recipe_dir": str(base)}
    scope["vars"] = _substitute(variables, scope, at("vars"))
    built: list[Stage] = []
    produced: list[Path] = []
    reads: list[tuple[str, Path]] = []  # (stage name, local input path) of the stages so far
    for i, raw in enumerate(raw_stages):
        p = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise RecipeError(f"{at(p)}: {p}: expected a mapping with 'stage' and 'out'")
        kind = raw.get("stage")
        if kind not in stage_registry.STAGES:
            known = ", ".join(sorted(stage_registry.STAGES))
            raise RecipeError(f"{at(p + '.stage')}: {p}.stage: {kind!r} is not a stage; known stages: {known}")
        name = str(raw.get("name") or kind)
        if name in scope["stages"]:
            raise RecipeError(f"{at(p + '.name')}: {p}.name: duplicate stage name {name!r}; give each a 'name'")
        if "out" not in raw:
            raise RecipeError(f"{at(p)}: {p}.out: required key is missing (where the stage writes its result)")
        values = {}
        for key, value in raw.items():
            values[key] = _substitute(value, scope, f"{at(f'{p}.{key}')}: stage {name!r}: {key}")
        if not isinstance(values["out"], (str, os.PathLike)) or not str(values["out"]).strip():
            raise RecipeError(f"{at(p + '.out')}: stage {name!r}: out: expected the directory the stage writes, "
                              f"got {'null' if values['out'] is None else repr(values['out'])}; set out: to a path")
        out = Path(str(values["out"])).expanduser()
        if not out.is_absolute():
            out = (Path.cwd() / out)
        out = out.resolve()
        cfg_values = {k: v for k, v in values.items() if k not in RESERVED}
        try:
            cls = stage_registry.config_class(kind)
            config = build_config(cls, cfg_values)
        except ConfigError as exc:
            key = exc.key.split("[")[0].split(".")[0] if exc.key else ""
            raise RecipeError(f"{at(f'{p}.{key}' if key else p)}: stage {name!r}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{at(p)}: stage {name!r}: {exc}") from None
        inputs = local_inputs(kind, cfg_values)
        for item in inputs:
            if item.must_exist and not item.present(produced):
                key = re.split(r"[.\[]", item.key, maxsplit=1)[0]
                shown = item.text if item.text.isprintable() else repr(item.text)
                raise RecipeError(f"{at(f'{p}.{key}')}: stage {name!r}: {item.key}: file or directory not found: "
                                  f"{shown}")
        _check_out(out, name, [item.path for item in inputs if item.present(produced)], built, reads,
                   f"{at(f'{p}.out')}: stage {name!r}: out")
        built.append(Stage(name=name, stage=kind, out=out, config=config, raw=values))
        produced.append(out)
        scope["stages"][name] = {**values, "out": str(out)}
    resolved = {"name": doc.get("name"), "vars": scope["vars"], "stages": [s.raw | {"out": str(s.out)} for s in built]}
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()
    return Recipe(name=str(doc.get("name") or (Path(source).stem if source else "recipe")),
                  path=Path(source) if source and not source.startswith("<") else None,
                  stages=built, hash=digest, resolved=resolved)


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None, *,
                run_dir: str | os.PathLike[str] | None = None) -> Recipe:
    """Read, override, substitute and validate a recipe file; nothing runs.

    With ``run_dir`` every stage writes to ``run_dir/<stage name>`` whatever its ``out`` says
    (:func:`embedforge.rundir.relocate`).
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    doc, lines = load_yaml(p.read_text(), str(p))
    if overrides:
        if not isinstance(doc, dict):
            raise RecipeError(f"{p}: a recipe is a mapping")
        _apply_overrides(doc, overrides, str(p))
    if run_dir is not None and isinstance(doc, dict):
        from embedforge.rundir import relocate

        relocate(doc, run_dir, str(p))
    return validate_recipe(doc, lines, str(p), recipe_dir=p.parent.resolve())


def single_stage(kind: str, values: dict[str, Any], out: str | os.PathLike[str], source: str) -> Recipe:
    """A one-stage recipe built from CLI options (so the CLI validates exactly like recipes do)."""
    doc = {"name": kind, "stages": [{"stage": kind, "out": os.fspath(out), **values}]}
    return validate_recipe(doc, {}, source)


@dataclass
class StagePlan:
    """Whether a stage will run, and why."""

    stage: Stage
    run: bool
    reason: str
    inputs: list[str] = field(default_factory=list)


def _decide(st: Stage, inputs: list[str], force: bool, remade: dict[Path, str]) -> tuple[bool, str]:
    """``(run, reason)`` for one stage; ``remade`` maps outputs that earlier stages (re)make now to their names."""
    from embedforge.model import CONFIG_CHANGED, NO_OUTPUT, stale_reason

    if force:
        return True, "forced (--force)"
    reason = stale_reason(st.out, st.config, inputs)
    if reason in (NO_OUTPUT, CONFIG_CHANGED):
        return True, reason
    for name in inputs:
        path = Path(name)
        for out, producer in remade.items():
            if path == out or out in path.parents:
                return True, f"input {name} is remade by stage {producer!r}"
    if reason is None:
        return False, "complete: same config and inputs"
    return True, reason


def plan_recipe(recipe: Recipe, *, force: bool = False, only: list[str] | None = None) -> list[StagePlan]:
    """What :func:`run_recipe` would do now, stage by stage, without running anything (``--dry-run``)."""
    _check_only(recipe, only)
    plans: list[StagePlan] = []
    remade: dict[Path, str] = {}
    for i, st in enumerate(recipe.stages):
        inputs = stage_inputs(st, [s.out for s in recipe.stages[:i]])
        if only and st.name not in only:
            plans.append(StagePlan(st, False, "not selected by --only", inputs))
            continue
        run, reason = _decide(st, inputs, force, remade)
        if run:
            remade[st.out] = st.name
        plans.append(StagePlan(st, run, reason, inputs))
    return plans


def _check_only(recipe: Recipe, only: list[str] | None) -> None:
    if only:
        names = {s.name for s in recipe.stages}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise RecipeError(f"--only: no stage named {', '.join(unknown)} (stages: {', '.join(sorted(names))})")


def _wait_for(st: Stage, inputs: list[str], rank: int, poll_s: float = 2.0) -> None:
    from embedforge.model import stale_reason
    from embedforge.training.engine import wait_until

    logger.info("rank %d: waiting for rank 0 to finish stage %s", rank, st.name)
    late = wait_until(lambda: stale_reason(st.out, st.config, inputs) is None, poll_s=poll_s)
    if late is not None:
        raise RecipeError(f"rank {rank}: stage {st.name!r} did not complete on rank 0 within {late:.0f} s")


def check_recipe(recipe: Recipe, *, force: bool = False, only: list[str] | None = None) -> None:
    """Pre-flight the stages :func:`run_recipe` would run (its plan: ``--only``, ``--force``, stale outputs): their
    data, models and outputs (:func:`embedforge.preflight.check_stages`); raise on the first problem, before any
    work."""
    from embedforge.preflight import check_stages

    check_stages([plan.stage for plan in plan_recipe(recipe, force=force, only=only) if plan.run])


def run_recipe(recipe: Recipe, *, force: bool = False, only: list[str] | None = None,
               run_dir: str | os.PathLike[str] | None = None) -> list[tuple[Stage, str]]:
    """Run the stages in order. Returns ``(stage, "ran" | "skipped" | "waited")`` for each stage considered.

    A stage is skipped when its output is complete and current: made with the same config from inputs (model
    directories, data files) whose identities are unchanged, none of them remade by an earlier stage of this run.
    After a stage runs, the identities of its inputs, taken just before it started, are recorded in its lineage.

    Every output the run may write is locked, cleaned of what killed saves left, and checked first (rank 0
    only: the other ranks of a torchrun job write nothing), so a second run into one of them, or an output
    directory embedforge did not write, is refused before any work rather than after hours of training.

    With ``run_dir`` (load the recipe with the same ``run_dir`` so its stages write there) the run records itself
    in ``run_dir/run.json`` and ``run_dir/run.log`` and ends, whether it succeeded or not, by writing the report
    (:func:`embedforge.report.build_report`).
    """
    from embedforge.outputs import check_output, clean_leftovers, output_lock

    _check_only(recipe, only)
    from embedforge.training.engine import is_main_process

    recorded = run_dir is not None and is_main_process()
    if recorded:
        from embedforge.rundir import check_run_dir, log_to, record_run

        run_dir = check_run_dir(run_dir)  # before anything (a stage's lock file) is written into it
    check_recipe(recipe, force=force, only=only)  # every stage's inputs and outputs, before anything is written
    with contextlib.ExitStack() as held:
        if is_main_process():
            for st in recipe.stages:
                if not only or st.name in only:
                    held.enter_context(output_lock(st.out))
                    clean_leftovers(st.out)
                    check_output(st.out, stage=st.stage)
        if not recorded:
            return _run_stages(recipe, force=force, only=only)
        held.enter_context(log_to(run_dir))
        from embedforge.report import build_report

        with record_run(run_dir, recipe, build_report) as record:
            return _run_stages(recipe, force=force, only=only, record=record)


def _run_stages(recipe: Recipe, *, force: bool = False, only: list[str] | None = None,
                record: Any = None) -> list[tuple[Stage, str]]:
    """Run the stages in order, their outputs locked by :func:`run_recipe`; returns what happened to each.

    Under torchrun (``WORLD_SIZE`` > 1) the training stages run on every rank; every other stage runs on rank 0
    while the other ranks wait for its complete output (:func:`run_recipe` has already run
    :mod:`embedforge.preflight` on the data, models and outputs of every stage that will run). An ``OSError`` of a stage (disk full,
    permission denied) is raised as a one-line :class:`~embedforge.errors.RunError` naming the stage and path.
    """
    from embedforge.training.memory import release_memory
    from embedforge.model import NO_OUTPUT, input_identity, record_inputs

    done: list[tuple[Stage, str]] = []
    from embedforge.training.engine import world_size

    rank = int(os.environ.get("RANK", "0"))
    world = world_size()
    remade: dict[Path, str] = {}
    for i, st in enumerate(recipe.stages):
        if only and st.name not in only:
            continue
        inputs = stage_inputs(st, [s.out for s in recipe.stages[:i]])
        if world > 1 and rank != 0 and not stage_registry.is_distributed(st.stage):
            # Under torchrun only rank 0 runs single-process stages; the others wait for its finished output.
            _wait_for(st, inputs, rank)
            done.append((st, "waited"))
            continue
        run, reason = _decide(st, inputs, force, remade)
        if not run:
            logger.info("stage %s: %s is %s; skipping (use --force to redo)", st.name, st.out, reason)
            if record is not None:
                record.skipped(st.name, reason)
            done.append((st, "skipped"))
            continue
        logger.info("stage %s (%s) -> %s: running (%s)", st.name, st.stage, st.out, reason)
        identities = {name: input_identity(name) for name in inputs}
        # The runner has decided: a stage must not skip itself because its config alone matches an old output.
        ctx = StageContext(recipe_hash=recipe.hash, recipe_path=recipe.path, stage_name=st.name,
                           force=force or reason != NO_OUTPUT)
        try:
            with record.stage(st.name, reason) if record is not None else contextlib.nullcontext():
                stage_registry.runner(st.stage)(st.config, st.out, ctx)
        except OSError as exc:  # a full disk, a denied write: one line naming the stage and the path
            raise from_os_error(exc, f"stage {st.name!r}", st.out) from exc
        if rank == 0:
            record_inputs(st.out, identities)
        remade[st.out] = st.name
        release_memory()  # the stage's model must not sit beside the next stage's
        done.append((st, "ran"))
    return done


def shipped_recipes() -> list[Path]:
    """Recipes shipped in the repository's ``recipes/`` folder (and ``./recipes`` when run elsewhere)."""
    roots = [Path(__file__).resolve().parent.parent / "recipes", Path.cwd() / "recipes"]
    seen: dict[Path, None] = {}
    for root in roots:
        if root.is_dir():
            for f in sorted(root.rglob("*.yaml")):
                seen.setdefault(f.resolve(), None)
    return list(seen)
