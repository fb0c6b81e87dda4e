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
import math
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
    """The combined teacher targets for ``texts`` (computed once per teacher, then read from the cache)."""
    from embedforge.distill.teacher import EncodeSettings, teacher_targets

    settings = EncodeSettings(max_seq_length=config.max_seq_length, batch_size=config.teacher_batch_size,
                              prompt=config.teacher_prompt, shard_size=config.shard_size)
    return teacher_targets(config.teachers, texts, cache_dir, settings, weights=config.weights,
                           processes=config.teacher_processes)


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
    """Train ``student`` on the teacher targets with SentenceTransformerTrainer under the shared training guards
    (:mod:`embedforge.training.guard`): it stops on a NaN loss before applying it, checkpoints on SIGTERM /
    Ctrl-C, and resumes only from a complete checkpoint made with the same training settings."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from embedforge.training.guard import NanGuardMixin, guarded_train, loss_history, training_settings
    from embedforge.training.precision import use_bf16
    from embedforge.distill.losses import JasperStellaLoss, LossWeights
    from embedforge.distill.matryoshka import DistillObjective

    generator = torch.Generator().manual_seed(config.seed)
    loss = JasperStellaLoss(
        LossWeights(config.cosine_weight, config.similarity_weight, config.relative_weight),
        margin=config.relative_margin, max_pairs=config.relative_pairs, generator=generator,
    )
    objective = DistillObjective(student, torch.from_numpy(targets), loss, dims=config.matryoshka_dims,
                                 layer_dims=config.layer_dims, full_dim_weight=config.full_dim_weight,
                                 pieces=config.batch_pieces)
    batch_size = min(config.batch_size, len(texts))
    steps_per_epoch = max(1, len(texts) // batch_size)
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    args = SentenceTransformerTrainingArguments(
        output_dir=os.fspath(checkpoint_dir),
        per_device_train_batch_size=batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        warmup_steps=int(config.warmup_ratio * total),
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        logging_steps=max(1, min(50, total // 10)),
        report_to="none",
        seed=config.seed,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=use_bf16(config.precision),
    )
    if config.batching == Batching.LENGTH:
        from functools import partial

        from embedforge.distill.batching import LengthGroupedBatchSampler

        args.batch_sampler = partial(LengthGroupedBatchSampler, lengths=[len(t) for t in texts])
    dataset = Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})

    class DistillTrainer(NanGuardMixin, SentenceTransformerTrainer):
        pass

    trainer = DistillTrainer(model=student, args=args, train_dataset=dataset, loss=objective)
    # Train on inputs cut to max_seq_length; the saved student keeps the length it had (the teacher's).
    saved_length = _limit_length(student, config.max_seq_length)
    start = time.perf_counter()
    try:
        result, resume = guarded_train(trainer, checkpoint_dir, training_settings(config), callbacks, where)
    finally:
        _limit_length(student, saved_length)
    return {
        "train_seconds": round(time.perf_counter() - start, 2),
        "steps": int(result.global_step),
        "resumed_from_step": int(Path(resume).name.split("-")[1]) if resume else 0,
        "train_loss": float(result.training_loss),
        "last_views": objective.last_views,
        "last_terms": loss.last_terms,
        "matryoshka_dims": objective.dims,
        "loss_history": loss_history(trainer),
    }


# ------------------------------------------------------------------------------------------------ runner


def run(config: DistillConfig, out_dir: Path, ctx: StageContext) -> None:
    """Recipe stage ``distill``: write the trained student to ``out_dir`` as a model directory."""
    from embedforge.training.guard import check_weights, last_checkpoint
    from embedforge.data import load_texts, max_chars_for
    from embedforge.model import is_complete, save_model

    out_dir = Path(out_dir)
    if is_complete(out_dir, config) and not ctx.force:
        logger.info("distill: %s is already complete; skipping", out_dir)
        return
    start = time.perf_counter()

    # 1. texts
    texts = load_texts(config.texts, limit=config.text_limit, max_chars=max_chars_for(config.max_seq_length),
                       min_texts=2, purpose="distillation")
    if config.student == StudentKind.LAYERS:  # before the teachers encode anything
        from embedforge.preflight import check_layers_fit
        from embedforge.sources import resolve_source

        check_layers_fit(os.fspath(resolve_source(config.model)), config.layers)

    # 2. teacher vectors
    targets, reports = teacher_vectors(config, texts, Path(ctx.cache_dir))
    teacher_dim = int(targets.shape[1])
    targets, rotation = rotate_targets(config, targets)

    # 3. student
    student = build_student(config, teacher_dim, texts, targets, rotation)

    # 4. training
    checkpoint_dir = out_dir.parent / f"{out_dir.name}.ckpt"
    where = ctx.stage_name or "distill"
    stats = train_student(student, config, texts, targets, checkpoint_dir,
                          callbacks=ctx.extra.get("train_callbacks", ()), where=where)
    check_weights(student, where, last_checkpoint(checkpoint_dir))  # never publish NaN weights

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
