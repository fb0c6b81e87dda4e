"""The healing distillation that follows layer pruning (the cut itself is :func:`embedforge.backbone.keep_layers`).

Dropping transformer layers is the cheapest structural compression: a 30-layer decoder keeping 15 layers halves
encode time. The pruned model drifts from the original, so :func:`heal` distills it back towards the unpruned
model's vectors (cosine + MSE on texts, a few hundred steps), in the spirit of "The Unreasonable Ineffectiveness
of the Deeper Layers" (Gromov et al., 2024), which heals pruned LLMs with a short fine-tune. It trains through the
one training engine (:mod:`embedforge.training.engine`): its checkpoints, resume, signal and NaN guards are those
of every other stage.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from embedforge.training.options import TrainOptions

logger = logging.getLogger(__name__)


def count_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def healing_loss(student: Any, teacher_vectors: Any) -> Any:
    """The healing objective as a sentence-transformers loss module.

    Inputs: one text column (tokenized by the trainer's collator) and a ``label`` column holding each text's row in
    ``teacher_vectors`` (``(N, D)``; the vectors stay out of the data set and the collator). Loss per batch:
    ``mean(1 - cos(student(text), teacher[label])) + MSE(student(text), teacher[label])``: the cosine term restores
    the direction of each vector, the MSE term its scale.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class HealingLoss(nn.Module):
        def __init__(self, model: Any, targets: torch.Tensor) -> None:
            super().__init__()
            self.model = model  # the trainer swaps in its wrapped (e.g. distributed) model
            self.register_buffer("targets", targets, persistent=False)

        def forward(self, sentence_features: Iterable[dict[str, Any]], labels: torch.Tensor) -> torch.Tensor:
            (features,) = list(sentence_features)
            out = self.model(features)["sentence_embedding"]
            target = self.targets.to(out.device)[labels.to(out.device).long()].to(out.dtype)
            return (1 - F.cosine_similarity(out, target, dim=-1)).mean() + F.mse_loss(out, target)

    return HealingLoss(student, torch.from_numpy(np.ascontiguousarray(teacher_vectors, dtype=np.float32)))


def heal(student: Any, texts: Sequence[str], teacher_vectors: np.ndarray, options: TrainOptions,
         ckpt_dir: str | os.PathLike[str], settings: dict[str, Any], *, max_seq_length: int = 128,
         callbacks: Iterable[Any] = (), where: str = "compress (heal)") -> tuple[dict[str, Any], dict[str, Any]]:
    """Distill ``student`` towards ``teacher_vectors`` (one per text) under ``options`` through the training engine.

    Checkpoints go to ``ckpt_dir`` every ``options.save_steps`` steps and on SIGTERM / Ctrl-C; a rerun resumes
    from the newest complete one only when it was made with the same ``settings`` (otherwise it starts over, one
    log line naming the change). A NaN or infinite loss stops before the optimizer applies it
    (:class:`~embedforge.training.guard.NanLossError`). Under torchrun each process trains on its share of the texts.
    Returns ``(metrics, stats)``: ``heal_loss_first`` / ``heal_loss_last`` (the first and last logged losses) and
    ``heal_steps``; the engine's statistics (``loss_history``, ``wall_s``, ``resumed_from``, ...).
    """
    from datasets import Dataset

    from embedforge.training.engine import build_trainer, run_training, trainer_arguments, world_size

    if len(texts) != len(teacher_vectors):
        raise ValueError(f"{len(texts)} texts but {len(teacher_vectors)} teacher vectors")
    steps = options.steps(len(texts), world_size())
    dataset = Dataset.from_dict({"text": list(texts), "label": list(range(len(texts)))})
    args = trainer_arguments(options, ckpt_dir, steps)
    trainer = build_trainer(student, args, dataset, loss=healing_loss(student, teacher_vectors))
    old_len = student.max_seq_length
    student.max_seq_length = max_seq_length  # train on inputs cut to max_seq_length; the model keeps its own
    try:
        stats = run_training(trainer, ckpt_dir, settings, callbacks=callbacks, where=where)
    finally:
        student.max_seq_length = old_len
        student.eval()
    losses = [loss for _, loss in stats["loss_history"]] or [stats["train_loss"]]
    metrics = {"heal_loss_first": float(losses[0]), "heal_loss_last": float(losses[-1]), "heal_steps": stats["steps"]}
    return metrics, stats
