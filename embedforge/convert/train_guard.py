"""Interruption and divergence guards shared by the convert training stages.

- :class:`SignalCheckpoint` turns SIGTERM / SIGINT into "save a checkpoint at the end of this step and stop"; the
  runner then raises :class:`TrainingInterrupted`, and a rerun resumes from the checkpoint. A second signal
  interrupts at once.
- :class:`GuardedTrainerMixin` stops on a non-finite loss *before* the optimizer applies it, so every checkpoint
  on disk is a good one, and saves / restores checkpoints as one file of the trainable weights (LoRA matrices,
  trainable heads), independent of how peft or sentence-transformers would lay the model out.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from embedforge.errors import Interrupted, RunError

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"


class NanLossError(RunError, RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Interrupted, RuntimeError):
    """Training stopped on a signal after writing a checkpoint; rerun the stage to resume."""


def last_checkpoint(ckpt_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``ckpt_dir`` (None when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    found = get_last_checkpoint(str(d))
    if found is None or not (Path(found) / TRAINABLE_FILE).is_file():
        return None
    return found


class SignalCheckpoint(TrainerCallback):
    """On SIGTERM / SIGINT: finish the current step, save a checkpoint, stop training."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("got %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: signal checkpointing disabled")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class GuardedTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before the Trainer in the bases)."""

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        value = float(loss.detach().float().item())
        if not math.isfinite(value):
            step = self.state.global_step + 1  # type: ignore[attr-defined]
            last = last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            model.zero_grad(set_to_none=True)
            raise NanLossError(
                f"the training loss became {value} at step {step}; stopped before applying it. "
                + (f"Last good checkpoint: {last} (a rerun resumes from it; lower the learning rate or check the "
                   "data first)." if last else "No checkpoint was written yet.")
            )
        return loss

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        from safetensors.torch import save_file

        out = Path(output_dir or self.args.output_dir)  # type: ignore[attr-defined]
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(out / TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from safetensors.torch import load_file

        target = self.accelerator.unwrap_model(model or self.model)  # type: ignore[attr-defined]
        weights = load_file(str(Path(resume_from_checkpoint) / TRAINABLE_FILE))
        own = dict(target.named_parameters())
        missing = [n for n in weights if n not in own]
        if missing:
            raise RuntimeError(
                f"{resume_from_checkpoint}: checkpoint does not match the model (e.g. {missing[:3]}); "
                "delete the checkpoint folder or rerun with the original settings"
            )
        import torch

        with torch.no_grad():
            for name, value in weights.items():
                own[name].copy_(value.to(own[name].dtype))
        logger.info("resumed %d trainable tensors from %s", len(weights), resume_from_checkpoint)

    def _load_best_model(self) -> None:  # pragma: no cover - no evaluation-driven best model here
        return None
