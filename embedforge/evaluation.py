"""Evaluation shared by every stage and benchmark: STS, retrieval over a whole BEIR corpus, classification.

Anything with ``encode(texts, batch_size, prompt) -> np.ndarray`` can be evaluated (an :class:`Encoder`); a
``SentenceTransformer`` is wrapped automatically, and an export directory runs through
:class:`~embedforge.onnx_encoder.OnnxEncoder`. Texts are encoded in
length-sorted batches with a progress bar. All scores are reported x100.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

from embedforge.data import BeirData
from embedforge.configs import ConfigError
from embedforge.errors import RunError
from embedforge.evaluation_config import BUILTIN_TASKS, EvalConfig, Task, parse_task  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

    from embedforge.configs import StageContext

logger = logging.getLogger(__name__)


@runtime_checkable
class Encoder(Protocol):
    """The one thing evaluation needs from a model."""

    def encode(self, texts: list[str], batch_size: int, prompt: str | None) -> np.ndarray: ...


class STEncoder:
    """Adapts a ``SentenceTransformer`` to :class:`Encoder` (prompts go through ST so pooling can skip them)."""

    def __init__(self, model: Any, truncate_dim: int | None = None):
        self.model = model
        self.truncate_dim = truncate_dim

    def encode(self, texts: list[str], batch_size: int, prompt: str | None) -> np.ndarray:
        import torch

        from embedforge.data import max_chars_for

        # Text beyond the token limit is never read; cutting it first keeps one huge text from stalling tokenization.
        limit = max_chars_for(getattr(self.model, "max_seq_length", None))
        if limit is not None:
            texts = [t[:limit] for t in texts]
        with torch.inference_mode():
            out = self.model.encode(
                texts, batch_size=batch_size, prompt=prompt, convert_to_numpy=True, show_progress_bar=False,
                truncate_dim=self.truncate_dim,
            )
        return np.asarray(out, dtype=np.float32)

    def prompt_for(self, role: str) -> str | None:
        prompts = getattr(self.model, "prompts", None) or {}
        return prompts.get(role) or None


def as_encoder(model: Any, truncate_dim: int | None = None) -> Encoder:
    """Wrap a SentenceTransformer (or a model dir path) as an :class:`Encoder`; pass encoders through."""
    if isinstance(model, (str, Path)) and (Path(model) / "manifest.json").is_file():
        # An export directory: evaluate the ONNX graph itself.
        from embedforge.onnx_encoder import OnnxEncoder

        return OnnxEncoder(model)
    if isinstance(model, (str, Path)):
        from embedforge.model import load_model

        model = load_model(model)
    if isinstance(model, STEncoder) or (isinstance(model, Encoder) and not hasattr(model, "_modules")):
        return model
    return STEncoder(model, truncate_dim=truncate_dim)


def _check_prompts(encoder: Encoder, prompts: dict[str, str | None]) -> None:
    """Refuse a given prompt that the model's pooling would cut one token too far (see
    :func:`embedforge.modules.prompts.check_prompt_tokens`); only sentence-transformers models are affected."""
    model = getattr(encoder, "model", None)
    if not isinstance(encoder, STEncoder) or model is None:
        return
    from embedforge.modules.prompts import check_model_prompts

    check_model_prompts(model, {k: v for k, v in prompts.items() if v})


def _default_prompt(encoder: Encoder, role: str, given: str | None) -> str | None:
    if given is not None:
        return given or None
    prompt_for = getattr(encoder, "prompt_for", None)
    return prompt_for(role) if callable(prompt_for) else None


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero); the dtype is kept."""
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def encode(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    prompt: str | None = None,
    normalize: bool = True,
    truncate_dim: int | None = None,
    show_progress: bool = True,
    desc: str = "encode",
) -> np.ndarray:
    """Encode ``texts`` in length-sorted batches (restored to input order); optionally truncate and L2-normalize."""
    from tqdm.auto import tqdm

    encoder = as_encoder(model)
    texts = list(texts)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    chunks: list[np.ndarray] = []
    n_batches = math.ceil(len(texts) / batch_size)
    for b in tqdm(range(n_batches), desc=desc, disable=not show_progress or n_batches < 2, unit="batch"):
        idx = order[b * batch_size:(b + 1) * batch_size]
        chunks.append(np.asarray(encoder.encode([texts[i] for i in idx], batch_size, prompt), dtype=np.float32))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    sorted_emb = np.concatenate(chunks)
    emb = np.empty_like(sorted_emb)
    emb[order] = sorted_emb
    if truncate_dim is not None:
        if truncate_dim > emb.shape[1]:
            raise ConfigError(f"truncate_dim: {truncate_dim} is larger than the model's {emb.shape[1]} dimensions; "
                              f"use at most {emb.shape[1]}", key="truncate_dim")
        emb = emb[:, :truncate_dim]
    if normalize:
        emb = l2_normalize(emb)
    return emb


