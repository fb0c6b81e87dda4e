"""Memory between and during stages: release what finished models held, measure peak host and GPU memory."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def release_memory() -> None:
    """Free models nobody refers to any more, and hand cached CUDA blocks back.

    A SentenceTransformer holds reference cycles, so ``del model`` alone does not free it: only the cycle collector
    does. Without this a finished stage's model stays allocated while the next one loads or trains (a 1B fp32 model
    is about 4 GiB). Torch is not imported here: where nothing imported it, nothing is on a GPU.
    """
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_gpu() -> None:
    """Start a new peak-memory window on the current CUDA device (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb() -> float | None:
    """Peak memory torch allocated on the current CUDA device since :func:`reset_peak_gpu`, in MiB (None without
    CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
