"""Distillation losses from "Jasper and Stella: distillation of SOTA embedding models" (Zhang et al., 2024).

Each loss takes a batch of student vectors ``s`` (B x d) and the teacher vectors ``t`` (B x D) of the same
texts, L2-normalizes both, and returns a scalar:

- :class:`CosineLoss`: pulls every student vector onto its teacher vector (needs d == D);
- :class:`SimilarityMatrixLoss`: makes the in-batch cosine-similarity matrix of the students match the
  teachers' (any d, D);
- :class:`RelativeSimilarityLoss`: keeps the teachers' *ordering* of in-batch pair scores with a margin.

:class:`JasperStellaLoss` adds them with the paper's weights (10 / 200 / 20); when d != D (a Matryoshka
prefix, say) the cosine term is left out, as Jasper does for its reduced-dimension heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _check_batch(student: Tensor, teacher: Tensor) -> None:
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(f"expected 2-D batches, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: student {student.shape[0]}, teacher {teacher.shape[0]}")


class CosineLoss(nn.Module):
    """Mean of ``1 - cos(s_i, t_i)`` over the batch.

    Inputs: student and teacher vectors of the same texts, of the *same* dimension.
    Relations: the pointwise term of Jasper's stage 1-2 objective; zero when every student vector points
    exactly where its teacher vector does.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_batch(student, teacher)
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"cosine loss needs equal dims, got {student.shape[1]} and {teacher.shape[1]}")
        cos = (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1)
        return (1.0 - cos).mean()


class SimilarityMatrixLoss(nn.Module):
    """Mean squared difference between the student's and the teacher's B x B cosine-similarity matrices.

    Inputs: student and teacher vectors of the same texts; the dimensions may differ (only similarities are
    compared), which is what lets it train Matryoshka prefixes and projection-free small heads.
    Relations: Jasper's "similarity loss"; it fixes the geometry of the batch, not the absolute positions.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_batch(student, teacher)
        s = F.normalize(student, dim=-1)
        t = F.normalize(teacher, dim=-1)
        return F.mse_loss(s @ s.T, t @ t.T)


class RelativeSimilarityLoss(nn.Module):
    """Hinge on the ordering of in-batch pair scores, as in Jasper's relative-similarity distillation.

    The B(B-1)/2 off-diagonal cosine scores of the batch are the items. For every two items a, b that the
    teacher orders ``t_a > t_b``, the student pays ``max(0, margin - (s_a - s_b))``; the loss is the mean over
    those ordered comparisons. Comparing all items with all items costs O(B^4), so at most ``max_pairs`` items
    are sampled per call (all of them when there are fewer), giving at most ``max_pairs^2 / 2`` comparisons.

    Args:
        margin: how much higher the student must score the item the teacher prefers (paper: 0.015).
        max_pairs: items (pair scores) sampled per batch.
    """

    def __init__(self, margin: float = 0.015, max_pairs: int = 512, generator: torch.Generator | None = None):
        super().__init__()
        if max_pairs < 2:
            raise ValueError("max_pairs must be >= 2")
        self.margin = margin
        self.max_pairs = max_pairs
        self.generator = generator

    def pair_scores(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """The sampled off-diagonal scores (student, teacher), as two 1-D tensors of equal length."""
        s = F.normalize(student, dim=-1)
        t = F.normalize(teacher, dim=-1)
        rows, cols = torch.triu_indices(s.shape[0], s.shape[0], offset=1, device=s.device)
        s_items = (s[rows] * s[cols]).sum(-1)
        t_items = (t[rows] * t[cols]).sum(-1)
        if s_items.numel() > self.max_pairs:
            pick = torch.randperm(s_items.numel(), generator=self.generator)[: self.max_pairs].to(s.device)
            s_items, t_items = s_items[pick], t_items[pick]
        return s_items, t_items

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_batch(student, teacher)
        if student.shape[0] < 2:
            return student.sum() * 0.0
        s_items, t_items = self.pair_scores(student, teacher)
        preferred = t_items[:, None] > t_items[None, :]  # [a, b]: the teacher puts a above b
        if not bool(preferred.any()):
            return s_items.sum() * 0.0
        gaps = s_items[:, None] - s_items[None, :]
        return F.relu(self.margin - gaps)[preferred].mean()


@dataclass
class LossWeights:
    """Weights of the three Jasper/Stella terms (paper defaults)."""

    cosine: float = 10.0
    similarity: float = 200.0
    relative: float = 20.0


class JasperStellaLoss(nn.Module):
    """Weighted sum ``w_cos * cosine + w_sim * similarity + w_rel * relative`` for one view of the student.

    The cosine term is used only when the student's dimension equals the teacher's; the other two compare
    similarities and work at any dimension. ``last_terms`` keeps the unweighted terms of the latest call for
    logging.
    """

    def __init__(self, weights: LossWeights | None = None, margin: float = 0.015, max_pairs: int = 512,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.weights = weights or LossWeights()
        self.cosine = CosineLoss()
        self.similarity = SimilarityMatrixLoss()
        self.relative = RelativeSimilarityLoss(margin=margin, max_pairs=max_pairs, generator=generator)
        self.last_terms: dict[str, float] = {}

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        w = self.weights
        total = student.new_zeros(())
        terms: dict[str, float] = {}
        if w.cosine > 0 and student.shape[1] == teacher.shape[1]:
            value = self.cosine(student, teacher)
            total = total + w.cosine * value
            terms["cosine"] = float(value.detach())
        if w.similarity > 0:
            value = self.similarity(student, teacher)
            total = total + w.similarity * value
            terms["similarity"] = float(value.detach())
        if w.relative > 0:
            value = self.relative(student, teacher)
            total = total + w.relative * value
            terms["relative"] = float(value.detach())
        self.last_terms = terms
        return total
