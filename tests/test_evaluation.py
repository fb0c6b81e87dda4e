"""Evaluation agrees with sentence-transformers' own evaluators and with hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from embedforge.data import BeirData
from embedforge.evaluation import (
    encode, evaluate_classification, evaluate_retrieval, evaluate_sts, parse_task, retrieval_metrics, split_labeled,
)
from embedforge.model import load_model
from embedforge.testing import sample_texts


def test_encode_restores_order_after_length_sorting(tiny_st_dir: Path) -> None:
    model = load_model(tiny_st_dir)
    texts = sample_texts()
    ours = encode(model, texts, batch_size=3, show_progress=False)
    ref = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_retrieval_metrics_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    qrels = {"a": {"d2": 1}, "b": {"d1": 1, "d3": 2}}
    m = retrieval_metrics(scores, ["d1", "d2", "d3"], ["a", "b"], qrels)
    ndcg_a = (1 / math.log2(3)) / 1.0
    dcg_b = 2 / math.log2(2) + 1 / math.log2(4)  # d3 first (gain 2), d1 third (gain 1)
    idcg_b = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((ndcg_a + dcg_b / idcg_b) / 2 * 100)
    assert m["mrr@10"] == pytest.approx((0.5 + 1.0) / 2 * 100)
    assert m["recall@100"] == pytest.approx(100.0)
    assert "ndcg@10_per_query" not in m
    # per query, in query order, for paired comparisons; a query without a relevant document is not judged
    three = np.stack([scores[0], scores[1], scores[1]])
    paired = retrieval_metrics(three, ["d1", "d2", "d3"], ["a", "c", "b"], {**qrels, "c": {}}, per_query=True)
    assert paired["ndcg@10_per_query"] == pytest.approx([ndcg_a * 100, dcg_b / idcg_b * 100])


def test_paired_difference_interval() -> None:
    from embedforge.evaluation import paired_difference

    # a constant gap has no spread: the interval is the gap itself
    same = paired_difference([10.0, 20.0, 30.0], [11.0, 21.0, 31.0])
    assert same == {"delta": 1.0, "ci95_low": 1.0, "ci95_high": 1.0, "queries": 3}
    # noisy gaps: the bootstrap interval is close to the normal one, mean +- 1.96 standard errors
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 100, 400)
    b = a + rng.normal(0.5, 10.0, 400)
    got = paired_difference(a, b)
    diff = b - a
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert got["delta"] == pytest.approx(diff.mean(), abs=0.005)
    assert got["ci95_low"] == pytest.approx(diff.mean() - half, abs=0.15)
    assert got["ci95_high"] == pytest.approx(diff.mean() + half, abs=0.15)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])


def test_retrieval_matches_sentence_transformers_evaluator(tiny_st_dir: Path) -> None:
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    model = load_model(tiny_st_dir)
    texts = sample_texts()
    corpus = {f"d{i}": t for i, t in enumerate(texts)}
    queries = {f"q{i}": " ".join(t.split()[:3]) for i, t in enumerate(texts)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(texts))}
    ours = evaluate_retrieval(model, BeirData(corpus, queries, qrels), show_progress=False)
    ev = InformationRetrievalEvaluator(queries, corpus, {q: set(r) for q, r in qrels.items()}, name="t",
                                       ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[100],
                                       map_at_k=[10], show_progress_bar=False)
    theirs = ev(model)
    assert ours["ndcg@10"] == pytest.approx(theirs["t_cosine_ndcg@10"] * 100, abs=1e-3)
    assert ours["mrr@10"] == pytest.approx(theirs["t_cosine_mrr@10"] * 100, abs=1e-3)


def test_sts_matches_sentence_transformers_evaluator(tiny_st_dir: Path) -> None:
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    model = load_model(tiny_st_dir)
    texts = sample_texts()
    data = {"sentence1": texts[:-1], "sentence2": texts[1:], "score": [float(i % 5) for i in range(len(texts) - 1)]}
    ours = evaluate_sts(model, data, show_progress=False)
    ev = EmbeddingSimilarityEvaluator(data["sentence1"], data["sentence2"], data["score"], name="s")
    theirs = ev(model)
    assert ours["spearman"] == pytest.approx(theirs["s_spearman_cosine"] * 100, abs=1e-3)


def test_classification_on_separable_data() -> None:
    class KeywordEncoder:
        """An encoder whose vectors separate the two labels perfectly."""

        def encode(self, texts: list[str], batch_size: int, prompt: str | None) -> np.ndarray:
            return np.array([[1.0, 0.1] if "card" in t else [0.1, 1.0] for t in texts], dtype=np.float32)

    texts = [f"my card {i}" for i in range(10)] + [f"the weather {i}" for i in range(10)]
    labels = ["card"] * 10 + ["weather"] * 10
    train, dev = split_labeled({"text": texts, "label": labels}, dev_fraction=0.3)
    assert set(dev["label"]) == {"card", "weather"} and not set(train["text"]) & set(dev["text"])
    assert evaluate_classification(KeywordEncoder(), train, dev, show_progress=False)["accuracy"] == 100.0


def test_truncate_dim_and_task_parsing(tiny_st_dir: Path) -> None:
    model = load_model(tiny_st_dir)
    out = encode(model, sample_texts()[:4], truncate_dim=8, show_progress=False)
    assert out.shape == (4, 8) and np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert parse_task("stsb-dev").kind == "sts"
    assert parse_task("retrieval:/x/y:dev").split == "dev"
    with pytest.raises(ValueError, match="unknown task"):
        parse_task("nope")
