"""The Jasper/Stella losses against hand computations (plain Python loops over numpy arrays)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from embedforge.distill.losses import (
    CosineLoss,
    JasperStellaLoss,
    LossWeights,
    RelativeSimilarityLoss,
    SimilarityMatrixLoss,
)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _by_hand_relative(s: np.ndarray, t: np.ndarray, margin: float) -> float:
    """Loop over every two off-diagonal pairs (i<j), (k<l) where the teacher prefers the first."""
    s, t = _unit(s), _unit(t)
    n = len(s)
    items = [(i, j) for i in range(n) for j in range(i + 1, n)]
    losses = []
    for a, b in itertools.product(items, items):
        ta, tb = float(t[a[0]] @ t[a[1]]), float(t[b[0]] @ t[b[1]])
        if ta > tb:
            sa, sb = float(s[a[0]] @ s[a[1]]), float(s[b[0]] @ s[b[1]])
            losses.append(max(0.0, margin - (sa - sb)))
    return float(np.mean(losses))


@pytest.fixture()
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(5, 4)), rng.normal(size=(5, 4))


def test_cosine_loss_matches_hand_computation(batch):
    s, t = batch
    expected = np.mean([1 - (s[i] @ t[i]) / (np.linalg.norm(s[i]) * np.linalg.norm(t[i])) for i in range(len(s))])
    got = CosineLoss()(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cosine_loss_is_zero_for_scaled_copies_and_rejects_other_dims(batch):
    s, _ = batch
    assert CosineLoss()(torch.tensor(s), torch.tensor(3 * s)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="equal dims"):
        CosineLoss()(torch.tensor(s), torch.tensor(s[:, :3]))


def test_similarity_matrix_loss_matches_hand_computation(batch):
    s, t = batch
    t = np.concatenate([t, t[:, :2] * 0.5], axis=1)  # the teacher may have another dimension
    su, tu = _unit(s), _unit(t)
    n = len(s)
    expected = sum((su[i] @ su[j] - tu[i] @ tu[j]) ** 2 for i in range(n) for j in range(n)) / n**2
    got = SimilarityMatrixLoss()(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("margin", [0.015, 0.3])
def test_relative_loss_matches_hand_computation(batch, margin):
    s, t = batch
    expected = _by_hand_relative(s, t, margin)
    got = RelativeSimilarityLoss(margin=margin, max_pairs=1000)(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_relative_loss_zero_when_order_kept_and_positive_when_reversed():
    # Pair scores of this batch are all more than the margin apart, so copying the teacher costs nothing.
    t = np.array([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8], [-0.5, 0.5]])
    loss = RelativeSimilarityLoss(margin=0.015, max_pairs=100)
    assert loss(torch.tensor(t), torch.tensor(t)).item() == 0.0
    # Mirroring one text changes the order of the pairs it is in: the student now pays.
    s = t.copy()
    s[3] = -s[3]
    got = loss(torch.tensor(s), torch.tensor(t)).item()
    assert got > 0
    assert got == pytest.approx(_by_hand_relative(s, t, 0.015), rel=1e-6)


def test_relative_loss_subsamples_items():
    rng = np.random.default_rng(0)
    s, t = torch.tensor(rng.normal(size=(40, 8))), torch.tensor(rng.normal(size=(40, 8)))
    loss = RelativeSimilarityLoss(max_pairs=50, generator=torch.Generator().manual_seed(0))
    s_items, t_items = loss.pair_scores(s, t)
    assert s_items.shape == t_items.shape == (50,)
    # The sampled items are genuine pair scores of the batch.
    su = torch.nn.functional.normalize(s, dim=-1)
    all_scores = (su @ su.T)[torch.triu_indices(40, 40, 1).unbind()]
    assert all(bool(torch.isclose(all_scores, v).any()) for v in s_items)
    assert loss(s, t).item() > 0


def test_jasper_stella_loss_weights_and_dim_rule(batch):
    s, t = (torch.tensor(x) for x in batch)
    w = LossWeights(cosine=10, similarity=200, relative=20)
    loss = JasperStellaLoss(w, margin=0.015, max_pairs=1000)
    full = loss(s, t).item()
    expected = (10 * CosineLoss()(s, t) + 200 * SimilarityMatrixLoss()(s, t)
                + 20 * RelativeSimilarityLoss(0.015, 1000)(s, t)).item()
    assert full == pytest.approx(expected, rel=1e-6)
    assert set(loss.last_terms) == {"cosine", "similarity", "relative"}
    # A prefix of another dimension: no cosine term.
    short = loss(s[:, :2], t).item()
    expected_short = (200 * SimilarityMatrixLoss()(s[:, :2], t) + 20 * RelativeSimilarityLoss(0.015, 1000)(s[:, :2], t)).item()
    assert short == pytest.approx(expected_short, rel=1e-6)
    assert "cosine" not in loss.last_terms


def test_losses_have_gradients(batch):
    s = torch.tensor(batch[0], requires_grad=True)
    t = torch.tensor(batch[1])
    JasperStellaLoss()(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
