"""Runners of the convert training stages: ``mntp``, ``simcse`` and ``contrastive``.

Each runner reads an embedder (or builds one from an LLM), trains it with the Hugging Face trainer family
(sentence-transformers' ``SentenceTransformerTrainer`` for the embedding objectives, the plain ``Trainer`` for
MNTP), and writes a model directory. Because the trainers run on accelerate, the same stage runs on several
processes unchanged::

    torchrun --nproc_per_node 4 -m embedforge.cli run recipe.yaml

Checkpoints go to ``<out_dir>.ckpt/`` every ``save_steps`` and on SIGTERM / Ctrl-C; a rerun resumes from the
newest one. A NaN loss stops the run before it touches the weights (:mod:`embedforge.training.guard`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge.configs import StageContext
from embedforge.data import load_texts, max_chars_for
from embedforge.convert.train_config import ContrastiveConfig, MntpConfig, SimcseConfig, TrainOptions, data_name

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data


def _text_dataset(specs: list[str | dict[str, Any]], limit: int | None, max_chars: int | None) -> Dataset:
    """The stage's texts (:func:`embedforge.data.load_texts`) as a one-column ``text`` data set."""
    from datasets import Dataset

    return Dataset.from_dict({"text": load_texts(specs, limit=limit, max_chars=max_chars, purpose="training")})


def load_pairs(spec: str | dict[str, Any], limit: int | None, hard_negatives: bool,
               max_chars: int | None = None) -> Dataset:
    """Pairs or triplets with canonical columns; negatives are dropped unless ``hard_negatives``."""
    from embedforge.data import BUILTINS, DataError, DataKind, load_data

    if isinstance(spec, str) and spec in BUILTINS:
        ds = load_data(spec, max_chars=max_chars)
    elif isinstance(spec, dict) and "kind" in spec:
        ds = load_data({k: v for k, v in spec.items() if k != "name"}, max_chars=max_chars)
    else:
        fields = {"path": spec} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}
        try:
            ds = load_data({**fields, "kind": DataKind.TRIPLETS}, max_chars=max_chars)
        except DataError as exc:
            if "missing column" not in str(exc):
                raise
            ds = load_data({**fields, "kind": DataKind.PAIRS}, max_chars=max_chars)
    if "anchor" not in ds.column_names or "positive" not in ds.column_names:
        raise ValueError(f"{data_name(spec)}: contrastive data needs anchor and positive columns, "
                         f"got {ds.column_names}")
    keep = ["anchor", "positive"] + ([c for c in ds.column_names if c.startswith("negative")]
                                     if hard_negatives else [])
    ds = ds.select_columns(keep)
    if limit is not None and len(ds) > limit:
        ds = ds.shuffle(seed=0).select(range(limit))
    return ds


