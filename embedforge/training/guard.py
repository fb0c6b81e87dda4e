"""Guards shared by every embedforge training loop: divergence, interruption, and what a rerun resumes from.

Used by the convert stages (mntp, simcse, contrastive), distill, the compress stage's healing and the binarizer.

- :func:`check_loss` / :class:`NanGuardMixin` stop on a non-finite loss *before* the optimizer applies it, and
  :func:`check_weights` refuses to publish weights that are not finite; the stage then publishes nothing.
- :class:`SignalCheckpoint` turns SIGTERM / SIGINT into "save a checkpoint at the end of this step and stop"; the
  runner then raises :class:`TrainingInterrupted`, and a rerun resumes from the checkpoint. A second signal
  interrupts at once.
- Every checkpoint carries ``embedforge-train.json`` (the training settings and their hash), written last, so it
  also marks the checkpoint as complete. :func:`resume_point` picks the newest complete checkpoint; checkpoints
  cut off while being written (killed, disk full) are removed with one log line, and when the training settings
  changed since the checkpoint the run starts over (one log line naming the changed key) instead of continuing the
  old schedule. The checkpoint folders are embedforge's own (``<out>.ckpt/checkpoint-N``); nothing else is removed.
- :class:`GuardedTrainerMixin` also saves / restores checkpoints as one file of the trainable weights (LoRA
  matrices, trainable heads), independent of how peft or sentence-transformers would lay the model out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterable

from _pickle import UnpicklingError  # the error torch's weights_only loading raises; nothing is unpickled here

from transformers import TrainerCallback

from embedforge.errors import Interrupted, RunError

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
TRAIN_RECORD = "embedforge-train.json"
TRAINER_STATE = "trainer_state.json"
#: Config keys that do not change what training computes: a rerun that changes only these still resumes.
RESUME_SAFE_KEYS = frozenset({
    "save_steps", "save_total_limit", "logging_steps", "eval_tasks", "adapter", "teacher_batch_size",
    "teacher_processes", "shard_size", "encode_batch_size",
})
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NanLossError(RunError, RuntimeError):
    """The training loss (or the trained weights) became NaN or infinite; nothing was published."""


class TrainingInterrupted(Interrupted, RuntimeError):
    """Training stopped on a signal after writing a checkpoint; rerun the stage to resume."""


# ------------------------------------------------------------------------------------------ settings


def loss_history(trainer: Any) -> list[list[float]]:
    """``[[step, loss], ...]`` of the losses the trainer logged (every ``logging_steps``), for the run report."""
    return [[int(e["step"]), round(float(e["loss"]), 6)] for e in trainer.state.log_history
            if isinstance(e, dict) and "loss" in e and "step" in e and math.isfinite(float(e["loss"]))]


def training_settings(config: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a checkpoint depends on: the config's fields as plain JSON values, minus
    :data:`RESUME_SAFE_KEYS`, plus when the input model was made (for an embedforge model directory) and
    ``extra``."""
    raw = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    plain = json.loads(json.dumps(raw, sort_keys=True, default=str))
    settings = {k: v for k, v in plain.items() if k not in RESUME_SAFE_KEYS}
    if isinstance(settings.get("train"), dict):  # the nested train options: the same keys are resume-safe there
        settings["train"] = {k: v for k, v in settings["train"].items() if k not in RESUME_SAFE_KEYS}
    model = settings.get("model")
    if isinstance(model, str) and (Path(model) / "embedforge.json").is_file():
        # the same path remade by an earlier stage (--force) is another starting point
        try:
            settings["model_created"] = json.loads((Path(model) / "embedforge.json").read_text()).get("created")
        except (OSError, ValueError):
            settings["model_created"] = None
    settings.update(json.loads(json.dumps(extra or {}, sort_keys=True, default=str)))
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    """A stable sha256 of a settings mapping."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def describe_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """``key: old -> new`` for the first changed keys (at most three)."""
    if not isinstance(old, dict):
        return "no record of its settings"
    old, new = _flat(old), _flat(new)  # a nested train: mapping names its changed key as train.KEY
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "settings hash differs"
    parts = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return "; ".join(parts) + more


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"learning_rate": x}}`` as ``{"train.learning_rate": x}`` (one level of nesting)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_record(folder: str | os.PathLike[str], settings: dict[str, Any], **fields: Any) -> None:
    """Write ``embedforge-train.json`` into a checkpoint folder, atomically (the folder's last file)."""
    folder = Path(folder)
    record = {"config_hash": settings_hash(settings), "settings": settings, **fields}
    tmp = folder / (TRAIN_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, folder / TRAIN_RECORD)


def read_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint's ``embedforge-train.json`` (None when it is missing or unreadable)."""
    try:
        record = json.loads((Path(folder) / TRAIN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "config_hash" in record else None


class TrainRecord(TrainerCallback):
    """Write the training settings into every checkpoint the trainer saves, after everything else in it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            write_record(folder, self.settings, step=state.global_step)
        return control


# ------------------------------------------------------------------------------------------ resume


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders under ``ckpt_dir``, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def _missing(folder: Path, required: Iterable[str]) -> str | None:
    for name in (*required, TRAIN_RECORD):
        if not (folder / name).is_file():
            return name
    return None if read_record(folder) is not None else TRAIN_RECORD


def last_checkpoint(ckpt_dir: str | os.PathLike[str], required: Iterable[str] = (TRAINER_STATE,)) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``ckpt_dir`` (None when there is none)."""
    required = tuple(required)
    for _, folder in _checkpoints(Path(ckpt_dir)):
        if _missing(folder, required) is None:
            return os.fspath(folder)
    return None


def resume_point(ckpt_dir: str | os.PathLike[str], settings: dict[str, Any],
                 required: Iterable[str] = (TRAINER_STATE,)) -> str | None:
    """The checkpoint a run with ``settings`` resumes from, or None to start over.

    Incomplete checkpoints (cut off while being written) are removed and the newest complete one is used; if that
    one was made with other settings, every checkpoint is removed and the run starts over. Each case is logged in
    one line. Only ``checkpoint-N`` folders are removed: they are embedforge's own.
    """
    d = Path(ckpt_dir)
    required = tuple(required)
    found = _checkpoints(d)
    incomplete: list[str] = []
    chosen: Path | None = None
    for _, folder in found:
        missing = _missing(folder, required)
        if missing is None:
            chosen = folder
            break
        incomplete.append(f"{folder.name} (no {missing})")
        _remove(folder)
    if incomplete:
        logger.warning("skipped incomplete checkpoints in %s, cut off while being written: %s; %s", d,
                       ", ".join(incomplete), f"resuming from {chosen.name}" if chosen else "starting over")
    if chosen is None:
        return None
    record = read_record(chosen) or {}
    if record.get("config_hash") != settings_hash(settings):
        logger.warning("training config changed since the checkpoint in %s (%s); starting over", chosen,
                       describe_change(record.get("settings"), settings))
        for _, folder in found:
            _remove(folder)
        return None
    return os.fspath(chosen)


def _remove(folder: Path) -> None:
    """Remove one of embedforge's checkpoint folders (on the first process only; the others read the same)."""
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ divergence


def nan_advice(last: str | os.PathLike[str] | None) -> str:
    """What to do after a divergence, given the last good checkpoint (if any)."""
    if last:
        return (f"Lower the learning rate or check the data, then rerun: changed settings start over, unchanged "
                f"ones resume from the last good checkpoint {last}.")
    return "Lower the learning rate or check the data, then rerun (no checkpoint was written yet)."


def check_loss(value: float, step: int, where: str, last: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`NanLossError` when a training loss is NaN or infinite (call it before the optimizer step)."""
    if not math.isfinite(value):
        raise NanLossError(f"{where}: the training loss became {value} at step {step}; stopped before applying it "
                           f"and published nothing. {nan_advice(last)}")


def check_weights(model: Any, where: str, last: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`NanLossError` when any weight of ``model`` is NaN or infinite (call it before publishing)."""
    import torch

    bad = total = 0
    first = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point():
                n = int((~torch.isfinite(param)).sum())
                bad += n
                total += param.numel()
                if n and first is None:
                    first = name
    if bad:
        raise NanLossError(f"{where}: {bad} of {total} trained weights are NaN or infinite (first: {first}); "
                           f"published nothing. {nan_advice(last)}")


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


class NanGuardMixin:
    """Mix into a ``transformers.Trainer`` subclass (before the Trainer in the bases): stop on a non-finite loss
    before the optimizer step applies it."""

    guard_name = "training"  # the stage name in messages; guarded_train sets it
    _required_files: tuple[str, ...] = (TRAINER_STATE,)  # what a complete checkpoint of this trainer holds

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        value = float(loss.detach().float().item())
        if not math.isfinite(value):
            model.zero_grad(set_to_none=True)
            check_loss(value, self.state.global_step + 1, self.guard_name,  # type: ignore[attr-defined]
                       last_checkpoint(self.args.output_dir, self._required_files))  # type: ignore[attr-defined]
        return loss


class GuardedTrainerMixin(NanGuardMixin):
    """Mix into a ``transformers.Trainer`` subclass (before the Trainer in the bases): the NaN guard, plus
    checkpoints that hold only the trainable weights."""

    _required_files = (TRAINER_STATE, TRAINABLE_FILE)

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
            raise RunError(
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


def guarded_train(trainer: Any, ckpt_dir: str | os.PathLike[str], settings: dict[str, Any],
                  callbacks: Iterable[Any] = (), where: str = "training") -> tuple[Any, str | None]:
    """Run ``trainer.train()`` under the shared guards; returns ``(train output, checkpoint resumed from)``.

    Resumes from :func:`resume_point` (only a checkpoint made with the same ``settings``), records ``settings`` in
    every checkpoint, turns SIGTERM / SIGINT into a checkpoint plus :class:`TrainingInterrupted`; the NaN guard
    comes from the trainer class (:class:`NanGuardMixin`).
    """
    guard = SignalCheckpoint()
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer.add_callback(TrainRecord(settings))
    trainer.add_callback(guard)
    required = getattr(trainer, "_required_files", (TRAINER_STATE,))
    trainer.guard_name = where
    resume = resume_point(ckpt_dir, settings, required)
    if resume:
        logger.info("%s: resuming from %s", where, resume)
    guard.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except UnpicklingError as exc:  # torch's weights_only loading refused a file of the checkpoint
        if not resume:
            raise
        raise RunError(f"{where}: {resume} holds a file that cannot be loaded safely (only tensors and plain data "
                       f"are; {str(exc).splitlines()[0][:120]}); it was not made by this trainer: remove {resume} "
                       "and rerun") from exc
    finally:
        guard.restore()
    if guard.received is not None:
        raise TrainingInterrupted(
            f"{where}: training stopped on signal {guard.received} at step {trainer.state.global_step}; checkpoint "
            f"in {last_checkpoint(ckpt_dir, required)}. Rerun the same command to resume."
        )
    return result, resume
