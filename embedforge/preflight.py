"""Pre-flight: check every input and output of the stages about to run, before the first one starts.

A recipe's stages can take hours, and a stage reads its data only after it has built its model, so a bad line in
the data of stage 2 would otherwise surface after stage 1 and a model load. :func:`check_stages` (called by
:func:`embedforge.recipe.check_recipe` from ``run_recipe``) looks at all the stages that will run, in order:

1. data: every file a stage names (training data, texts, calibration sets, evaluation tasks) is opened and read
   through :mod:`embedforge.data`'s loaders with the columns the stage will ask for, so a bad JSON line, a missing
   column or an empty file is reported now. Files over :data:`FULL_CHECK_BYTES` and ``save_to_disk`` folders are
   checked on their first :data:`PREFIX_ROWS` rows only; built-in data sets and hub data set names are not read.
2. models: a local model directory must hold a model (``config.json`` or ``modules.json``), a ``.gguf`` file must
   exist, an alias must have its wheel installed. Hub ids are left to the stage (nothing is downloaded here).
3. outputs: the folder an ``out`` is created in must be writable (a file is created there and removed again),
   and the file system must have room for an estimate of what the stages write (the input model's weight bytes
   times a per-stage factor, see :data:`SIZE_FACTOR`).
4. ``max_seq_length``, when a recipe sets it, must not exceed the model's ``max_position_embeddings`` when the
   model's ``config.json`` is on local disk; a ``layers`` selection must fit the layers that config lists.

Anything an earlier stage of the same run produces is not checked (it does not exist yet). Every error names the
stage, the key and the path, and is a :class:`~embedforge.errors.UsageError` subclass (exit status 2).
Import-light: no torch; the ``datasets`` library is imported only for ``save_to_disk`` folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from embedforge.configs import ConfigError
from embedforge.data import BUILTINS, DataError, DataKind, DataSpec, load_records
from embedforge.errors import OutputError
from embedforge.sources import ALIASES, SourceError, alias_path

if TYPE_CHECKING:  # pragma: no cover
    from embedforge.recipe import Stage

logger = logging.getLogger(__name__)

#: data files up to this size are read completely; bigger ones on their first PREFIX_ROWS rows
FULL_CHECK_BYTES = 256 * 2**20
PREFIX_ROWS = 10_000
#: what a stage writes, as a multiple of its input model's weight bytes (export: fp32, fused, fp16, three int8
#: and the token-output graphs; training stages: the model plus checkpoints; the rest: about one copy)
SIZE_FACTOR = {"export": 6.0, "mntp": 3.0, "simcse": 3.0, "contrastive": 3.0, "convert": 1.5, "distill": 1.5,
               "compress": 1.5, "binarizer": 1.5, "eval": 0.0}
#: a GGUF checkpoint is dequantized to float32: about this many times its file size (4-bit weights)
GGUF_EXPANSION = 8.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx.data", ".gguf", ".npy")
#: config keys holding models, per stage type ("model" is checked for every stage)
MODEL_KEYS = {"distill": ("extra_teachers", "student_model"), "mntp": ("lm_source",),
              "contrastive": ("distill_teacher",)}
#: config keys holding lists of data sources, per stage type: (key, how the stage reads it)
DATA_LIST_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "mntp": (("data", "texts"),),
    "simcse": (("data", "texts"),),
    "contrastive": (("data", "pairs"), ("stage2_data", "pairs")),
    "distill": (("texts", "any"),),
}
#: config keys holding one data source, per stage type: (key, how the stage reads it)
DATA_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "compress": (("heal_data", "texts"), ("calibration_data", "texts"), ("vocab_corpus", "texts")),
    "binarizer": (("data", "texts"),),
    "export": (("calibration_data", "texts"), ("probe_texts", "lines")),
}


@dataclass
class _Plan:
    """What the checks learn while walking the stages."""

    produced: dict[Path, float] = field(default_factory=dict)  # out -> estimated bytes of the model written there
    needed: dict[int, tuple[Path, float, list[str]]] = field(default_factory=dict)  # st_dev -> (dir, bytes, stages)


def check_stages(stages: list[Stage]) -> None:
    """Check ``stages`` in order (each may use what the earlier ones produce); see the module docstring."""
    plan = _Plan()
    for st in stages:
        where = f"stage {st.name!r}"
        for key, value in _model_values(st):
            _check_model(value, f"{where}: {key}", plan)
        for key, value, mode in _data_values(st):
            _check_data(value, mode, f"{where}: {key}", plan)
        _check_max_seq_length(st, where, plan)
        _check_layers(st, where, plan)
        _check_qlora(st, where)
        size = _check_output(st, where, plan)
        plan.produced[st.out] = size
    _check_free_space(plan)


def _check_qlora(st: Stage, where: str) -> None:
    """A 4-bit (QLoRA) stage needs CUDA and bitsandbytes: say so before the stages ahead of it spend hours."""
    quantization = getattr(st.config, "quantization", None)
    if getattr(quantization, "value", quantization) != "4bit":
        return
    from embedforge.training.qlora import require_qlora
    from embedforge.errors import UsageError

    try:
        require_qlora()
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------------ models


def _model_values(st: Stage) -> Iterator[tuple[str, str]]:
    for key in ("model", *MODEL_KEYS.get(st.stage, ())):
        value = getattr(st.config, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(values):
            if isinstance(item, str) and item:
                yield (f"{key}[{i}]" if isinstance(value, (list, tuple)) else key), item


def _produced(path: Path, plan: _Plan) -> Path | None:
    """The earlier output ``path`` lies in (or is), if an earlier stage of this run writes it."""
    for out in plan.produced:
        if path == out or out in path.parents:
            return out
    return None


def _local(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith(".gguf") or Path(value).expanduser().exists()


def _check_model(value: str, where: str, plan: _Plan) -> None:
    if value in ALIASES:
        try:
            alias_path(value)
        except SourceError as exc:
            raise SourceError(f"{where}: {exc}") from None
        return
    if not _looks_local(value):
        return  # a hub id: the stage resolves it (nothing is downloaded here)
    path = _local(value)
    if _produced(path, plan) is not None:
        return
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"{where}: GGUF file not found: {path}; check the path")
        return
    if not path.exists():
        raise SourceError(f"{where}: model directory not found: {path}; check the path or run the stage that "
                          "writes it first")
    if not path.is_dir():
        raise SourceError(f"{where}: {path} is a file; expected a model directory, a .gguf file, an alias or a hub id")
    if not any((path / name).is_file() for name in ("config.json", "modules.json", "manifest.json")):
        raise SourceError(f"{where}: {path} holds no model (no config.json or modules.json); point it at a model "
                          "directory")


def model_bytes(value: str, plan: _Plan | None = None) -> float:
    """Estimated float weight bytes of a model source (0 when unknown, e.g. a hub id)."""
    if value in ALIASES:
        try:
            path = alias_path(value)
        except SourceError:
            return 0.0
    elif _looks_local(value):
        path = _local(value)
        if plan is not None and (out := _produced(path, plan)) is not None:
            return plan.produced[out]
    else:
        return 0.0
    if path.is_file():
        size = float(path.stat().st_size)
        return size * GGUF_EXPANSION if path.suffix == ".gguf" else size
    if not path.is_dir():
        return 0.0
    total = 0.0
    for f in path.rglob("*"):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            total += f.stat().st_size * (GGUF_EXPANSION if f.suffix == ".gguf" else 1.0)
    return total


# -------------------------------------------------------------------------------------------------- data


def _data_values(st: Stage) -> Iterator[tuple[str, Any, str]]:
    """``(key, spec, mode)`` for every data source of a stage; mode says how the stage reads it."""
    cfg = st.config
    for key, mode in DATA_LIST_KEYS.get(st.stage, ()):
        for i, spec in enumerate(getattr(cfg, key, None) or []):
            yield f"{key}[{i}]", spec, mode
    for key, mode in DATA_KEYS.get(st.stage, ()):
        spec = getattr(cfg, key, None)
        if spec is not None:
            yield key, spec, mode
    tasks_key = "tasks" if st.stage == "eval" else "eval_tasks"
    for i, task in enumerate(getattr(cfg, tasks_key, None) or []):
        yield f"{tasks_key}[{i}]", task, "task"


def _check_data(spec: Any, mode: str, where: str, plan: _Plan) -> None:
    if mode == "task":
        _check_task(spec, where, plan)
        return
    if isinstance(spec, str) and spec.startswith("beir:"):
        folder, _, split = spec[5:].partition(":")
        _check_beir(folder, split or "test", where, plan)
        return
    if isinstance(spec, str):
        if spec in BUILTINS:
            return
        fields: dict[str, Any] = {"path": spec}
    elif isinstance(spec, dict):
        fields = {k: v for k, v in spec.items() if k != "name"}
        if not isinstance(fields.get("path"), str) or not fields["path"]:
            raise DataError(f"{where}: a data mapping needs a path (a file, a folder or a built-in name)")
        if fields["path"] in BUILTINS:
            return
    else:
        return
    path_text = str(fields.get("path", ""))
    path = _local(path_text)
    if _produced(path, plan) is not None:
        return
    if not path.exists():
        if "/" in path_text and not path_text.startswith((".", "/", "~")):
            return  # a hub data set name: read by the stage (nothing is downloaded here)
        raise DataError(f"{where}: data file not found: {path}; check the path")
    if mode == "lines":
        _check_text_lines(path, where)
        return
    limit = fields.get("limit")
    if path.is_dir() or path.stat().st_size > FULL_CHECK_BYTES:  # a saved datasets folder can be any size
        logger.info("%s: %s may be large; checking its first %d rows", where, path, PREFIX_ROWS)
        limit = PREFIX_ROWS if limit is None else min(int(limit), PREFIX_ROWS)
    fields["limit"] = limit
    try:
        if "kind" in fields:
            _read(fields, fields["kind"])
        elif mode == "texts":
            _read(fields, DataKind.TEXTS)
        elif mode == "pairs":  # as the contrastive stage reads it: triplets when the file has negatives, else pairs
            _read_first(fields, DataKind.TRIPLETS, DataKind.PAIRS)
        else:  # the distill stage: a text column, else every text column of a pairs file
            _read_first(fields, DataKind.TEXTS, DataKind.PAIRS)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    except TypeError as exc:  # a mapping with keys DataSpec does not have
        raise DataError(f"{where}: {exc}; a data mapping takes DataSpec fields (path, kind, columns, limit, ...)") \
            from None


def _read(fields: dict[str, Any], kind: Any) -> None:
    load_records(DataSpec(**{**fields, "kind": kind}))


def _read_first(fields: dict[str, Any], first: DataKind, second: DataKind) -> None:
    try:
        _read(fields, first)
    except DataError as exc:
        if "missing column" not in str(exc):
            raise
        _read(fields, second)


def _check_text_lines(path: Path, where: str) -> None:
    try:
        with path.open(encoding="utf-8") as fh:
            for _ in fh:
                pass
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: {path}: not valid UTF-8 ({exc.reason}); save it as UTF-8 text") from None
    except IsADirectoryError:
        raise DataError(f"{where}: {path} is a directory; expected a text file with one text per line") from None


def _check_beir(folder: str, split: str, where: str, plan: _Plan) -> None:
    root = _local(folder)
    if _produced(root, plan) is not None:
        return
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / name).is_file():
            raise DataError(f"{where}: {root / name}: file not found (a BEIR folder holds corpus.jsonl, "
                            "queries.jsonl and qrels/<split>.tsv)")


def _check_task(spec: Any, where: str, plan: _Plan) -> None:
    if not isinstance(spec, str):
        return
    from embedforge.evaluation_config import parse_task

    try:
        task = parse_task(spec)
    except ValueError:
        return  # the config check reports unknown tasks
    if task.path is None:
        return
    if task.kind == "retrieval":
        _check_beir(task.path, task.split or "test", where, plan)
        return
    kind = DataKind.SCORED if task.kind == "sts" else DataKind.LABELED
    _check_data({"path": task.path, "kind": kind}, "texts", where, plan)


# ------------------------------------------------------------------------------------------------ outputs


def _existing_ancestor(path: Path) -> Path:
    cur = path
    while not cur.exists() and cur != cur.parent:
        cur = cur.parent
    return cur


def _probe_write(folder: Path) -> None:
    """Create and remove a file in ``folder`` (what ``atomic_dir`` will do there); raises ``OSError`` if it cannot."""
    fd, name = tempfile.mkstemp(prefix=".embedforge-preflight-", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_writable(out: Path, where: str) -> Path:
    """Check that output directory ``out`` can be created (or replaced); return the existing folder it goes in.

    ``where`` starts the error message (e.g. ``"stage 'onnx': out"``).
    """
    from embedforge.errors import os_reason

    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{where}: {out} is a file; an output is a directory, choose another path")
    folder = _existing_ancestor(out.parent)
    if not folder.is_dir():
        raise OutputError(f"{where}: {folder} is a file, so {out} cannot be created there; choose another path")
    try:
        _probe_write(folder)
    except OSError as exc:
        raise OutputError(f"{where}: cannot create {out} in {folder}: {os_reason(exc)}") from None
    return folder


def _check_output(st: Stage, where: str, plan: _Plan) -> float:
    """Check that ``st.out`` can be written; return the estimated bytes of the model the stage writes there."""
    folder = check_writable(st.out, f"{where}: out")
    model = getattr(st.config, "model", None)
    size = model_bytes(model, plan) if isinstance(model, str) and model else 0.0
    need = size * SIZE_FACTOR.get(st.stage, 1.5)
    if need > 0:
        dev = folder.stat().st_dev
        base, total, names = plan.needed.get(dev, (folder, 0.0, []))
        plan.needed[dev] = (base, total + need, [*names, st.name])
    return size


def _check_free_space(plan: _Plan) -> None:
    for folder, need, names in plan.needed.values():
        free = shutil.disk_usage(folder).free
        if free < need:
            which = ", ".join(repr(n) for n in names)
            raise OutputError(
                f"stage {which}: out: {folder} has {free / 2**30:.2f} GiB free, and the run needs about "
                f"{need / 2**30:.2f} GiB there; free some space or set out to a bigger disk"
            )


# ------------------------------------------------------------------------------------------ max_seq_length


def model_config_path(value: str) -> Path | None:
    """The ``config.json`` of a local model directory (its root's, else its first module's), if there is one."""
    if not _looks_local(value):
        return None
    path = _local(value)
    if (path / "config.json").is_file():
        return path / "config.json"
    modules = path / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
        except (OSError, ValueError):
            return None
        for entry in entries if isinstance(entries, list) else []:
            candidate = path / str(entry.get("path", "")) / "config.json"
            if candidate.is_file():
                return candidate
    return None


def _read_model_config(model: str) -> tuple[Path | None, dict[str, Any]]:
    """The local model's ``config.json`` path and content ({} when it is not on disk or not readable)."""
    config_file = model_config_path(model)
    if config_file is None:
        return None, {}
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return config_file, {}
    return config_file, config if isinstance(config, dict) else {}


