"""Weight quantization that a saved model needs re-applied when it loads (used by :mod:`.loading` and compress).

compress writes ``weight_quantization.json`` beside float weights for optimum-quanto (transformers cannot serialize
quanto models); bitsandbytes weights carry their quantization in ``config.json`` but load only on a CUDA GPU. The
checks and the quanto step live here, beside the loader, so loading a compressed model needs nothing from
``embedforge.compress``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from embedforge.errors import UsageError

logger = logging.getLogger(__name__)

WEIGHT_QUANT_FILE = "weight_quantization.json"


class WeightQuantError(UsageError, RuntimeError):
    """Weight quantization cannot run here; the message says what to install or which hardware is needed."""


def require_bnb() -> None:
    """Raise :class:`WeightQuantError` unless bitsandbytes can run (CUDA device + package installed)."""
    import torch

    if not torch.cuda.is_available():
        raise WeightQuantError(
            "bitsandbytes 8-bit/4-bit weights need a CUDA GPU, and none is visible here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}). "
            "On CPU use weights: quanto-int8 instead.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise WeightQuantError("bitsandbytes is not installed: pip install 'embedforge[gpu]' "
                               "(or pip install bitsandbytes)")


def require_quanto() -> None:
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        raise WeightQuantError("optimum-quanto is not installed: pip install optimum-quanto")


def quantize_quanto(model: Any, weights: str = "int8") -> dict[str, Any]:
    """Quantize the Linear weights of a SentenceTransformer's backbone with optimum-quanto, in place."""
    require_quanto()
    from optimum.quanto import freeze, qint8, quantize

    if weights != "int8":
        raise ValueError(f"quanto weights must be int8 (int4 breaks under inference_mode), not {weights!r}")
    qtype = qint8
    hf = getattr(model[0], "auto_model", None)
    if hf is None:
        raise TypeError(f"the first module ({type(model[0]).__name__}) has no Hugging Face model to quantize")
    quantize(hf, weights=qtype)
    freeze(hf)
    n_q = sum(1 for m in hf.modules() if type(m).__name__.startswith("QLinear"))
    logger.info("quanto %s: %d linear layers quantized", weights, n_q)
    return {"method": "quanto", "weights": weights, "quantized_linear_layers": n_q}
