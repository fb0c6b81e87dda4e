"""Benchmark: SmolLM2-135M-Instruct becomes an embedder on this machine's CPU.

    python -m bench.dev.convert_smollm2 --out runs/bench-convert [--only VARIANT] [--steps 200] [--keep-layers 16]

Zero-shot variants (causal mean / last-token / echo, bidirectional mean) are only evaluated; tuned variants are
trained with the embedforge stages (``convert`` -> ``mntp`` -> ``contrastive``) and saved under
``DIR/models/<variant>/``. ``DIR/results.json`` is rewritten after every variant (scores, training wall time, peak
memory, the settings) and names the best tuned variant under ``best``; ``DIR/results.md`` holds the table.

``causal-distill-mean`` (SmolLM2 cut to ``--keep-layers`` layers, distilled from MiniLM's cached vectors) followed by
a short supervised LoRA stage on SciFact train pairs is ``causal-distill-mean-sup``; it reuses the distilled model of
the same ``--out`` when that is complete, and its ``train_wall_s`` adds both stages. The distill variants carry no
query instruction (neither the teacher nor the distill texts have one), and their supervised stage trains without
it too. ``causal-distill-mean-scifact-corpus-sup`` is the same two stages with the SciFact corpus (unlabeled) among
the distill texts. The teacher's encoding time is recorded under ``teacher_vectors`` (measured once per text set).

Evaluation sets (dev only): STS-B dev and SICK trial (Spearman x100) on every variant; SciFact dev queries
(nDCG@10) and Banking77 (accuracy, train split into train/dev) on the variants listed by ``--full-eval``. To fit
two shared CPU cores, SciFact documents are cut to ``--doc-len`` tokens, and ``--scifact-docs`` / ``--banking-rows``
can shrink those sets (recorded in the JSON; 0 = whole set).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("bench.convert_smollm2")

SCIFACT_QUERY = "Given a scientific claim, retrieve documents that support or refute it: "


# ------------------------------------------------------------------------------------------ evaluation


def _scifact(max_docs: int) -> Any:
    from embedforge.data import BeirData, builtin_beir

    beir = builtin_beir("scifact-dev")
    if not max_docs or max_docs >= len(beir.corpus):
        return beir
    relevant = {d for rel in beir.qrels.values() for d in rel}
    others = sorted(set(beir.corpus) - relevant)
    keep = relevant | set(random.Random(0).sample(others, max(0, max_docs - len(relevant))))
    return BeirData(corpus={d: t for d, t in beir.corpus.items() if d in keep}, queries=beir.queries,
                    qrels=beir.qrels)


def evaluate_model(model: Any, args: argparse.Namespace, full: bool,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Scores of one embedder: STS-B dev, SICK trial, and (``full``) SciFact dev and Banking77.

    ``progress`` is called with the scores so far after each task (partial results survive a stopped run).
    """
    from embedforge.data import builtin
    from embedforge.evaluation import evaluate_classification, evaluate_retrieval, evaluate_sts, split_labeled

    out: dict[str, Any] = {}
    report = progress or (lambda scores: None)
    t = time.perf_counter()
    out["stsb-dev"] = evaluate_sts(model, builtin("stsb-dev"), batch_size=64)
    report(out)
    out["sick-trial"] = evaluate_sts(model, builtin("sick-trial"), batch_size=64)
    report(out)
    if full:
        keep_len = model.max_seq_length
        model.max_seq_length = args.doc_len
        beir = _scifact(args.scifact_docs)
        prompt = (getattr(model, "prompts", None) or {}).get("query") or None
        out["scifact-dev"] = evaluate_retrieval(model, beir, query_prompt=prompt, batch_size=32)
        out["scifact-dev"]["corpus_docs"] = len(beir.corpus)
        out["scifact-dev"]["doc_max_tokens"] = args.doc_len
        model.max_seq_length = keep_len
        report(out)
        banking = builtin("banking77")
        if args.banking_rows and args.banking_rows < len(banking):
            banking = banking.shuffle(seed=0).select(range(args.banking_rows))
        train, dev = split_labeled(banking)
        out["banking77"] = evaluate_classification(model, train, dev, batch_size=64)
        out["banking77"]["rows"] = len(banking)
    out["eval_s"] = round(time.perf_counter() - t, 1)
    return out


# --------------------------------------------------------------------------------------------- variants


