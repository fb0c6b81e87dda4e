"""The ``distill`` stage: teacher vectors once, then a student trained to reproduce them.

``run`` reads top to bottom as the steps of the recipe:

1. gather the unlabeled texts;
2. encode them with every teacher (cached on disk, reused, resumable), combine the teachers, and optionally
   rotate the result onto its principal axes (for Matryoshka prefixes);
3. build the student (teacher layer subset, static token table, or any model) and its projection head;
4. train it with the Jasper/Stella losses over Matryoshka dims and (layer, dim) pairs, checkpointing to
   ``<out_dir>.ckpt/`` so that a killed run resumes;
5. save it as an ordinary model directory (``stage="distill"``, Matryoshka dims in ``extra``);
6. optionally evaluate it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedforge.configs import StageContext
from embedforge.distill.config import Batching, DistillConfig, Projection, StudentKind, TargetRotation

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ steps


def teacher_vectors(config: DistillConfig, texts: list[str], cache_dir: Path) -> tuple[np.ndarray, list[Any]]:
    """The combined teacher targets for ``texts`` (computed once per teacher, then read from the cache; under
    torchrun the first process computes them and the others wait for its cache)."""
    from embedforge.distill.teacher import EncodeSettings, teacher_targets
    from embedforge.training.engine import is_main_process

    settings = EncodeSettings(max_seq_length=config.max_seq_length, batch_size=config.teacher_batch_size,
                              prompt=config.teacher_prompt, shard_size=config.shard_size)
    return teacher_targets(config.teachers, texts, cache_dir, settings, weights=config.weights,
                           processes=config.teacher_processes, encode=is_main_process())


def rotate_targets(config: DistillConfig, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher vectors in the coordinates ``config.target_rotation`` asks for, and the rotation (or None)."""
    if config.target_rotation == TargetRotation.NONE:
        return targets, None
    from embedforge.distill.matryoshka import pca_rotation

    rotation = pca_rotation(targets)
    rotated = (targets @ rotation).astype(np.float32)
    variance = rotated.var(axis=0)
    share = np.cumsum(variance) / variance.sum()
    logger.info("targets rotated onto their principal axes: the first 32/64/128/256 dims hold %s of the variance",
                "/".join(f"{share[min(d, len(share)) - 1]:.2f}" for d in (32, 64, 128, 256)))
    return rotated, rotation


def build_student(config: DistillConfig, teacher_dim: int, texts: list[str], targets: np.ndarray,
                  rotation: np.ndarray | None = None) -> Any:
    """The untrained student, with a projection head to ``teacher_dim`` where the config asks for one.

    With a target ``rotation`` (targets = teacher vectors @ rotation) the student always gets a head: a layer
    student, which already speaks the teacher's coordinates, starts from the rotation itself; any other student
    gets a head fitted by least squares.
    """
    from embedforge.distill import students
    from embedforge.model import load_model
    from embedforge.sources import resolve_source

    if config.student == StudentKind.MODEL:
        student = students.model_student(config.student_model or "", max_seq_length=config.max_seq_length)
    else:
        teacher_path = resolve_source(config.model)
        teacher = load_model(teacher_path)
        if config.student == StudentKind.LAYERS:
            from embedforge.backbone import count_layers, select_layers

            keep = select_layers(count_layers(teacher), config.layers, source=config.model)
            student = students.layer_student(teacher, keep)
        else:
            student = students.static_student(teacher, dims=config.static_dims, sif=config.static_sif,
                                              teacher_path=teacher_path)
    dim = int(student.get_embedding_dimension())
    if config.projection == Projection.NEVER and dim != teacher_dim:
        raise ValueError(f"projection=never but the student gives {dim} dims and the teachers {teacher_dim}")
    if config.projection == Projection.ALWAYS or dim != teacher_dim or rotation is not None:
        identity = dim == teacher_dim
        student = students.add_projection(student, teacher_dim, identity=identity)
        if identity and rotation is not None and config.student == StudentKind.LAYERS:
            students.set_projection(student, rotation.T)  # the teacher's vector, rotated: x @ R
        elif not identity or rotation is not None:
            sample = min(len(texts), 4096)
            cos = students.fit_projection(student, texts[:sample], targets[:sample])
            logger.info("projection %d -> %d fitted by least squares: mean cosine %.3f", dim, teacher_dim, cos)
    return student


def _limit_length(model: Any, length: Any) -> Any:
    """Set a transformer student's max_seq_length (static students have none); returns the previous one."""
    previous = getattr(model[0], "max_seq_length", None)
    if isinstance(previous, int) and isinstance(length, int):
        model.max_seq_length = length
    return previous