def steps_for(rows: int, config: TrainOptions, max_steps: int | None = None) -> int:
    """Optimizer steps: ``max_steps``, capped at ``epochs`` passes over ``rows`` examples on every process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, math.ceil(rows / (config.batch_size * world)))
    return max(1, min(max_steps or config.max_steps, math.ceil(config.epochs * per_epoch)))


# ------------------------------------------------------------------------------------------ trainers


def _common_args(config: TrainOptions, ckpt_dir: Path, steps: int, learning_rate: float) -> dict[str, Any]:
    import torch

    from embedforge.training.precision import use_bf16

    bf16 = use_bf16(config.precision)
    return dict(
        output_dir=os.fspath(ckpt_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=learning_rate,
        warmup_steps=int(config.warmup_ratio * steps),
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        seed=config.seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def _run_trainer(trainer: Any, ckpt_dir: Path, extra_callbacks: list[Any], config: TrainOptions, where: str,
                 **phase: Any) -> dict[str, Any]:
    """Train under the shared guards (:func:`~embedforge.training.guard.guarded_train`): resume only from a
    checkpoint made with the same settings, stop on NaN or a signal; returns wall time and final loss."""
    from embedforge.training.guard import guarded_train, loss_history, training_settings
    from embedforge.training.memory import peak_gpu_mb, reset_peak_gpu

    reset_peak_gpu()
    start = time.perf_counter()
    result, resume = guarded_train(trainer, ckpt_dir, training_settings(config, phase), extra_callbacks, where)
    stats = {
        "steps": trainer.state.global_step,
        "wall_s": round(time.perf_counter() - start, 1),
        "train_loss": float(result.training_loss),
        "resumed_from": resume,
        "loss_history": loss_history(trainer),
    }
    gpu_mb = peak_gpu_mb()  # training only: loading, quantizing and merging are outside this window
    if gpu_mb is not None:
        stats["peak_gpu_mb"] = gpu_mb
    return stats


def _st_trainer(model: Any, args: Any, train: Any, loss: Any) -> Any:
    from sentence_transformers import SentenceTransformerTrainer

    from embedforge.training.guard import GuardedTrainerMixin

    class Trainer(GuardedTrainerMixin, SentenceTransformerTrainer):
        pass

    return Trainer(model=model, args=args, train_dataset=train, loss=loss)


def _st_args(config: TrainOptions, ckpt_dir: Path, steps: int, learning_rate: float,
             prompts: dict[str, Any] | None = None) -> Any:
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    return SentenceTransformerTrainingArguments(
        **_common_args(config, ckpt_dir, steps, learning_rate),
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=prompts or None,
    )


def _callbacks(ctx: StageContext) -> list[Any]:
    return list(ctx.extra.get("train_callbacks", []))


def _ckpt_dir(out_dir: Path) -> Path:
    return Path(os.fspath(out_dir) + ".ckpt")


def _finish(model: Any, out_dir: Path, config: TrainOptions, parent: str | None, ctx: StageContext, stage: str,
            stats: dict[str, Any]) -> None:
    from embedforge.training.guard import check_weights, last_checkpoint
    from embedforge.convert.train_model import finish_adapter, save_trained
    from embedforge.training.memory import peak_rss_mb

    check_weights(model, stage, last_checkpoint(_ckpt_dir(out_dir)))  # never publish NaN weights
    backbone_dir = parent
    if backbone_dir is None:
        from embedforge.sources import resolve_source

        backbone_dir = os.fspath(resolve_source(config.model))
    adapter = finish_adapter(model, config, source_backbone=backbone_dir)
    stats["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if int(os.environ.get("RANK", "0")) == 0:
        save_trained(model, out_dir, stage=stage, config=config, parent=parent, ctx=ctx, adapter=adapter,
                     train_stats=stats)
        shutil.rmtree(_ckpt_dir(out_dir), ignore_errors=True)


# ------------------------------------------------------------------------------------------------ MNTP


def mntp_collator(tokenizer: Any, config: MntpConfig) -> Any:
    """Masking collator: ``mask_probability`` of the tokens become targets (80% mask token, 10% random, 10% kept)."""
    from transformers import DataCollatorForLanguageModeling

    if config.mask_token is not None:
        tokenizer.mask_token = config.mask_token
    elif tokenizer.mask_token is None:
        tokenizer.mask_token = "_"  # LLM2Vec's choice for models without a mask token
    if tokenizer.mask_token_id is None or tokenizer.mask_token_id == tokenizer.unk_token_id:
        raise ValueError(f"mask_token {tokenizer.mask_token!r} is not a single token of this vocabulary")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=config.mask_probability)


def mntp_loss(logits: Any, labels: Any) -> Any:
    """Masked next-token loss: the token at ``i`` (where ``labels[i] != -100``) is predicted from position ``i-1``."""
    import torch.nn.functional as F

    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100)


def masked_positions_loss(hidden: Any, labels: Any, head: Any, softcap: float | None = None) -> Any:
    """:func:`mntp_loss` computed from hidden states, applying the LM head only where a token is predicted.

    The vocabulary projection dominates the cost of a small model's step; with 20% of the tokens masked this
    computes a fifth of it.
    """
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    where = targets != -100
    if not bool(where.any()):
        return hidden.sum() * 0.0
    logits = head(hidden[:, :-1][where]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[where])


def lm_head_for(backbone: Any, config: MntpConfig, parent: str | None) -> Any:
    """A causal-LM wrapper sharing ``backbone``'s weights, with the LM head tied to the input embeddings or read
    from the original LLM (``lm_source``, default: the lineage's source)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        lm = AutoModelForCausalLM.from_config(backbone.config)
    setattr(lm, lm.base_model_prefix, backbone)
    vocab, hidden = backbone.get_input_embeddings().weight.shape
    head = torch.nn.Linear(hidden, vocab, bias=False)
    if getattr(backbone.config, "tie_word_embeddings", False):
        head.weight = backbone.get_input_embeddings().weight
    else:
        head.weight = torch.nn.Parameter(_read_lm_head(config, parent), requires_grad=False)
    lm.lm_head = head
    leftovers = [n for n, p in lm.named_parameters() if p.device.type == "meta"]
    if leftovers:
        raise RuntimeError(f"MNTP: the LM wrapper has weights not shared with the embedder: {leftovers[:3]}")
    lm.config.use_cache = False
    return lm


def _read_lm_head(config: MntpConfig, parent: str | None) -> Any:
    from safetensors import safe_open

    from embedforge.model import read_lineage
    from embedforge.sources import resolve_source

    source = config.lm_source or (read_lineage(parent).get("source") if parent else None) or config.model
    folder = Path(os.fspath(resolve_source(source)))
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(os.fspath(file), "pt") as fh:
            if "lm_head.weight" in fh.keys():
                return fh.get_tensor("lm_head.weight")
    raise ValueError(f"MNTP needs the LM head, and {folder} has no lm_head.weight; set lm_source to the LLM")


def run_mntp(config: MntpConfig, out_dir: Path, ctx: StageContext) -> None:
    """Stage ``mntp``: LoRA masked next-token prediction under bidirectional attention; LoRA merged at the end."""
    from transformers import Trainer, TrainingArguments

    from embedforge.training.guard import GuardedTrainerMixin
    from embedforge.convert.train_model import add_lora, backbone_of, load_start_model

    out_dir = Path(out_dir)
    model, parent = load_start_model(config)                                              # 1. embedder
    max_len = config.max_seq_length or model.max_seq_length
    texts = _text_dataset(config.data, config.data_limit, max_chars_for(max_len))         # 2. data
    tokenizer = _copy_tokenizer(model)
    collator = mntp_collator(tokenizer, config)
    tokenized = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_len,
                                              return_special_tokens_mask=True),
                          batched=True, remove_columns=["text"])
    lm = lm_head_for(backbone_of(model), config, parent)                                  # 3. LM on the backbone
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_lm = add_lora(lm, config) if config.lora_r > 0 else lm                           # 4. LoRA
    steps = steps_for(len(tokenized), config)
    ckpt = _ckpt_dir(out_dir)
    args = TrainingArguments(**_common_args(config, ckpt, steps, config.learning_rate))

    backbone, head = backbone_of(model), lm.lm_head
    softcap = getattr(backbone.config, "final_logit_softcapping", None)

    class MntpTrainer(GuardedTrainerMixin, Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                              use_cache=False).last_hidden_state
            loss = masked_positions_loss(hidden, inputs["labels"], head, softcap)
            return (loss, None) if return_outputs else loss

    trainer = MntpTrainer(model=peft_lm, args=args, train_dataset=tokenized, data_collator=collator)
    stats = _run_trainer(trainer, ckpt, _callbacks(ctx), config, ctx.stage_name or "mntp")  # 5. train
    if config.lora_r > 0:
        peft_lm.merge_and_unload()                                                        # 6. merge (in place)
    _finish(model, out_dir, config, parent, ctx, ctx.stage_name or "mntp", stats)         # 7. save


