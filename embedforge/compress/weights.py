"""Weight quantization of a model's backbone: bitsandbytes (GPU) and optimum-quanto (CPU or GPU).

* **bitsandbytes** 8-bit (LLM.int8) / 4-bit (NF4): for GPU serving and QLoRA-style training. Loading goes through
  transformers' ``BitsAndBytesConfig``; a model saved after loading keeps its quantized weights and its
  ``quantization_config`` in ``config.json``, so it reloads quantized (on a GPU). Needs CUDA and the
  ``bitsandbytes`` package; without either, :func:`require_bnb` says exactly what is missing.
* **optimum-quanto** int8 weight-only quantization: works on CPU (quanto's int4 weights fail under
  ``torch.inference_mode``, which sentence-transformers' ``encode`` uses, so int4 is not offered).
  transformers cannot serialize quanto
  models, so a compressed directory keeps float weights plus ``weight_quantization.json``, and
  :func:`load_compressed` re-applies the quantization at load time (the saving is in memory, not on disk).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
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


def bnb_config(bits: int, compute_dtype: str = "bfloat16") -> Any:
    """A transformers ``BitsAndBytesConfig`` for 8-bit (LLM.int8) or 4-bit (NF4, double quantization)."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    raise ValueError(f"bitsandbytes supports 8 or 4 bits, not {bits}")


def load_bnb(path: str | os.PathLike[str], bits: int = 8, *, device: str = "cuda",
             compute_dtype: str = "bfloat16") -> Any:
    """Load a model directory with its backbone quantized by bitsandbytes (GPU only)."""
    from embedforge.modules import load_embedder

    require_bnb()
    return load_embedder(os.fspath(path), device=device,
                         model_kwargs={"quantization_config": bnb_config(bits, compute_dtype)})


def quantize_quanto(model: Any, weights: str = "int8") -> dict[str, Any]:
    """Quantize the Linear weights of a SentenceTransformer's backbone with optimum-quanto, in place."""
    require_quanto()
    from optimum.quanto import freeze, qint8, quantize

    if weights != "int8":
        raise ValueError(f"quanto weights must be int8 (int4 breaks under inference_mode), not {weights!r}")
    qtype = qint8
    from embedforge.backbone import hf_model

    hf = hf_model(model)
    quantize(hf, weights=qtype)
    freeze(hf)
    n_q = sum(1 for m in hf.modules() if type(m).__name__.startswith("QLinear"))
    logger.info("quanto %s: %d linear layers quantized", weights, n_q)
    return {"method": "quanto", "weights": weights, "quantized_linear_layers": n_q}


def weight_bytes(model: Any) -> int:
    """Bytes held by a model's parameters and buffers, counting quantized tensors at their packed size."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: Any) -> int:
    """Packed size of a tensor: quanto tensors hold their int data and scales in ``_data`` / ``_scale`` / ``_shift``."""
    inner = [getattr(tensor, name) for name in ("_data", "_scale", "_shift")
             if getattr(tensor, name, None) is not None and type(tensor).__name__ != "Tensor"]
    if inner:
        return sum(_tensor_bytes(t) for t in inner)
    return int(tensor.numel() * tensor.element_size())


def write_plan(directory: str | os.PathLike[str], plan: dict[str, Any]) -> Path:
    path = Path(directory) / WEIGHT_QUANT_FILE
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


def load_compressed(path: str | os.PathLike[str], *, device: str | None = None) -> Any:
    """Load a model directory and re-apply the weight quantization its ``weight_quantization.json`` asks for.

    Directories without that file (or bitsandbytes ones, which carry their quantization in ``config.json``)
    load as usual.
    """
    from embedforge.modules import load_embedder

    plan_file = Path(path) / WEIGHT_QUANT_FILE
    if not plan_file.is_file():
        return load_embedder(os.fspath(path), device=device)
    plan = json.loads(plan_file.read_text())
    if plan.get("method") == "quanto":
        model = load_embedder(os.fspath(path), device=device)
        quantize_quanto(model, plan.get("weights", "int8"))
        return model
    if plan.get("method") == "bitsandbytes":
        require_bnb()
        return load_embedder(os.fspath(path), device=device or "cuda")
    raise WeightQuantError(f"{plan_file}: unknown weight quantization method {plan.get('method')!r}")
