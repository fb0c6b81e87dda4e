"""InfoNCE with false-negative filtering and an optional teacher similarity term (a sentence-transformers loss).

Inputs: columns ``(anchor, positive[, negative, negative_2, ...])``; optionally a ``label`` column holding the
teacher's vectors of the anchor and the positive, concatenated (only with ``distill_weight > 0``).

Relations: anchor ``i`` should score its own positive above every other candidate, the candidates being all
positives and negatives of the batch (of every process with ``gather_across_devices``). Logits are cosine
similarities divided by the temperature (van den Oord et al. 2018, "Representation Learning with Contrastive
Predictive Coding"; SimCSE, Gao et al. 2021).

False-negative filtering: a candidate ``j`` other than the positive whose cosine exceeds the positive's by more
than ``false_negative_margin`` (``s_ij > s_ii+ + margin``) is probably an unlabeled positive; it is dropped from the
softmax. Similarities for the mask come from the model itself, detached (NV-Retriever, Moreira et al. 2024, and
GISTEmbed, Solatorio 2024, use a guide model for the same purpose).

Teacher term (an ablation, Jasper/Stella "similarity loss", Zhang et al. 2024): mean squared error between the
student's and the teacher's anchor-positive cosine matrices; the dimensions of the two models need not match.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def infonce_logits(
    anchors: Tensor, candidates: Tensor, positive_index: Tensor, temperature: float,
    false_negative_margin: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Cosine logits ``(B, C) / temperature`` with suspected false negatives set to ``-inf``.

    Returns the logits and the boolean mask of the filtered entries.
    """
    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    cos = a @ c.T
    rows = torch.arange(cos.size(0), device=cos.device)
    filtered = torch.zeros_like(cos, dtype=torch.bool)
    if false_negative_margin is not None:
        with torch.no_grad():
            pos = cos[rows, positive_index].unsqueeze(1)
            filtered = cos.detach() > pos + false_negative_margin
            filtered[rows, positive_index] = False
    logits = (cos / temperature).masked_fill(filtered, float("-inf"))
    return logits, filtered


def similarity_matching_loss(student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor) -> Tensor:
    """MSE between the student's and the teacher's ``a x b`` cosine-similarity matrices."""
    s = F.normalize(student_a, dim=-1) @ F.normalize(student_b, dim=-1).T
    t = F.normalize(teacher_a, dim=-1) @ F.normalize(teacher_b, dim=-1).T
    return F.mse_loss(s, t.to(s.dtype))


class FilteredInfoNCELoss(nn.Module):
    """InfoNCE over in-batch and hard negatives with optional false-negative filtering (see module docstring)."""

    def __init__(
        self,
        model: Any,
        temperature: float = 0.05,
        false_negative_margin: float | None = None,
        gather_across_devices: bool = False,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.false_negative_margin = false_negative_margin
        self.gather_across_devices = gather_across_devices
        self.distill_weight = distill_weight
        self.last_stats: dict[str, float] = {}

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss from per-column embeddings ``[anchor, positive, negatives...]`` (each ``(B, D)``)."""
        from sentence_transformers.util import all_gather_with_grad, get_rank

        if len(embeddings) < 2:
            raise ValueError(f"InfoNCE needs an anchor and a positive column, got {len(embeddings)} column(s)")
        anchors = embeddings[0]
        local_candidates = embeddings[1:]
        batch = anchors.size(0)
        offset = 0
        candidates = local_candidates
        if self.gather_across_devices:
            candidates = [all_gather_with_grad(c) for c in local_candidates]
            offset = get_rank() * batch
        positive_index = torch.arange(offset, offset + batch, device=anchors.device)
        pool = torch.cat(candidates, dim=0)
        logits, filtered = infonce_logits(
            anchors, pool, positive_index, self.temperature, self.false_negative_margin
        )
        loss = F.cross_entropy(logits, positive_index)
        self.last_stats = {"candidates": float(pool.size(0)), "filtered": float(filtered.sum().item())}
        if self.distill_weight > 0 and labels is not None and labels.dim() == 2 and labels.size(0) == batch:
            half = labels.size(1) // 2
            term = similarity_matching_loss(anchors, local_candidates[0], labels[:, :half], labels[:, half:])
            self.last_stats["distill"] = float(term.detach().item())
            loss = loss + self.distill_weight * term
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "false_negative_margin": self.false_negative_margin,
            "gather_across_devices": self.gather_across_devices,
            "distill_weight": self.distill_weight,
        }
