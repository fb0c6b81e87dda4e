"""The ``precision`` option of training stages (torch-free: stage configs import it)."""

from __future__ import annotations

import enum


class Precision(str, enum.Enum):
    """Compute precision: ``auto`` = bf16 autocast where the device supports it, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


def use_bf16(precision: Precision) -> bool:
    """Resolve the precision option: ``auto`` is bf16 on a CUDA device that supports it, else fp32."""
    import torch

    if precision == Precision.BF16:
        return True
    if precision == Precision.FP32:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
