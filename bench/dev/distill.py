"""Distillation benchmark: all-MiniLM-L6-v2 -> layer students and a static student, on CPU.

    nice -n 5 python -m bench.dev.distill --out runs/bench-distill

Teacher vectors for unlabeled texts from ../shared/data (STS-B train, SICK train, SNLI, 20 Newsgroups subjects
and bodies, SciFact train-pair claims and abstracts; none of the evaluation sets) are computed once and cached;
each student is trained with the ``distill`` stage and saved under ``OUT/models/<name>/``. Layer students
train on length-grouped batches (short sentences and long documents are not padded together) and, with
``--rotation pca``, learn the teacher vectors rotated onto their principal axes, so that Matryoshka prefixes
start with the directions of largest variance. ``--scifact-corpus`` adds the SciFact corpus abstracts as
unlabeled text (unsupervised domain adaptation, an ablation: the corpus is what SciFact retrieval searches). Every model is evaluated on STS-B dev (Spearman),
SciFact dev (nDCG@10) and Banking77 (accuracy) at its full dimension and at 256/128/64/32 (Matryoshka
prefixes, renormalized), each text encoded once. Encode throughput is measured in the same run for the teacher
and each student (alternating, best of several rounds, so that other jobs on the machine hurt both alike).
``OUT/results.json`` is rewritten after every step; ``OUT/results.md`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ["stsb-dev", "scifact-dev", "banking77"]
DIMS = [256, 128, 64, 32]
logger = logging.getLogger("bench.distill")


# ---------------------------------------------------------------------------------------------- texts


def corpus_sentences(documents: list[str], n: int, seed: int = 1) -> list[str]:
    """``n`` random sentences (6 words or more) cut from ``documents``: claim-like unlabeled texts."""
    sentences = [s.strip() for d in documents for s in re.split(r"(?<=[.!?])\s+", d) if len(s.split()) >= 6]
    return random.Random(seed).sample(sentences, min(n, len(sentences)))


def training_texts(limit: int, seed: int = 0, scifact_corpus: bool = False, scifact_sentences: int = 0) -> list[str]:
    """Unlabeled texts from the shared data, no evaluation set among them, shuffled, at most ``limit``.

    ``scifact_corpus`` adds the SciFact corpus abstracts (the documents SciFact dev retrieval searches, without
    its queries or relevance labels) and ``scifact_sentences`` sentences cut from them: an unsupervised
    domain-adaptation ablation, off by default.
    """
    from embedforge.data import builtin, builtin_beir

    sources = [builtin(name) for name in
               ("stsb-train", "sick-train", "snli-triplets", "newsgroups-pairs", "scifact-train-pairs")]
    if scifact_corpus:
        abstracts = list(builtin_beir("scifact-dev").corpus.values())
        sources.append({"text": abstracts + corpus_sentences(abstracts, scifact_sentences)})
    seen: dict[str, None] = {}
    for ds in sources:
        for column in (ds.column_names if hasattr(ds, "column_names") else list(ds)):
            values = ds[column]
            if values and isinstance(values[0], str):
                for text in values:
                    text = " ".join(text.split())[:1000]
                    if len(text) > 3:
                        seen.setdefault(text, None)
    texts = list(seen)
    random.Random(seed).shuffle(texts)
    return texts[:limit]


# ------------------------------------------------------------------------------------------ evaluation


class CachedEncoder:
    """Encodes each distinct text once at full dimension; Matryoshka evaluations reuse the vectors."""

    def __init__(self, model: Any):
        self.model = model
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str], batch_size: int, prompt: str | None) -> np.ndarray:
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            with torch.inference_mode():
                out = self.model.encode(missing, batch_size=batch_size, prompt=prompt, convert_to_numpy=True,
                                        show_progress_bar=False)
            self.cache.update(zip(missing, np.asarray(out, dtype=np.float32)))
        return np.stack([self.cache[t] for t in texts])


def evaluate_all_dims(model: Any, full_dim: int) -> dict[str, dict[str, float]]:
    """Main score of every task at the full dim and each Matryoshka prefix."""
    from embedforge.evaluation import evaluate, main_score

    encoder = CachedEncoder(model)
    out: dict[str, dict[str, float]] = {}
    for dim in [full_dim, *[d for d in DIMS if d < full_dim]]:
        res = evaluate(encoder, TASKS, batch_size=64, truncate_dim=None if dim == full_dim else dim,
                       show_progress=False)
        scores = {t: round(main_score(t, res[t]), 2) for t in TASKS}
        scores["average"] = round(float(np.mean([scores[t] for t in TASKS])), 2)
        out["full" if dim == full_dim else str(dim)] = scores
        logger.info("dim %s: %s", dim, scores)
    return out


def throughput(models: dict[str, Any], texts: list[str], rounds: int = 3, batch_size: int = 64) -> dict[str, float]:
    """Texts per second of each model on ``texts``; models alternate, best round counts."""
    import torch

    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            with torch.inference_mode():
                model.encode(texts, batch_size=batch_size, show_progress_bar=False)
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
    return {k: round(v, 1) for k, v in best.items()}


def evaluate_into(entry: dict[str, Any], model: Any) -> None:
    """Scores at every dim (and the time they took) into ``entry``."""
    start = time.perf_counter()
    entry["scores"] = evaluate_all_dims(model, int(model.get_embedding_dimension()))
    entry["eval_seconds"] = round(time.perf_counter() - start, 1)


def model_size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20, 2)


# ---------------------------------------------------------------------------------------------- driver


def write(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Distillation benchmark (teacher all-MiniLM-L6-v2, CPU)", "",
             "Commands (in order, on the same OUT; a rerun resumes and adds what is missing):", "",
             *[f"- `{c}`" for c in results.get("commands", [results.get("command", "")])], "",
             f"{results.get('n_texts', '?')} training texts; SciFact corpus in training: "
             f"{results.get('scifact_corpus_in_training', False)}; {results.get('threads', '?')} torch thread(s); "
             f"evaluation and throughput at {results.get('eval_max_seq_length', '?')} tokens.", "",
             "| model | dim | STS-B | SciFact | Banking77 | avg | % teacher | % own full | speed-up | size MB | distill s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    teacher = results.get("models", {}).get("teacher", {}).get("scores", {}).get("full", {})
    for name, info in results.get("models", {}).items():
        scores = info.get("scores", {})
        if not scores:
            continue
        full_avg = scores.get("full", {}).get("average")
        for dim, s in scores.items():
            pct_t = f"{100 * s['average'] / teacher['average']:.1f}" if teacher else ""
            pct_own = f"{100 * s['average'] / full_avg:.1f}" if full_avg else ""
            up = f"{info['speed']['speedup']:.1f}x" if info.get("speed") else ""
            lines.append(f"| {name} | {dim} | {s.get('stsb-dev', '')} | {s.get('scifact-dev', '')} | "
                         f"{s.get('banking77', '')} | "
                         f"{s['average']} | {pct_t} | {pct_own} | {up if dim == 'full' else ''} | "
                         f"{info.get('size_mb', '') if dim == 'full' else ''} | "
                         f"{info.get('distill', {}).get('seconds', '') if dim == 'full' else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=60000, help="training texts (at most; 51,567 exist)")
    parser.add_argument("--students", default="layers2,static,layers3",
                        help="comma list of: layers2 (two layers, --keep-layers), layers3 (1,3,5), static")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--static-epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=64, help="layer students' batch size")
    parser.add_argument("--max-steps", type=int, default=-1, help="layer students: stop after this many steps")
    parser.add_argument("--static-lr", type=float, default=1e-2)
    parser.add_argument("--speed-texts", type=int, default=500)
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--static-init", action="store_true",
                        help="also score the static student's model2vec initialisation before training")
    parser.add_argument("--eval-max-seq-length", type=int, default=128,
                        help="input length for every model in evaluation and throughput (same for all)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="evaluation tasks (for quick checks)")
    parser.add_argument("--keep-layers", default="0,5", help="layers2 student: the two teacher layers it keeps")
    parser.add_argument("--rotation", default="pca", choices=["pca", "none"],
                        help="layer students: learn the teacher vectors rotated onto their principal axes")
    parser.add_argument("--batching", default="length", choices=["length", "random"],
                        help="layer students: length-grouped or random batches")
    parser.add_argument("--full-dim-weight", type=float, default=1.0,
                        help="layer students: weight of the full-dim view against each Matryoshka prefix (1 each)")
    parser.add_argument("--max-seq-length", type=int, default=128, help="training input length (teacher and students)")
    parser.add_argument("--scifact-corpus", action="store_true",
                        help="ablation: add the SciFact corpus abstracts to the unlabeled training texts")
    parser.add_argument("--scifact-sentences", type=int, default=0,
                        help="with --scifact-corpus: also this many sentences cut from the corpus abstracts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same for every model)")
    args = parser.parse_args(argv)
    TASKS[:] = [t for t in args.tasks.split(",") if t]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)

    from embedforge.configs import StageContext
    from embedforge.distill.config import DistillConfig
    from embedforge.distill.pipeline import run
    from embedforge.typed_config import build_config
    from embedforge.model import load_model, read_lineage
    from embedforge.sources import resolve_source

    out = args.out.resolve()
    (out / "models").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    results.setdefault("models", {})
    results["command"] = " ".join(["python -m bench.dev.distill", *(argv or sys.argv[1:])])
    results.setdefault("commands", [])
    results["commands"].append(results["command"])  # a resumed or extended run keeps every invocation
    results["targets"] = {"layers_pct_teacher": 95, "layers_speedup": 2.5, "dim128_pct_own_full": 97,
                          "static_pct_teacher": 85, "static_speedup": 50}
    settings = results.setdefault("settings", {})
    if "out" in settings:  # written by an earlier version as one flat dict: file it under its command
        results["settings"] = settings = {results["commands"][-2] if len(results["commands"]) > 1 else "": settings}
    settings[results["command"]] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    # 1. texts (written once; the pipeline reads them as a jsonl file)
    texts_file = out / "texts.jsonl"
    if not texts_file.is_file():
        texts = training_texts(args.texts, scifact_corpus=args.scifact_corpus,
                               scifact_sentences=args.scifact_sentences)
        texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    results["n_texts"] = sum(1 for _ in texts_file.open())
    write(out, results)

    # 2. the teacher: vectors cached once (the first student's run fills the cache), scores at every dim
    teacher_dir = Path(resolve_source("minilm-l6"))
    ctx = StageContext(cache_dir=out / "cache")
    teacher = load_model(teacher_dir)
    teacher.max_seq_length = args.eval_max_seq_length
    speed_texts = training_texts(10**9, seed=1)[-args.speed_texts:]
    results["eval_max_seq_length"] = args.eval_max_seq_length
    results["threads"] = args.threads
    results["scifact_corpus_in_training"] = args.scifact_corpus
    results["scifact_corpus_sentences"] = args.scifact_sentences if args.scifact_corpus else 0
    results["throughput_texts"] = len(speed_texts)
    entry = results["models"].setdefault("teacher", {})
    entry["size_mb"] = model_size_mb(teacher_dir)
    if not entry.get("scores"):
        evaluate_into(entry, teacher)
        write(out, results)

    # 3. each student: distill (resumable), throughput against the teacher in the same call, scores
    # --max-steps > 0 alone ends a layer student's run (epochs off), as it always did here
    layer_train = dict(learning_rate=args.lr, batch_size=args.batch_size,
                       max_steps=args.max_steps if args.max_steps > 0 else None,
                       epochs=None if args.max_steps > 0 else args.epochs)
    layer_common = dict(student="layers", train=layer_train, target_rotation=args.rotation, batching=args.batching,
                        full_dim_weight=args.full_dim_weight)
    specs = {
        "layers2": dict(layers=[int(i) for i in args.keep_layers.split(",")], **layer_common),
        "layers3": dict(layers=[1, 3, 5], **layer_common),
        "static": dict(student="static", train=dict(learning_rate=args.static_lr, epochs=args.static_epochs,
                                                    batch_size=256, warmup_ratio=0.0)),
    }
    for name in [s for s in args.students.split(",") if s]:
        model_dir = out / "models" / name
        spec = {**specs[name], "train": {**specs[name]["train"], "save_steps": 100}}
        cfg = build_config(DistillConfig, dict(model=str(teacher_dir), texts=[str(texts_file)], matryoshka_dims=DIMS,
                                               max_seq_length=args.max_seq_length, shard_size=1024, **spec))
        start = time.perf_counter()
        run(cfg, model_dir, ctx)
        entry = results["models"].setdefault(name, {})
        entry["spec"] = {k: getattr(v, "value", v) for k, v in specs[name].items()}
        entry["distill"] = read_lineage(model_dir).get("metrics", {}).get("distill", {})
        entry["distill"]["wall_seconds_this_run"] = round(time.perf_counter() - start, 1)
        entry["size_mb"] = model_size_mb(model_dir)
        write(out, results)
        candidates = [(name, model_dir)]
        if name == "static" and args.static_init:  # the model2vec initialisation alone, untrained
            init_dir = out / "models" / "static-init"
            if not (init_dir / "modules.json").is_file():
                from embedforge.distill.students import static_student
                from embedforge.model import save_model

                save_model(static_student(load_model(teacher_dir), teacher_path=teacher_dir), init_dir,
                           stage="distill", source=str(teacher_dir), extra={"note": "model2vec init, untrained"})
            candidates.append(("static-init", init_dir))
        for cand, cand_dir in candidates:
            entry = results["models"].setdefault(cand, {})
            entry["size_mb"] = model_size_mb(cand_dir)
            student = load_model(cand_dir)
            if isinstance(student.max_seq_length, int):
                student.max_seq_length = args.eval_max_seq_length
            if not entry.get("speed"):
                speed = throughput({"teacher": teacher, cand: student}, speed_texts, rounds=args.speed_rounds)
                entry["speed"] = {**speed, "speedup": round(speed[cand] / speed["teacher"], 2)}
                logger.info("%s throughput: %s", cand, entry["speed"])
                write(out, results)
            if not entry.get("scores"):
                evaluate_into(entry, student)
                write(out, results)
    logger.info("wrote %s", out / "results.json")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
