"""Whether 4-bit QLoRA can run here: the check every training stage and the recipe pre-flight share."""

from __future__ import annotations

#: The install line for the GPU extra (bitsandbytes).
GPU_EXTRA = "pip install 'embedforge[gpu]'"


def require_qlora() -> None:
    """Refuse 4-bit QLoRA, in one line, where it cannot run: no CUDA device, or no bitsandbytes."""
    import importlib.util

    import torch

    from embedforge.errors import UsageError

    if not torch.cuda.is_available():
        raise UsageError("quantization: 4bit (QLoRA) needs a CUDA GPU and this machine has none; set quantization: "
                         f"none here, or run on a GPU machine with bitsandbytes ({GPU_EXTRA})")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"quantization: 4bit (QLoRA) needs bitsandbytes, which is not installed: {GPU_EXTRA}")
