"""Configs of the ``compress`` and ``binarizer`` recipe stages (torch-free).

``compress`` makes a model smaller — fewer layers (with a short healing distillation), a vocabulary cut down to the
tokens a corpus uses, weight quantization — and can attach an embedding quantizer (binary / int8 with calibration
ranges). ``binarizer`` trains the learned multi-bit binarizer on the model's own vectors and appends it to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from embedforge.backbone import LAYERS_HELP, LayerSpec, check_layers
from embedforge.configs import check, choice, opt
from embedforge.training.options import TrainOptions, train_field


class EmbeddingPrecision(str, Enum):
    """How stored vectors are quantized (see :mod:`embedforge.compress.quantization`)."""

    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"
    BINARY = "binary"  # sentence-transformers' binary: packbits bytes minus 128, int8
    UBINARY = "ubinary"  # packbits uint8 (FAISS IndexBinaryFlat; viewed as int8 for Vespa)


class WeightQuant(str, Enum):
    """Weight quantization applied to the backbone."""

    NONE = "none"
    QUANTO_INT8 = "quanto-int8"  # optimum-quanto, CPU or GPU; applied when the model is loaded
    BNB_8BIT = "bnb-8bit"  # bitsandbytes LLM.int8, CUDA only, saved pre-quantized
    BNB_4BIT = "bnb-4bit"  # bitsandbytes NF4, CUDA only, saved pre-quantized


@dataclass
class CompressConfig:
    """Shrink a model directory: layers, vocabulary, weights; optionally attach an embedding quantizer."""

    model: str = opt(help="model directory (or alias) to compress")
    layers: LayerSpec | None = opt(None, help=LAYERS_HELP + "; unset: no layer pruning")
    heal: bool = opt(False, help="after layer pruning, distill the pruned model back towards the unpruned model's "
                                 "vectors ((1 - cos) + MSE; its schedule is train:)")
    heal_data: str = opt("texts", help="texts for healing: a built-in name, a data file or beir:FOLDER")
    heal_limit: int = opt(2000, help="at most this many healing texts")
    max_seq_length: int = opt(128, help="token limit during healing")
    # the defaults are the earlier healing loop's: 200 constant-rate AdamW steps (decay 0.01, clipping 1.0), fp32
    train: TrainOptions = train_field(
        learning_rate=5e-5, lr_scheduler="constant", warmup_ratio=0.0, weight_decay=0.01, batch_size=32,
        max_steps=200, epochs=None, precision="fp32", seed=0)
    vocab_corpus: str | None = opt(None, help="prune the vocabulary to the tokens this corpus uses "
                                              "(a built-in name, a data file or beir:FOLDER)")
    vocab_limit: int | None = opt(None, help="read at most this many corpus texts for vocabulary pruning")
    weights: WeightQuant = opt(WeightQuant.NONE, help="weight quantization: none, quanto-int8, bnb-8bit, bnb-4bit")
    embedding_precision: EmbeddingPrecision = opt(
        EmbeddingPrecision.FLOAT32, help="stored-vector quantization recorded with the model "
                                         "(float32, int8, uint8, binary, ubinary)")
    truncate_dim: int | None = opt(None, help="Matryoshka truncation before embedding quantization")
    calibration_data: str = opt("texts", help="texts whose vectors calibrate int8 ranges")
    calibration_limit: int = opt(2000, help="at most this many calibration texts")

    def __post_init__(self) -> None:
        self.weights = choice(WeightQuant, self.weights, "weights")
        self.embedding_precision = choice(EmbeddingPrecision, self.embedding_precision, "embedding_precision")
        check(bool(self.model), "model", "name the model directory to compress")
        check_layers(self.layers)
        check(not self.heal or self.layers is not None, "heal", "healing only makes sense after layer pruning "
                                                                "(set layers)")
        check(self.heal_limit > 0, "heal_limit", "must be positive")
        check(self.max_seq_length > 0, "max_seq_length", "must be positive")
        check(self.vocab_limit is None or self.vocab_limit > 0, "vocab_limit", "must be positive")
        check(self.truncate_dim is None or self.truncate_dim > 0, "truncate_dim", "must be positive")
        check(self.calibration_limit >= 2, "calibration_limit", "needs at least 2 texts")


@dataclass
class BinarizerConfig:
    """Train the learned multi-bit binarizer (BEBR) on the model's vectors and append it to the model."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"limit": "data_limit"}

    model: str = opt(help="model directory (or alias) whose vectors the binarizer learns")
    data: str = opt("texts", help="training texts: a built-in name, a data file or beir:FOLDER "
                                  "(keep evaluation queries out)")
    data_limit: int = opt(20000, help="at most this many training texts")
    bits: int = opt(2, help="bit levels per dimension (the code has bits x dim bits)")
    hidden_dim: int | None = opt(None, help="width of each level's residual MLP (default 2 x dim)")
    temperature: float = opt(0.05, help="softmax temperature of the similarity-distribution losses")
    sym_weight: float = opt(1.0, help="weight of the code-vs-code similarity loss")
    asym_weight: float = opt(1.0, help="weight of the float-query-vs-code similarity loss")
    mse_weight: float = opt(1.0, help="weight of the reconstruction loss")
    output: str = opt("float", help="what the model's sentence_embedding becomes: float (reconstruction), "
                                    "packed (uint8 codes) or passthrough (input unchanged, codes on the side)")
    encode_batch_size: int = opt(64, help="texts per forward pass when encoding the training texts")
    # train.batch_size counts vectors per step and process (the similarity losses compare within a batch); the
    # defaults are the earlier loop's: 600 steps, 5% warmup then cosine, AdamW without decay, no gradient clipping
    train: TrainOptions = train_field(
        learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.05, weight_decay=0.0, batch_size=512,
        max_steps=600, epochs=None, precision="fp32", seed=0)

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "name the model directory")
        check(1 <= self.bits <= 8, "bits", "must be between 1 and 8")
        check(self.hidden_dim is None or self.hidden_dim > 0, "hidden_dim", "must be positive")
        check(self.train.batch_size >= 2, "train.batch_size", "needs at least 2 vectors per batch (the losses "
                                                              "compare vectors within a batch)")
        check(self.data_limit >= 2, "data_limit", "needs at least 2 texts")
        check(self.temperature > 0, "temperature", "must be positive")
        check(min(self.sym_weight, self.asym_weight, self.mse_weight) >= 0, "sym_weight",
              "loss weights must be >= 0")
        check(self.sym_weight + self.asym_weight + self.mse_weight > 0, "sym_weight", "some loss weight must be > 0")
        check(self.output in ("float", "packed", "passthrough"), "output",
              f"{self.output!r} is not one of 'float', 'packed', 'passthrough'")
        check(self.encode_batch_size > 0, "encode_batch_size", "must be positive")
