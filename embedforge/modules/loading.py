"""Load sentence-transformers directories that contain embedforge modules.

sentence-transformers 6 refuses to import a module class outside its own namespace unless ``trust_remote_code``
is set, and that flag would also let ``transformers`` run a checkpoint's own modelling code. embedforge's classes
are installed code, not code shipped with the checkpoint, so :func:`load_embedder` resolves exactly those
``modules.json`` entries to the imported classes and keeps ``trust_remote_code`` off for everything else.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


def module_classes_for(path: str | os.PathLike[str]) -> dict[str, type]:
    """``{modules.json type: installed class}`` for every embedforge module of the saved model at ``path``."""
    modules_json = Path(path) / "modules.json"
    if not modules_json.is_file():
        return {}
    from embedforge.modules.portable import installed_class

    classes: dict[str, type] = {}
    for entry in json.loads(modules_json.read_text()):
        ref = entry.get("type", "")
        if (cls := installed_class(ref)) is not None:  # embedforge.* or a shipped copy's embedforge_* name
            classes[ref] = cls
    return classes


def load_embedder(
    path: str | os.PathLike[str], *, device: str | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> SentenceTransformer:
    """``SentenceTransformer(path)`` that also resolves embedforge's own module classes.

    Uses sentence-transformers' ``_load_with_module_classes`` hook where it exists (the path its trainer uses to
    reload a model); on versions without it, falls back to ``trust_remote_code=True`` only when the checkpoint's
    ``config.json`` declares no custom code (``auto_map``).
    """
    from sentence_transformers import SentenceTransformer

    path = os.fspath(path)
    classes = module_classes_for(path)
    kwargs = {"device": device or "cpu", "trust_remote_code": trust_remote_code, **kwargs}
    loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
    if not classes:
        model = SentenceTransformer(path, **kwargs)
    elif loader is not None:
        model = loader(path, classes, **kwargs)
    else:
        config = Path(path) / "config.json"
        if not trust_remote_code and config.is_file() and "auto_map" in json.loads(config.read_text()):
            raise ValueError(f"{path} ships its own model code (auto_map); pass trust_remote_code=True to load it")
        model = SentenceTransformer(path, **{**kwargs, "trust_remote_code": True})
    return fix_weighted_mean_padding(model)


def _pools_weighted_mean(module: Any) -> bool:
    mode = getattr(module, "pooling_mode", None)  # a string, or a tuple when several modes are combined
    return mode == "weightedmean" or (isinstance(mode, tuple) and "weightedmean" in mode)


def fix_weighted_mean_padding(model: SentenceTransformer) -> SentenceTransformer:
    """Pad on the right when a weighted-mean model that pads on the left is loaded on sentence-transformers < 6.1.

    Before 6.1 the weighted mean weighs each token by its absolute position, so left padding gives padded rows
    wrong vectors. Such a model can only have been built on 6.1 or later (``build_embedder`` refuses it before).
    Pooling by weighted mean never needs left padding, and right padding gives the same vectors on every version,
    so the tokenizer is switched and a warning says so.
    """
    from embedforge.convert.embedder import weighted_mean_handles_left_padding

    tokenizer = getattr(model[0], "tokenizer", None) if len(model) else None
    weighted = any(_pools_weighted_mean(m) for m in model)
    if (weighted and getattr(tokenizer, "padding_side", None) == "left"
            and not weighted_mean_handles_left_padding()):
        tokenizer.padding_side = "right"
        logger.warning("this sentence-transformers (< 6.1) pools weightedmean wrongly with left padding; the model "
                       "now pads on the right, which gives the vectors it was built for")
    return model


_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: Any) -> int | None:
    """The most tokens the model's learned absolute position table can index, or None when it has no such table
    (rotary / relative positions, static token tables): reading longer inputs would index past its end.

    Accepts a SentenceTransformer, one of its modules, or a transformers model. RoBERTa-style tables start after
    the padding index and OPT-style ones after an ``offset``; both are subtracted.
    """
    from torch import nn

    first = model[0] if hasattr(model, "_first_module") or isinstance(model, nn.Sequential) else model
    hf = getattr(first, "auto_model", None) or getattr(first, "model", None) or first
    if not isinstance(hf, nn.Module):
        return None
    for name, module in hf.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            offset = int(getattr(module, "offset", 0) or 0)
            pad = module.padding_idx
            return int(module.num_embeddings) - offset - (pad + 1 if pad is not None else 0)
    return None


def check_max_seq_length(model: Any, max_seq_length: int | None, source: str) -> None:
    """Refuse a ``max_seq_length`` longer than the model's position table (see :func:`position_limit`)."""
    from embedforge.configs import ConfigError

    if max_seq_length is None:
        return
    limit = position_limit(model)
    if limit is not None and max_seq_length > limit:
        raise ConfigError(f"max_seq_length: {max_seq_length} is more than {source} can read (its position "
                          f"embeddings cover {limit} tokens); use at most {limit}", key="max_seq_length")
