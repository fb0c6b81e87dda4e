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
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedforge.evaluation import l2_normalize

logger = logging.getLogger(__name__)


@dataclass
class BinarizerTraining:
    """Hyper-parameters of :func:`train_binarizer` (mirrors the fields of ``BinarizerConfig``)."""

    bits: int = 2
    hidden_dim: int | None = None
    steps: int = 600
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 0.05
    sym_weight: float = 1.0
    asym_weight: float = 1.0
    mse_weight: float = 1.0
    seed: int = 0


def _kl_rows(student_logits: Any, teacher_logits: Any) -> Any:
    """Mean KL(teacher || student) over rows of two logit matrices."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    log_target=True, reduction="batchmean")


def binarizer_loss(binarizer: Any, x: Any, hp: BinarizerTraining) -> tuple[Any, dict[str, float]]:
    """The training loss on one batch of L2-normalized teacher vectors ``x`` (torch, ``(B, D)``)."""
    import torch

    _, recon = binarizer.encode_levels(x)
    teacher = x @ x.T
    mask = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    t_logits = (teacher / hp.temperature).masked_fill(mask, -1e4)
    parts: dict[str, Any] = {}
    if hp.sym_weight:
        parts["sym"] = _kl_rows(((recon @ recon.T) / hp.temperature).masked_fill(mask, -1e4), t_logits)
    if hp.asym_weight:
        parts["asym"] = _kl_rows(((x @ recon.T) / hp.temperature).masked_fill(mask, -1e4), t_logits)
    if hp.mse_weight:
        parts["mse"] = ((recon - x) ** 2).sum(dim=-1).mean()
    weights = {"sym": hp.sym_weight, "asym": hp.asym_weight, "mse": hp.mse_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def train_binarizer(vectors: np.ndarray, hp: BinarizerTraining | None = None, *, show_progress: bool = True,
                    init: Any = None, where: str = "binarizer") -> tuple[Any, dict[str, Any]]:
    """Train a :class:`LearnedBinarizer` on teacher vectors (rows are L2-normalized first).

    Returns the binarizer (eval mode, ``output="float"``) and a history dict with the first/last losses.
    ``init`` continues from an existing binarizer (resume). A NaN or infinite loss stops training before the
    optimizer applies it, and non-finite weights are refused at the end
    (:class:`~embedforge.training.guard.NanLossError`).
    """
    import torch
    from tqdm.auto import tqdm

    from embedforge.training.guard import check_loss, check_weights

    from embedforge.modules.binarizer import LearnedBinarizer

    hp = hp or BinarizerTraining()
    x_all = np.asarray(vectors, dtype=np.float32)
    x_all = l2_normalize(x_all)
    n, dim = x_all.shape
    if n < 2:
        raise ValueError("the binarizer needs at least 2 training vectors")
    gen = torch.Generator().manual_seed(hp.seed)
    torch.manual_seed(hp.seed)
    model = init if init is not None else LearnedBinarizer(dim, bits=hp.bits, hidden_dim=hp.hidden_dim)
    model.train()
    data = torch.from_numpy(x_all)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, hp.steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / hp.steps))
    )
    batch = min(hp.batch_size, n)
    history: dict[str, Any] = {"steps": hp.steps, "n_vectors": n, "loss_history": []}
    every = max(1, hp.steps // 100)  # about 100 points of the loss curve for the run report
    bar = tqdm(range(hp.steps), desc="binarizer", disable=not show_progress)
    for step in bar:
        idx = torch.randperm(n, generator=gen)[:batch]
        loss, parts = binarizer_loss(model, data[idx], hp)
        check_loss(float(loss.detach()), step + 1, where)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0:
            history["first"] = {"loss": float(loss.detach()), **parts}
        if (step + 1) % every == 0:
            history["loss_history"].append([step + 1, round(float(loss.detach()), 6)])
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    history["last"] = {"loss": float(loss.detach()), **parts}
    check_weights(model, where)
    model.eval()
    model.output = "float"
    logger.info("binarizer trained: loss %.4f -> %.4f", history["first"]["loss"], history["last"]["loss"])
    return model, history


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
