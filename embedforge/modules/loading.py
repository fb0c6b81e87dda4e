"""Load sentence-transformers directories that contain embedforge modules, with the side files stages write.

sentence-transformers 6 refuses to import a module class outside its own namespace unless ``trust_remote_code``
is set, and that flag would also let ``transformers`` run a checkpoint's own modelling code. embedforge's classes
are installed code, not code shipped with the checkpoint, so :func:`load_embedder` resolves exactly those
``modules.json`` entries to the imported classes and keeps ``trust_remote_code`` off for everything else.

Some stages write a model whose ``SentenceTransformer(dir)`` is *not* the model they trained: ``adapter: keep``
saves the untouched backbone plus a LoRA adapter in ``adapter/``, and ``compress`` with ``weights: quanto-int8``
saves float weights plus ``weight_quantization.json`` (bitsandbytes weights reload quantized from ``config.json``
but need a GPU). :func:`load_saved` reads what ``embedforge.json`` records (and which side files are there) and
puts those pieces back, so a directory loads as the model its stage produced.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge.errors import UsageError
from embedforge.modules.weight_quant import WEIGHT_QUANT_FILE

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # where ``adapter: keep`` saves the LoRA adapter (convert's training stages)
WEIGHT_QUANT_METHODS = ("quanto", "bitsandbytes")


@dataclass(frozen=True)
class SavedExtras:
    """What a saved model needs on top of ``SentenceTransformer(dir)`` to be the model its stage produced."""

    adapter: Path | None = None
    """Folder of a kept LoRA adapter (``adapter/``), or None."""
    weight_quantization: dict[str, Any] | None = None
    """The weight quantization plan (``{"method": "quanto", "weights": "int8"}`` ...), or None."""


def saved_extras(path: str | os.PathLike[str]) -> SavedExtras:
    """Read which side files a model directory carries, from its ``embedforge.json`` and the files themselves.

    Raises :class:`~embedforge.errors.UsageError` when the lineage records a side file that is missing or one this
    version cannot apply, so a damaged directory never loads silently as a different model.
    """
    from embedforge.outputs import LINEAGE_FILE

    root = Path(path)
    lineage_file = root / LINEAGE_FILE
    try:
        extra = (json.loads(lineage_file.read_text()).get("extra") or {}) if lineage_file.is_file() else {}
    except json.JSONDecodeError as err:
        raise UsageError(f"{lineage_file}: not valid JSON ({err.msg}, line {err.lineno}); restore the file or "
                         "rerun the stage that wrote this model") from err
    extra = extra if isinstance(extra, dict) else {}

    adapter: Path | None = None
    recorded_adapter = extra.get("adapter")
    adapter_dir = root / (recorded_adapter if isinstance(recorded_adapter, str) else ADAPTER_DIR)
    if (adapter_dir / "adapter_config.json").is_file():
        adapter = adapter_dir
    elif recorded_adapter:
        raise UsageError(f"{root}: embedforge.json records a kept LoRA adapter but {adapter_dir}/adapter_config.json "
                         "is missing; copy the whole model directory (adapter/ included) or rerun the stage")

    plan: dict[str, Any] | None = None
    plan_file = root / WEIGHT_QUANT_FILE
    if plan_file.is_file():
        try:
            plan = json.loads(plan_file.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"{plan_file}: not valid JSON ({err.msg}); restore it or rerun the compress stage") \
                from err
    elif isinstance(extra.get("weight_quantization"), dict):
        plan = extra["weight_quantization"]
    if plan is not None and plan.get("method") not in WEIGHT_QUANT_METHODS:
        raise UsageError(f"{root}: unknown weight quantization method {plan.get('method')!r} in {WEIGHT_QUANT_FILE} "
                         f"(this embedforge applies {', '.join(WEIGHT_QUANT_METHODS)}); upgrade embedforge")
    return SavedExtras(adapter=adapter, weight_quantization=plan)


def load_saved(
    path: str | os.PathLike[str], *, device: str | None = None, trust_remote_code: bool = False,
    merge_adapter: bool = True, weight_quantization: bool = True, **kwargs: Any,
) -> SentenceTransformer:
    """Load a saved model directory as the model its stage produced (see the module docstring).

    Args:
        path: the model directory.
        device: torch device; bitsandbytes weights default to ``cuda``, everything else to ``cpu``.
        trust_remote_code: passed to transformers for the checkpoint's own code.
        merge_adapter: merge a kept LoRA adapter into the backbone's weights (True: a plain model whose vectors are
            the adapted model's), or keep it as a peft wrapper (False: to train or inspect the adapter itself).
        weight_quantization: re-apply a quanto weight quantization plan (False loads the float weights on disk,
            for stages that transform the weights themselves, such as ONNX export).
        **kwargs: passed to ``SentenceTransformer`` (``truncate_dim``, ``model_kwargs`` ...).
    """
    extras = saved_extras(path)
    method = (extras.weight_quantization or {}).get("method")
    if method == "bitsandbytes":
        device = _bnb_device(path, device)
    model = load_embedder(path, device=device, trust_remote_code=trust_remote_code, **kwargs)
    if extras.adapter is not None:
        apply_adapter(model, extras.adapter, merge=merge_adapter)
    if method == "quanto" and weight_quantization:
        from embedforge.modules.weight_quant import quantize_quanto

        quantize_quanto(model, (extras.weight_quantization or {}).get("weights", "int8"))
    _warn_merging_prompts(model, path)
    return model


def _warn_merging_prompts(model: SentenceTransformer, path: str | os.PathLike[str]) -> None:
    """Warn about a saved prompt that pools wrongly (models saved before embedforge refused such prompts)."""
    from embedforge.configs import ConfigError
    from embedforge.modules.prompts import check_model_prompts

    try:
        check_model_prompts(model, dict(getattr(model, "prompts", None) or {}), "prompts")
    except ConfigError as err:
        logger.warning("%s: saved prompt %s; set model.prompts to the fixed prompt (vectors of texts encoded with "
                       "the old one change a little)", path, err)


def _bnb_device(path: str | os.PathLike[str], device: str | None) -> str:
    """The device for a model with bitsandbytes weights; a clear error where bitsandbytes cannot run."""
    from embedforge.modules.weight_quant import WeightQuantError, require_bnb

    try:
        require_bnb()
    except WeightQuantError as err:
        raise UsageError(f"{path} holds bitsandbytes-quantized weights, which load only on a CUDA GPU: {err}") from err
    return device or "cuda"


def apply_adapter(model: SentenceTransformer, adapter_dir: str | os.PathLike[str], *, merge: bool = True) -> None:
    """Put a saved LoRA adapter back on the backbone in ``model[0]`` (in place), merged into its weights or not."""
    from peft import PeftModel

    first = model[0]
    backbone = getattr(first, "auto_model", None)
    if backbone is None:
        raise UsageError(f"{adapter_dir}: a LoRA adapter needs a transformers backbone as the first module, "
                         f"not {type(first).__name__}")
    wrapped = PeftModel.from_pretrained(backbone, os.fspath(adapter_dir))
    wrapped.eval()
    new = wrapped.merge_and_unload() if merge else wrapped
    if "model" in first._modules:  # sentence-transformers >= 6 keeps the backbone in ``.model``
        first.model = new
    else:
        first.auto_model = new
    logger.info("applied the LoRA adapter in %s (%s)", adapter_dir, "merged into the weights" if merge else "kept")


def module_classes_for(path: str | os.PathLike[str]) -> dict[str, type]:
    """``{modules.json type: installed class}`` for every embedforge module of the saved model at ``path``."""
    modules_json = Path(path) / "modules.json"
    if not modules_json.is_file():
        return {}
    from embedforge.modules.portable import installed_class

    classes: dict[str, type] = {}
    for entry in json.loads(modules_json.read_text()):
        ref = entry.get("type", "")
        if (cls := installed_class(ref)) is not None:  # embedforge.* or a shipped copy's embedforge_* name
            classes[ref] = cls
    return classes


def load_embedder(
    path: str | os.PathLike[str], *, device: str | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> SentenceTransformer:
    """``SentenceTransformer(path)`` that also resolves embedforge's own module classes.

    Uses sentence-transformers' ``_load_with_module_classes`` hook where it exists (the path its trainer uses to
    reload a model); on versions without it, falls back to ``trust_remote_code=True`` only when the checkpoint's
    ``config.json`` declares no custom code (``auto_map``).
    """
    from sentence_transformers import SentenceTransformer

    path = os.fspath(path)
    classes = module_classes_for(path)
    kwargs = {"device": device or "cpu", "trust_remote_code": trust_remote_code, **kwargs}
    loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
    if not classes:
        model = SentenceTransformer(path, **kwargs)
    elif loader is not None:
        model = loader(path, classes, **kwargs)
    else:
        config = Path(path) / "config.json"
        if not trust_remote_code and config.is_file() and "auto_map" in json.loads(config.read_text()):
            raise ValueError(f"{path} ships its own model code (auto_map); pass trust_remote_code=True to load it")
        model = SentenceTransformer(path, **{**kwargs, "trust_remote_code": True})
    return fix_weighted_mean_padding(model)


def _pools_weighted_mean(module: Any) -> bool:
    mode = getattr(module, "pooling_mode", None)  # a string, or a tuple when several modes are combined
    return mode == "weightedmean" or (isinstance(mode, tuple) and "weightedmean" in mode)


def fix_weighted_mean_padding(model: SentenceTransformer) -> SentenceTransformer:
    """Pad on the right when a weighted-mean model that pads on the left is loaded on sentence-transformers < 6.1.

    Before 6.1 the weighted mean weighs each token by its absolute position, so left padding gives padded rows
    wrong vectors. Such a model can only have been built on 6.1 or later (``build_embedder`` refuses it before).
    Pooling by weighted mean never needs left padding, and right padding gives the same vectors on every version,
    so the tokenizer is switched and a warning says so.
    """
    from embedforge.modules.prompts import weighted_mean_handles_left_padding

    tokenizer = getattr(model[0], "tokenizer", None) if len(model) else None
    weighted = any(_pools_weighted_mean(m) for m in model)
    if (weighted and getattr(tokenizer, "padding_side", None) == "left"
            and not weighted_mean_handles_left_padding()):
        tokenizer.padding_side = "right"
        logger.warning("this sentence-transformers (< 6.1) pools weightedmean wrongly with left padding; the model "
                       "now pads on the right, which gives the vectors it was built for")
    return model


_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: Any) -> int | None:
    """The most tokens the model's learned absolute position table can index, or None when it has no such table
    (rotary / relative positions, static token tables): reading longer inputs would index past its end.

    Accepts a SentenceTransformer, one of its modules, or a transformers model. RoBERTa-style tables start after
    the padding index and OPT-style ones after an ``offset``; both are subtracted.
    """
    from torch import nn

    first = model[0] if hasattr(model, "_first_module") or isinstance(model, nn.Sequential) else model
    hf = getattr(first, "auto_model", None) or getattr(first, "model", None) or first
    if not isinstance(hf, nn.Module):
        return None
    for name, module in hf.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            offset = int(getattr(module, "offset", 0) or 0)
            pad = module.padding_idx
            return int(module.num_embeddings) - offset - (pad + 1 if pad is not None else 0)
    return None


def check_max_seq_length(model: Any, max_seq_length: int | None, source: str) -> None:
    """Refuse a ``max_seq_length`` longer than the model's position table (see :func:`position_limit`)."""
    from embedforge.configs import ConfigError

    if max_seq_length is None:
        return
    limit = position_limit(model)
    if limit is not None and max_seq_length > limit:
        raise ConfigError(f"max_seq_length: {max_seq_length} is more than {source} can read (its position "
                          f"embeddings cover {limit} tokens); use at most {limit}", key="max_seq_length")
