"""Mask and pooling helpers shared by the pooling heads.

Everything here is written without data-dependent Python control flow so that the heads trace into ONNX with
dynamic batch and sequence axes: positions are compared with broadcast ``arange`` tensors, and the first real token
of a row is found with an int32 ``argmax`` (which also works with left padding).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def prompt_length_of(features: dict[str, Any]) -> int | None:
    """The ``prompt_length`` feature as a plain int (sentence-transformers stores an int or a 1-element tensor)."""
    value = features.get("prompt_length")
    if value is None:
        return None
    if isinstance(value, Tensor):
        return int(value.reshape(-1)[0].item())
    return int(value)


def first_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's first attended position: 0 with right padding, the pad count with left padding."""
    # int32: onnxruntime's ArgMax has no int64 kernel on some providers.
    return attention_mask.to(torch.int32).argmax(dim=1)


def positions_like(attention_mask: Tensor) -> Tensor:
    """A ``(1, seq)`` int tensor ``[[0, 1, ..., seq-1]]`` on the mask's device."""
    seq = attention_mask.shape[1]
    return torch.arange(seq, device=attention_mask.device).unsqueeze(0)


def pooling_mask(features: dict[str, Any], *, include_prompt: bool = True) -> Tensor:
    """The ``(batch, seq)`` 0/1 mask of tokens to pool.

    Starts from ``attention_mask`` (all ones if absent) and, when ``include_prompt`` is False and the features carry
    a ``prompt_length`` (the instruction tokens sentence-transformers prepended), zeroes the first
    ``prompt_length`` real tokens of every row, whichever side the padding is on.
    """
    tokens = features["token_embeddings"]
    mask = features.get("attention_mask")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.int64, device=tokens.device)
    prompt_length = None if include_prompt else prompt_length_of(features)
    if prompt_length:
        start = first_token_index(mask) + prompt_length
        keep = positions_like(mask) >= start.unsqueeze(1)
        mask = mask * keep.to(mask.dtype)
    return mask


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(batch, seq, dim)`` over the positions where ``mask`` ``(batch, seq)`` is 1.

    Sums in float32 for half-precision inputs; rows with an empty mask give zeros instead of NaN.
    """
    acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    weights = mask.unsqueeze(-1).to(acc)
    total = (hidden.to(acc) * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return (total / count).to(hidden.dtype)


def copy_shipped_code(module: Any, output_path: str) -> None:
    """Keep a model that was loaded from the code shipped in its directory loadable after ``model.save``.

    For a class loaded with ``trust_remote_code`` sentence-transformers copies the code into the module's own
    folder, but looks for it at the top of the model directory when loading; this puts the shipped files
    (``embedforge_*.py``) there too. Call it from ``save`` of modules that live in a subfolder. Installed classes:
    nothing to do (embedforge's save ships the code itself).
    """
    origin = type(module).__module__
    if not origin.startswith("transformers_modules."):
        return
    source = Path(sys.modules[origin].__file__).parent
    root = Path(output_path).parent
    for code in source.glob("embedforge_*.py"):
        if not (root / code.name).exists():
            shutil.copyfile(code, root / code.name)


def _module_base() -> type:
    from sentence_transformers.base.modules import Module

    return Module


class TrainableHead(_module_base()):  # type: ignore[misc]
    """Base for heads with weights: the config goes to ``config.json``, the weights to ``model.safetensors``.

    Subclasses list their constructor arguments in ``config_keys`` and implement ``forward`` and
    ``get_embedding_dimension``; saving and loading mirror each other here.
    """

    config_keys: list[str] = []

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write ``config.json`` and the weights into ``output_path``."""
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)
        copy_shipped_code(self, output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        init_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "TrainableHead":
        """Rebuild the head from its saved config and load its weights (strict: no missing or extra keys)."""
        hub_kwargs = {
            "subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
            "local_files_only": local_files_only,
        }
        config = cls.load_config(model_name_or_path=model_name_or_path, **hub_kwargs)
        for key, value in (init_defaults or {}).items():
            config.setdefault(key, value)
        head = cls(**config)
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, model=head, **hub_kwargs)


class CrossAttention(torch.nn.Module):
    """Multi-head attention of ``x`` (queries) over ``context`` (keys and values), written out in plain ops.

    Plain matmul + softmax rather than a fused kernel keeps the graph exportable to ONNX and identical across
    backends. ``key_mask`` ``(batch, keys)`` hides context positions where it is 0.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dimension {dim} is not divisible by {num_heads} heads")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_out = torch.nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim**-0.5)
        if key_mask is not None:
            hidden = (key_mask == 0).unsqueeze(1).unsqueeze(2)
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.num_heads * self.head_dim)
        return self.to_out(out)


class GEGLUFeedForward(torch.nn.Module):
    """``Linear -> GEGLU -> Linear``: the first projection's output is split into value and gate halves and the
    value is multiplied by ``gelu(gate)`` (Shazeer 2020, used by NV-Embed's latent attention block)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(dim, 2 * dim * mult)
        self.proj_out = torch.nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * torch.nn.functional.gelu(gate))
