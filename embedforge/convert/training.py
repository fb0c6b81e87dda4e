"""Runners of the convert training stages: ``mntp``, ``simcse`` and ``contrastive``.

Each runner reads an embedder (or builds one from an LLM), trains it through the one training engine
(:mod:`embedforge.training.engine`: a sentence-transformers loss for the embedding objectives, a ``compute_loss``
function for MNTP's language-model head) with the options of its ``train:`` key, and writes a model directory.
Because the engine's trainers run on accelerate, the same stage runs on several processes unchanged::

    torchrun --nproc_per_node 4 -m embedforge.cli run recipe.yaml

Checkpoints go to ``<out_dir>.ckpt/`` every ``train.save_steps`` and on SIGTERM / Ctrl-C; a rerun with the same
settings resumes from the newest one. A NaN loss stops the run before it touches the weights
(:mod:`embedforge.training.guard`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge.configs import StageContext
from embedforge.data import load_texts, max_chars_for
from embedforge.convert.train_config import (
    AdapterTrainConfig, ContrastiveConfig, MntpConfig, SimcseConfig, data_name,
)

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


# ------------------------------------------------------------------------------------------ training


def _train(trainer: Any, ckpt: Path, config: Any, ctx: StageContext, where: str, **phase: Any) -> dict[str, Any]:
    """:func:`~embedforge.training.engine.run_training` with the stage's resume settings (``phase`` tells the
    contrastive schedule's phases apart) and the callbacks the caller put in ``ctx.extra['train_callbacks']``."""
    from embedforge.training.engine import run_training
    from embedforge.training.guard import training_settings

    return run_training(trainer, ckpt, training_settings(config, phase),
                        callbacks=ctx.extra.get("train_callbacks", []), where=where)


def _finish(model: Any, out_dir: Path, config: AdapterTrainConfig, parent: str | None, ctx: StageContext,
            stage: str, stats: dict[str, Any]) -> None:
    from embedforge.convert.train_model import finish_adapter, save_trained
    from embedforge.training.engine import checkpoint_dir, is_main_process
    from embedforge.training.guard import check_weights, last_checkpoint
    from embedforge.training.memory import peak_rss_mb

    check_weights(model, stage, last_checkpoint(checkpoint_dir(out_dir)))  # never publish NaN weights
    backbone_dir = parent
    if backbone_dir is None:
        from embedforge.sources import resolve_source

        backbone_dir = os.fspath(resolve_source(config.model))
    adapter = finish_adapter(model, config, source_backbone=backbone_dir)
    stats["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if is_main_process():
        save_trained(model, out_dir, stage=stage, config=config, parent=parent, ctx=ctx, adapter=adapter,
                     train_stats=stats)
        shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)


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


