"""The one model format: a sentence-transformers directory plus ``embedforge.json``.

Every stage reads and writes this format. ``SentenceTransformer(dir)`` loads any of them (custom modules need
embedforge importable). Writes are atomic: everything lands in a temporary sibling directory that is renamed
into place only once it is complete, so an interrupted save never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from embedforge import __version__

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

LINEAGE_FILE = "embedforge.json"


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out_dir`` when the block succeeds.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was. An existing
    ``out_dir`` is moved aside first and deleted only after the new one is in place.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_safe(value: Any) -> Any:
    """Convert dataclasses, paths, enums and numpy scalars into plain JSON values."""
    import dataclasses
    import enum

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
        "extra": _json_safe(extra or {}),
    }


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
) -> Path:
    """Save ``model`` as a sentence-transformers directory with lineage, atomically. Returns the directory."""
    lineage = make_lineage(
        stage=stage, source=source, config=config, metrics=metrics, parent=parent,
        recipe_hash=recipe_hash, extra=extra,
    )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save(str(tmp), safe_serialization=True)
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
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
    lineage = read_lineage(d) or make_lineage(stage="external", source=os.fspath(d))
    lineage.setdefault("metrics", {}).update(_json_safe(metrics))
    tmp = d / (LINEAGE_FILE + ".tmp")
    tmp.write_text(json.dumps(lineage, indent=2) + "\n")
    os.replace(tmp, d / LINEAGE_FILE)


def is_complete(path: str | os.PathLike[str], config: Any = None) -> bool:
    """True when ``path`` holds a finished embedforge output (and, if given, one made with ``config``)."""
    lineage = read_lineage(path)
    if not lineage:
        return False
    if config is not None and lineage.get("config_hash") not in (None, config_hash(config)):
        return False
    return True
