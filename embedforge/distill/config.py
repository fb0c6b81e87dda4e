"""Config of the ``distill`` stage: a small student learns a teacher's vectors (torch-free).

The teacher (one model directory, or several whose normalized vectors are concatenated as in Jasper) encodes a
text corpus once; the vectors are cached on disk. A student (a layer subset of the teacher, a static
token-embedding table, or any HF model) is trained to reproduce them with the Jasper/Stella losses, optionally
at several Matryoshka dimensions and (layer, dim) pairs at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from embedforge.backbone import LAYERS_HELP, LayerSpec, check_layers
from embedforge.configs import check, choice, opt
from embedforge.training.options import TrainOptions, train_field


class StudentKind(str, enum.Enum):
    """Where the student comes from."""

    LAYERS = "layers"   # the teacher with a subset of its transformer layers (keeps its tokenizer)
    STATIC = "static"   # a token-embedding table initialised model2vec-style from the teacher
    MODEL = "model"     # any HF model or sentence-transformers directory named by ``student_model``


class Projection(str, enum.Enum):
    """Whether to put a linear head that maps the student's output to the teacher's dimension."""

    AUTO = "auto"       # only when the student's dimension differs from the teacher's
    ALWAYS = "always"   # always (identity-initialised when the dimensions already match)
    NEVER = "never"     # never (the dimensions must match)


class TargetRotation(str, enum.Enum):
    """An orthogonal rotation of the teacher vectors before the student learns them."""

    NONE = "none"   # the teacher's own coordinates
    PCA = "pca"     # principal axes of the training vectors, largest variance first (for Matryoshka prefixes)


class Batching(str, enum.Enum):
    """How training texts are put into batches."""

    RANDOM = "random"   # uniformly shuffled
    LENGTH = "length"   # shuffled, then texts of similar length batched together (less padding)


@dataclass
class DistillConfig:
    """Distill one or more teachers into a smaller, faster student."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"text_limit": "data_limit"}

    model: str = opt(help="the teacher: model directory, alias (minilm-l6) or hub id")
    extra_teachers: list[str] = opt(
        factory=list, help="more teachers; their normalized vectors are concatenated after the first one's"
    )
    teacher_weights: list[float] = opt(
        factory=list, help="one weight per teacher (model first, then extra_teachers); default all 1"
    )
    texts: list[str] = opt(
        factory=lambda: ["texts"],
        help="unlabeled training texts: built-in data set names or files; every text column is used",
    )
    data_limit: int | None = opt(None, help="use at most this many texts (after de-duplication)")
    student: StudentKind = opt(StudentKind.LAYERS, help="layers | static | model")
    student_model: str | None = opt(None, help="student=model only: HF model or sentence-transformers directory")
    layers: LayerSpec | None = opt(None, help="student=layers (required there): the teacher's " + LAYERS_HELP)
    static_dims: int | None = opt(
        None, help="student=static: PCA dimensions of the token table (default: the teacher's dimension)"
    )
    static_sif: float | None = opt(1e-4, help="student=static: SIF coefficient of the token weighting (None: off)")
    projection: Projection = opt(Projection.AUTO, help="auto | always | never: linear head to the teacher dim")
    max_seq_length: int = opt(128, help="longest input in tokens, for teacher and student")
    teacher_batch_size: int = opt(64, help="texts per teacher forward pass")
    teacher_processes: int = opt(
        1, help="encoding processes (one per GPU when there are GPUs); each writes its own shards"
    )
    shard_size: int = opt(4096, help="texts per cached shard of teacher vectors")
    teacher_prompt: str | None = opt(None, help="text put before every text when the teacher encodes it")
    cosine_weight: float = opt(10.0, help="weight of the cosine loss (1 - cos to the teacher vector)")
    similarity_weight: float = opt(200.0, help="weight of the similarity-matrix MSE loss")
    relative_weight: float = opt(20.0, help="weight of the relative-similarity hinge loss")
    relative_margin: float = opt(0.015, help="margin of the relative-similarity hinge")
    relative_pairs: int = opt(
        512, help="in-batch pair scores sampled per step for the relative loss (all pairs of them are compared)"
    )
    matryoshka_dims: list[int] = opt(
        factory=list, help="extra output dims trained at once, e.g. [256, 128, 64, 32] (the full dim is implied)"
    )
    full_dim_weight: float = opt(
        1.0, help="weight of the full-dimension view in the mean over views (each Matryoshka prefix and layer/dim "
                  "pair weighs 1); above 1 favours the full vector over its prefixes"
    )
    target_rotation: TargetRotation = opt(
        TargetRotation.NONE,
        help="none | pca: rotate the teacher vectors onto their principal axes (fit on the training vectors; "
             "orthogonal, so full-dim cosines are unchanged) so that Matryoshka prefixes keep the most variance; "
             "the student's linear head learns the rotated vectors",
    )
    batching: Batching = opt(
        Batching.RANDOM,
        help="random | length: length batches group texts of similar length (within windows of 64 batches, "
             "batch order shuffled), which saves most of the padding when short and long texts are mixed",
    )
    batch_pieces: int = opt(
        1, help="run the student on up to this many length-sorted pieces of each batch, each padded only to its "
                "own longest text; the in-batch losses still compare the whole batch. With random batching this "
                "keeps short and long texts in the same similarity matrix at little padding cost (try 4)",
    )
    layer_dims: list[list[int]] = opt(
        factory=list, help="Starbucks 2D pairs [[layer, dim], ...]: the state after that layer, cut to dim"
    )
    train: TrainOptions = train_field(
        learning_rate=1e-4, batch_size=128, max_steps=None, epochs=1.0, warmup_ratio=0.05, save_steps=200,
        save_total_limit=1, seed=42, logging_steps=None,
    )
    eval_tasks: list[str] = opt(factory=list, help="evaluate the student on these tasks after training")

    def __post_init__(self) -> None:
        self.student = choice(StudentKind, self.student, "student")
        self.projection = choice(Projection, self.projection, "projection")
        self.target_rotation = choice(TargetRotation, self.target_rotation, "target_rotation")
        self.batching = choice(Batching, self.batching, "batching")
        check(int(self.batch_pieces) >= 1, "batch_pieces", "must be >= 1")
        check(bool(self.model), "model", "name the teacher")
        n_teachers = 1 + len(self.extra_teachers)
        check(not self.teacher_weights or len(self.teacher_weights) == n_teachers, "teacher_weights",
              f"give one weight per teacher ({n_teachers}), or none")
        check(all(w > 0 for w in self.teacher_weights), "teacher_weights", "weights must be positive")
        check(bool(self.texts), "texts", "list at least one text source")
        check(self.data_limit is None or self.data_limit > 1, "data_limit", "must be > 1")
        if self.student == StudentKind.MODEL:
            check(bool(self.student_model), "student_model", "student=model needs student_model")
        if self.student == StudentKind.LAYERS:
            check(self.layers is not None, "layers",
                  "student=layers needs the teacher layers to keep, e.g. layers: 2, [1, 3, 5] or {every: 2}")
            check_layers(self.layers)
        else:
            check(self.layers is None, "layers", "layer selection only applies to student=layers")
        check(self.static_dims is None or self.static_dims > 0, "static_dims", "must be positive")
        check(self.static_sif is None or 0 < self.static_sif < 1, "static_sif", "must be in (0, 1)")
        check(self.max_seq_length > 0, "max_seq_length", "must be positive")
        check(self.teacher_batch_size > 0, "teacher_batch_size", "must be positive")
        check(self.teacher_processes >= 1, "teacher_processes", "must be >= 1")
        check(self.shard_size > 0, "shard_size", "must be positive")
        check(self.train.batch_size >= 2, "train.batch_size", "the in-batch losses need at least 2 texts per batch")
        for key in ("cosine_weight", "similarity_weight", "relative_weight", "relative_margin"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.cosine_weight + self.similarity_weight + self.relative_weight > 0, "cosine_weight",
              "at least one loss weight must be positive")
        check(self.relative_pairs >= 2, "relative_pairs", "must be >= 2")
        check(all(d > 0 for d in self.matryoshka_dims), "matryoshka_dims", "dims must be positive")
        check(self.full_dim_weight > 0, "full_dim_weight", "must be positive")
        for pair in self.layer_dims:
            check(len(pair) == 2 and pair[0] >= 1 and pair[1] >= 1, "layer_dims",
                  f"each entry is [layer >= 1, dim >= 1], got {pair!r}")
        if self.target_rotation != TargetRotation.NONE:
            check(self.projection != Projection.NEVER, "target_rotation",
                  "a rotated target needs the student's linear head (projection auto or always)")
        if self.layer_dims:
            check(self.student != StudentKind.STATIC, "layer_dims", "a static student has no layers")

    @property
    def teachers(self) -> list[str]:
        """All teachers, the main one first."""
        return [self.model, *self.extra_teachers]

    @property
    def weights(self) -> list[float]:
        """One weight per teacher (all 1 unless given)."""
        return list(self.teacher_weights) or [1.0] * len(self.teachers)
