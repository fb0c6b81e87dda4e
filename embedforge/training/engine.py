"""The one way embedforge trains: trainer arguments from :class:`~.options.TrainOptions`, one trainer
construction, one guarded run that returns the same statistics for every stage.

Every training stage (``mntp``, ``simcse``, ``contrastive``, ``distill``, ``compress``'s healing, ``binarizer``)
goes through these three calls::

    args = trainer_arguments(config.train, ckpt, steps)                    # schedule, precision, checkpoints
    trainer = build_trainer(model, args, dataset, loss=loss)               # the guarded trainer
    stats = run_training(trainer, ckpt, training_settings(config), where=stage_name)

The trainer is sentence-transformers' ``SentenceTransformerTrainer`` when the stage gives a ``loss`` module (it
reads the ``features`` dicts of a SentenceTransformer) or the plain ``transformers.Trainer`` when it gives a
``compute_loss(model, inputs)`` function (MNTP's language-model head, the binarizer on vectors). Both run on
accelerate, so every training stage runs unchanged under ``torchrun``. Both carry the guards of
:mod:`.guard`: a NaN loss stops before the optimizer applies it, SIGTERM / Ctrl-C saves a checkpoint and stops,
a rerun resumes only from a complete checkpoint made with the same settings. Checkpoints hold the trainable
weights in one safetensors file plus the trainer's optimizer, scheduler and RNG states, in ``<out>.ckpt/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from embedforge.training.options import Scheduler, TrainOptions

_SCHEDULERS = {Scheduler.LINEAR: "linear", Scheduler.COSINE: "cosine", Scheduler.CONSTANT: "constant_with_warmup"}


def world_size() -> int:
    """Processes of this run (``WORLD_SIZE`` under torchrun, else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_until(ready: Callable[[], bool], timeout_s: float | None = None, poll_s: float = 2.0) -> float | None:
    """Poll ``ready()`` until it is true (a process of a torchrun job waiting for what the first one writes).

    Returns None once ready, or the limit in seconds when it passed first (the caller says what was late). The
    limit is ``timeout_s``, else ``$EMBEDFORGE_RANK_WAIT_S``, else 24 hours.
    """
    limit = timeout_s if timeout_s is not None else float(os.environ.get("EMBEDFORGE_RANK_WAIT_S", 24 * 3600))
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > limit:
            return limit
        time.sleep(poll_s)
    return None


def checkpoint_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where a stage writing ``out_dir`` keeps its checkpoints: ``<out_dir>.ckpt`` (embedforge's own folder)."""
    return Path(os.fspath(out_dir) + ".ckpt")


def trainer_arguments(options: TrainOptions, ckpt_dir: str | os.PathLike[str], steps: int, *,
                      learning_rate: float | None = None, sentence_transformers: bool = True, **extra: Any) -> Any:
    """Training arguments for ``steps`` optimizer steps under ``options`` (``learning_rate`` overrides the options'
    one, e.g. for a second phase); ``extra`` goes to the arguments class as it is (``batch_sampler``,
    ``dataloader_drop_last``, ``prompts``, ...)."""
    import torch

    from embedforge.training.precision import use_bf16

    cuda = torch.cuda.is_available()
    values: dict[str, Any] = dict(
        output_dir=os.fspath(ckpt_dir),
        max_steps=steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=learning_rate if learning_rate is not None else options.learning_rate,
        warmup_steps=int(options.warmup_ratio * steps),
        weight_decay=options.weight_decay,
        lr_scheduler_type=_SCHEDULERS[options.lr_scheduler],
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        logging_steps=options.log_every(steps),
        seed=options.seed,
        bf16=use_bf16(options.precision),
        use_cpu=not cuda,
        ddp_backend="gloo" if world_size() > 1 and not cuda else None,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    values.update(extra)
    if sentence_transformers:
        from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    else:
        from transformers import TrainingArguments as Arguments
    return Arguments(**values)


def build_trainer(model: Any, args: Any, train_dataset: Any, *, loss: Any = None,
                  compute_loss: Callable[[Any, dict[str, Any]], Any] | None = None, data_collator: Any = None,
                  trainable_only: bool = True) -> Any:
    """The guarded trainer of every stage: give ``loss`` (a sentence-transformers loss module) or ``compute_loss``
    (``(model, inputs) -> loss`` for a plain ``transformers.Trainer``), not both.

    ``trainable_only`` checkpoints only the weights that require gradients (LoRA matrices, a trainable head, or
    every weight of a fully trained student) in one safetensors file; False leaves checkpointing to the trainer
    (whole model as it saves it).
    """
    from embedforge.training.guard import GuardedTrainerMixin, NanGuardMixin

    if (loss is None) == (compute_loss is None):
        raise TypeError("build_trainer: give either loss or compute_loss")
    mixin = GuardedTrainerMixin if trainable_only else NanGuardMixin
    kwargs: dict[str, Any] = {"model": model, "args": args, "train_dataset": train_dataset}
    if data_collator is not None:
        kwargs["data_collator"] = data_collator
    if loss is not None:
        from sentence_transformers import SentenceTransformerTrainer

        class StageTrainer(mixin, SentenceTransformerTrainer):  # type: ignore[valid-type, misc]
            pass

        return StageTrainer(loss=loss, **kwargs)

    from transformers import Trainer

    class FunctionTrainer(mixin, Trainer):  # type: ignore[valid-type, misc]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            value = compute_loss(model, inputs)  # type: ignore[misc]
            return (value, None) if return_outputs else value

    return FunctionTrainer(**kwargs)


def run_training(trainer: Any, ckpt_dir: str | os.PathLike[str], settings: dict[str, Any], *,
                 callbacks: Iterable[Any] = (), where: str = "training") -> dict[str, Any]:
    """Train under the shared guards (:func:`~embedforge.training.guard.guarded_train`) and return what every
    stage records: ``steps``, ``wall_s``, ``train_loss``, ``resumed_from`` (a checkpoint path or None),
    ``loss_history`` (``[[step, loss], ...]``, drawn by the run report) and ``peak_gpu_mb`` on a GPU."""
    from embedforge.training.guard import guarded_train, loss_history
    from embedforge.training.memory import peak_gpu_mb, reset_peak_gpu

    reset_peak_gpu()
    start = time.perf_counter()
    result, resume = guarded_train(trainer, ckpt_dir, settings, callbacks, where)
    stats: dict[str, Any] = {
        "steps": int(trainer.state.global_step),
        "wall_s": round(time.perf_counter() - start, 1),
        "train_loss": float(result.training_loss),
        "resumed_from": resume,
        "loss_history": loss_history(trainer),
    }
    gpu_mb = peak_gpu_mb()  # training only: loading, quantizing and merging are outside this window
    if gpu_mb is not None:
        stats["peak_gpu_mb"] = gpu_mb
    return stats
