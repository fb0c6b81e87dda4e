"""The one model format: a sentence-transformers directory plus ``embedforge.json``.

Every stage reads and writes this format. ``SentenceTransformer(dir)`` loads any of them; a directory with an
embedforge module carries that module's code and needs ``trust_remote_code=True`` (see :mod:`embedforge.modelcard`).
Writes are atomic: everything lands in a temporary sibling directory that is renamed into place only once it is
complete, so an interrupted save never leaves a half-written model behind. Only a directory embedforge wrote (or an
empty one) is ever replaced, one run at a time (see :mod:`embedforge.outputs`).
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge import __version__
# atomic output directories live in embedforge.outputs; importable from here as before
from embedforge.outputs import Existing, atomic_dir  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

LINEAGE_FILE = "embedforge.json"
#: The lineage stage :func:`update_metrics` records in a directory embedforge did not write (it stays foreign).
EXTERNAL_STAGE = "external"


def _json_safe(value: Any) -> Any:
    """Convert dataclasses, paths, enums and numpy scalars into plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return value


def config_hash(config: Any) -> str:
    """A stable sha256 of a config (dataclass or dict), used for lineage and resume checks."""
    blob = json.dumps(_json_safe(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def make_lineage(
    *,
    stage: str,
    source: str,
    config: Any = None,
    metrics: dict[str, Any] | None = None,
    parent: str | os.PathLike[str] | None = None,
    recipe_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``embedforge.json`` record; the parent's lineage (if it has one) is chained in."""
    parents: list[dict[str, Any]] = []
    if parent is not None and (Path(parent) / LINEAGE_FILE).is_file():
        prev = read_lineage(parent)
        parents = [
            {"path": os.fspath(parent), "stage": prev.get("stage"), "source": prev.get("source")},
            *prev.get("parents", []),
        ]
    elif parent is not None:
        parents = [{"path": os.fspath(parent), "stage": None, "source": None}]
    return {
        "embedforge_version": __version__,
        "stage": stage,
        "source": source,
        "parents": parents,
        "recipe_hash": recipe_hash,
        "config": _json_safe(config) if config is not None else {},
        "config_hash": config_hash(config) if config is not None else None,
        "metrics": _json_safe(metrics or {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "output_id": uuid.uuid4().hex,  # tells apart two outputs made with one config within one second
        "extra": _json_safe(extra or {}),
    }


def write_lineage(directory: str | os.PathLike[str], lineage: dict[str, Any] | None = None,
                  **fields: Any) -> dict[str, Any]:
    """Write ``embedforge.json`` into ``directory`` and return the record written.

    Give a record built by :func:`make_lineage`, or :func:`make_lineage`'s keyword arguments to build it here. The
    one writer of the lineage file: :func:`save_model` calls it for model directories, and stages whose output is
    not a sentence-transformers model (export, eval) call it inside their own :func:`atomic_dir` block.
    """
    if lineage is None:
        lineage = make_lineage(**fields)
    elif fields:
        raise TypeError(f"write_lineage: give a lineage record or its fields, not both ({', '.join(fields)})")
    (Path(directory) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return lineage


def save_model(
    model: SentenceTransformer,
    out_dir: str | os.PathLike[str],
    *,
    stage: str,
    source: str,
    config: Any = None,
    metrics: dict[str, Any] | None = None,
    parent: str | os.PathLike[str] | None = None,
    recipe_hash: str | None = None,
    extra: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    folders: dict[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Save ``model`` as a sentence-transformers directory with lineage, atomically. Returns the directory.

    ``files`` (name -> text) and ``folders`` (name -> a folder copied in) are side files the stage adds beside the
    model, e.g. ``weight_quantization.json`` or a kept adapter in ``adapter/``; they land in the same atomic rename.
    The lineage is built (a parent's lineage read) before anything is written.
    """
    import shutil

    from embedforge.modelcard import finish_model_dir

    out = Path(out_dir)
    lineage = make_lineage(stage=stage, source=source, config=config, metrics=metrics, parent=parent,
                           recipe_hash=recipe_hash, extra=extra)
    with atomic_dir(out) as tmp:
        model.save(str(tmp), safe_serialization=True)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for name, folder in (folders or {}).items():
            shutil.copytree(folder, tmp / name)
        write_lineage(tmp, lineage)
        finish_model_dir(tmp, model, name=out.name)  # shipped module code, legacy configs, model card
    logger.info("saved %s model to %s", stage, out)
    return out


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | None = None,
    trust_remote_code: bool = False,
    truncate_dim: int | None = None,
    merge_adapter: bool = True,
    weight_quantization: bool = True,
) -> SentenceTransformer:
    """Load any embedforge (or plain sentence-transformers) model directory, or a hub id / alias.

    A directory loads as the model its stage produced, whatever ``embedforge.json`` records on top of the
    sentence-transformers files: a kept LoRA adapter is put back (merged into the weights unless
    ``merge_adapter=False``), a quanto weight quantization is re-applied (unless ``weight_quantization=False``),
    bitsandbytes weights load on the GPU, and embedforge's own heads resolve without ``trust_remote_code``.
    See :func:`embedforge.modules.loading.load_saved`.
    """
    from sentence_transformers import SentenceTransformer

    from embedforge.sources import resolve_source

    resolved = resolve_source(os.fspath(path))
    if isinstance(resolved, Path):
        from embedforge.modules.loading import load_saved

        return load_saved(resolved, device=device, trust_remote_code=trust_remote_code, truncate_dim=truncate_dim,
                          merge_adapter=merge_adapter, weight_quantization=weight_quantization)
    return SentenceTransformer(
        resolved,
        device=device or "cpu",
        trust_remote_code=trust_remote_code,
        truncate_dim=truncate_dim,
    )


def read_lineage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the ``embedforge.json`` record of a model directory ({} for a plain directory)."""
    f = Path(path) / LINEAGE_FILE
    if not f.is_file():
        return {}
    return json.loads(f.read_text())


def update_metrics(path: str | os.PathLike[str], metrics: dict[str, Any]) -> None:
    """Merge ``metrics`` into a model directory's lineage record (write to temp file, then replace)."""
    d = Path(path)
    lineage = read_lineage(d) or make_lineage(stage=EXTERNAL_STAGE, source=os.fspath(d))
    lineage.setdefault("metrics", {}).update(_json_safe(metrics))
    tmp = d / (LINEAGE_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(lineage, indent=2) + "\n")
        os.replace(tmp, d / LINEAGE_FILE)
    except OSError as exc:
        from embedforge.outputs import disk_full, is_disk_full

        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(d / LINEAGE_FILE, exc) from exc
        raise


def is_complete(path: str | os.PathLike[str], config: Any = None,
                inputs: list[str | os.PathLike[str]] | None = None) -> bool:
    """True when ``path`` holds a finished embedforge output (and, if given, one made with ``config`` from
    ``inputs`` as they are now: see :func:`stale_reason`)."""
    if inputs is None:
        lineage = read_lineage(path)
        if not lineage or lineage.get("stage") == EXTERNAL_STAGE:  # none, or metrics recorded in a foreign model
            return False
        return config is None or lineage.get("config_hash") in (None, config_hash(config))
    return stale_reason(path, config, inputs) is None


# ------------------------------------------------------------------------------------------ input identity
#
# An output records, in its lineage's ``inputs``, the identity of every local path the stage consumed: a model
# directory with lineage by the fields that change whenever it is made again (stage, config hash, creation time,
# output id and its own inputs; metrics merged in later by an eval stage do not count), any other directory by
# the names, sizes and modification times of its files, and a file by size, modification time and sha256.

_MAX_DIR_FILES = 10_000
NO_OUTPUT = "no output"
CONFIG_CHANGED = "config changed"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lineage_identity(lineage: dict[str, Any]) -> str:
    keys = ("stage", "source", "config_hash", "created", "output_id", "inputs")
    blob = json.dumps({k: lineage.get(k) for k in keys}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _dir_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    seen = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            st = f.stat()
            digest.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            seen += 1
            if seen >= _MAX_DIR_FILES:  # a huge folder: its first files in a fixed order stand for it
                return digest.hexdigest()
    return digest.hexdigest()


def input_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the current content of an input path (recorded in an output's lineage ``inputs``)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(p)}
    if p.is_dir():
        lineage = read_lineage(p)
        if lineage:
            return {"kind": "model", "id": _lineage_identity(lineage)}
        return {"kind": "dir", "files": _dir_fingerprint(p)}
    return {"kind": "missing"}


def same_input(recorded: Any, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` still has the identity ``recorded`` (a file whose time changed but not its bytes is the
    same; its sha256 is computed only when size or time differ)."""
    if not isinstance(recorded, dict):
        return False
    p = Path(path)
    kind = recorded.get("kind")
    if kind == "file" and p.is_file():
        st = p.stat()
        if st.st_size != recorded.get("size"):
            return False
        return st.st_mtime_ns == recorded.get("mtime_ns") or _sha256(p) == recorded.get("sha256")
    return kind != "file" and input_identity(p) == recorded


def record_inputs(path: str | os.PathLike[str], inputs: dict[str, dict[str, Any]]) -> None:
    """Write the identities of the inputs an output was made from into its lineage (temp file, then replace)."""
    d = Path(path)
    lineage = read_lineage(d)
    if not lineage:
        raise FileNotFoundError(f"{d / LINEAGE_FILE}: no lineage to record the stage's inputs in")
    lineage["inputs"] = inputs
    tmp = d / (LINEAGE_FILE + ".tmp")
    tmp.write_text(json.dumps(lineage, indent=2) + "\n")
    os.replace(tmp, d / LINEAGE_FILE)


def stale_reason(path: str | os.PathLike[str], config: Any,
                 inputs: list[str | os.PathLike[str]]) -> str | None:
    """Why the output at ``path`` must be made again, or None when it is complete and current.

    Complete and current means: it has lineage, its config hash matches ``config`` (when given), and it records
    the identity of exactly ``inputs``, each unchanged since.
    """
    lineage = read_lineage(path)
    if not lineage or lineage.get("stage") == EXTERNAL_STAGE:  # none, or metrics recorded in a foreign model
        return NO_OUTPUT
    if config is not None and lineage.get("config_hash") not in (None, config_hash(config)):
        return CONFIG_CHANGED
    recorded = lineage.get("inputs")
    if not isinstance(recorded, dict):
        return "its inputs were not recorded"
    wanted = {os.fspath(Path(p)) for p in inputs}
    for name in sorted(wanted - set(recorded)):
        return f"new input {name}"
    for name in sorted(set(recorded) - wanted):
        return f"input {name} is no longer used"
    for name in sorted(wanted):
        if not same_input(recorded[name], name):
            return f"input {name} changed"
    return None