def train_student(student: Any, config: DistillConfig, texts: list[str], targets: np.ndarray,
                  checkpoint_dir: Path, callbacks: Sequence[Any] = (), where: str = "distill") -> dict[str, Any]:
    """Train ``student`` on the teacher targets through the one training engine (:mod:`embedforge.training.engine`:
    NaN guard, checkpoint on SIGTERM / Ctrl-C, resume only from a complete checkpoint made with the same settings).

    The data set's ``label`` column is each text's row in ``targets``. Under torchrun every process trains on its
    own share of the batches (the batch sampler is sharded per process), so the steps are counted over the
    global batch of ``train.batch_size`` x processes."""
    import dataclasses

    import torch
    from datasets import Dataset

    from embedforge.distill.losses import JasperStellaLoss, LossWeights
    from embedforge.distill.matryoshka import DistillObjective
    from embedforge.training.engine import build_trainer, run_training, trainer_arguments, world_size
    from embedforge.training.guard import training_settings

    loss = JasperStellaLoss(
        LossWeights(config.cosine_weight, config.similarity_weight, config.relative_weight),
        margin=config.relative_margin, max_pairs=config.relative_pairs,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    objective = DistillObjective(student, torch.from_numpy(targets), loss, dims=config.matryoshka_dims,
                                 layer_dims=config.layer_dims, full_dim_weight=config.full_dim_weight,
                                 pieces=config.batch_pieces)
    world = world_size()
    # a corpus smaller than one batch per process trains on whole-corpus batches (every batch is full: drop_last)
    options = dataclasses.replace(config.train, batch_size=min(config.train.batch_size, len(texts) // world))
    steps = options.steps(len(texts), world, drop_last=True)
    if world > 1:
        logger.info("%s: %d processes, each training on its own share of the batches (global batch %d x %d), "
                    "%d steps", where, world, world, options.batch_size, steps)
    extra: dict[str, Any] = {}
    if config.batching == Batching.LENGTH:
        from functools import partial

        from embedforge.distill.batching import LengthGroupedBatchSampler

        # a sampler of whole batches: under torchrun accelerate deals its batches out to the processes in turn
        extra["batch_sampler"] = partial(LengthGroupedBatchSampler, lengths=[len(t) for t in texts])
    args = trainer_arguments(options, checkpoint_dir, steps, dataloader_drop_last=True, **extra)
    dataset = Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})
    trainer = build_trainer(student, args, dataset, loss=objective)
    # Train on inputs cut to max_seq_length; the saved student keeps the length it had (the teacher's).
    saved_length = _limit_length(student, config.max_seq_length)
    try:
        stats = run_training(trainer, checkpoint_dir, training_settings(config), callbacks=callbacks, where=where)
    finally:
        _limit_length(student, saved_length)
    return {**stats, "last_views": objective.last_views, "last_terms": loss.last_terms,
            "matryoshka_dims": objective.dims}


# ------------------------------------------------------------------------------------------------ runner


def run(config: DistillConfig, out_dir: Path, ctx: StageContext) -> None:
    """Recipe stage ``distill``: write the trained student to ``out_dir`` as a model directory.

    Under torchrun every process runs it: the first one encodes the teacher vectors while the others wait for the
    finished cache and read it, every process trains on its share of the batches, and the first one publishes."""
    from embedforge.data import load_texts, max_chars_for
    from embedforge.model import is_complete, save_model
    from embedforge.training.engine import checkpoint_dir as checkpoint_folder
    from embedforge.training.engine import is_main_process, world_size
    from embedforge.training.guard import check_weights, last_checkpoint

    out_dir = Path(out_dir)
    if is_complete(out_dir, config) and not ctx.force:
        logger.info("distill: %s is already complete; skipping", out_dir)
        return
    start = time.perf_counter()

    # 1. texts
    texts = load_texts(config.texts, limit=config.data_limit, max_chars=max_chars_for(config.max_seq_length),
                       min_texts=2 * world_size(), purpose="distillation")
    if config.student == StudentKind.LAYERS:  # before the teachers encode anything
        from embedforge.preflight import check_layers_fit
        from embedforge.sources import resolve_source

        check_layers_fit(os.fspath(resolve_source(config.model)), config.layers)

    # 2. teacher vectors (under torchrun: encoded by the first process only, read by all)
    targets, reports = teacher_vectors(config, texts, Path(ctx.cache_dir))
    teacher_dim = int(targets.shape[1])
    targets, rotation = rotate_targets(config, targets)

    # 3. student
    student = build_student(config, teacher_dim, texts, targets, rotation)

    # 4. training
    checkpoint_dir = checkpoint_folder(out_dir)
    where = ctx.stage_name or "distill"
    stats = train_student(student, config, texts, targets, checkpoint_dir,
                          callbacks=ctx.extra.get("train_callbacks", ()), where=where)
    check_weights(student, where, last_checkpoint(checkpoint_dir))  # never publish NaN weights
    if not is_main_process():  # the first process publishes; the trained weights are the same on every one
        return

    # 5. save
    extra = {
        "matryoshka_dims": stats.pop("matryoshka_dims"),
        "train": {"loss_history": stats.pop("loss_history")},  # read by the run report
        "layer_dims": [list(p) for p in config.layer_dims],
        "student": config.student.value,
        "teachers": [{"source": t, "weight": w, "cache": os.fspath(r.directory), "dim": r.dim,
                      "fingerprint": r.teacher_fingerprint}
                     for t, w, r in zip(config.teachers, config.weights, reports)],
        "n_texts": len(texts),
        "target_rotation": config.target_rotation.value,
    }
    metrics = {"distill": {**stats, "seconds": round(time.perf_counter() - start, 2)}}
    # the lineage follows the weights: a student=model student comes from student_model, the others from the teacher
    origin = config.student_model if config.student == StudentKind.MODEL else config.model
    parent = origin if origin and Path(origin).is_dir() else None
    save_model(student, out_dir, stage="distill", source=config.model, config=config, metrics=metrics,
               parent=parent, recipe_hash=ctx.recipe_hash, extra=extra)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)

    # 6. evaluation
    if config.eval_tasks:
        from embedforge.evaluation import evaluate
        from embedforge.model import update_metrics

        update_metrics(out_dir, {"eval": evaluate(student, config.eval_tasks, show_progress=False)})
    logger.info("distill: saved the student to %s", out_dir)
