"""Configs of the convert training stages: ``mntp``, ``simcse`` and ``contrastive`` (torch-free).

All three share the model / LoRA / adapter fields of :class:`AdapterTrainConfig`; each adds what its objective
needs. How they train (learning rate, batch, steps, precision, checkpoints, seed) sits under the ``train:`` key
(:class:`~embedforge.training.options.TrainOptions`), whose defaults are each stage's own::

    - stage: mntp
      train: {max_steps: 1000, batch_size: 32}   # learning_rate stays mntp's 5e-5

The input ``model`` is an embedforge model directory (e.g. the output of the ``convert`` stage) or an LLM source,
which is first turned into a bidirectional mean-pooling embedder.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedforge.backbone import LAYERS_HELP, LayerSpec, check_layers
from embedforge.configs import check, choice, opt
from embedforge.training.options import TrainOptions, train_field


class AdapterMode(str, enum.Enum):
    """What happens to the LoRA adapter at the end of training."""

    MERGE = "merge"  # fold the adapter into the backbone weights (plain model, fastest inference)
    KEEP = "keep"    # save the unmerged backbone plus the adapter in ``adapter/`` beside it


class Quantization(str, enum.Enum):
    """Backbone weights during training: ``none`` (LoRA) or ``4bit`` (QLoRA, needs CUDA + bitsandbytes)."""

    NONE = "none"
    NF4 = "4bit"


def data_name(spec: str | dict[str, Any]) -> str:
    """A short, stable name for a data spec (the built-in name or the file's stem)."""
    from embedforge.data import BUILTINS

    path = spec if isinstance(spec, str) else str(spec.get("name") or spec.get("path", "data"))
    if path in BUILTINS:
        return path
    return Path(path).stem.replace(".", "_") or "data"


def _data_help(kind: str) -> str:
    return (f"{kind} data: built-in names (e.g. snli-triplets) or paths to JSONL/CSV/TSV/Parquet files, or "
            "dicts with DataSpec fields (path, columns, limit, ...)")


#: ``train:`` defaults shared by the convert stages (each stage sets its own learning rate).
_TRAIN_DEFAULTS: dict[str, Any] = dict(
    warmup_ratio=0.05, weight_decay=0.0, batch_size=32, max_steps=100, epochs=1.0, save_steps=50,
    save_total_limit=2, logging_steps=10, seed=0,
)


def convert_train_field(learning_rate: float) -> Any:
    """The ``train`` field of a convert stage: :data:`_TRAIN_DEFAULTS` with the stage's ``learning_rate``."""
    return train_field(**_TRAIN_DEFAULTS, learning_rate=learning_rate)


@dataclass
class AdapterTrainConfig:
    """Fields every convert training stage shares: the model, its LoRA adapter and what is done to the backbone
    (the training options themselves are the stage's ``train`` field)."""

    model: str = opt(help="embedforge model directory to train (or an LLM source: built as bidirectional mean)")
    lora_r: int = opt(16, help="LoRA rank (0 = train all weights, no adapter)")
    lora_alpha: int = opt(32, help="LoRA scaling numerator (effective scale alpha / r)")
    lora_dropout: float = opt(0.05, help="dropout on the LoRA input")
    lora_targets: list[str] = opt(
        factory=lambda: ["all-linear"], help="module names to adapt (e.g. [q_proj, v_proj]) or [all-linear]"
    )
    adapter: AdapterMode = opt(AdapterMode.MERGE, help="merge | keep: merge LoRA into the weights or save it apart")
    quantization: Quantization = opt(
        Quantization.NONE, help="none | 4bit (QLoRA: the frozen backbone in NF4; CUDA + bitsandbytes only)"
    )
    gradient_checkpointing: bool = opt(False, help="recompute activations in the backward pass to save memory")
    layers: LayerSpec | None = opt(None, help=LAYERS_HELP + ", before training; unset keeps all")
    max_seq_length: int | None = opt(None, help="truncate inputs to this many tokens (default: the model's)")
    data_limit: int | None = opt(
        None, help="contrastive: at most this many rows of each data set; mntp / simcse: at most this many "
                   "distinct texts in all"
    )
    trust_remote_code: bool = opt(False, help="allow the model's own Python code")
    train: TrainOptions = convert_train_field(learning_rate=2e-4)

    def _check_common(self) -> None:
        self.adapter = choice(AdapterMode, self.adapter, "adapter")
        self.quantization = choice(Quantization, self.quantization, "quantization")
        check(bool(self.model), "model", "name the model directory or LLM to train")
        check(self.lora_r >= 0, "lora_r", "must be >= 0")
        check(self.lora_alpha > 0, "lora_alpha", "must be positive")
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        check(bool(self.lora_targets), "lora_targets", "name at least one module (or all-linear)")
        check_layers(self.layers)
        check(self.max_seq_length is None or self.max_seq_length > 1, "max_seq_length", "must be > 1")
        check(self.data_limit is None or self.data_limit > 0, "data_limit", "must be positive")
        check(
            self.quantization == Quantization.NONE or self.lora_r > 0, "quantization",
            "4bit (QLoRA) trains only a LoRA adapter: set lora_r > 0",
        )
        check(
            self.adapter == AdapterMode.MERGE or self.lora_r > 0, "adapter", "keep needs a LoRA adapter (lora_r > 0)"
        )


@dataclass
class MntpConfig(AdapterTrainConfig):
    """LLM2Vec masked next-token prediction: under bidirectional attention, mask tokens and predict token i from
    the hidden state at i-1 with the LM head; the LoRA-adapted backbone goes back into the embedder."""

    data: list[str | dict[str, Any]] = opt(factory=lambda: ["texts"], help=_data_help("raw text (column text)"))
    mask_probability: float = opt(0.2, help="fraction of tokens masked (LLM2Vec: 0.2 for Llama)")
    mask_token: str | None = opt(
        None, help="token used for masking (default: the tokenizer's mask token, else '_' as LLM2Vec does)"
    )
    lm_source: str | None = opt(
        None, help="where to load the LM head from when the embedder has none and the embeddings are not tied"
    )
    max_seq_length: int | None = opt(128, help="truncate texts to this many tokens")
    train: TrainOptions = convert_train_field(learning_rate=5e-5)

    def __post_init__(self) -> None:
        self._check_common()
        check(0.0 < self.mask_probability < 1.0, "mask_probability", "must be in (0, 1)")
        check(self.adapter == AdapterMode.MERGE, "adapter", "MNTP always merges its adapter (keep is for simcse / "
              "contrastive)")
        check(self.quantization == Quantization.NONE, "quantization", "MNTP trains in full precision here")
        check(bool(self.data), "data", "give at least one text data set")


@dataclass
class SimcseConfig(AdapterTrainConfig):
    """Unsupervised SimCSE: each text twice through the model (different dropout), in-batch negatives."""

    data: list[str | dict[str, Any]] = opt(factory=lambda: ["texts"], help=_data_help("raw text (column text)"))
    temperature: float = opt(0.05, help="InfoNCE temperature (logits = cosine / temperature)")
    dropout: float = opt(
        0.1, help="dropout set on the backbone's dropout layers and attention while training, so the two views of a "
                  "text differ (the saved model keeps its own rates)"
    )
    max_seq_length: int | None = opt(64, help="truncate texts to this many tokens")
    train: TrainOptions = convert_train_field(learning_rate=3e-5)
    gather_across_devices: bool = opt(True, help="multi-process runs: use every process's batch as negatives")

    def __post_init__(self) -> None:
        self._check_common()
        check(self.temperature > 0, "temperature", "must be positive")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(bool(self.data), "data", "give at least one text data set")


@dataclass
class ContrastiveConfig(AdapterTrainConfig):
    """Supervised contrastive tuning: InfoNCE over (anchor, positive[, negatives]) with in-batch negatives."""

    data: list[str | dict[str, Any]] = opt(
        factory=list, help=_data_help("pair / triplet") + "; stage 1 of a two-stage schedule")
    stage2_data: list[str | dict[str, Any]] = opt(
        factory=list, help="optional stage 2 data (NV-Embed: retrieval first, then mixed tasks); same forms as data"
    )
    stage2_max_steps: int | None = opt(None, help="optimizer steps of stage 2 at most (default: train.max_steps)")
    stage2_learning_rate: float | None = opt(
        None, help="stage 2 peak learning rate (default: train.learning_rate)")
    prompts: dict[str, str] = opt(
        factory=dict,
        help="query instruction per data set name, e.g. {scifact-train-pairs: \"Given a claim, find evidence:\\n\"}; "
             "put before the anchor column and excluded from pooling (end it with a newline, not a space)",
    )
    temperature: float = opt(0.05, help="InfoNCE temperature (logits = cosine / temperature)")
    hard_negatives: bool = opt(True, help="use the data's negative columns as extra negatives")
    cache_minibatch: int | None = opt(
        None, help="GradCache: embed in chunks of this size (CachedMultipleNegativesRankingLoss) for big batches"
    )
    false_negative_margin: float | None = opt(
        None,
        help="mask any negative whose cosine exceeds the positive's by more than this (e.g. 0.0 or -0.05); "
             "None = no filtering",
    )
    gather_across_devices: bool = opt(True, help="multi-process runs: use every process's batch as negatives")
    distill_teacher: str | None = opt(
        None, help="ABLATION: teacher model whose in-batch similarity matrix the student also matches"
    )
    distill_weight: float = opt(1.0, help="weight of the teacher similarity-matching term")
    max_seq_length: int | None = opt(64, help="truncate texts to this many tokens")
    train: TrainOptions = convert_train_field(learning_rate=2e-4)

    def __post_init__(self) -> None:
        self._check_common()
        check(bool(self.data), "data", "give at least one pair or triplet data set")
        check(self.temperature > 0, "temperature", "must be positive")
        check(self.cache_minibatch is None or self.cache_minibatch > 0, "cache_minibatch", "must be positive")
        check(self.stage2_max_steps is None or self.stage2_max_steps > 0, "stage2_max_steps", "must be positive")
        check(self.stage2_learning_rate is None or self.stage2_learning_rate > 0, "stage2_learning_rate",
              "must be positive")
        check(
            self.cache_minibatch is None or (self.false_negative_margin is None and self.distill_teacher is None),
            "cache_minibatch",
            "GradCache (CachedMultipleNegativesRankingLoss) cannot be combined with false_negative_margin or "
            "distill_teacher",
        )
        check(self.distill_weight >= 0, "distill_weight", "must be >= 0")
        check(isinstance(self.prompts, dict), "prompts", "must map data set names to instructions")
        self._check_prompt_names()

    def _check_prompt_names(self) -> None:
        """Every prompt is a string for a data set of this stage (a misspelt name would silently go unused)."""
        names = {data_name(s) for s in [*self.data, *self.stage2_data]}
        for name, prompt in self.prompts.items():
            check(isinstance(prompt, str), f"prompts.{name}", "must be a string (the instruction)")
            check(name in names, f"prompts.{name}",
                  f"no data set of this stage is named {name!r} (its data sets: {', '.join(sorted(names))})")
