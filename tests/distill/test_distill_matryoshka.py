"""The training objective: mean over Matryoshka prefixes and Starbucks (layer, dim) views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedforge.distill.losses import JasperStellaLoss
from embedforge.distill.matryoshka import DistillObjective, full_dims, prefix


def _load(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def test_prefix_and_full_dims():
    x = torch.tensor([[3.0, 4.0, 12.0]])
    torch.testing.assert_close(prefix(x, 2), torch.tensor([[0.6, 0.8]]))
    assert full_dims([8, 16], 32) == [32, 16, 8]
    assert full_dims([32, 8, 8], 32) == [32, 8]
    with pytest.raises(ValueError, match="exceed"):
        full_dims([64], 32)


def test_objective_is_the_mean_over_prefixes(bert_teacher, texts):
    model = _load(bert_teacher)
    rng = np.random.default_rng(0)
    targets = torch.tensor(rng.normal(size=(len(texts), 32)), dtype=torch.float32)
    loss = JasperStellaLoss(max_pairs=10_000)
    objective = DistillObjective(model, targets, loss, dims=[16, 8])
    batch = [3, 7, 11, 20, 42]
    features = model.preprocess([texts[i] for i in batch])
    with torch.no_grad():
        got = objective([features], torch.tensor(batch)).item()
        full = model(model.preprocess([texts[i] for i in batch]))["sentence_embedding"]
        t = targets[batch]
        by_hand = np.mean([loss(full[:, :d] / full[:, :d].norm(dim=1, keepdim=True), t).item() for d in (32, 16, 8)])
    assert got == pytest.approx(by_hand, rel=1e-5)
    assert set(objective.last_views) == {"dim32", "dim16", "dim8"}
    # Teacher vectors may also come as labels directly.
    with torch.no_grad():
        direct = objective([model.preprocess([texts[i] for i in batch])], targets[batch]).item()
    assert direct == pytest.approx(got, rel=1e-5)


def test_full_dim_weight_is_a_weighted_mean_over_views(bert_teacher, texts):
    model = _load(bert_teacher)
    targets = torch.randn(len(texts), 32, generator=torch.Generator().manual_seed(1))
    loss = JasperStellaLoss(max_pairs=10_000)
    objective = DistillObjective(model, targets, loss, dims=[16, 8], full_dim_weight=3.0)
    batch = [1, 4, 9, 16]
    with torch.no_grad():
        got = objective([model.preprocess([texts[i] for i in batch])], torch.tensor(batch)).item()
    views = objective.last_views
    assert got == pytest.approx((3 * views["dim32"] + views["dim16"] + views["dim8"]) / 5, rel=1e-5)
    assert got != pytest.approx((views["dim32"] + views["dim16"] + views["dim8"]) / 3, rel=1e-3)
    with pytest.raises(ValueError, match="full_dim_weight"):
        DistillObjective(model, targets, loss, dims=[16], full_dim_weight=0.0)


def test_layer_dim_view_is_the_truncated_model(bert_teacher, texts):
    """The (layer, dim) view equals what a student cut after that layer outputs, cut to dim."""
    from embedforge.distill.students import layer_student

    model = _load(bert_teacher)
    targets = torch.randn(len(texts), 32)
    objective = DistillObjective(model, targets, JasperStellaLoss(max_pairs=10_000), layer_dims=[[1, 8]])
    batch = [0, 1, 2, 3]
    with torch.no_grad():
        objective([model.preprocess([texts[i] for i in batch])], torch.tensor(batch))
        features = model.preprocess([texts[i] for i in batch])
        model[0].auto_model.config.output_hidden_states = True
        out = model(features)
        model[0].auto_model.config.output_hidden_states = False
        view = objective._layer_view(out, 1)
    one_layer = layer_student(model, [0])
    expected = one_layer.encode([texts[i] for i in batch], convert_to_tensor=True)
    torch.testing.assert_close(prefix(view, 8), prefix(expected, 8), atol=1e-5, rtol=1e-4)
    assert set(objective.last_views) == {"dim32", "layer1_dim8"}
    assert model[0].auto_model.config.output_hidden_states is False  # restored after the forward pass


def test_objective_rejects_pairs_outside_the_student(bert_teacher):
    model = _load(bert_teacher)
    with pytest.raises(ValueError, match="outside"):
        DistillObjective(model, torch.zeros(4, 32), JasperStellaLoss(), layer_dims=[[4, 8]])
    with pytest.raises(ValueError, match="outside"):
        DistillObjective(model, torch.zeros(4, 32), JasperStellaLoss(), layer_dims=[[1, 64]])


def test_pca_rotation_keeps_cosines_and_puts_the_top_components_first():
    """Against a hand computation: eigenvectors of the covariance, sorted by eigenvalue."""
    from embedforge.distill.matryoshka import pca_rotation

    rng = np.random.default_rng(0)
    d = 12
    # Anisotropic data whose largest variances sit in the *last* coordinates, plus a common offset.
    scales = np.linspace(0.1, 3.0, d)
    mixing, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = (rng.normal(size=(500, d)) * scales) @ mixing.T + 0.5
    rotation = pca_rotation(x).astype(np.float64)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(d), atol=1e-5)  # orthogonal

    rotated = x @ rotation
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(rotated) @ unit(rotated).T, unit(x) @ unit(x).T, atol=1e-5)  # cosines kept

    # By hand: the covariance's eigenvalues, largest first, are the variances of the rotated coordinates ...
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False))
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    np.testing.assert_allclose(rotated.var(axis=0, ddof=1), eigenvalues, rtol=1e-4)
    # ... and a k-prefix is the projection onto the top-k principal axes (up to each axis' sign).
    for k in (1, 3, 6):
        np.testing.assert_allclose(np.abs(rotated[:, :k]), np.abs(x @ eigenvectors[:, :k]), rtol=1e-4, atol=1e-5)
        assert rotated[:, :k].var(axis=0).sum() > 1.5 * x[:, :k].var(axis=0).sum()
    # Deterministic signs: each axis' largest entry is positive.
    assert np.all(rotation[np.abs(rotation).argmax(axis=0), np.arange(d)] > 0)
    with pytest.raises(ValueError, match="N >= 2"):
        pca_rotation(x[:1])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_pieces_give_the_same_loss_on_less_padding(tmp_path, padding_side):
    """The forward pass on length-sorted pieces scores the same batch as one padded pass (a RoPE decoder, so
    cutting left padding is exact too), and the pieces it runs on are narrower than the batch."""
    from embedforge.convert.embedder import build_embedder
    from embedforge.testing import tiny_decoder

    decoder = tiny_decoder("llama", tmp_path / "llama")
    model = build_embedder(str(decoder), pooling="mean", bidirectional=True, max_seq_length=64,
                           padding_side=padding_side)
    texts = ["a b", "one two three four five six seven eight nine ten eleven twelve thirteen", "c",
             "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron", "d e f", "g h"]
    targets = torch.randn(len(texts), model.get_embedding_dimension(), generator=torch.Generator().manual_seed(0))
    loss = JasperStellaLoss(max_pairs=10_000)
    whole = DistillObjective(model, targets, loss, dims=[8])
    pieces = DistillObjective(model, targets, loss, dims=[8], pieces=3)
    widths: list[int] = []
    hook = model[0].register_forward_pre_hook(lambda module, args: widths.append(args[0]["input_ids"].shape[1]))
    features = model.preprocess(texts)
    labels = torch.arange(len(texts))
    with torch.no_grad():
        expected = whole([features], labels).item()
        views = dict(whole.last_views)
        widths.clear()
        got = pieces([features], labels).item()
    hook.remove()
    assert got == pytest.approx(expected, rel=1e-4)
    assert pieces.last_views == pytest.approx(views, rel=1e-4)
    full_width = features["attention_mask"].shape[1]
    assert len(widths) == 3 and max(widths) == full_width and min(widths) < full_width / 2
    with pytest.raises(ValueError, match="pieces"):
        DistillObjective(model, targets, loss, pieces=0)
