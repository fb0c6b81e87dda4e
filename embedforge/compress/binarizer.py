"""Training the learned multi-bit binarizer on teacher vectors, and scoring its codes with bit operations.

The binarizer (:class:`embedforge.modules.binarizer.LearnedBinarizer`) is trained embedding-to-embedding: the
teacher's float vectors go in, and the loss asks the reconstructions to keep the teacher's similarity structure:

* ``sym``: within a batch, the softmax over reconstruction·reconstruction similarities matches the softmax over
  teacher·teacher similarities (KL, temperature ``temperature``) — the score a pure binary index computes;
* ``asym``: the same for teacher·reconstruction (a float query against binary documents);
* ``mse``: reconstruction error, a small anchor that keeps the scale calibrated.

Bits come from sign() with a straight-through gradient. Level 0 starts as plain sign binarization (its residual
MLP starts as the identity), so training can only move away from sign where the loss says so.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from embedforge.evaluation import l2_normalize

if TYPE_CHECKING:
    from embedforge.compress.config import BinarizerConfig

logger = logging.getLogger(__name__)


def _kl_rows(student_logits: Any, teacher_logits: Any) -> Any:
    """Mean KL(teacher || student) over rows of two logit matrices."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    log_target=True, reduction="batchmean")


def binarizer_loss(recon: Any, x: Any, weights: BinarizerConfig) -> tuple[Any, dict[str, float]]:
    """The training loss of one batch: reconstructions ``recon`` of the L2-normalized teacher vectors ``x`` (torch,
    ``(B, D)``, B >= 2), with the temperature and loss weights of ``weights``."""
    import torch

    teacher = x @ x.T
    mask = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    t_logits = (teacher / weights.temperature).masked_fill(mask, -1e4)
    parts: dict[str, Any] = {}
    if weights.sym_weight:
        parts["sym"] = _kl_rows(((recon @ recon.T) / weights.temperature).masked_fill(mask, -1e4), t_logits)
    if weights.asym_weight:
        parts["asym"] = _kl_rows(((x @ recon.T) / weights.temperature).masked_fill(mask, -1e4), t_logits)
    if weights.mse_weight:
        parts["mse"] = ((recon - x) ** 2).sum(dim=-1).mean()
    factor = {"sym": weights.sym_weight, "asym": weights.asym_weight, "mse": weights.mse_weight}
    total = sum(factor[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def train_binarizer(vectors: np.ndarray, config: BinarizerConfig, ckpt_dir: str | os.PathLike[str],
                    settings: dict[str, Any] | None = None, *, callbacks: Iterable[Any] = (),
                    where: str = "binarizer") -> tuple[Any, dict[str, Any]]:
    """Train a :class:`LearnedBinarizer` (``config.bits``, ``config.hidden_dim``) on teacher vectors (rows are
    L2-normalized first) through the training engine, under ``config.train``.

    Each batch holds ``train.batch_size`` vectors per process (fewer when there are fewer vectors; incomplete last
    batches are dropped: the losses compare the vectors of a batch). Checkpoints go to ``ckpt_dir`` and a rerun
    resumes only with the same ``settings`` (default: the config's training settings); a NaN or infinite loss
    stops before the optimizer applies it (:class:`~embedforge.training.guard.NanLossError`). Under torchrun every
    process starts from the same weights (seeded) and trains on its share of the vectors.

    Returns the binarizer (eval mode, ``output="float"``) and the engine's statistics plus ``n_vectors``,
    ``loss_first`` / ``loss_last`` (first and last logged losses) and ``last_parts`` (the loss terms of the last
    step).
    """
    import dataclasses

    import torch

    from embedforge.modules.binarizer import LearnedBinarizer
    from embedforge.training.engine import build_trainer, run_training, trainer_arguments, world_size
    from embedforge.training.guard import check_weights, last_checkpoint, training_settings

    x_all = l2_normalize(np.asarray(vectors, dtype=np.float32))
    n, dim = x_all.shape
    world = world_size()
    if n // world < 2:
        from embedforge.data import DataError

        raise DataError(f"{where}: {n} training vector(s) for {world} process(es), but each batch needs at least 2 "
                        "per process; give more training texts (data, data_limit)")
    options = dataclasses.replace(config.train, batch_size=min(config.train.batch_size, n // world))
    steps = options.steps(n, world, drop_last=True)
    torch.manual_seed(options.seed)  # the same initial weights on every process
    model = LearnedBinarizer(dim, bits=config.bits, hidden_dim=config.hidden_dim)
    last_parts: dict[str, float] = {}

    def compute_loss(module: Any, inputs: dict[str, Any]) -> Any:
        x = inputs["x"]
        recon = module({"sentence_embedding": x})["sentence_embedding"]  # through forward: DDP syncs gradients
        loss, parts = binarizer_loss(recon, x, config)
        last_parts.update(parts)
        return loss

    args = trainer_arguments(options, ckpt_dir, steps, sentence_transformers=False, dataloader_drop_last=True,
                             max_grad_norm=0.0)  # the binarizer trains without gradient clipping
    trainer = build_trainer(model, args, _Vectors(torch.from_numpy(x_all)), compute_loss=compute_loss,
                            data_collator=_stack)
    stats = run_training(trainer, ckpt_dir, settings if settings is not None else training_settings(config),
                         callbacks=callbacks, where=where)
    check_weights(model, where, last_checkpoint(ckpt_dir))
    model.eval()
    model.output = "float"
    losses = [loss for _, loss in stats["loss_history"]] or [stats["train_loss"]]
    stats.update(n_vectors=n, loss_first=float(losses[0]), loss_last=float(losses[-1]), last_parts=last_parts)
    logger.info("binarizer trained: loss %.4f -> %.4f", stats["loss_first"], stats["loss_last"])
    return model, stats


class _Vectors:
    """Rows of a ``(N, D)`` tensor as ``{"x": row}`` examples (a map-style data set for the trainer)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self.data[index]}


def _stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"x": torch.stack([row["x"] for row in rows])}


def binarize(binarizer: Any, vectors: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Run a trained binarizer on float vectors: ``(packed uint8 codes, float reconstructions)``."""
    import torch

    from embedforge.modules.binarizer import pack_bits

    x = np.asarray(vectors, dtype=np.float32)
    x = l2_normalize(x)
    codes, recons = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            levels, recon = binarizer.encode_levels(torch.from_numpy(x[i:i + batch_size]))
            bits = (levels > 0).reshape(levels.shape[0], -1)
            codes.append(pack_bits(bits).numpy())
            recons.append(recon.numpy())
    return np.concatenate(codes), np.concatenate(recons)


def level_scores(query_codes: np.ndarray, doc_codes: np.ndarray, scales: np.ndarray, dim: int) -> np.ndarray:
    """Reconstruction inner products from packed multi-level codes with popcounts only.

    ``<sum_s a_s q_s, sum_t a_t d_t> = sum_{s,t} a_s a_t (D - 2 hamming(q_s, d_t))`` for {-1,+1} levels of ``dim``
    bits each (``dim`` must be a multiple of 8 so levels sit on byte boundaries).
    """
    from embedforge.compress.quantization import hamming_distances

    if dim % 8:
        raise ValueError("level scoring needs dim to be a multiple of 8")
    width = dim // 8
    k = len(scales)
    out = np.zeros((len(query_codes), len(doc_codes)), dtype=np.float64)
    for s in range(k):
        qs = query_codes[:, s * width:(s + 1) * width]
        for t in range(k):
            dt = doc_codes[:, t * width:(t + 1) * width]
            out += scales[s] * scales[t] * (dim - 2.0 * hamming_distances(qs, dt))
    return out.astype(np.float32)