# ----------------------------------------------------------------------------------------------- STS


def evaluate_sts(model: Any, data: Dataset | dict[str, list[Any]], *, batch_size: int = 32,
                 truncate_dim: int | None = None, show_progress: bool = True) -> dict[str, float]:
    """Spearman and Pearson correlation (x100) between cosine similarity and the gold scores.

    Gold scores that cannot give a correlation (non-finite, fewer than 2, all equal) raise :class:`DataError`
    before anything is encoded.
    """
    from scipy.stats import pearsonr, spearmanr

    s1, s2, gold = list(data["sentence1"]), list(data["sentence2"]), np.asarray(data["score"], dtype=np.float64)
    check_sts_scores(gold, "STS data")
    uniq = list(dict.fromkeys(s1 + s2))
    emb = encode(model, uniq, batch_size=batch_size, truncate_dim=truncate_dim, show_progress=show_progress,
                 desc="sts")
    pos = {t: i for i, t in enumerate(uniq)}
    a = emb[[pos[t] for t in s1]]
    b = emb[[pos[t] for t in s2]]
    cos = np.sum(a * b, axis=1)
    if not np.all(np.isfinite(cos)) or np.ptp(cos) == 0:
        raise RunError(f"STS: the model gives {'non-finite' if not np.all(np.isfinite(cos)) else 'identical'} "
                       "cosine similarities for every pair, so no correlation exists; check the model's vectors")
    return {
        "spearman": float(spearmanr(cos, gold).statistic * 100),
        "pearson": float(pearsonr(cos, gold).statistic * 100),
        "n": len(gold),
    }


def check_sts_scores(gold: np.ndarray, source: str) -> None:
    """Refuse gold scores that make a correlation undefined (the metric would be NaN)."""
    from embedforge.data import DataError

    bad = np.flatnonzero(~np.isfinite(gold))
    if bad.size:
        raise DataError(f"{source}: row {int(bad[0]) + 1}: gold score {gold[bad[0]]!r} is not a finite number")
    if gold.size < 2:
        raise DataError(f"{source}: STS needs at least 2 scored pairs, found {gold.size}")
    if np.ptp(gold) == 0:
        raise DataError(f"{source}: every gold score is {gold[0]:g}; a correlation needs scores that differ")


# ----------------------------------------------------------------------------------------- retrieval


def retrieval_metrics(scores: np.ndarray, doc_ids: list[str], query_ids: list[str],
                      qrels: dict[str, dict[str, int]], *, k_ndcg: int = 10, k_recall: int = 100,
                      k_mrr: int = 10) -> dict[str, float]:
    """nDCG@10 (graded gains, log2 discount), Recall@100 and MRR@10 (x100) from a query x doc score matrix."""
    top = max(k_ndcg, k_recall, k_mrr)
    top = min(top, scores.shape[1])
    # argpartition then sort only the head: the corpus can be large.
    part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
    ndcgs, recalls, rrs = [], [], []
    for qi, qid in enumerate(query_ids):
        rel = {d: g for d, g in qrels.get(qid, {}).items() if g > 0}
        if not rel:
            continue
        cand = part[qi]
        ranked = cand[np.argsort(-scores[qi, cand], kind="stable")]
        ranked_ids = [doc_ids[j] for j in ranked]
        dcg = sum(rel.get(d, 0) / math.log2(r + 2) for r, d in enumerate(ranked_ids[:k_ndcg]))
        ideal = sorted(rel.values(), reverse=True)[:k_ndcg]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        ndcgs.append(dcg / idcg if idcg > 0 else 0.0)
        recalls.append(len(set(ranked_ids[:k_recall]) & set(rel)) / len(rel))
        rr = 0.0
        for r, d in enumerate(ranked_ids[:k_mrr]):
            if d in rel:
                rr = 1.0 / (r + 1)
                break
        rrs.append(rr)
    return {
        f"ndcg@{k_ndcg}": float(np.mean(ndcgs) * 100),
        f"recall@{k_recall}": float(np.mean(recalls) * 100),
        f"mrr@{k_mrr}": float(np.mean(rrs) * 100),
        "queries": len(ndcgs),
    }


