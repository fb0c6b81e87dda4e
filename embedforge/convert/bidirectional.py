"""Bidirectional attention for decoder-only LLMs through ``config.is_causal = False``.

Since transformers 5.2 the mask builders (``create_causal_mask`` and the sliding-window variant) read
``config.is_causal``; when it is False they build a padding-only (bidirectional) mask, under eager, sdpa and flex
attention alike. The flag is a plain config attribute, so ``save_pretrained`` writes it to ``config.json``, PEFT
wrappers share the wrapped model's config, and any later ``from_pretrained`` — including a plain
``SentenceTransformer(dir)`` — loads the model bidirectional again. Nothing is monkey-patched.

The families below are tested per architecture in ``tests/convert/test_bidirectional.py``. For any other
architecture :func:`set_bidirectional` runs a two-forward probe (does the first token's state change when the
last token changes?) and refuses the model with the list of supported families when the flag has no effect
(e.g. GPT-Neo, whose attention applies its own causal buffer).
"""

from __future__ import annotations

import logging
from typing import Any

from embedforge.errors import UsageError

logger = logging.getLogger(__name__)

#: ``config.model_type`` values tested to honour ``is_causal=False`` (eager and sdpa).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama (1-3), SmolLM, TinyLlama",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2 (eager only)",
    "gemma3": "Gemma 3",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3 / Phi-3.5",
}


class UnsupportedArchitectureError(UsageError, ValueError):
    """The model's attention ignores ``is_causal`` and cannot be made bidirectional this way."""


def supported_list() -> str:
    """Human-readable list of the supported families for error messages."""
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())


def _configs(model: Any) -> list[Any]:
    """The model's config plus its text sub-config (multimodal wrappers keep the decoder's config there)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    found = [config]
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        found.append(text)
    return found


def model_type_of(model: Any) -> str:
    """``config.model_type`` of a model (PEFT wrappers included)."""
    return str(getattr(_configs(model)[0], "model_type", "unknown"))


def is_bidirectional(model: Any) -> bool:
    """True when the model's config says ``is_causal=False``."""
    return getattr(_configs(model)[0], "is_causal", None) is False


def _set_flag(model: Any, causal: bool) -> None:
    for config in _configs(model):
        config.is_causal = causal


def probe_bidirectional(model: Any, vocab_size: int | None = None) -> bool:
    """Run two 4-token inputs differing only in the last token; True if the first token's state differs.

    The flag currently set on the model is what is probed; the model is put in eval mode for the probe and
    restored afterwards.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = vocab_size or int(getattr(_configs(model)[-1], "vocab_size", 100) or 100)
    first, second = torch.tensor([[1, 2, 3, 4]]) % vocab, torch.tensor([[1, 2, 3, 5]]) % vocab
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            a = base(input_ids=first.to(device), use_cache=False, output_hidden_states=True).hidden_states[-1]
            b = base(input_ids=second.to(device), use_cache=False, output_hidden_states=True).hidden_states[-1]
    finally:
        base.train(was_training)
    return not torch.allclose(a[0, 0].float(), b[0, 0].float(), atol=1e-6, rtol=0)


def set_bidirectional(model: Any, enabled: bool = True, *, verify: bool | None = None) -> Any:
    """Make ``model`` bidirectional (``enabled=True``) or causal again, in place; returns the model.

    ``verify`` runs :func:`probe_bidirectional` after setting the flag; by default it runs only for architectures
    outside :data:`SUPPORTED_MODEL_TYPES`. A failed probe restores causal attention and raises
    :class:`UnsupportedArchitectureError`.
    """
    model_type = model_type_of(model)
    if not enabled:
        _set_flag(model, True)
        return model
    known = model_type in SUPPORTED_MODEL_TYPES
    _set_flag(model, False)
    if verify is None:
        verify = not known
    if verify and not probe_bidirectional(model):
        _set_flag(model, True)
        raise UnsupportedArchitectureError(
            f"cannot make {model_type!r} bidirectional: its attention ignores config.is_causal=False. "
            f"Supported architectures: {supported_list()}"
        )
    if not known:
        logger.warning(
            "%s is not in the tested list (%s) but the probe shows bidirectional attention; proceeding",
            model_type, ", ".join(SUPPORTED_MODEL_TYPES),
        )
    return model
