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
from dataclasses import dataclass
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


#: the per-query key :func:`retrieval_metrics` adds with ``per_query=True`` (at the default k_ndcg)
PER_QUERY = "ndcg@10_per_query"


def retrieval_metrics(scores: np.ndarray, doc_ids: list[str], query_ids: list[str],
                      qrels: dict[str, dict[str, int]], *, k_ndcg: int = 10, k_recall: int = 100,
                      k_mrr: int = 10, per_query: bool = False) -> dict[str, Any]:
    """nDCG@10 (graded gains, log2 discount), Recall@100 and MRR@10 (x100) from a query x doc score matrix.

    ``per_query``: also ``"ndcg@10_per_query"``, each judged query's nDCG (x100) in ``query_ids`` order, for paired
    comparisons of two score matrices over the same queries."""
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
    out: dict[str, Any] = {
        f"ndcg@{k_ndcg}": float(np.mean(ndcgs) * 100),
        f"recall@{k_recall}": float(np.mean(recalls) * 100),
        f"mrr@{k_mrr}": float(np.mean(rrs) * 100),
        "queries": len(ndcgs),
    }
    if per_query:
        out[f"ndcg@{k_ndcg}_per_query"] = [float(x * 100) for x in ndcgs]
    return out


def paired_difference(reference: Sequence[float], other: Sequence[float], *, resamples: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Mean of ``other - reference`` over the same queries and its 95% bootstrap interval (queries resampled
    with replacement ``resamples`` times): whether a gap between two encoders of one model is larger than what
    the choice of queries alone would move."""
    ref, oth = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != oth.shape or len(ref) == 0:
        raise ValueError(f"paired_difference needs two equally long, non-empty score lists, got {len(reference)} "
                         f"and {len(other)}")
    diff = oth - ref
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return {"delta": round(float(diff.mean()), 2), "ci95_low": round(float(np.percentile(means, 2.5)), 2),
            "ci95_high": round(float(np.percentile(means, 97.5)), 2), "queries": len(diff)}


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


# ------------------------------------------------------------------------- several artifacts, one stage


@dataclass
class Artifact:
    """One thing the eval stage scores: what it is, where it lives, how big it is and how its vectors are made.

    ``source`` names the artifact whose vectors this one reuses (a Matryoshka prefix or binary codes need no
    encoding of their own); ``None`` means the artifact is encoded itself.
    """

    name: str
    kind: str
    path: str
    size_bytes: int
    graph: str | None = None
    dims: int | None = None
    source: str | None = None
    binary: bool = False


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (the size a user downloads or ships)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def graph_bytes(path: Path) -> int:
    """Bytes of an ONNX graph with its external weights file, if it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def pick_int8_graph(export_dir: Path, given: str | None) -> str:
    """The int8 graph of an export to evaluate (relative to ``export_dir``); refuse a missing one."""
    from embedforge.onnx_encoder import read_manifest

    if given is not None:
        if not (export_dir / given).is_file():
            raise ConfigError(f"int8_graph: {export_dir / given} does not exist; name a graph of the export, e.g. "
                              "onnx/model_qint8_avx512_vnni.onnx", key="int8_graph")
        return given
    graphs = [g["file"] if isinstance(g, dict) else str(g) for g in read_manifest(export_dir).get("graphs", [])]
    files = [g if g.startswith("onnx/") else f"onnx/{g}" for g in graphs]
    int8 = [f for f in files if Path(f).name.startswith("model_qint8_") and (export_dir / f).is_file()]
    if not int8:
        int8 = sorted(str(p.relative_to(export_dir)) for p in (export_dir / "onnx").glob("model_qint8_*.onnx"))
    if not int8:
        raise ConfigError(f"export: {export_dir} has no int8 graph (onnx/model_qint8_*.onnx); export with int8 "
                          "targets or leave export out", key="export")
    preferred = [f for f in int8 if f.endswith("model_qint8_avx512_vnni.onnx")]
    return (preferred or int8)[0]


def plan_artifacts(config: EvalConfig) -> list[Artifact]:
    """Every artifact the stage will score, in order, with its files checked (nothing is loaded or encoded)."""
    model_dir = Path(config.model)
    size = dir_bytes(model_dir) if model_dir.is_dir() else 0
    arts = [Artifact("pytorch", "pytorch", config.model, size)]
    binary_source = "pytorch"
    if config.export is not None:
        export_dir = Path(config.export)
        if not (export_dir / "manifest.json").is_file():
            raise ConfigError(f"export: {export_dir} is not an export directory (no manifest.json); run the export "
                              "stage first or point export at its output", key="export")
        fp32 = export_dir / "onnx" / "model.onnx"
        if not fp32.is_file():
            raise ConfigError(f"export: {fp32} is missing; export the model again", key="export")
        int8 = pick_int8_graph(export_dir, config.int8_graph)
        arts.append(Artifact("onnx-fp32", "onnx-fp32", str(export_dir), graph_bytes(fp32), graph="onnx/model.onnx"))
        arts.append(Artifact("onnx-int8", "onnx-int8", str(export_dir), graph_bytes(export_dir / int8), graph=int8))
        binary_source = "onnx-int8"
    if config.binary_rescore:
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ConfigError("binary_rescore: needs faiss; run `pip install 'embedforge[export]'` (or faiss-cpu)",
                              key="binary_rescore") from None
        src = next(a for a in arts if a.name == binary_source)
        arts.append(Artifact("binary-rescore", "binary-rescore", src.path, src.size_bytes, graph=src.graph,
                             source=src.name, binary=True))
    for dim in config.truncate_dims:
        arts.append(Artifact(f"pytorch@{dim}", "pytorch", config.model, size, dims=dim, source="pytorch"))
        if config.binary_rescore:
            b = arts[[a.name for a in arts].index("binary-rescore")]
            arts.append(Artifact(f"binary-rescore@{dim}", "binary-rescore", b.path, b.size_bytes, graph=b.graph,
                                 dims=dim, source=b.source, binary=True))
    return arts


def encode_task_vectors(encoder: Encoder, task: Task, data: Any, *, batch_size: int, query_prompt: str | None,
                        doc_prompt: str | None, show_progress: bool = True) -> dict[str, Any]:
    """A task's texts encoded once (full dimension, not normalized), for :func:`score_task_vectors`."""
    common = dict(batch_size=batch_size, normalize=False, show_progress=show_progress)
    if task.kind == "sts":
        s1, s2 = list(data["sentence1"]), list(data["sentence2"])
        uniq = list(dict.fromkeys(s1 + s2))
        pos = {t: i for i, t in enumerate(uniq)}
        return {"emb": encode(encoder, uniq, desc=f"{task.name}", **common), "texts": len(uniq),
                "a": np.array([pos[t] for t in s1]), "b": np.array([pos[t] for t in s2])}
    if task.kind == "retrieval":
        qp = _default_prompt(encoder, "query", query_prompt)
        dp = _default_prompt(encoder, "document", doc_prompt)
        doc_ids, query_ids = list(data.corpus), list(data.queries)
        d = encode(encoder, [data.corpus[i] for i in doc_ids], prompt=dp, desc=f"{task.name} corpus", **common)
        q = encode(encoder, [data.queries[i] for i in query_ids], prompt=qp, desc=f"{task.name} queries", **common)
        return {"q": q, "d": d, "doc_ids": doc_ids, "query_ids": query_ids, "texts": len(doc_ids) + len(query_ids)}
    train, dev = data
    x_train = encode(encoder, list(train["text"]), desc=f"{task.name} train", **common)
    x_test = encode(encoder, list(dev["text"]), desc=f"{task.name} test", **common)
    return {"train": x_train, "test": x_test, "texts": len(x_train) + len(x_test)}


def _prefix(x: np.ndarray, dim: int | None) -> np.ndarray:
    return l2_normalize(x if dim is None else x[:, :dim])


def score_task_vectors(task: Task, data: Any, vectors: dict[str, Any], *, dim: int | None = None,
                       binary: bool = False, rescore_depth: int = 40, per_query: bool = False) -> dict[str, Any]:
    """Metrics of one task from vectors of :func:`encode_task_vectors`, cut to ``dim`` and renormalized.

    ``binary``: retrieval searches the documents' sign bits (hamming distance to the query's) for the top
    ``rescore_depth`` and re-ranks them by float query . calibrated int8 document; STS pairs are scored float
    first sentence . int8 second sentence (the score a rescoring index returns); classification has no binary
    counterpart here and is reported as not applicable. ``per_query``: retrieval metrics carry each query's
    nDCG@10 too (see :func:`retrieval_metrics`).
    """
    from embedforge.quantization import BinaryRescoreIndex, Int8Calibration

    if task.kind == "sts":
        emb = _prefix(vectors["emb"], dim)
        a, b = emb[vectors["a"]], emb[vectors["b"]]
        if binary:
            cal = Int8Calibration.fit(emb)
            b = cal.dequantize(cal.quantize(b))
        from scipy.stats import pearsonr, spearmanr

        gold = np.asarray(data["score"], dtype=np.float64)
        cos = np.sum(a * b, axis=1)
        if not np.all(np.isfinite(cos)) or np.ptp(cos) == 0:
            what = "non-finite" if not np.all(np.isfinite(cos)) else "identical"
            raise RunError(f"{task.name}: the model gives {what} similarities for every pair, so no correlation "
                           "exists; check the model's vectors")
        return {"spearman": float(spearmanr(cos, gold).statistic * 100),
                "pearson": float(pearsonr(cos, gold).statistic * 100), "n": len(gold)}
    if task.kind == "retrieval":
        q, d = _prefix(vectors["q"], dim), _prefix(vectors["d"], dim)
        if not binary:
            return retrieval_metrics(q @ d.T, vectors["doc_ids"], vectors["query_ids"], data.qrels,
                                     per_query=per_query)
        depth = min(rescore_depth, len(d))
        k = min(100, depth)
        index = BinaryRescoreIndex.build(d, Int8Calibration.fit(d))
        scores, ids = index.search(q, k=k, depth=depth)
        full = np.full((len(q), len(d)), -np.inf, dtype=np.float32)
        rows = np.repeat(np.arange(len(q))[:, None], ids.shape[1], axis=1)
        keep = ids >= 0
        full[rows[keep], ids[keep]] = scores[keep]
        out = retrieval_metrics(full, vectors["doc_ids"], vectors["query_ids"], data.qrels, k_recall=k,
                                per_query=per_query)
        out["rescore_depth"] = depth
        return out
    if binary:
        return {"not_applicable": "binary codes serve search; classification is scored on float vectors"}
    from sklearn.linear_model import LogisticRegression

    train, dev = data
    x_train, x_test = _prefix(vectors["train"], dim), _prefix(vectors["test"], dim)
    clf = LogisticRegression(max_iter=1000, C=10.0)
    clf.fit(x_train, list(train["label"]))
    acc = float(np.mean(clf.predict(x_test) == np.asarray(list(dev["label"]), dtype=object)))
    return {"accuracy": acc * 100, "n_train": len(x_train), "n_test": len(x_test)}


def _artifact_encoder(art: Artifact) -> Encoder:
    if art.kind == "pytorch":
        return as_encoder(art.path)
    from embedforge.onnx_encoder import OnnxEncoder

    return OnnxEncoder(art.path, file=art.graph or "onnx/model.onnx")


def evaluate_artifacts(config: EvalConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Score the model and every artifact :func:`plan_artifacts` lists; each encoded artifact encodes the task
    texts once, the prefixes and binary codes reuse those vectors.

    Returns the PyTorch model's task metrics at the top level (as :func:`evaluate` does) plus ``"artifacts"``: one
    record per artifact in the form :mod:`embedforge.report` reads: ``name``, ``kind``, ``path``, ``dims`` (its
    width), ``dim`` (the width again for the PyTorch and binary artifacts, which make the quality-vs-dimension
    curves; None for the ONNX graphs), ``precision`` (float / binary), ``size_bytes`` and ``size_mb`` on disk,
    ``vector_bytes`` per stored vector, ``throughput`` (texts/s while encoding every task text, the same texts for
    every artifact) and ``results`` (task metrics). Every artifact after the first has ``vs_pytorch`` in its
    retrieval tasks' metrics: its nDCG@10 minus the full PyTorch model's over the same queries, with a 95%
    bootstrap interval (:func:`paired_difference`).
    """
    import gc

    parsed = [parse_task(t) for t in config.tasks]
    loaded = [load_task_data(t) for t in parsed]
    arts = plan_artifacts(config)
    encoded: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    records: list[dict[str, Any]] = []
    reference_queries: dict[str, list[float]] = {}  # the PyTorch model's nDCG@10 per query, per retrieval task
    for art in arts:
        if art.source is None:
            encoder = _artifact_encoder(art)
            if art.kind == "pytorch":
                _check_prompts(encoder, {"query_prompt": config.query_prompt, "doc_prompt": config.doc_prompt})
                full = getattr(getattr(encoder, "model", None), "get_embedding_dimension", lambda: None)()
                too_big = [d for d in config.truncate_dims if full is not None and d > full]
                if too_big:  # refuse before the first text is encoded
                    raise ConfigError(f"truncate_dims: {too_big[0]} is larger than the model's {full} dimensions; "
                                      f"use at most {full}", key="truncate_dims")
            logger.info("eval: encoding the task texts with %s (%s)", art.name, art.graph or art.path)
            start = time.perf_counter()
            vectors = [encode_task_vectors(encoder, t, d, batch_size=config.batch_size,
                                           query_prompt=config.query_prompt, doc_prompt=config.doc_prompt,
                                           show_progress=show_progress) for t, d in zip(parsed, loaded)]
            seconds = time.perf_counter() - start
            n_texts = sum(v["texts"] for v in vectors)
            encoded[art.name] = (vectors, {"texts": n_texts, "encode_seconds": round(seconds, 2),
                                           "throughput": round(n_texts / max(seconds, 1e-9), 2)})
            del encoder
            gc.collect()
        vectors, timing = encoded[art.source or art.name]
        full_dim = next((v[k].shape[1] for v in vectors for k in ("emb", "d", "train") if k in v), None)
        dims = art.dims if art.dims is not None else full_dim
        if dims is not None and full_dim is not None and dims > full_dim:
            raise ConfigError(f"truncate_dims: {dims} is larger than the {full_dim} dimensions of {art.source}; use "
                              f"at most {full_dim}", key="truncate_dims")
        metrics = {t.name: score_task_vectors(t, d, v, dim=art.dims, binary=art.binary,
                                              rescore_depth=config.rescore_depth, per_query=True)
                   for t, d, v in zip(parsed, loaded, vectors)}
        for task_name, m in metrics.items():  # retrieval: paired with the full PyTorch model, query by query
            queries = m.pop(PER_QUERY, None)
            if queries is None:
                continue
            if not records:
                reference_queries[task_name] = queries
            else:
                m["vs_pytorch"] = paired_difference(reference_queries[task_name], queries)
        vector_bytes = (-(-dims // 8) + dims) if art.binary and dims else (4 * dims if dims else None)
        # "dim" places the PyTorch and binary artifacts on the quality-vs-dimension curves (the ONNX graphs are
        # full-width copies of the PyTorch point and stay off them); "dims" is every artifact's width.
        on_curve = art.kind in ("pytorch", "binary-rescore")
        records.append({"name": art.name, "kind": art.kind, "path": art.path, "graph": art.graph,
                        "dims": dims, "dim": dims if on_curve else None,
                        "precision": "binary" if art.binary else "float",
                        "size_bytes": art.size_bytes, "size_mb": round(art.size_bytes / 2**20, 2),
                        "vector_bytes": vector_bytes, "throughput": timing["throughput"],
                        "throughput_texts": timing["texts"], "encode_seconds": timing["encode_seconds"],
                        "vectors_from": art.source or art.name, "results": metrics})
        logger.info("eval %s: %s", art.name,
                    {t: round(main_score(t, m), 2) for t, m in metrics.items() if "not_applicable" not in m})
    return {**records[0]["results"], "artifacts": records}


def artifacts_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per artifact with its size, throughput and the headline score of every task."""
    from embedforge.report import paired_text, table

    paired = [t for t in records[0]["results"] if any(paired_text(r["results"].get(t)) for r in records)]
    rows = []
    for r in records:
        row = {"artifact": r["name"], "kind": r["kind"], "dims": r["dims"], "size MiB": r["size_mb"],
               "bytes/vector": r["vector_bytes"], "texts/s": r["throughput"]}
        for task, m in r["results"].items():
            row[task] = main_score(task, m) if "not_applicable" not in m else None
        row.update({f"{task} vs pytorch (95% CI)": paired_text(r["results"].get(task)) for task in paired})
        rows.append(row)
    return table(rows)


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
        check_output(out_dir, stage="eval", inputs=[config.model] + ([config.export] if config.export else []))
        if config.multi_artifact:
            plan_artifacts(config)  # missing graphs or faiss are refused before anything is loaded
        if config.multi_artifact:
            results = evaluate_artifacts(config)
        else:
            results = evaluate(config.model, config.tasks, batch_size=config.batch_size,
                               truncate_dim=config.truncate_dim, query_prompt=config.query_prompt,
                               doc_prompt=config.doc_prompt)
        tasks_only = {k: v for k, v in results.items() if k != "artifacts"}
        report = f"# Evaluation of {config.model}\n\n" + metrics_table(tasks_only) + "\n"
        if "artifacts" in results:
            report += ("\n## Every artifact (headline score per task; texts/s while encoding every task text)\n\n"
                       + artifacts_table(results["artifacts"]) + "\n")
        with atomic_dir(out_dir, stage="eval") as tmp:
            (tmp / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            (tmp / "report.md").write_text(report)
            write_lineage(tmp, stage="eval", source=config.model, config=config, metrics=tasks_only,
                          parent=config.model if Path(config.model).is_dir() else None, recipe_hash=ctx.recipe_hash)
    if config.record_in_model and Path(config.model).is_dir():
        update_metrics(config.model, {"eval": results})
