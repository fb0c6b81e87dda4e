"""Where the trainer's extra GPU memory goes: a contrastive stage's peak, phase by phase, and what is alive at it.

    python -m bench.dev.gpu_trainer_memory --out DIR --shape SHAPE_DIR [--one-b] [--steps 4] [--batch 32] [--seq 64]

``bench/dev/gpu_check.py`` found the ``contrastive`` stage's recorded peak (``peak_gpu_mb``) about 3.4 GiB above the
step that ``bench/dev/gpu_memory_probe.py`` measures by hand with the same pieces, in every variant. For each variant
this script runs, in one process:

1. the hand-measured step of ``gpu_memory_probe.probe`` (the reference);
2. the ``contrastive`` stage itself for a few steps, with a trainer callback that reads the allocated memory and
   the peak since the previous event at each trainer event (train begin, step begin, before and after the optimizer
   step, step end, train end), so the peak is placed in a phase;
3. torch's allocator history over the same stage (``torch.cuda.memory._record_memory_history``), replayed to the
   moment of the highest allocation: the live blocks there, grouped by the Python frames that allocated them.

Everything is written to ``DIR/results.json``. On CPU (``--device cpu``) it is a dry run: no memory figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench._common import write_results

MB = 2**20
_SKIP = ("torch/nn/modules/module.py", "torch/utils/checkpoint.py", "torch/autograd/", "torch/_tensor.py",
         "torch/utils/_contextlib.py", "torch/amp/autocast_mode.py")


def _short(frame: dict[str, Any]) -> str:
    parts = str(frame.get("filename", "?")).split("/")
    return f"{'/'.join(parts[-2:])}:{frame.get('line', '?')}:{frame.get('name', '?')}"


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frames outside torch's module / autograd plumbing (where a block was really asked for)."""
    kept = [f for f in frames if not any(s in str(f.get("filename", "")) for s in _SKIP)]
    return " < ".join(_short(f) for f in kept[:3]) or "(no Python frame)"


def peak_breakdown(events: list[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    """Replay allocator events (alloc / free) to the highest point of the memory they account for; the blocks
    alive there, grouped by allocation site. Blocks allocated before recording began are not in the events."""
    live: dict[int, int] = {}
    cur = peak = 0
    peak_at = -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif e["action"] in ("free_requested", "free_completed"):
            cur -= live.pop(e["addr"], 0)
    blocks: dict[int, dict[str, Any]] = {}
    for e in events[: peak_at + 1]:
        if e["action"] == "alloc":
            blocks[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            blocks.pop(e["addr"], None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in blocks.values():
        g = groups[_site(e.get("frames") or [])]
        g[0] += e["size"]
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"events": len(events), "peak_event": peak_at, "peak_mb": round(peak / MB, 1),
            "live_blocks": len(blocks),
            "by_site": [{"mb": round(b / MB, 1), "blocks": n, "site": site} for site, (b, n) in ranked[:top]],
            "peak_event_site": _site(events[peak_at].get("frames") or []) if peak_at >= 0 else None}


def _phase_callback(records: list[dict[str, Any]]) -> Any:
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def mark(event: str, state: Any) -> None:
        row: dict[str, Any] = {"event": event, "step": state.global_step}
        if cuda:
            torch.cuda.synchronize()
            row["allocated_mb"] = round(torch.cuda.memory_allocated() / MB, 1)
            row["peak_since_last_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
            torch.cuda.reset_peak_memory_stats()
        records.append(row)

    tokens = {"padded": 0, "real": 0}

    def count(module: Any, inputs: tuple[Any, ...]) -> None:  # the encoder's input: padded and real tokens
        mask = inputs[0]["attention_mask"] if inputs and isinstance(inputs[0], dict) else None
        if mask is not None:
            tokens["padded"] += int(mask.numel())
            tokens["real"] += int(mask.sum())

    class PhaseMemory(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001, D102
            model[0].register_forward_pre_hook(count)
            mark("train_begin", state)

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, D102
            tokens.update(padded=0, real=0)
            mark("step_begin", state)

        def on_pre_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001, D102
            mark("after_backward", state)  # forward + loss + backward ran since step_begin
            records[-1].update(padded_tokens=tokens["padded"], real_tokens=tokens["real"])

        def on_optimizer_step(self, args, state, control, **kw):  # noqa: ANN001, D102
            mark("after_optimizer", state)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, D102
            mark("step_end", state)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001, D102
            mark("train_end", state)

    return PhaseMemory()


def trainer_run(start: Path, dest: Path, variant: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
    import torch

    from embedforge.configs import StageContext
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.train_model import release_memory
    from embedforge.convert.training import run_contrastive
    from embedforge.model import read_lineage
    from embedforge.typed_config import build_config

    from bench.dev.gpu_check import VARIANTS

    cuda = torch.cuda.is_available()
    quant, ckpt = VARIANTS[variant]
    cfg = build_config(ContrastiveConfig, dict(
        model=os.fspath(start), data=["snli-triplets"], quantization=quant, gradient_checkpointing=ckpt,
        max_seq_length=seq, lora_r=16, lora_alpha=32,
        train=dict(precision="bf16" if cuda else "fp32", max_steps=steps, batch_size=batch, save_steps=10 * steps,
                   logging_steps=1, learning_rate=2e-4)))
    records: list[dict[str, Any]] = []
    release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    run_contrastive(cfg, dest, StageContext(extra={"train_callbacks": [_phase_callback(records)]}))
    out: dict[str, Any] = {"variant": variant, "phases": records,
                           "train": read_lineage(dest)["extra"]["train"]}
    if cuda:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        out["allocated_before_mb"] = round(base / MB, 1)
        traces = snapshot.get("device_traces") or []
        events = traces[torch.cuda.current_device()] if traces else []
        out["history"] = peak_breakdown(events)
        peaks = [r["peak_since_last_mb"] for r in records if "peak_since_last_mb" in r]
        if peaks:
            worst = max(range(len(records)), key=lambda i: records[i].get("peak_since_last_mb", 0))
            out["trainer_peak_mb"] = max(peaks)
            out["trainer_peak_phase"] = f"{records[worst - 1]['event'] if worst else 'start'} -> {records[worst]['event']}"
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.dev.gpu_memory_probe import add_shape_args, prepare_start, probe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default="lora-ckpt,qlora-ckpt")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = prepare_start(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"command": " ".join(["python", "-m", "bench.dev.gpu_trainer_memory", *(argv or sys.argv[1:])]),
                              "batch_triplets": args.batch, "seq": args.seq, "steps": args.steps, "rows": []}
    for variant in args.variants.split(","):
        row: dict[str, Any] = {"variant": variant}
        try:
            row["hand_step"] = probe(start, variant, args.batch, args.seq, device)
            row.update(trainer_run(start, out / f"run-{variant}", variant, args.steps, args.batch, args.seq))
            if "trainer_peak_mb" in row:
                row["trainer_minus_hand_mb"] = round(row["trainer_peak_mb"] - row["hand_step"]["step_peak_mb"], 1)
        except Exception as exc:  # noqa: BLE001 - the other variants still run
            import traceback

            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["trace"] = traceback.format_exc()[-1500:]
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("phases", "trace")})[:3000], flush=True)
        write_results(out, result)  # the next variant's hand step starts by releasing this one's models
    return 0


if __name__ == "__main__":
    sys.exit(main())