def _copy_tokenizer(model: Any) -> Any:
    """A private copy of the embedder's tokenizer (MNTP may set its mask token)."""
    import copy

    return copy.deepcopy(model.tokenizer)


# ---------------------------------------------------------------------------------------------- SimCSE


def enable_dropout(backbone: Any, p: float) -> Any:
    """Set every dropout of ``backbone`` to ``p``: its ``nn.Dropout`` modules and the ``attention_dropout`` rate
    attention modules read in train mode (LoRA's own ``lora_dropout`` is left alone). Returns a function that puts
    the previous values back.

    Setting ``config.attention_dropout`` after the model is built changes nothing: the modules copied the rate
    when they were constructed.
    """
    import torch

    from embedforge.errors import UsageError

    saved: list[tuple[Any, str, float]] = []
    for name, module in backbone.named_modules():
        if "lora_" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            saved.append((module, "p", module.p))
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            saved.append((module, "attention_dropout", module.attention_dropout))
            module.attention_dropout = p
    if not saved:
        raise UsageError(f"simcse: {type(backbone).__name__} has no dropout layer or attention dropout to set, so "
                         "the two views of a text would be identical; use the contrastive stage instead")
    logger.info("simcse: dropout %.2f on %d places of the backbone", p, len(saved))

    def restore() -> None:
        for module, attr, value in saved:
            setattr(module, attr, value)

    return restore


def run_simcse(config: SimcseConfig, out_dir: Path, ctx: StageContext) -> None:
    """Stage ``simcse``: unsupervised SimCSE (two dropout views of each text, in-batch negatives)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from embedforge.convert.train_model import backbone_of, load_start_model, preflight, prepare_for_training

    preflight(config)                                                                     # 0. refuse early
    out_dir = Path(out_dir)
    model, parent = load_start_model(config)                                              # 1. embedder
    texts = _text_dataset(config.data, config.data_limit,                                 # 2. (text, text) pairs
                       max_chars_for(config.max_seq_length or model.max_seq_length))
    pairs = texts.map(lambda b: {"anchor": b["text"], "positive": b["text"]}, batched=True,
                      remove_columns=["text"])
    prepare_for_training(model, config)                                                   # 3. LoRA
    restore_dropout = enable_dropout(backbone_of(model), config.dropout)                  # 4. dropout views
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / config.temperature,
                                        gather_across_devices=config.gather_across_devices)
    steps = steps_for(len(pairs), config)
    ckpt = _ckpt_dir(out_dir)
    trainer = _st_trainer(model, _st_args(config, ckpt, steps, config.learning_rate), pairs, loss)
    try:
        stats = _run_trainer(trainer, ckpt, _callbacks(ctx), config, ctx.stage_name or "simcse")  # 5. train
    finally:
        restore_dropout()
    _finish(model, out_dir, config, parent, ctx, ctx.stage_name or "simcse", stats)       # 6. save


# ----------------------------------------------------------------------------------------- contrastive


def contrastive_loss(model: Any, config: ContrastiveConfig) -> Any:
    """The loss a :class:`ContrastiveConfig` asks for: GradCache MNRL, or embedforge's filtered InfoNCE."""
    if config.cache_minibatch is not None:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        return CachedMultipleNegativesRankingLoss(
            model, scale=1.0 / config.temperature, mini_batch_size=config.cache_minibatch,
            gather_across_devices=config.gather_across_devices,
        )
    from embedforge.convert.losses import FilteredInfoNCELoss

    return FilteredInfoNCELoss(
        model, temperature=config.temperature, false_negative_margin=config.false_negative_margin,
        gather_across_devices=config.gather_across_devices,
        distill_weight=config.distill_weight if config.distill_teacher else 0.0,
    )


