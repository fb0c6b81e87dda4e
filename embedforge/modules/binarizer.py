"""Binarizer modules: turn a pooled sentence embedding into bits, inside the model (and inside ONNX graphs).

Two sentence-transformers modules, both reading ``features["sentence_embedding"]``:

* :class:`SignBinarizer` — plain sign binarization, bit = ``x > 0``, packed 8 dimensions per byte in numpy
  ``packbits`` order (most significant bit first).
* :class:`LearnedBinarizer` — the recurrent multi-bit binarizer of "Binary Embedding-based Retrieval at Tencent"
  (Gan et al., KDD 2023): ``k`` levels of bits per dimension. Level 0 binarizes a residual MLP of the input;
  every next level binarizes a residual MLP of what the levels so far failed to reconstruct. The reconstruction
  is ``sum_t scale_t * b_t`` with ``b_t`` in {-1, +1}^D and one learned scalar per level, so the inner product of
  two reconstructions is a weighted sum of popcounts::

      <u, v> = sum_{s,t} scale_s * scale_t * (D - 2 * hamming(u_s, v_t))

  which is what lets a binary index score it with bit operations. Training (embedding-to-embedding on teacher
  vectors) lives in :mod:`embedforge.compress.binarizer`.

Both write ``features["binary_embedding"]`` (uint8, ``bits * D / 8`` bytes, level 0 first) and, according to
``output``, put either the packed codes (``"packed"``), the {-1, +1} / reconstructed floats (``"float"``) or the
input unchanged (``"passthrough"``) into ``sentence_embedding``. Only traceable ops are used (comparison, casts,
multiply, sum), so ``torch.onnx.export`` bakes binarization into the graph with a packed uint8 output.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from sentence_transformers.base.modules.module import Module
from torch import Tensor, nn

from embedforge.modules.common import copy_shipped_code

logger = logging.getLogger(__name__)

OUTPUTS = ("float", "packed", "passthrough")


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a ``(..., n)`` {0,1}/bool tensor into ``(..., ceil(n / 8))`` uint8, numpy ``packbits`` order.

    Written with a multiply-and-sum so it traces into plain ONNX ops (Mul, ReduceSum, Cast).
    """
    n = bits.shape[-1]
    pad = (-n) % 8
    b = bits.to(torch.int32)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*b.shape[:-1], -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=b.device)
    return (b * weights).sum(dim=-1).to(torch.uint8)


def unpack_bits(codes: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``(..., B)`` uint8 -> ``(..., n)`` {0, 1} float32."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.int32, device=codes.device)
    bits = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*codes.shape[:-1], -1)[..., :n].to(torch.float32)


class _Ste(torch.autograd.Function):
    """sign() forward; straight-through gradient, zeroed where |x| > clip (hard-tanh estimator)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, clip: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(x: Tensor, clip: float = 1.0) -> Tensor:
    """{-1, +1} with a straight-through gradient while training; a plain comparison otherwise (traceable)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Ste.apply(x, clip)
    return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))


class _BinarizerBase(Module):
    """Shared save/forward plumbing."""

    module_input_name = "sentence_embedding"

    def _emit(self, features: dict[str, Tensor], floats: Tensor, bits01: Tensor) -> dict[str, Tensor]:
        packed = pack_bits(bits01)
        features["binary_embedding"] = packed
        if self.output == "packed":
            features["sentence_embedding"] = packed
        elif self.output == "float":
            features["sentence_embedding"] = floats
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        if any(True for _ in self.parameters()):
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)
        copy_shipped_code(self, output_path)