def _zero_shot(pooling: str, bidirectional: bool, truncate: bool = False
               ) -> Callable[[argparse.Namespace, Path], tuple[Any, dict]]:
    def make(args: argparse.Namespace, work: Path) -> tuple[Any, dict]:
        from embedforge.convert.embedder import build_embedder
        from embedforge.backbone import apply_layers as truncate_layers  # layers: N keeps the first N

        model = build_embedder("smollm2-135m", pooling=pooling, bidirectional=bidirectional,
                               max_seq_length=args.max_len, prompts={"query": SCIFACT_QUERY})
        layers = 30
        if truncate and args.keep_layers < 30:
            truncate_layers(model, args.keep_layers)
            layers = args.keep_layers
        return model, {"pooling": pooling, "bidirectional": bidirectional, "trained": False, "layers": layers}
    return make


def _convert(args: argparse.Namespace, work: Path, pooling: str, bidirectional: bool, instruction: bool = True
             ) -> Path:
    """The zero-shot starting point of a tuned variant, truncated to ``--keep-layers``, saved once; with
    ``instruction`` SciFact queries carry ``SCIFACT_QUERY`` (excluded from pooling)."""
    from embedforge.convert.embedder import build_embedder
    from embedforge.backbone import apply_layers as truncate_layers  # layers: N keeps the first N
    from embedforge.model import is_complete, save_model

    out = work / (f"start-{pooling}-{'bi' if bidirectional else 'causal'}-L{args.keep_layers}"
                  f"{'' if instruction else '-noinstruction'}")
    if is_complete(out):
        return out
    options: dict[str, Any] = {}
    if pooling == "latent_attention":
        options = {"latent_count": args.latents}
    model = build_embedder("smollm2-135m", pooling=pooling, bidirectional=bidirectional, max_seq_length=args.max_len,
                           prompts={"query": SCIFACT_QUERY} if instruction else None, **options)
    if args.keep_layers and args.keep_layers < 30:
        truncate_layers(model, args.keep_layers)
    save_model(model, out, stage="convert", source="smollm2-135m",
               config={"pooling": pooling, "bidirectional": bidirectional, "keep_layers": args.keep_layers})
    return out


def _mntp(args: argparse.Namespace, work: Path, start: Path) -> tuple[Path, dict]:
    from embedforge.configs import StageContext
    from embedforge.convert.train_config import MntpConfig
    from embedforge.convert.training import run_mntp
    from embedforge.model import is_complete, read_lineage
    from embedforge.typed_config import build_config

    out = work / f"{start.name}-mntp{args.mntp_steps}"
    if not is_complete(out):
        cfg = build_config(MntpConfig, dict(
            model=str(start), data=["texts"], max_seq_length=args.max_len, lora_r=16, lora_alpha=32,
            data_limit=20000, train=dict(max_steps=args.mntp_steps, batch_size=args.mntp_batch, learning_rate=1e-4,
                                         precision=args.precision, save_steps=25, logging_steps=5),
        ))
        run_mntp(cfg, out, StageContext(stage_name="mntp"))
    return out, read_lineage(out)["extra"]["train"]