def evaluate_retrieval(model: Any, beir: BeirData, *, query_prompt: str | None = None,
                       doc_prompt: str | None = None, batch_size: int = 32, truncate_dim: int | None = None,
                       show_progress: bool = True) -> dict[str, float]:
    """Dense retrieval over the whole corpus with cosine similarity; nDCG@10, Recall@100, MRR@10 (x100)."""
    encoder = as_encoder(model)
    qp = _default_prompt(encoder, "query", query_prompt)
    dp = _default_prompt(encoder, "document", doc_prompt)
    doc_ids = list(beir.corpus)
    query_ids = list(beir.queries)
    d = encode(encoder, [beir.corpus[i] for i in doc_ids], batch_size=batch_size, prompt=dp,
               truncate_dim=truncate_dim, show_progress=show_progress, desc="corpus")
    q = encode(encoder, [beir.queries[i] for i in query_ids], batch_size=batch_size, prompt=qp,
               truncate_dim=truncate_dim, show_progress=show_progress, desc="queries")
    return retrieval_metrics(q @ d.T, doc_ids, query_ids, beir.qrels)


# ------------------------------------------------------------------------------------ classification


def split_labeled(data: Dataset | dict[str, list[Any]], dev_fraction: float = 0.2, seed: int = 0
                  ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Deterministic stratified train/dev split of a labeled set (every label keeps a share in both)."""
    import random

    texts, labels = list(data["text"]), list(data["label"])
    by_label: dict[Any, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    rng = random.Random(seed)
    train_idx, dev_idx = [], []
    for lab in sorted(by_label, key=str):
        idx = by_label[lab]
        rng.shuffle(idx)
        n_dev = max(1, round(len(idx) * dev_fraction)) if len(idx) > 1 else 0
        dev_idx += idx[:n_dev]
        train_idx += idx[n_dev:]
    pick = lambda ids: {"text": [texts[i] for i in ids], "label": [labels[i] for i in ids]}  # noqa: E731
    return pick(sorted(train_idx)), pick(sorted(dev_idx))


def check_labeled(labels: Sequence[Any], source: str, min_per_label: int = 2) -> None:
    """Refuse labeled data that cannot give a classification score: fewer than 2 labels, or a label with fewer
    than ``min_per_label`` rows (the stratified split puts at least one row of every label on each side)."""
    from collections import Counter

    from embedforge.data import DataError

    counts = Counter(labels)
    if len(counts) < 2:
        only = f" (only {next(iter(counts))!r})" if counts else ""
        raise DataError(f"{source}: classification needs at least 2 different labels, found {len(counts)}{only}")
    rare = sorted((lab for lab, n in counts.items() if n < min_per_label), key=str)
    if rare:
        raise DataError(f"{source}: classification needs at least {min_per_label} rows per label for the "
                        f"train/dev split; label {rare[0]!r} has {counts[rare[0]]}"
                        + (f" ({len(rare) - 1} more labels too)" if len(rare) > 1 else ""))


def evaluate_classification(model: Any, train: Dataset | dict[str, list[Any]],
                            test: Dataset | dict[str, list[Any]], *, batch_size: int = 32,
                            truncate_dim: int | None = None, show_progress: bool = True) -> dict[str, float]:
    """Logistic-regression accuracy (x100) on embeddings: fit on ``train``, score on ``test``."""
    from sklearn.linear_model import LogisticRegression

    x_train = encode(model, list(train["text"]), batch_size=batch_size, truncate_dim=truncate_dim,
                     show_progress=show_progress, desc="clf-train")
    x_test = encode(model, list(test["text"]), batch_size=batch_size, truncate_dim=truncate_dim,
                    show_progress=show_progress, desc="clf-test")
    clf = LogisticRegression(max_iter=1000, C=10.0)
    clf.fit(x_train, list(train["label"]))
    acc = float(np.mean(clf.predict(x_test) == np.asarray(list(test["label"]), dtype=object)))
    return {"accuracy": acc * 100, "n_train": len(x_train), "n_test": len(x_test)}


# ---------------------------------------------------------------------------------------- task driver


def load_task_data(task: Task) -> Any:
    """Load and validate a task's data (cheap next to encoding; done for every task before the model loads)."""
    from embedforge import data as D

    source = task.path or task.name
    if task.kind == "sts":
        ds = D.builtin(task.name) if task.path is None else D.load_data(task.path, D.DataKind.SCORED)
        check_sts_scores(np.asarray(ds["score"], dtype=np.float64), source)
        return ds
    if task.kind == "retrieval":
        return D.builtin_beir(task.name) if task.path is None else D.load_beir(task.path, task.split or "test")
    ds = D.builtin(task.name) if task.path is None else D.load_data(task.path, D.DataKind.LABELED)
    check_labeled(list(ds["label"]), source)
    return split_labeled(ds)


def run_task(model: Any, task: Task, data: Any = None, *, batch_size: int = 32, truncate_dim: int | None = None,
             query_prompt: str | None = None, doc_prompt: str | None = None,
             show_progress: bool = True) -> dict[str, float]:
    """Evaluate ``model`` on one task (its data loaded with :func:`load_task_data` unless given)."""
    data = load_task_data(task) if data is None else data
    common = dict(batch_size=batch_size, truncate_dim=truncate_dim, show_progress=show_progress)
    if task.kind == "sts":
        return evaluate_sts(model, data, **common)
    if task.kind == "retrieval":
        return evaluate_retrieval(model, data, query_prompt=query_prompt, doc_prompt=doc_prompt, **common)
    train, dev = data
    return evaluate_classification(model, train, dev, **common)


def evaluate(model: Any, tasks: Sequence[str], *, batch_size: int = 32, truncate_dim: int | None = None,
             query_prompt: str | None = None, doc_prompt: str | None = None,
             show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` (a SentenceTransformer, a model dir, or an :class:`Encoder`) on several tasks.

    Task names and data are validated first, so a bad file fails before the model is loaded or anything encoded.
    """
    parsed = [parse_task(t) for t in tasks]
    loaded = [load_task_data(t) for t in parsed]
    encoder = as_encoder(model, truncate_dim=None)
    dim_of = getattr(getattr(encoder, "model", None), "get_embedding_dimension", None)
    dim = dim_of() if callable(dim_of) else None
    if truncate_dim is not None and dim is not None and truncate_dim > dim:  # refuse before encoding anything
        raise ConfigError(f"truncate_dim: {truncate_dim} is larger than the model's {dim} dimensions; use at most "
                          f"{dim}", key="truncate_dim")
    _check_prompts(encoder, {"query_prompt": query_prompt, "doc_prompt": doc_prompt})
    results: dict[str, dict[str, float]] = {}
    for task, data in zip(parsed, loaded):
        start = time.perf_counter()
        results[task.name] = run_task(encoder, task, data, batch_size=batch_size, truncate_dim=truncate_dim,
                                      query_prompt=query_prompt, doc_prompt=doc_prompt, show_progress=show_progress)
        results[task.name]["seconds"] = round(time.perf_counter() - start, 2)
        logger.info("%s: %s", task.name, results[task.name])
    return results


MAIN_METRIC = {"sts": "spearman", "retrieval": "ndcg@10", "classification": "accuracy"}


def main_score(task_name: str, metrics: dict[str, float]) -> float:
    """The headline number of a task's metrics (Spearman, nDCG@10 or accuracy)."""
    return metrics[MAIN_METRIC[parse_task(task_name).kind]]


def run_stage(config: EvalConfig, out_dir: Path, ctx: StageContext) -> None:
    """Recipe stage ``eval``: write metrics.json and report.md to ``out_dir``; record metrics in the model's lineage."""
    from embedforge.model import atomic_dir, update_metrics, write_lineage
    from embedforge.outputs import check_output, output_lock
    from embedforge.report import metrics_table

    # The output is checked and locked before the (long) evaluation: an eval never replaces a model or the
    # directory it evaluates, only a new or empty directory or an earlier eval output (its embedforge.json says so).
    with output_lock(out_dir):
        check_output(out_dir, stage="eval", inputs=[config.model])
        results = evaluate(config.model, config.tasks, batch_size=config.batch_size,
                           truncate_dim=config.truncate_dim, query_prompt=config.query_prompt,
                           doc_prompt=config.doc_prompt)
        with atomic_dir(out_dir, stage="eval") as tmp:
            (tmp / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            (tmp / "report.md").write_text(f"# Evaluation of {config.model}\n\n" + metrics_table(results) + "\n")
            write_lineage(tmp, stage="eval", source=config.model, config=config, metrics=results,
                          parent=config.model if Path(config.model).is_dir() else None, recipe_hash=ctx.recipe_hash)
    if config.record_in_model and Path(config.model).is_dir():
        update_metrics(config.model, {"eval": results})