def mntp_objective(backbone: Any, head: Any) -> Any:
    """The module MNTP trains: its forward is the backbone, then :func:`masked_positions_loss` with ``head``.

    The trainer calls this module (under torchrun: the DistributedDataParallel wrapper around it), so every weight
    the loss uses, the LoRA matrices inside ``backbone`` included, is seen by the wrapper and its gradients are
    averaged over the processes.
    """
    import torch

    class MaskedNextTokenObjective(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.softcap = getattr(backbone.config, "final_logit_softcapping", None)

        def forward(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> Any:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return masked_positions_loss(hidden.last_hidden_state, labels, self.head, self.softcap)

    return MaskedNextTokenObjective()


def _objective_loss(model: Any, inputs: dict[str, Any]) -> Any:
    return model(input_ids=inputs["input_ids"], labels=inputs["labels"], attention_mask=inputs.get("attention_mask"))


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
    from embedforge.convert.train_model import add_lora, backbone_of, load_start_model
    from embedforge.training.engine import build_trainer, checkpoint_dir, trainer_arguments, world_size

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
    steps = config.train.steps(len(tokenized), world_size())
    ckpt = checkpoint_dir(out_dir)
    args = trainer_arguments(config.train, ckpt, steps, sentence_transformers=False)

    objective = mntp_objective(backbone_of(model), lm.lm_head)  # the LoRA layers sit in the backbone itself
    trainer = build_trainer(objective, args, tokenized, compute_loss=_objective_loss, data_collator=collator)
    stats = _train(trainer, ckpt, config, ctx, ctx.stage_name or "mntp")                  # 5. train
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
    from embedforge.training.engine import build_trainer, checkpoint_dir, trainer_arguments, world_size

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
    steps = config.train.steps(len(pairs), world_size())
    ckpt = checkpoint_dir(out_dir)
    args = trainer_arguments(config.train, ckpt, steps, batch_sampler=_no_duplicates())
    trainer = build_trainer(model, args, pairs, loss=loss)
    try:
        stats = _train(trainer, ckpt, config, ctx, ctx.stage_name or "simcse")           # 5. train
    finally:
        restore_dropout()
    _finish(model, out_dir, config, parent, ctx, ctx.stage_name or "simcse", stats)       # 6. save


# ----------------------------------------------------------------------------------------- contrastive


def _no_duplicates() -> Any:
    """The batch sampler of the embedding objectives: no text twice in a batch (it would be its own negative)."""
    from sentence_transformers.base.sampler import BatchSamplers

    return BatchSamplers.NO_DUPLICATES


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
    from embedforge.modules.prompts import check_model_prompts
    from embedforge.training.engine import build_trainer, checkpoint_dir, trainer_arguments, world_size

    preflight(config)                                                                     # 0. refuse early
    out_dir = Path(out_dir)
    model, parent = load_start_model(config)                                              # 1. embedder
    check_model_prompts(model, config.prompts, "prompts")  # before any data is loaded or step taken
    train = config.train
    schedule = [("stage1", config.data, train.max_steps, train.learning_rate)]            # 2. schedule
    if config.stage2_data:
        schedule.append(("stage2", config.stage2_data, config.stage2_max_steps or train.max_steps,
                         config.stage2_learning_rate or train.learning_rate))
    max_chars = max_chars_for(config.max_seq_length or model.max_seq_length)
    sets = [(name, _contrastive_sets(specs, config, max_chars), steps, lr) for name, specs, steps, lr in schedule]
    prepare_for_training(model, config)                                                   # 3. LoRA
    loss = contrastive_loss(model, config)
    all_stats: dict[str, Any] = {}
    for name, data, max_steps, lr in sets:                                                # 4. train each stage
        prompts = {d: {"anchor": config.prompts[d]} for d in data if d in config.prompts}
        if len(data) == 1:
            only = next(iter(data))
            dataset: Any = data[only]
            prompts = prompts.get(only) or None  # type: ignore[assignment]
        else:
            dataset = data
        rows = sum(len(d) for d in data.values())
        steps = dataclasses.replace(train, max_steps=max_steps).steps(rows, world_size())
        ckpt = checkpoint_dir(out_dir) / name if len(sets) > 1 else checkpoint_dir(out_dir)
        args = trainer_arguments(train, ckpt, steps, learning_rate=lr, batch_sampler=_no_duplicates(),
                                 prompts=prompts or None)
        trainer = build_trainer(model, args, dataset, loss=loss)
        all_stats[name] = _train(trainer, ckpt, config, ctx, ctx.stage_name or "contrastive", phase=name)
        logger.info("%s done: %s", name, all_stats[name])
    stats = {"stages": all_stats, "steps": sum(s["steps"] for s in all_stats.values()),
             "wall_s": round(sum(s["wall_s"] for s in all_stats.values()), 1)}
    if any("peak_gpu_mb" in s for s in all_stats.values()):
        stats["peak_gpu_mb"] = max(s.get("peak_gpu_mb", 0.0) for s in all_stats.values())
    _finish(model, out_dir, config, parent, ctx, ctx.stage_name or "contrastive", stats)  # 5. save