def _swap_head(args: argparse.Namespace, src: Path, pooling: str, work: Path) -> Path:
    """``src``'s backbone with a fresh pooling head (so MNTP runs once for every head)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    from embedforge.model import is_complete, save_model
    from embedforge.modules import load_embedder
    from embedforge.modules.latent_attention import LatentAttentionPooling

    out = work / f"{src.name}-{pooling}"
    if is_complete(out):
        return out
    base = load_embedder(src)
    dim = base.get_embedding_dimension()
    import torch

    torch.manual_seed(0)
    head = LatentAttentionPooling(dim, num_latents=args.latents, num_heads=8, include_prompt=False)
    model = SentenceTransformer(modules=[base[0], head, Normalize()], prompts=base.prompts, device="cpu")
    save_model(model, out, stage="convert", source="smollm2-135m", parent=src, config={"pooling": pooling})
    return out


def _contrastive(args: argparse.Namespace, start: Path, out: Path, steps: int, **overrides: Any) -> dict:
    from embedforge.configs import StageContext
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.training import run_contrastive
    from embedforge.model import is_complete, read_lineage
    from embedforge.training.options import TRAIN_KEYS
    from embedforge.typed_config import build_config

    if not is_complete(out):
        fields: dict[str, Any] = dict(
            model=str(start), data=args.data, max_seq_length=args.max_len, lora_r=16, lora_alpha=32,
            temperature=0.05, prompts={"scifact-train-pairs": SCIFACT_QUERY}, data_limit=4000,
            hard_negatives=args.hard_negatives,
        )
        train: dict[str, Any] = dict(max_steps=steps, batch_size=args.batch, learning_rate=args.lr,
                                     precision=args.precision, save_steps=20, logging_steps=5)
        for key, value in overrides.items():  # a variant's changes: training options go under train
            (train if key in TRAIN_KEYS else fields)[key] = value
        cfg = build_config(ContrastiveConfig, {**fields, "train": train})
        run_contrastive(cfg, out, StageContext(stage_name="contrastive"))
    return read_lineage(out)["extra"]["train"]


def _tuned(pooling: str, bidirectional: bool, mntp: bool, **overrides: Any) -> Callable:
    def make(args: argparse.Namespace, work: Path, name: str) -> tuple[Path, dict]:
        head = "mean" if pooling == "latent_attention" and mntp else pooling
        start = _convert(args, work, head, bidirectional)
        info: dict[str, Any] = {"pooling": pooling, "bidirectional": bidirectional, "mntp_steps": 0,
                                "keep_layers": args.keep_layers, "trained": True, **overrides}
        wall = 0.0
        if mntp:
            start, mstats = _mntp(args, work, start)
            info["mntp_steps"] = args.mntp_steps
            info["mntp"] = mstats
            wall += mstats.get("wall_s", 0.0)
            if pooling == "latent_attention":
                start = _swap_head(args, start, pooling, work)
        elif pooling == "latent_attention":
            start = _swap_head(args, start, pooling, work)
        steps = overrides.pop("steps", args.steps)
        info["steps"] = steps
        stats = _contrastive(args, start, Path(args.out) / "models" / name, steps, **overrides)
        info["contrastive"] = stats
        info["train_wall_s"] = round(wall + stats.get("wall_s", 0.0), 1)
        return Path(args.out) / "models" / name, info
    return make


def _kd_texts(args: argparse.Namespace, work: Path) -> Path:
    """Unlabeled training texts for teacher distillation, as a JSONL file (column ``text``).

    Short sentences (STS-B train, SICK train, SNLI triplets, SciFact train claims) plus long texts (the SciFact
    abstracts cited by *train* claims, 20 Newsgroups bodies) so that the student also sees document-length inputs.
    None of the evaluation sets (STS-B dev, SICK trial, SciFact dev queries, Banking77) is used. With
    ``--kd-corpus N`` (the ``*-scifact-corpus`` variant) the whole SciFact corpus is added as unlabeled text, plus
    N sentences cut from its abstracts: unsupervised domain adaptation to the corpus that SciFact retrieval
    searches (no SciFact dev query or relevance label is read).
    """
    from embedforge.data import builtin
    from embedforge.data import load_texts as gather_texts

    corpus = getattr(args, "kd_corpus", 0)
    out = work / (f"kd-texts-{args.kd_long}.jsonl" if not corpus else f"kd-texts-{args.kd_long}-scifact{corpus}.jsonl")
    if out.is_file():
        return out
    texts = gather_texts(["stsb-train", "sick-train", "snli-triplets", "scifact-train-pairs"])
    bodies = [t.strip() for t in builtin("newsgroups-pairs")["positive"] if len(t.strip()) > 200]
    texts = list(dict.fromkeys(texts + random.Random(0).sample(bodies, min(args.kd_long, len(bodies)))))
    if corpus:  # domain adaptation: unlabeled SciFact corpus abstracts and sentences cut from them
        from embedforge.data import builtin_beir

        from bench.dev.distill import corpus_sentences

        abstracts = list(builtin_beir("scifact-dev").corpus.values())
        texts = list(dict.fromkeys(texts + abstracts + corpus_sentences(abstracts, corpus)))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    os.replace(tmp, out)
    return out


def _distill_config(args: argparse.Namespace, work: Path, start: Path, steps: int) -> Any:
    from embedforge.distill.config import DistillConfig
    from embedforge.typed_config import build_config

    # the step budget alone ends the run (epochs off), as --kd-steps always meant
    return build_config(DistillConfig, dict(
        model=args.teacher, student="model", student_model=str(start), texts=[str(_kd_texts(args, work))],
        max_seq_length=args.kd_len, batching=args.kd_batching, batch_pieces=args.kd_pieces, matryoshka_dims=[],
        train=dict(batch_size=args.kd_batch, max_steps=steps, epochs=None, learning_rate=args.kd_lr,
                   save_steps=25, precision=args.kd_precision),
    ))


def _distilled(args: argparse.Namespace, work: Path, name: str) -> tuple[Path, dict]:
    """Causal mean-pooled SmolLM2 (``--keep-layers``) + a linear head, trained on a teacher's vectors (Jasper
    losses, the ``distill`` stage with ``student: model``); the head starts from a least-squares fit."""
    from embedforge.configs import StageContext
    from embedforge.distill.pipeline import run as run_distill
    from embedforge.model import read_lineage

    # The teacher and the distill texts carry no instruction, so neither does the student: an instruction it never
    # saw in training costs SciFact 1.9 points (37.1 -> 35.2 on the 900-step model).
    start = _convert(args, work, "mean", False, instruction=False)
    out = Path(args.out) / "models" / name
    config = _distill_config(args, work, start, args.kd_steps)
    teacher = _teacher_time(config, work)
    run_distill(config, out, StageContext(stage_name="distill", cache_dir=work / "cache"))
    lineage = read_lineage(out)
    stats = (lineage.get("metrics") or {}).get("distill", {})
    info = {"pooling": "mean", "bidirectional": False, "mntp_steps": 0, "keep_layers": args.keep_layers,
            "trained": True, "teacher": args.teacher, "steps": stats.get("steps"), "distill": stats,
            "n_texts": (lineage.get("extra") or {}).get("n_texts"), "kd_len": args.kd_len,
            "kd_precision": args.kd_precision, "teacher_vectors": teacher,
            "train_wall_s": round(stats.get("seconds", 0.0), 1)}
    return out, info


def _teacher_time(config: Any, work: Path) -> dict[str, Any]:
    """Encode the distill texts with the teacher (into the stage's cache) and time it; the time is kept beside
    the cache, so a rerun that finds the vectors cached still reports what computing them cost."""
    import torch

    from embedforge.data import load_texts as gather_texts
    from embedforge.distill.pipeline import teacher_vectors

    record = work / f"teacher-time-{Path(config.texts[0]).stem}.json"
    if record.is_file():
        return json.loads(record.read_text())
    texts = gather_texts(config.texts)
    t = time.perf_counter()
    teacher_vectors(config, texts, work / "cache")
    result = {"seconds": round(time.perf_counter() - t, 1), "texts": len(texts), "threads": torch.get_num_threads()}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, record)
    return result


def _with_corpus(variant: Callable[..., tuple[Path, dict]]) -> Callable[..., tuple[Path, dict]]:
    """``variant`` with the SciFact corpus among the unlabeled distill texts (``--kd-corpus`` sentences, 5,000 when
    not given); the result records the domain adaptation."""
    def make(args: argparse.Namespace, work: Path, name: str) -> tuple[Path, dict]:
        if not args.kd_corpus:
            args.kd_corpus = 5000
        out, info = variant(args, work, name)
        info["domain_adaptation"] = {"scifact_corpus_abstracts": True, "scifact_corpus_sentences": args.kd_corpus}
        return out, info
    return make


def _distilled_sup(args: argparse.Namespace, work: Path, name: str, base: str = "causal-distill-mean"
                   ) -> tuple[Path, dict]:
    """``causal-distill-mean``, then a short supervised LoRA contrastive stage on ``--sup-data`` (default: the
    SciFact train claims -> cited abstracts, in-batch negatives; ``--sup-epochs`` passes, no dev data).

    The distilled model of the same ``--out`` is reused when it is already complete (its recorded training time
    counts); the reported ``train_wall_s`` is distill + contrastive."""
    start, info = _distilled(args, work, base)
    out = Path(args.out) / "models" / name
    stats = _contrastive(args, start, out, args.steps, data=args.sup_data, max_seq_length=args.sup_len,
                         learning_rate=args.sup_lr, epochs=args.sup_epochs, hard_negatives=False, prompts={})
    info.update(contrastive=stats, sup_data=args.sup_data, sup_epochs=args.sup_epochs, sup_lr=args.sup_lr,
                sup_len=args.sup_len, sup_instruction=False, distill_wall_s=info["train_wall_s"],
                train_wall_s=round(info["train_wall_s"] + stats.get("wall_s", 0.0), 1))
    return out, info


def _head_only(args: argparse.Namespace, work: Path) -> tuple[Any, dict]:
    """Ablation: the zero-shot backbone with only the least-squares head to the teacher space (no training)."""
    from embedforge.data import load_texts as gather_texts
    from embedforge.distill.pipeline import build_student, teacher_vectors

    start = _convert(args, work, "mean", False)
    config = _distill_config(args, work, start, 1)
    texts = gather_texts(config.texts)
    targets, _ = teacher_vectors(config, texts, work / "cache")
    t = time.perf_counter()
    model = build_student(config, int(targets.shape[1]), texts, targets)
    model.max_seq_length = args.max_len
    return model, {"pooling": "mean", "bidirectional": False, "trained": False, "layers": args.keep_layers,
                   "teacher": args.teacher, "head_fit_s": round(time.perf_counter() - t, 1)}


ZERO_SHOT = {
    "zs-causal-mean-truncated": _zero_shot("mean", False, truncate=True),
    "zs-bidir-mean-truncated": _zero_shot("mean", True, truncate=True),
    "zs-causal-mean": _zero_shot("mean", False),
    "zs-causal-lasttoken": _zero_shot("lasttoken", False),
    "zs-causal-echo": _zero_shot("echo", False),
    "zs-bidir-mean": _zero_shot("mean", True),
    "ablation-causal-mean-teacher-head": _head_only,
}
TUNED = {
    "causal-sup-mean": _tuned("mean", False, False),
    "bidir-mntp-sup-mean": _tuned("mean", True, True),
    "bidir-mntp-sup-latent": _tuned("latent_attention", True, True),
    "causal-sup-echo": _tuned("echo", False, False),
    "causal-distill-mean": _distilled,
    "causal-distill-mean-scifact-corpus": _with_corpus(_distilled),
    "causal-distill-mean-sup": _distilled_sup,
    # the -sup stage on top of causal-distill-mean-scifact-corpus (that model is reused when complete)
    "causal-distill-mean-scifact-corpus-sup": _with_corpus(
        lambda args, work, name: _distilled_sup(args, work, name, base="causal-distill-mean-scifact-corpus")),
    # ablations
    "ablation-bidir-sup-mean-nomntp": _tuned("mean", True, False),
    "ablation-bidir-mntp-sup-mean-fnfilter": _tuned("mean", True, True, false_negative_margin=0.0),
    "ablation-bidir-mntp-sup-mean-teacher": _tuned("mean", True, True, distill_teacher="minilm-l6",
                                                    distill_weight=1.0),
}


# ------------------------------------------------------------------------------------------------ main


def _write(out: Path, results: dict[str, Any]) -> None:
    """Merge this run's variants into ``results.json`` (several runs may share one ``--out``) and redo the table."""
    import fcntl

    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        merged = {**on_disk, **{k: v for k, v in results.items() if k != "variants"}}
        merged["variants"] = {**on_disk.get("variants", {}), **results["variants"]}
        _write_locked(out, merged)


def _write_locked(out: Path, results: dict[str, Any]) -> None:
    tuned = {k: v for k, v in results["variants"].items() if v.get("trained") and "stsb-dev" in v.get("scores", {})}
    if tuned:
        results["best"] = max(tuned, key=lambda k: tuned[k]["scores"]["stsb-dev"]["spearman"])
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    rows = ["| variant | STS-B dev | SICK trial | SciFact dev nDCG@10 | Banking77 acc | train s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        s = v.get("scores", {})
        cell = lambda task, key: f"{s[task][key]:.1f}" if task in s else "-"  # noqa: E731
        rows.append(f"| {name} | {cell('stsb-dev', 'spearman')} | {cell('sick-trial', 'spearman')} | "
                    f"{cell('scifact-dev', 'ndcg@10')} | {cell('banking77', 'accuracy')} | "
                    f"{v.get('train_wall_s', '-')} | {v.get('peak_rss_mb', '-')} |")
    (out / "results.md").write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", action="append", help="variant(s) to run (repeatable); default: all")
    parser.add_argument("--steps", type=int, default=80, help="contrastive steps per tuned variant")
    parser.add_argument("--mntp-steps", type=int, default=20)
    parser.add_argument("--mntp-batch", type=int, default=16)
    parser.add_argument("--keep-layers", type=int, default=8,
                        help="decoder layers kept of 30 (tuned and *-truncated variants)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--hard-negatives", action="store_true", help="use SNLI contradictions as hard negatives")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids spinning when the "
                        "cores are shared)")
    parser.add_argument("--zero-shot-from", type=Path, default=None,
                        help="results.json of bench/dev/convert_zeroshot.py: copy its STS scores instead of "
                             "recomputing the full-depth zero-shot variants")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--latents", type=int, default=64, help="latent_attention: latents (NV-Embed: 512)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--data", nargs="+", default=["snli-triplets", "stsb-train-pairs", "scifact-train-pairs"])
    parser.add_argument("--full-eval", nargs="*", default=None,
                        help="variants that also get SciFact and Banking77 (default: every tuned variant and "
                             "zs-causal-mean)")
    parser.add_argument("--doc-len", type=int, default=96)
    parser.add_argument("--scifact-docs", type=int, default=1000)
    parser.add_argument("--banking-rows", type=int, default=2000)
    parser.add_argument("--teacher", default="minilm-l6", help="causal-distill-mean: the teacher embedder")
    parser.add_argument("--kd-steps", type=int, default=400, help="causal-distill-mean: training steps")
    parser.add_argument("--kd-batch", type=int, default=64)
    parser.add_argument("--kd-len", type=int, default=128, help="causal-distill-mean: tokens per training text")
    parser.add_argument("--kd-lr", type=float, default=2e-4,
                        help="distill: peak learning rate (2e-4 beat 1e-4 on every score at 1,000 steps)")
    parser.add_argument("--kd-precision", default="fp32", choices=["fp32", "bf16"],
                        help="distill: bf16 autocast (1.5x to 1.6x faster per step on CPUs with AVX512-BF16)")
    parser.add_argument("--kd-batching", default="length", choices=["length", "random"],
                        help="distill: batch composition (length: similar lengths together; random: mixed)")
    parser.add_argument("--kd-pieces", type=int, default=1,
                        help="distill: length-sorted pieces per batch for the student's forward pass")
    parser.add_argument("--kd-long", type=int, default=2000, help="20 Newsgroups bodies among the distill texts")
    parser.add_argument("--sup-data", nargs="+", default=["scifact-train-pairs"],
                        help="causal-distill-mean-sup: data of the contrastive stage after distillation")
    parser.add_argument("--sup-epochs", type=float, default=1.0, help="causal-distill-mean-sup: passes (cap: --steps)")
    parser.add_argument("--sup-lr", type=float, default=1e-4)
    parser.add_argument("--sup-len", type=int, default=128, help="causal-distill-mean-sup: tokens per text")
    parser.add_argument("--kd-corpus", type=int, default=0,
                        help="add the SciFact corpus abstracts and this many sentences cut from them to the distill "
                        "texts (domain adaptation; default 5000 for the causal-distill-mean-scifact-corpus variant)")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: import --zero-shot-from and rewrite results.json / results.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out: Path = args.out
    (out / "models").mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"variants": {}}  # only this run's variants; _write merges them into the file
    if not args.collect_only:
        results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__}
        results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    names = [] if args.collect_only else (args.only or [*ZERO_SHOT, *TUNED])
    unknown = [n for n in names if n not in ZERO_SHOT and n not in TUNED]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join([*ZERO_SHOT, *TUNED])}")
    full_eval = set(args.full_eval) if args.full_eval is not None else {*TUNED}
    if args.zero_shot_from is not None and args.zero_shot_from.is_file():
        results["zero_shot_imported"] = {"from": str(args.zero_shot_from),
                                         "results": json.loads(args.zero_shot_from.read_text())}
    for name in names:
        logger.info("=== %s", name)
        start = time.perf_counter()
        if name in ZERO_SHOT:
            model, info = ZERO_SHOT[name](args, work)
        else:
            path, info = TUNED[name](args, work, name)
            from embedforge.modules import load_embedder

            model = load_embedder(path)  # resolves embedforge's own modules (echo, latent attention)
        def partial(scores: dict[str, Any], name: str = name, info: dict[str, Any] = info) -> None:
            results["variants"][name] = {**info, "scores": dict(scores), "eval_complete": False}
            _write(out, results)

        info["scores"] = evaluate_model(model, args, full=name in full_eval, progress=partial)
        info["eval_complete"] = True
        info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        info["variant_wall_s"] = round(time.perf_counter() - start, 1)
        info["run_settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        results["variants"][name] = info
        _write(out, results)
        logger.info("%s: %s", name, json.dumps(info["scores"]))
        del model
    if not names:
        _write(out, results)
    if not (out / "results.md").is_file():
        return
    print((out / "results.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
