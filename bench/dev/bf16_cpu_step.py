"""fp32 vs bf16-autocast training step of the SmolLM2 distill student on this CPU, alternating in one process.

    python -m bench.dev.bf16_cpu_step --out DIR [--threads 2] [--batches 6] [--batch-size 64] [--max-len 128]

The student is the one ``bench/dev/convert_smollm2.py`` distills: SmolLM2-135M-Instruct cut to its first 8 layers,
causal attention, mean pooling. Two workloads from the distill texts (shuffled with a fixed seed): ``mixed`` batches
(short sentences and long documents, padded to the longest, at most ``--max-len`` tokens) and ``short`` batches
(texts under 200 characters, what most length-grouped batches hold). A step is the forward pass, a
scalar loss and the backward pass; fp32 and bf16 run the same batch back to back, the first batch is warm-up. Writes
``DIR/results.json`` with every time, the padded tokens per batch and the fp32 / bf16 ratio, and the largest
difference between the two precisions' pooled vectors (cosine) as a sanity check.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import write_results


def _texts(n: int) -> list[str]:
    from embedforge.data import builtin
    from embedforge.data import load_texts as gather_texts

    texts = gather_texts(["stsb-train", "sick-train", "snli-triplets", "scifact-train-pairs"])
    bodies = [t.strip() for t in builtin("newsgroups-pairs")["positive"] if len(t.strip()) > 200]
    texts = texts + random.Random(0).sample(bodies, min(2000, len(bodies)))
    random.Random(0).shuffle(texts)
    return texts[:n]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from embedforge.convert.embedder import build_embedder
    from embedforge.backbone import apply_layers as truncate_layers  # layers: N keeps the first N

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--keep-layers", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_embedder("smollm2-135m", pooling="mean", bidirectional=False, max_seq_length=args.max_len)
    truncate_layers(model, args.keep_layers)
    model.train()
    texts = _texts(20 * args.batches * args.batch_size)
    n = args.batches * args.batch_size
    short = [t for t in texts if len(t) < 200][:n]  # what most length-grouped batches hold
    workloads = {"mixed": texts[:n], "short": short}

    def step(batch: list[str], bf16: bool) -> tuple[float, int, np.ndarray]:
        features = model.tokenize(batch)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(features)["sentence_embedding"]
        out.float().pow(2).sum().backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds, int(features["attention_mask"].numel()), out.detach().float().numpy()

    result: dict[str, Any] = {
        "command": " ".join(["python", "-m", "bench.dev.bf16_cpu_step", *(argv or sys.argv[1:])]),
        "threads": args.threads, "batch_size": args.batch_size, "max_len": args.max_len,
        "keep_layers": args.keep_layers, "bf16_supported_flags": _cpu_flags(), "torch": torch.__version__,
    }
    for name, pool in workloads.items():
        batches = [pool[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
        step(batches[0], False)
        step(batches[0], True)
        rows: list[dict[str, Any]] = []
        worst_cos = 1.0
        for batch in batches[1:]:
            t32, tokens, v32 = step(batch, False)
            t16, _, v16 = step(batch, True)
            cos = np.sum(v32 * v16, axis=1) / (np.linalg.norm(v32, axis=1) * np.linalg.norm(v16, axis=1))
            worst_cos = min(worst_cos, float(cos.min()))
            rows.append({"padded_tokens": tokens, "fp32_s": round(t32, 3), "bf16_s": round(t16, 3)})
        fp32 = sum(r["fp32_s"] for r in rows)
        bf16 = sum(r["bf16_s"] for r in rows)
        result[name] = {"rows": rows, "fp32_s": round(fp32, 2), "bf16_s": round(bf16, 2),
                        "fp32_over_bf16": round(fp32 / bf16, 3), "min_cos_bf16_vs_fp32": round(worst_cos, 5)}
    write_results(args.out, result)
    print(result)
    return 0


def _cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split() if "bf16" in f or f.startswith("amx"))


if __name__ == "__main__":
    sys.exit(main())