def _check_max_seq_length(st: Stage, where: str, plan: _Plan) -> None:
    value = st.raw.get("max_seq_length")  # only a value the recipe sets; the stages cap their own defaults
    model = getattr(st.config, "model", None)
    if not isinstance(value, int) or isinstance(value, bool) or not isinstance(model, str):
        return
    if _produced(_local(model), plan) is not None:
        return
    config_file, config = _read_model_config(model)
    for key in ("max_position_embeddings", "n_positions"):
        limit = config.get(key)
        if isinstance(limit, int) and limit > 0:
            if value > limit:
                raise ConfigError(f"{where}: max_seq_length: {value} exceeds the model's {key} {limit} "
                                  f"({config_file}); set max_seq_length to at most {limit}", key="max_seq_length")
            return


def _check_layers(st: Stage, where: str, plan: _Plan) -> None:
    spec = getattr(st.config, "layers", None)
    model = getattr(st.config, "model", None)
    if spec is None or not isinstance(model, str) or _produced(_local(model), plan) is not None:
        return
    try:
        check_layers_fit(model, spec)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", key=exc.key) from None


def check_layers_fit(model: str, spec: Any) -> None:
    """Refuse a ``layers`` selection the model lacks, read from its ``config.json`` (nothing when not on disk)."""
    _, config = _read_model_config(model)
    if not config:
        return
    text = config.get("text_config")
    n_layers = config.get("num_hidden_layers", text.get("num_hidden_layers") if isinstance(text, dict) else None)
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        return
    from embedforge.backbone import select_layers

    select_layers(n_layers, spec, source=model)
