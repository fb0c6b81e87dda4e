"""The training objectives against independent, loop-by-loop computations; config validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from embedforge.configs import ConfigError
from embedforge.convert.losses import FilteredInfoNCELoss, infonce_logits, similarity_matching_loss
from embedforge.convert.train_config import ContrastiveConfig, MntpConfig, SimcseConfig
from embedforge.convert.training import masked_positions_loss, mntp_loss
from embedforge.training.options import TrainOptions


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _reference_infonce(anchors, columns, temperature, margin=None):
    """Per-anchor softmax over every candidate, written as plain loops."""
    candidates = [c[j] for c in columns for j in range(c.shape[0])]
    total = 0.0
    for i in range(anchors.shape[0]):
        pos = i  # the i-th row of the first column
        sims = [_cos(anchors[i], c) for c in candidates]
        kept = [s for j, s in enumerate(sims) if j == pos or margin is None or not s > sims[pos] + margin]
        total += -(sims[pos] / temperature - math.log(sum(math.exp(s / temperature) for s in kept)))
    return total / anchors.shape[0]


def test_infonce_matches_loop_reference_with_hard_negatives() -> None:
    torch.manual_seed(0)
    a, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    loss = FilteredInfoNCELoss(model=None, temperature=0.1)
    got = loss.compute_loss_from_embeddings([a, p, n])
    assert got.item() == pytest.approx(_reference_infonce(a, [p, n], 0.1), rel=1e-5)
    assert loss.last_stats["candidates"] == 10
    assert loss.last_stats["filtered"] == 0


def test_false_negative_filtering_masks_candidates_above_the_positive() -> None:
    torch.manual_seed(1)
    a = torch.randn(4, 8)
    p = a + 0.8 * torch.randn(4, 8)
    n = torch.randn(4, 8)
    n[2] = a[0] * 3.0  # a near-duplicate of anchor 0 sitting among the negatives: a false negative for it
    for margin in (0.0, -0.05):
        loss = FilteredInfoNCELoss(model=None, temperature=0.05, false_negative_margin=margin)
        got = loss.compute_loss_from_embeddings([a, p, n])
        assert got.item() == pytest.approx(_reference_infonce(a, [p, n], 0.05, margin), rel=1e-5)
        assert loss.last_stats["filtered"] >= 1
    logits, filtered = infonce_logits(a, torch.cat([p, n]), torch.arange(4), 0.05, 0.0)
    assert filtered[0, 4 + 2]  # the planted duplicate is masked for anchor 0
    assert not filtered[torch.arange(4), torch.arange(4)].any()  # positives never are
    assert torch.isinf(logits[0, 6])
    unfiltered = FilteredInfoNCELoss(model=None, temperature=0.05).compute_loss_from_embeddings([a, p, n])
    assert unfiltered.item() > got.item()


def test_gradients_flow_to_all_columns() -> None:
    torch.manual_seed(2)
    cols = [torch.randn(3, 6, requires_grad=True) for _ in range(3)]
    FilteredInfoNCELoss(model=None).compute_loss_from_embeddings(cols).backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cols)


def test_teacher_similarity_term() -> None:
    torch.manual_seed(3)
    sa, sb, ta, tb = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 5), torch.randn(4, 5)
    expected = sum(
        (_cos(sa[i], sb[j]) - _cos(ta[i], tb[j])) ** 2 for i in range(4) for j in range(4)
    ) / 16
    assert similarity_matching_loss(sa, sb, ta, tb).item() == pytest.approx(expected, rel=1e-5)
    labels = torch.cat([ta, tb], dim=1)
    base = FilteredInfoNCELoss(model=None).compute_loss_from_embeddings([sa, sb])
    with_teacher = FilteredInfoNCELoss(model=None, distill_weight=2.0).compute_loss_from_embeddings([sa, sb], labels)
    assert with_teacher.item() == pytest.approx(base.item() + 2.0 * expected, rel=1e-5)


def test_mntp_loss_predicts_masked_token_from_previous_position() -> None:
    torch.manual_seed(4)
    vocab, length = 11, 7
    logits = torch.randn(2, length, vocab)
    labels = torch.full((2, length), -100)
    labels[0, 3], labels[0, 6], labels[1, 1] = 4, 9, 2
    terms = []
    for b, i in ((0, 3), (0, 6), (1, 1)):
        terms.append(-F.log_softmax(logits[b, i - 1], dim=-1)[labels[b, i]])
    assert mntp_loss(logits, labels).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_masked_positions_loss_equals_full_vocabulary_loss() -> None:
    torch.manual_seed(5)
    hidden, head = torch.randn(3, 9, 6), torch.nn.Linear(6, 13, bias=False)
    labels = torch.full((3, 9), -100)
    labels[0, 2], labels[1, 8], labels[2, 4], labels[2, 5] = 1, 7, 12, 0
    full = mntp_loss(head(hidden), labels)
    assert masked_positions_loss(hidden, labels, head).item() == pytest.approx(full.item(), rel=1e-6)
    capped = masked_positions_loss(hidden, labels, head, softcap=2.0)
    assert capped.item() == pytest.approx(mntp_loss(torch.tanh(head(hidden) / 2.0) * 2.0, labels).item(), rel=1e-6)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="adapter"):
        ContrastiveConfig(model="m", data=["x"], lora_r=0, adapter="keep")
    with pytest.raises(ConfigError, match="cache_minibatch"):
        ContrastiveConfig(model="m", data=["x"], cache_minibatch=8, false_negative_margin=0.0)
    with pytest.raises(ConfigError, match="data"):
        ContrastiveConfig(model="m")
    with pytest.raises(ConfigError, match="quantization"):
        ContrastiveConfig(model="m", data=["x"], quantization="8bit")
    with pytest.raises(ConfigError, match="adapter"):
        MntpConfig(model="m", adapter="keep")
    with pytest.raises(ConfigError, match="temperature"):
        SimcseConfig(model="m", temperature=0)
    with pytest.raises(ConfigError, match="stage2_learning_rate"):
        ContrastiveConfig(model="m", data=["x"], stage2_learning_rate=0.0)
    bf16 = ContrastiveConfig(model="m", data=["x"], train=TrainOptions(precision="bf16"))
    assert bf16.train.precision.value == "bf16"


def test_each_stage_keeps_its_own_training_defaults() -> None:
    """A recipe's ``train:`` mapping changes only the keys it names; the rest are the stage's defaults."""
    from embedforge.typed_config import build_config

    rates = {MntpConfig: 5e-5, SimcseConfig: 3e-5, ContrastiveConfig: 2e-4}
    for cls, rate in rates.items():
        values = {"model": "m", "data": ["x"]}
        default = build_config(cls, values).train
        assert (default.learning_rate, default.batch_size, default.max_steps, default.epochs) == (rate, 32, 100, 1.0)
        assert (default.warmup_ratio, default.save_steps, default.save_total_limit, default.logging_steps,
                default.seed) == (0.05, 50, 2, 10, 0)
        changed = build_config(cls, {**values, "train": {"batch_size": 8}}).train
        assert changed.batch_size == 8 and changed.learning_rate == rate and changed.logging_steps == 10
    with pytest.raises(ConfigError, match=r"^train\.max_steps: must be positive"):
        build_config(ContrastiveConfig, {"model": "m", "data": ["x"], "train": {"max_steps": 0}})


def test_train_config_imports_without_torch() -> None:
    code = ("import sys, embedforge.convert.train_config as c, embedforge.stages as s; "
            "c.ContrastiveConfig(model='m', data=['x']); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
