"""Where the GPU memory of a LoRA / QLoRA contrastive step goes: weights, forward-saved activations, backward peak.

    python -m bench.dev.gpu_memory_probe --out DIR --shape SHAPE_DIR [--one-b] [--batch 32] [--seq 64]

One hand-written step per variant through embedforge's own pieces (``load_start_model``, ``prepare_for_training``,
``contrastive_loss``) under bf16 autocast, with ``torch.cuda.max_memory_allocated`` read after moving the model to
the GPU, after the forward pass (loss computed, graph alive) and after the backward pass. It complements
``bench/dev/gpu_check.py``, whose trainer-level figure is one number per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench._common import write_results


def _mb(x: int) -> float:
    return round(x / 2**20, 1)


def probe(start: Path, variant: str, batch: int, seq: int, device: str = "cuda") -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")

    def alloc() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return 0

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else 0

    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.train_model import load_start_model, prepare_for_training, release_memory
    from embedforge.convert.training import contrastive_loss
    from embedforge.data import builtin
    from embedforge.typed_config import build_config

    from bench.dev.gpu_check import VARIANTS  # the same three variants

    quant, ckpt = VARIANTS[variant]
    cfg = build_config(ContrastiveConfig, dict(
        model=os.fspath(start), data=["snli-triplets"], quantization=quant, gradient_checkpointing=ckpt,
        max_seq_length=seq, lora_r=16, lora_alpha=32, train=dict(batch_size=batch)))
    release_memory()
    base = alloc()
    model, _ = load_start_model(cfg)
    prepare_for_training(model, cfg)
    model.to(device)
    loss_fn = contrastive_loss(model, cfg)
    rows = builtin("snli-triplets").select(range(batch))
    feats = [model.tokenize(list(rows[col])) for col in ("anchor", "positive", "negative")]
    feats = [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in f.items()} for f in feats]
    out: dict[str, Any] = {"variant": variant, "weights_mb": _mb(alloc() - base),
                           "tokens": int(sum(f["attention_mask"].sum().item() for f in feats))}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        loss = loss_fn(feats, None)
    out["after_forward_mb"] = _mb(alloc() - base)
    out["forward_peak_mb"] = _mb(peak() - base)
    loss.backward()
    out["step_peak_mb"] = _mb(peak() - base)
    out["saved_by_forward_mb"] = round(out["after_forward_mb"] - out["weights_mb"], 1)
    out["checkpointing_on"] = bool(getattr(model[0].auto_model, "is_gradient_checkpointing", False))
    out["loss"] = float(loss.item())
    del model, loss_fn, loss, feats
    release_memory()
    return out


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The options that pick the model and batch (shared with ``bench/dev/gpu_trainer_memory.py``)."""
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--one-b", action="store_true", help="Llama-1B layer shape instead of the shape's own")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a CPU dry run)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)


def prepare_start(args: argparse.Namespace) -> Path:
    """The random-weight model of ``--shape`` (``--one-b``: Llama-1B layers) as a bidirectional mean embedder
    under ``--out``, made once."""
    from bench.dev.gpu_check import ONE_B, make_shape_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "shape-model"
    if not src.exists():
        make_shape_model(Path(args.shape), src, layers=args.layers, **(ONE_B if args.one_b else {}))
    start = out / "start"
    if not start.exists():
        from embedforge.convert.embedder import build_embedder

        build_embedder(src, pooling="mean", bidirectional=True, max_seq_length=args.seq).save(os.fspath(start))
    return start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--variants", default="lora,lora-ckpt,qlora-ckpt")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = prepare_start(args)
    result: dict[str, Any] = {"command": " ".join(["python", "-m", "bench.dev.gpu_memory_probe", *(argv or sys.argv[1:])]),
                              "batch_triplets": args.batch, "seq": args.seq, "rows": []}
    for variant in args.variants.split(","):
        try:
            row = probe(start, variant, args.batch, args.seq, args.device)
        except Exception as exc:  # noqa: BLE001 - the other variants still run
            row = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_results(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
