"""Runners of the ``compress`` and ``binarizer`` stages.

``run`` (compress) reads top to bottom as its steps:

1. load the model (and, when healing, encode the healing texts with it first: those are the teacher vectors);
2. prune layers, then heal towards the teacher vectors (checkpoints under ``<out_dir>.ckpt/``);
3. prune the vocabulary to a corpus;
4. quantize weights (quanto: re-applied at load time; bitsandbytes: saved pre-quantized, GPU only);
5. calibrate the embedding quantizer (int8 ranges / binary layout) and save it next to the model;
6. measure what changed (parameters, bytes, layers, vocabulary, cosine to the input model) and save.

``run_binarizer`` encodes texts with the model (cached under ``<out_dir>.ckpt/``), trains the learned multi-bit
binarizer on those vectors, appends it to the model and saves.

Both train through :mod:`embedforge.training.engine` and run under torchrun: every process trains (healing, the
binarizer) on its share of the data; only the first one writes anything, and the others wait until it has.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedforge.compress.config import BinarizerConfig, CompressConfig, EmbeddingPrecision, WeightQuant
from embedforge.configs import ConfigError, StageContext
from embedforge.errors import RunError
from embedforge.data import load_texts, max_chars_for

logger = logging.getLogger(__name__)

PROBE_TEXTS = 64
# Used to measure drift when the config names no texts of its own (no vocabulary corpus, healing or calibration).
FALLBACK_PROBES = [
    "A cyclist waits at the red light while the rain gets heavier.",
    "The committee postponed its vote on the new budget until next week.",
    "Mitochondria produce most of the chemical energy a cell needs.",
    "How can I change the delivery address of my order?",
    "Two children build a sandcastle near the edge of the water.",
    "The central bank kept interest rates unchanged for a third month.",
    "Vaccination reduced hospital admissions among older adults.",
    "My card was charged twice for the same purchase.",
]


def _load(spec: str, device: str | None = None) -> Any:
    """The input model as its stage produced it (a kept adapter merged in), with float weights to transform."""
    from embedforge.model import load_model

    return load_model(spec, device=device, merge_adapter=True, weight_quantization=False)


def _vectors(model: Any, texts: list[str], batch_size: int = 32) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False),
                          dtype=np.float32)


def _save(model: Any, out_dir: Path, *, source: str, config: Any, ctx: StageContext, metrics: dict[str, Any],
          extra: dict[str, Any], files: dict[str, str], stage: str = "compress") -> None:
    """Model dir + lineage + side files, all in one atomic rename (:func:`embedforge.model.save_model`)."""
    from embedforge.model import save_model

    save_model(model, out_dir, stage=stage, source=source, config=config, metrics=metrics,
               parent=source if Path(source).is_dir() else None, recipe_hash=ctx.recipe_hash, extra=extra,
               files=files)


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = np.sum(an * bn, axis=1)
    return {"cosine_to_input_mean": float(cos.mean()), "cosine_to_input_min": float(cos.min())}


def run(config: CompressConfig, out_dir: Path, ctx: StageContext) -> None:
    """Compress ``config.model`` into ``out_dir`` (see the module docstring for the steps)."""
    import torch

    from embedforge.backbone import keep_layers
    from embedforge.compress.pruning import count_parameters, heal
    from embedforge.compress.quantization import QUANTIZATION_FILE, EmbeddingQuantizer
    from embedforge.compress.vocab import prune_vocabulary
    from embedforge.compress.weights import WEIGHT_QUANT_FILE, load_bnb, require_bnb, weight_bytes
    from embedforge.training.engine import checkpoint_dir, is_main_process
    from embedforge.training.guard import training_settings

    out_dir = Path(out_dir)
    started = time.time()
    torch.manual_seed(config.train.seed)
    main = is_main_process()
    if not main and not config.heal:  # under torchrun, nothing to train: the first process does all the work
        _wait_for_main(out_dir, started)
        return
    if config.weights in (WeightQuant.BNB_8BIT, WeightQuant.BNB_4BIT):
        require_bnb()  # fail before any work
    # 1. model (checked against the config before any work), probe texts and (for healing) teacher vectors
    model = _load(config.model, device="cuda" if torch.cuda.is_available() else None)
    keep = _check_against_model(config, model)  # layer indices to keep, None when not pruning
    pruning = keep is not None
    metrics: dict[str, Any] = {"params_before": count_parameters(model), "weight_bytes_before": weight_bytes(model)}
    extra: dict[str, Any] = {}
    max_chars = max_chars_for(getattr(model, "max_seq_length", None))
    corpus = (load_texts(config.vocab_corpus, limit=config.vocab_limit, max_chars=max_chars,
                         purpose="vocabulary pruning") if config.vocab_corpus and main else None)
    heal_texts: list[str] = []
    teacher: np.ndarray | None = None
    if pruning and config.heal:
        heal_texts = load_texts(config.heal_data, limit=config.heal_limit, max_chars=max_chars, purpose="healing")
        teacher = _vectors(model, heal_texts, config.train.batch_size)
    probe = (corpus or heal_texts or FALLBACK_PROBES)[:PROBE_TEXTS]
    probe_before = _vectors(model, probe) if main else np.zeros((0, 0), dtype=np.float32)
    # 2. layer pruning + healing (every torchrun process trains; only the first one goes on and writes)
    if keep is not None:
        extra["layer_pruning"] = keep_layers(model, keep)
        if teacher is not None:
            healed, stats = heal(model, heal_texts, teacher, config.train, checkpoint_dir(out_dir),
                                 training_settings(config), max_seq_length=config.max_seq_length,
                                 callbacks=ctx.extra.get("train_callbacks", []))
            metrics.update(healed)
            extra["train"] = {"loss_history": stats["loss_history"], "wall_s": stats["wall_s"],
                              "resumed_from": stats["resumed_from"]}  # read by the run report
    if not main:
        _wait_for_main(out_dir, started)
        return
    # 3. vocabulary pruning
    if corpus is not None:
        extra["vocab_pruning"] = prune_vocabulary(model, corpus)
    # 4. weight quantization
    files: dict[str, str] = {}
    if config.weights == WeightQuant.QUANTO_INT8:
        weights = "int8"
        plan = {"method": "quanto", "weights": weights,
                "note": "float weights on disk; embedforge.compress.weights.load_compressed quantizes at load"}
        files[WEIGHT_QUANT_FILE] = json.dumps(plan, indent=2) + "\n"
        measured = _load_quanto_copy(model, weights)
        extra["weight_quantization"] = plan
        metrics["weight_bytes_quantized"] = weight_bytes(measured)
        metrics.update({f"quantized_{k}": v for k, v in _cosines(probe_before, _vectors(measured, probe)).items()})
    elif config.weights in (WeightQuant.BNB_8BIT, WeightQuant.BNB_4BIT):
        bits = 8 if config.weights == WeightQuant.BNB_8BIT else 4
        staging = checkpoint_dir(out_dir) / "bnb-staging"
        model.save(str(staging), safe_serialization=True)
        model = load_bnb(staging, bits)
        extra["weight_quantization"] = {"method": "bitsandbytes", "bits": bits}
        files[WEIGHT_QUANT_FILE] = json.dumps(extra["weight_quantization"], indent=2) + "\n"
    # 5. embedding quantizer
    if config.embedding_precision != EmbeddingPrecision.FLOAT32:
        precision = config.embedding_precision.value
        calib_vectors = None
        if precision in ("int8", "uint8"):
            calib_vectors = _vectors(model, load_texts(config.calibration_data, limit=config.calibration_limit,
                                                        max_chars=max_chars, purpose="calibration"))
        quantizer = EmbeddingQuantizer.calibrate(precision, calib_vectors, truncate_dim=config.truncate_dim)
        files[QUANTIZATION_FILE] = json.dumps(quantizer.to_dict(), indent=2) + "\n"
        extra["embedding_quantization"] = {"precision": precision, "truncate_dim": config.truncate_dim,
                                           "bytes_per_vector": quantizer.code_width
                                           or _code_width(precision, probe_before.shape[1], config.truncate_dim)}
    # 6. measure and save
    metrics["params_after"] = count_parameters(model)
    metrics["weight_bytes_after"] = weight_bytes(model)
    metrics.update(_cosines(probe_before, _vectors(model, probe)))
    _save(model, out_dir, source=config.model, config=config, ctx=ctx, metrics=metrics, extra=extra, files=files)
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)  # finished: checkpoints and staging are not needed
    _wait_for_main(out_dir, started)


def _wait_for_main(out_dir: Path, started: float, poll_s: float = 2.0) -> None:
    """Under torchrun, hold every process here until the first one has written ``out_dir`` (its last step), so
    that no process starts the recipe's next stage before its input exists. A barrier once training has joined the
    processes; otherwise (no healing: only the first process works) the others wait for a lineage file written
    after ``started``. A no-op in a single process."""
    import torch.distributed as dist

    from embedforge.model import LINEAGE_FILE
    from embedforge.training.engine import is_main_process, wait_until, world_size

    if world_size() <= 1:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return
    if is_main_process():
        return
    lineage = out_dir / LINEAGE_FILE
    late = wait_until(lambda: lineage.is_file() and lineage.stat().st_mtime >= started - 1.0, poll_s=poll_s)
    if late is not None:
        raise RunError(f"compress: {out_dir} was not written by the first process within {late:.0f} s; see its log")


def _check_against_model(config: CompressConfig, model: Any) -> list[int] | None:
    """Refuse settings the loaded model cannot honour (more layers or dimensions than it has), before any work.

    Returns the layer indices to keep when the config prunes layers.
    """
    from embedforge.backbone import count_layers, select_layers

    if config.heal:
        from embedforge.modules.loading import check_max_seq_length

        check_max_seq_length(model, config.max_seq_length, config.model)
    dim = model.get_embedding_dimension()
    if config.truncate_dim is not None and dim is not None and config.truncate_dim > dim:
        raise ConfigError(f"truncate_dim: {config.truncate_dim} is larger than the model's {dim} dimensions "
                          f"({config.model}); use at most {dim} or leave it unset", key="truncate_dim")
    if config.layers is None:
        return None
    return select_layers(count_layers(model), config.layers, source=config.model)


def _code_width(precision: str, dim: int, truncate_dim: int | None) -> int:
    d = min(dim, truncate_dim or dim)
    return {"float32": 4 * d, "int8": d, "uint8": d}.get(precision, (d + 7) // 8)


def _load_quanto_copy(model: Any, weights: str) -> Any:
    """A quantized deep copy of ``model`` (the saved one stays float; quanto cannot be serialized)."""
    import copy

    from embedforge.compress.weights import quantize_quanto

    clone = copy.deepcopy(model)
    quantize_quanto(clone, weights)
    return clone


def run_binarizer(config: BinarizerConfig, out_dir: Path, ctx: StageContext) -> None:
    """Train the learned binarizer on the model's vectors and save the model with it appended.

    Under torchrun every process encodes the texts and trains on its share of the vectors; only the first one
    writes anything (the vector cache, checkpoints, the model).
    """
    import torch
    from sentence_transformers.sentence_transformer.modules import Normalize

    from embedforge.compress.binarizer import binarize, train_binarizer
    from embedforge.modules.binarizer import find_binarizer
    from embedforge.training.engine import checkpoint_dir, is_main_process
    from embedforge.training.guard import training_settings

    out_dir = Path(out_dir)
    started = time.time()
    torch.manual_seed(config.train.seed)
    model = _load(config.model, device="cuda" if torch.cuda.is_available() else None)
    if find_binarizer(model) is not None:
        raise ConfigError(f"model: {config.model} already ends in a binarizer; give the model without one",
                          key="model")
    # 1. teacher vectors, cached so a rerun skips the encoding
    max_chars = max_chars_for(getattr(model, "max_seq_length", None))
    texts = load_texts(config.data, limit=config.data_limit, max_chars=max_chars, purpose="binarizer training")
    ckpt = checkpoint_dir(out_dir)
    vectors = _cached_vectors(model, texts, config.encode_batch_size, ckpt / f"vectors-{len(texts)}.npy")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    # 2. train on 90%, measure on the held-out 10%
    rng = np.random.default_rng(config.train.seed)
    order = rng.permutation(len(vectors))
    n_held = max(2, len(vectors) // 10) if len(vectors) >= 20 else 0
    held, train = vectors[order[:n_held]], vectors[order[n_held:]]
    binarizer, stats = train_binarizer(train, config, ckpt, training_settings(config),
                                       callbacks=ctx.extra.get("train_callbacks", []))
    if not is_main_process():
        _wait_for_main(out_dir, started)
        return
    metrics: dict[str, Any] = {"binarizer_loss_first": stats["loss_first"], "binarizer_loss_last": stats["loss_last"],
                               "train_vectors": len(train), "train_steps": stats["steps"]}
    if n_held:
        metrics.update(similarity_preservation(binarizer, held))
    # 3. append (after a Normalize: the binarizer was trained on unit vectors) and save
    binarizer.output = config.output
    if not isinstance(model[-1], Normalize):
        model.append(Normalize())
    codes, _ = binarize(binarizer, vectors[:2])
    model.append(binarizer.to(model.device))
    extra = {"binarizer": {"bits": config.bits, "dim": binarizer.dim, "output": config.output,
                           "code_bytes": int(codes.shape[1]), "scales": binarizer.scales.detach().tolist()},
             "train": {"loss_history": stats["loss_history"], "wall_s": stats["wall_s"],
                       "resumed_from": stats["resumed_from"]}}  # read by the run report
    _save(model, out_dir, source=config.model, config=config, ctx=ctx, metrics=metrics, extra=extra, files={},
          stage="binarizer")
    shutil.rmtree(ckpt, ignore_errors=True)  # finished: the cached vectors and checkpoints are not needed any more
    _wait_for_main(out_dir, started)


def _cached_vectors(model: Any, texts: list[str], batch_size: int, cache: Path) -> np.ndarray:
    """The model's vectors of ``texts``, read from ``cache`` when an earlier run left it; the first process writes
    it (atomically: a rerun never reads half a file), the others only read."""
    from embedforge.outputs import write_npy_atomic
    from embedforge.training.engine import is_main_process

    if cache.is_file():
        return np.load(cache)
    vectors = _vectors(model, texts, batch_size)
    if is_main_process():
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_npy_atomic(cache, vectors)
    return vectors


def similarity_preservation(binarizer: Any, vectors: np.ndarray) -> dict[str, float]:
    """Spearman (x100) between teacher cosine and code similarity over all pairs, learned vs plain sign."""
    from scipy.stats import spearmanr

    from embedforge.compress.binarizer import binarize

    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    x = x[:1000]
    iu = np.triu_indices(len(x), 1)
    teacher = (x @ x.T)[iu]
    _, recon = binarize(binarizer, x)
    sign = np.where(x > 0, 1.0, -1.0)
    return {"heldout_spearman_learned": float(spearmanr((recon @ recon.T)[iu], teacher).statistic * 100),
            "heldout_spearman_sign": float(spearmanr((sign @ sign.T)[iu], teacher).statistic * 100)}