def add_teacher_vectors(datasets: dict[str, Any], teacher: str, batch_size: int = 64) -> dict[str, Any]:
    """Add a ``label`` column: the teacher's anchor and positive vectors, concatenated (distillation ablation)."""
    import numpy as np

    from embedforge.evaluation import encode
    from embedforge.model import load_model

    model = load_model(teacher)
    out = {}
    for name, ds in datasets.items():
        a = encode(model, ds["anchor"], batch_size=batch_size, desc=f"teacher {name} anchors")
        p = encode(model, ds["positive"], batch_size=batch_size, desc=f"teacher {name} positives")
        out[name] = ds.add_column("label", [row.tolist() for row in np.concatenate([a, p], axis=1)])
    return out


def _contrastive_sets(specs: list[Any], config: ContrastiveConfig, max_chars: int | None = None) -> Any:
    from datasets import DatasetDict

    sets = {data_name(s): load_pairs(s, config.data_limit, config.hard_negatives, max_chars) for s in specs}
    if config.distill_teacher:
        sets = add_teacher_vectors(sets, config.distill_teacher)
    return DatasetDict(sets)


def run_contrastive(config: ContrastiveConfig, out_dir: Path, ctx: StageContext) -> None:
    """Stage ``contrastive``: supervised InfoNCE with LoRA; optional second stage on other data (NV-Embed)."""
    from embedforge.convert.train_model import load_start_model, preflight, prepare_for_training

    preflight(config)                                                                     # 0. refuse early
    from embedforge.modules.prompts import check_model_prompts

    out_dir = Path(out_dir)
    model, parent = load_start_model(config)                                              # 1. embedder
    check_model_prompts(model, config.prompts, "prompts")  # before any data is loaded or step taken
    schedule = [("stage1", config.data, config.max_steps, config.learning_rate)]          # 2. schedule
    if config.stage2_data:
        schedule.append(("stage2", config.stage2_data, config.stage2_max_steps or config.max_steps,
                         config.stage2_learning_rate or config.learning_rate))
    max_chars = max_chars_for(config.max_seq_length or model.max_seq_length)
    sets = [(name, _contrastive_sets(specs, config, max_chars), steps, lr) for name, specs, steps, lr in schedule]
    prepare_for_training(model, config)                                                   # 3. LoRA
    loss = contrastive_loss(model, config)
    all_stats: dict[str, Any] = {}
    for name, data, max_steps, lr in sets:                                                # 4. train each stage
        prompts = {d: {"anchor": config.prompts[d]} for d in data if d in config.prompts}
        if len(data) == 1:
            only = next(iter(data))
            train: Any = data[only]
            prompts = prompts.get(only) or None  # type: ignore[assignment]
        else:
            train = data
        steps = steps_for(sum(len(d) for d in data.values()), config, max_steps)
        ckpt = _ckpt_dir(out_dir) / name if len(sets) > 1 else _ckpt_dir(out_dir)
        trainer = _st_trainer(model, _st_args(config, ckpt, steps, lr, prompts), train, loss)
        all_stats[name] = _run_trainer(trainer, ckpt, _callbacks(ctx), config, ctx.stage_name or "contrastive",
                                       phase=name)
        logger.info("%s done: %s", name, all_stats[name])
    stats = {"stages": all_stats, "steps": sum(s["steps"] for s in all_stats.values()),
             "wall_s": round(sum(s["wall_s"] for s in all_stats.values()), 1)}
    if any("peak_gpu_mb" in s for s in all_stats.values()):
        stats["peak_gpu_mb"] = max(s.get("peak_gpu_mb", 0.0) for s in all_stats.values())
    _finish(model, out_dir, config, parent, ctx, ctx.stage_name or "contrastive", stats)  # 5. save
