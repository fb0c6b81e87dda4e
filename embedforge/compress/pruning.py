"""The healing distillation that follows layer pruning (the cut itself is :func:`embedforge.backbone.keep_layers`).

Dropping transformer layers is the cheapest structural compression: a 30-layer decoder keeping 15 layers halves
encode time. The pruned model drifts from the original, so :func:`heal` distills it back towards the unpruned
model's vectors (cosine + MSE on texts, a few hundred steps), in the spirit of "The Unreasonable Ineffectiveness
of the Deeper Layers" (Gromov et al., 2024), which heals pruned LLMs with a short fine-tune.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def count_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


HEAL_CHECKPOINT = "heal.safetensors"


def _save_heal_state(path: Path, student: Any, opt: Any, step: int, gen: Any, settings: Any) -> None:
    """One safetensors file (weights, optimizer moments, RNG states; the rest as JSON metadata), replaced
    atomically: a checkpoint is either the old one or the new one, never half of each. No pickle."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {f"model.{k}": v.detach().cpu().clone().contiguous()
                               for k, v in student.state_dict().items()}
    optim = opt.state_dict()
    extra_state: dict[str, dict[str, Any]] = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                extra_state.setdefault(str(index), {})[key] = value
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "settings": settings, "param_groups": optim["param_groups"], "optimizer_extra": extra_state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"embedforge": json.dumps(meta, default=str)})
    os.replace(tmp, path)


def _load_heal_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(tensors, metadata)`` of a healing checkpoint, or None when it cannot be read (logged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {})["embedforge"])
        return load_file(str(path)), meta
    except Exception as exc:  # noqa: BLE001 - a cut-off or foreign file: start over
        logger.warning("skipped the incomplete healing checkpoint %s (%s); starting over", path,
                       f"{type(exc).__name__}: {exc}"[:120])
        return None


def _restore_heal_state(tensors: dict[str, Any], meta: dict[str, Any], student: Any, opt: Any, gen: Any) -> int:
    import torch

    student.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("optimizer_extra", {}).items():
        state.setdefault(int(index), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def heal(student: Any, texts: Sequence[str], teacher_vectors: np.ndarray, *, steps: int, lr: float = 5e-5,
         batch_size: int = 32, max_seq_length: int = 128, seed: int = 0, checkpoint_dir: str | os.PathLike[str] | None
         = None, checkpoint_every: int = 50, signature: str | dict[str, Any] | None = None,
         show_progress: bool = True, where: str = "compress (heal)") -> dict[str, float]:
    """Distill ``student`` towards ``teacher_vectors`` (one per text): loss = (1 - cos) + MSE, AdamW, ``steps`` steps.

    With ``checkpoint_dir`` the student's weights, optimizer state and step are saved every ``checkpoint_every``
    steps (``heal.safetensors``, no pickle) and a rerun continues from there, but only if the checkpoint carries
    the same ``signature`` (a config hash, or a mapping of the training settings, whose changed key is then
    logged); otherwise it starts over. A NaN or infinite loss stops the run before the optimizer applies it
    (:class:`~embedforge.training.guard.NanLossError`). Returns the mean loss of the first and last 10 steps.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from embedforge.training.guard import (SignalCheckpoint, TrainingInterrupted, check_loss, check_weights,
                                                describe_change)

    if len(texts) != len(teacher_vectors):
        raise ValueError(f"{len(texts)} texts but {len(teacher_vectors)} teacher vectors")
    target_all = torch.from_numpy(np.asarray(teacher_vectors, dtype=np.float32))
    old_len = student.max_seq_length
    student.max_seq_length = max_seq_length
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = Path(checkpoint_dir) / HEAL_CHECKPOINT if checkpoint_dir else None
    if checkpoint_dir and (Path(checkpoint_dir) / "heal.pt").exists():
        logger.warning("ignoring %s: pickle checkpoints are never loaded", Path(checkpoint_dir) / "heal.pt")
    loaded = _load_heal_state(ckpt) if ckpt is not None and ckpt.is_file() else None
    if loaded is not None and loaded[1].get("settings") != signature:
        old = loaded[1].get("settings")
        change = (describe_change(old, signature) if isinstance(signature, dict) else "config hash "
                  f"{str(old)[:12]} -> {str(signature)[:12]}")
        logger.warning("training config changed since the checkpoint in %s (%s); starting over", ckpt, change)
        ckpt.unlink(missing_ok=True)
        loaded = None
    if loaded is not None:
        start = _restore_heal_state(*loaded, student, opt, gen)
        logger.info("healing resumes at step %d from %s", start, ckpt)
    losses: list[float] = []
    device = next(student.parameters()).device
    guard = SignalCheckpoint()
    if ckpt is not None:
        guard.install()  # SIGTERM / Ctrl-C: checkpoint after this step, then stop
    try:
        for step in tqdm(range(start, steps), desc="heal", disable=not show_progress, initial=start, total=steps):
            idx = torch.randperm(len(texts), generator=gen)[:batch_size]
            batch_texts = [texts[i] for i in idx]
            prep = getattr(student, "preprocess", None) or student.tokenize
            features = prep(batch_texts)
            features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
            out = student(features)["sentence_embedding"]
            target = target_all[idx].to(device)
            loss = (1 - F.cosine_similarity(out, target, dim=-1)).mean() + F.mse_loss(out, target)
            value = float(loss.detach())
            check_loss(value, step + 1, where, ckpt if ckpt is not None and ckpt.is_file() else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(value)
            stop = ckpt is not None and guard.received is not None and step + 1 < steps
            if ckpt is not None and step + 1 < steps and ((step + 1) % checkpoint_every == 0 or stop):
                _save_heal_state(ckpt, student, opt, step + 1, gen, signature)
            if stop:
                raise TrainingInterrupted(f"{where}: training stopped on signal {guard.received} at step {step + 1}; "
                                          f"checkpoint in {ckpt}. Rerun the same command to resume.")
    finally:
        guard.restore()
    check_weights(student, where, ckpt if ckpt is not None and ckpt.is_file() else None)
    student.eval()
    student.max_seq_length = old_len
    if not losses:
        return {}
    head = losses[: min(10, len(losses))]
    tail = losses[-min(10, len(losses)):]
    return {"heal_loss_first": float(np.mean(head)), "heal_loss_last": float(np.mean(tail)), "heal_steps": steps}