class SignBinarizer(_BinarizerBase):
    """Plain sign binarization (1 bit per dimension), optionally after Matryoshka truncation.

    Args:
        dim: input width (for :meth:`get_embedding_dimension`).
        truncate_dim: keep only the first dims before binarizing (``None``: all).
        output: ``"float"`` ({-1, +1} vectors), ``"packed"`` (uint8 codes) or ``"passthrough"``.
    """

    config_keys = ["dim", "truncate_dim", "output"]

    def __init__(self, dim: int, truncate_dim: int | None = None, output: str = "packed") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.dim = int(dim)
        self.truncate_dim = int(truncate_dim) if truncate_dim else None
        if self.truncate_dim is not None and self.truncate_dim > self.dim:
            # the code would be sized for dimensions the input does not have
            raise ValueError(f"truncate_dim {self.truncate_dim} is larger than the input's {self.dim} dimensions")
        self.output = output

    @property
    def bits_dim(self) -> int:
        return self.truncate_dim or self.dim

    def forward(self, features: dict[str, Tensor], **kwargs: Any) -> dict[str, Tensor]:
        x = features[self.module_input_name]
        if self.truncate_dim:
            x = x[..., : self.truncate_dim]
        bits = x > 0
        return self._emit(features, torch.where(bits, 1.0, -1.0).to(x.dtype), bits)

    def get_embedding_dimension(self) -> int:
        if self.output == "packed":
            return math.ceil(self.bits_dim / 8)
        return self.bits_dim if self.output == "float" else self.dim

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> SignBinarizer:
        config = cls.load_config(model_name_or_path, subfolder=subfolder,
                                 **{k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only")
                                    if k in kwargs})
        return cls(**{k: v for k, v in config.items() if k in cls.config_keys})


class ResidualMLP(nn.Module):
    """``x + W2 act(W1 LayerNorm(x))``; ``W2`` starts at zero so the block starts as the identity."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class LearnedBinarizer(_BinarizerBase):
    """Recurrent residual binarizer with ``bits`` levels of {-1, +1} codes per dimension (BEBR).

    Args:
        dim: embedding width D (input and code width per level).
        bits: levels k; the code has ``k * D`` bits.
        hidden_dim: width of each level's residual MLP (default ``2 * D``).
        output: ``"float"`` (reconstruction, default), ``"packed"`` or ``"passthrough"``.
        input_scale: the input is multiplied by this before the MLPs (unit vectors have tiny coordinates).
    """

    config_keys = ["dim", "bits", "hidden_dim", "output", "input_scale"]

    def __init__(self, dim: int, bits: int = 2, hidden_dim: int | None = None, output: str = "float",
                 input_scale: float | None = None) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.dim = int(dim)
        self.bits = int(bits)
        self.hidden_dim = int(hidden_dim or 2 * dim)
        self.output = output
        self.input_scale = float(input_scale if input_scale is not None else math.sqrt(dim))
        self.levels = nn.ModuleList(ResidualMLP(self.dim, self.hidden_dim) for _ in range(self.bits))
        # Level t's scale starts at 2^-t of the level-0 scale that best fits unit vectors with {-1,+1} codes.
        base = 0.8 / math.sqrt(dim)
        self.log_scales = nn.Parameter(torch.log(torch.tensor([base * 0.5**t for t in range(self.bits)])))

    @property
    def scales(self) -> Tensor:
        return self.log_scales.exp()

    def encode_levels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(codes, reconstruction)``: codes ``(..., bits, D)`` in {-1, +1}, reconstruction ``(..., D)``."""
        scales = self.scales.to(x.dtype)
        recon = torch.zeros_like(x)
        codes = []
        for t, level in enumerate(self.levels):
            residual = (x - recon) * (self.input_scale * 2.0**t)
            b = sign_ste(level(residual))
            codes.append(b)
            recon = recon + scales[t] * b
        return torch.stack(codes, dim=-2), recon

    def forward(self, features: dict[str, Tensor], **kwargs: Any) -> dict[str, Tensor]:
        x = features[self.module_input_name]
        codes, recon = self.encode_levels(x)
        bits01 = (codes > 0).reshape(*codes.shape[:-2], self.bits * self.dim)
        return self._emit(features, recon, bits01)

    def get_embedding_dimension(self) -> int:
        if self.output == "packed":
            return math.ceil(self.bits * self.dim / 8)
        return self.dim

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> LearnedBinarizer:
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        module = cls(**{k: v for k, v in config.items() if k in cls.config_keys})
        cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub)
        return module


def find_binarizer(model: Any) -> _BinarizerBase | None:
    """The binarizer module of a SentenceTransformer, if it has one."""
    for module in model:
        if isinstance(module, _BinarizerBase):
            return module
    return None
