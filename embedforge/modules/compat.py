"""Configuration files that older sentence-transformers and transformers releases can read too.

sentence-transformers 6 saves ``1_Pooling/config.json`` as ``{"embedding_dimension", "pooling_mode",
"include_prompt"}``; 5.x rebuilds the module with ``Pooling(**config)``, whose signature is
``Pooling(word_embedding_dimension, pooling_mode=None, pooling_mode_cls_token=False, pooling_mode_max_tokens=False,
pooling_mode_mean_tokens=True, pooling_mode_mean_sqrt_len_tokens=False, pooling_mode_weightedmean_tokens=False,
pooling_mode_lasttoken=False, include_prompt=True)``, so the new keys make it fail. sentence-transformers 6 still
reads the old keys (it renames ``word_embedding_dimension`` and folds the ``pooling_mode_*`` flags into
``pooling_mode``), so the old form loads the same module on both.

transformers 5 saves fast tokenizers as ``"tokenizer_class": "TokenizersBackend"``, a name 4.x does not know;
``PreTrainedTokenizerFast`` is the same class in 5.x (an alias) and the generic fast tokenizer in 4.x.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The boolean flag of each pooling mode, in the order both 5.x and 6.x concatenate combined modes.
LEGACY_POOLING_FLAGS: dict[str, str] = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}

#: The parameters of sentence-transformers 5.x ``Pooling.__init__`` (checked against the 5.1.0 release).
LEGACY_POOLING_PARAMS = ("word_embedding_dimension", "pooling_mode", *LEGACY_POOLING_FLAGS.values(), "include_prompt")

#: tokenizer classes transformers 5 writes that transformers 4.x cannot resolve, and what to write instead.
LEGACY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}

POOLING_TYPE_SUFFIX = ".Pooling"


def legacy_pooling_config(
    embedding_dimension: int, pooling_mode: str | list[str] | tuple[str, ...], include_prompt: bool = True
) -> dict[str, Any] | None:
    """The 5.x form of a pooling config, or None when it cannot express ``pooling_mode`` exactly.

    Combined modes are written as flags, which fix the concatenation order; a combination in another order (or
    with a mode twice, or a mode 5.x lacks) has no old form.
    """
    modes = [pooling_mode] if isinstance(pooling_mode, str) else list(pooling_mode)
    order = list(LEGACY_POOLING_FLAGS)
    if not modes or any(m not in LEGACY_POOLING_FLAGS for m in modes) or modes != sorted(set(modes), key=order.index):
        return None
    config: dict[str, Any] = {"word_embedding_dimension": int(embedding_dimension)}
    config.update({flag: mode in modes for mode, flag in LEGACY_POOLING_FLAGS.items()})
    config["include_prompt"] = bool(include_prompt)
    return config


def rewrite_pooling_config(folder: str | os.PathLike[str]) -> bool:
    """Rewrite a saved ``Pooling`` module's ``config.json`` in the 5.x form; True when the file changed."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    if "pooling_mode" not in config or not ({"embedding_dimension", "word_embedding_dimension"} & set(config)):
        return False  # already in the old form, or not a config this function knows
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    legacy = legacy_pooling_config(dim, config["pooling_mode"], config.get("include_prompt", True))
    if legacy is None:
        logger.info("%s: pooling_mode %r has no sentence-transformers 5.x form; left as it is", path,
                    config["pooling_mode"])
        return False
    path.write_text(json.dumps(legacy, indent=4) + "\n", encoding="utf-8")
    return True


def rewrite_tokenizer_config(folder: str | os.PathLike[str]) -> bool:
    """Replace a ``tokenizer_class`` transformers 4.x cannot resolve; True when the file changed."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    replacement = LEGACY_TOKENIZER_CLASSES.get(config.get("tokenizer_class", ""))
    if replacement is None:
        return False
    config["tokenizer_class"] = replacement
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def make_legacy_compatible(model_dir: str | os.PathLike[str]) -> list[str]:
    """Rewrite the pooling and tokenizer configs of a saved model in forms older releases read; returns the files
    changed (relative to ``model_dir``)."""
    root = Path(model_dir)
    modules_json = root / "modules.json"
    entries = json.loads(modules_json.read_text(encoding="utf-8")) if modules_json.is_file() else []
    changed: list[str] = []
    folders = {""} | {e.get("path", "") for e in entries}
    for folder in sorted(folders):
        if rewrite_tokenizer_config(root / folder):
            changed.append(os.path.join(folder, "tokenizer_config.json"))
    for entry in entries:
        ref = entry.get("type", "")
        if ref.startswith("sentence_transformers.") and ref.endswith(POOLING_TYPE_SUFFIX):
            if rewrite_pooling_config(root / entry.get("path", "")):
                changed.append(os.path.join(entry.get("path", ""), "config.json"))
    return changed
