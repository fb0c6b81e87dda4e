"""Zero-shot SmolLM2-135M-Instruct embedders: attention x pooling, no training, in one run.

    nice -n 5 python -m bench.dev.convert_zeroshot --out runs/bench-zeroshot [--only causal-mean,echo] [--tasks stsb-dev]

Every variant is built with :func:`embedforge.convert.embedder.build_embedder` from the same dequantized GGUF
checkpoint and scored with :mod:`embedforge.evaluation` (Spearman x100 of cosine similarity). ``results.json`` is
rewritten after each variant (partial results survive an interrupted run) and ``results.md`` holds the table; the
``ratio_to_causal_mean`` column compares every variant with the causal mean-pooling baseline of the same run. A rerun
with the same settings keeps the variants already in ``results.json`` and computes only the missing ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.convert_zeroshot")

ECHO = "Rewrite the sentence: {text}\nRewritten sentence: {text}"

#: name -> build_embedder options
VARIANTS: dict[str, dict[str, Any]] = {
    "causal-mean": {"pooling": "mean", "bidirectional": False},
    "causal-lasttoken": {"pooling": "lasttoken", "bidirectional": False},
    "echo": {"pooling": "echo", "bidirectional": False, "echo_template": ECHO},
    "bidir-mean": {"pooling": "mean", "bidirectional": True},
    "causal-weightedmean": {"pooling": "weightedmean", "bidirectional": False},
    "bidir-lasttoken": {"pooling": "lasttoken", "bidirectional": True},
}


def load_tasks(args: argparse.Namespace) -> dict[str, dict[str, list[Any]]]:
    """The scored pairs of every task; with ``--limit`` a fixed random subset (seed 0) of each."""
    import random

    from embedforge.evaluation import load_task_data, parse_task

    tasks = {}
    for name in args.tasks:
        data = load_task_data(parse_task(name))
        columns = {c: list(data[c]) for c in ("sentence1", "sentence2", "score")}
        n = len(columns["score"])
        if args.limit and args.limit < n:
            keep = sorted(random.Random(0).sample(range(n), args.limit))
            columns = {c: [v[i] for i in keep] for c, v in columns.items()}
        tasks[name] = columns
    return tasks


def run_variant(name: str, options: dict[str, Any], args: argparse.Namespace,
                tasks: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Build one embedder and score it (Spearman of cosine) on every task."""
    import torch

    from embedforge.convert.embedder import build_embedder
    from embedforge.evaluation import evaluate_sts

    t0 = time.perf_counter()
    model = build_embedder(args.model, max_seq_length=args.max_seq_length, **options)
    built = time.perf_counter() - t0
    scores = {}
    for task, data in tasks.items():
        start = time.perf_counter()
        with torch.inference_mode():
            scores[task] = evaluate_sts(model, data, batch_size=args.batch_size, show_progress=False)
        scores[task]["seconds"] = time.perf_counter() - start
    return {
        "variant": name, **{k: v for k, v in options.items() if k != "echo_template"},
        **{f"{task}_spearman": round(m["spearman"], 2) for task, m in scores.items()},
        "build_s": round(built, 1), "eval_s": round(sum(m.get("seconds", 0.0) for m in scores.values()), 1),
    }


def write(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from embedforge.report import table

    base = next((r for r in rows if r["variant"] == "causal-mean"), None)
    key = f"{args.tasks[0]}_spearman"
    for row in rows:
        if base is not None and key in row and base.get(key):
            row["ratio_to_causal_mean"] = round(row[key] / base[key], 3)
    payload = {"model": args.model, "max_seq_length": args.max_seq_length, "tasks": args.tasks, "limit": args.limit,
               "echo_template": ECHO, "variants": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# Zero-shot {args.model} embedders (no training)\n\n"
        f"Tasks: {', '.join(args.tasks)} ({f'{args.limit} random pairs each' if args.limit else 'all pairs'}), "
        f"max_seq_length {args.max_seq_length}.\n\n" + table(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-zeroshot")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--tasks", default="stsb-dev,sick-trial", help="comma-separated evaluation tasks")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="score a fixed random subset of N pairs per task")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    rows: list[dict[str, Any]] = []
    previous = out / "results.json"
    if previous.is_file():  # keep finished variants of an earlier (interrupted) run with the same settings
        old = json.loads(previous.read_text())
        same = (old.get("tasks"), old.get("max_seq_length"), old.get("limit", 0))
        if same == (args.tasks, args.max_seq_length, args.limit):
            rows = [r for r in old.get("variants", []) if r["variant"] in VARIANTS]
    done = {r["variant"] for r in rows}
    tasks = load_tasks(args)
    for name in names:
        if name in done:
            logger.info("%s: already in %s, skipping", name, previous)
            continue
        row = run_variant(name, VARIANTS[name], args, tasks)
        rows.append(row)
        write(out, rows, args)
        logger.info("%s", row)


if __name__ == "__main__":
    main()
