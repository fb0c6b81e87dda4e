"""Model preparation shared by the convert training stages: load the embedder, truncate, LoRA / QLoRA, finish.

The embedder is a sentence-transformers model whose first module holds the decoder as ``auto_model``. LoRA is put
on that decoder with peft (``get_peft_model``); at the end :func:`finish_adapter` merges it into the weights or
takes it off again and returns it to be saved in ``adapter/`` beside the model (:func:`load_with_adapter` puts it
back on).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge.convert.train_config import AdapterMode, AdapterTrainConfig, Quantization
from embedforge.modules.loading import ADAPTER_DIR  # the model format names the kept adapter's folder
# the memory helpers moved to embedforge.training.memory; re-exported for scripts that import them from here
from embedforge.training.memory import peak_gpu_mb, peak_rss_mb, release_memory, reset_peak_gpu  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

from embedforge.training.qlora import GPU_EXTRA, require_qlora  # noqa: F401 (GPU_EXTRA re-exported)

logger = logging.getLogger(__name__)



def load_start_model(config: AdapterTrainConfig) -> tuple[SentenceTransformer, str | None]:
    """The embedder a stage trains, and its directory (None when it was built from an LLM source).

    An embedforge / sentence-transformers directory is loaded as is; anything else is treated as an LLM source and
    built into a bidirectional mean-pooling embedder first.
    """
    from embedforge.model import load_model

    path = Path(config.model)
    if (path / "modules.json").is_file():  # as its stage produced it: a kept adapter merged in, float weights
        model = load_model(path, trust_remote_code=config.trust_remote_code, weight_quantization=False)
        parent: str | None = os.fspath(path)
    else:
        from embedforge.convert.embedder import build_embedder

        logger.info("%s is not a model directory: building a bidirectional mean-pooling embedder from it",
                    config.model)
        model = build_embedder(config.model, pooling="mean", bidirectional=True,
                               trust_remote_code=config.trust_remote_code)
        parent = None
    if config.layers is not None:
        from embedforge.backbone import apply_layers

        apply_layers(model, config.layers, source=config.model)
    if config.max_seq_length is not None:
        from embedforge.modules.loading import check_max_seq_length

        check_max_seq_length(model, config.max_seq_length, config.model)
        model.max_seq_length = config.max_seq_length
    return model, parent


def backbone_of(model: Any) -> Any:
    """The decoder (``transformers`` model) inside an embedder's first module."""
    first = model[0]
    if not hasattr(first, "auto_model"):
        raise TypeError(f"the first module ({type(first).__name__}) holds no transformers model")
    return first.auto_model


def set_backbone(model: Any, backbone: Any) -> None:
    """Replace the decoder inside the embedder's first module (sentence-transformers 6 keeps it in ``.model``)."""
    first = model[0]
    if "model" in first._modules:
        first.model = backbone
    else:
        first.auto_model = backbone




def preflight(config: AdapterTrainConfig) -> None:
    """Checks that need this machine, run before anything is loaded (the config itself is checked at parse time)."""
    if config.quantization == Quantization.NF4:
        require_qlora()


def quantize_backbone(model: Any, config: AdapterTrainConfig) -> None:
    """Replace the backbone by an NF4-quantized copy of itself (QLoRA), ready for k-bit training."""
    import tempfile

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModel, BitsAndBytesConfig

    require_qlora()
    backbone = backbone_of(model)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        backbone.save_pretrained(tmp)
        quantized = AutoModel.from_pretrained(tmp, quantization_config=bnb, device_map={"": 0})
    quantized.config.is_causal = backbone.config.is_causal
    quantized.config.use_cache = False
    set_backbone(model, prepare_model_for_kbit_training(
        quantized, use_gradient_checkpointing=config.gradient_checkpointing
    ))


def add_lora(target: Any, config: AdapterTrainConfig) -> Any:
    """Wrap ``target`` (a transformers model) in a peft LoRA model; returns the wrapper."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(config.train.seed)  # the LoRA matrices' initial values
    targets: Any = config.lora_targets
    if list(targets) == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(target, lora)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s: %d of %d parameters trainable", config.lora_r, targets, trainable, total)
    return peft_model


def prepare_for_training(model: Any, config: AdapterTrainConfig) -> None:
    """Quantize (QLoRA), enable gradient checkpointing and put LoRA on the backbone of ``model``, in place."""
    from transformers import set_seed

    set_seed(config.train.seed)  # the LoRA matrices' initial values
    if config.quantization == Quantization.NF4:
        quantize_backbone(model, config)
    backbone = backbone_of(model)
    backbone.config.use_cache = False
    if config.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r > 0:
        set_backbone(model, add_lora(backbone, config))
    model.train()


def finish_adapter(model: Any, config: AdapterTrainConfig, source_backbone: str | None = None) -> Path | None:
    """End of training: merge the LoRA adapter (returns None) or unload it, returning a temporary folder that
    holds the saved adapter.

    With QLoRA the adapter is merged into a full-precision reload of the backbone (``source_backbone``), never
    into the 4-bit weights.
    """
    from peft import PeftModel

    wrapper = model[0].auto_model
    if not isinstance(wrapper, PeftModel):
        return None
    if config.quantization == Quantization.NF4:
        import tempfile

        from transformers import AutoModel

        if source_backbone is None:
            raise RuntimeError("QLoRA: the full-precision backbone's folder is needed to merge the adapter")
        with tempfile.TemporaryDirectory() as tmp:
            wrapper.save_pretrained(tmp)
            full = AutoModel.from_pretrained(source_backbone)
            if config.layers is not None:
                from embedforge.backbone import apply_layers

                apply_layers(full, config.layers, source=source_backbone)  # the same cut as the trained model
            full.config.is_causal = wrapper.get_base_model().config.is_causal
            wrapper = PeftModel.from_pretrained(full, tmp)
    if config.adapter == AdapterMode.MERGE:
        set_backbone(model, wrapper.merge_and_unload())
        logger.info("merged the LoRA adapter into the backbone")
        return None
    import tempfile

    saved = Path(tempfile.mkdtemp(prefix="embedforge-adapter-"))
    wrapper.save_pretrained(os.fspath(saved))  # before unload(), which strips the LoRA layers
    set_backbone(model, wrapper.unload())
    return saved


def load_with_adapter(path: str | os.PathLike[str], *, device: str | None = None) -> SentenceTransformer:
    """Load a model saved with ``adapter: keep`` and put its LoRA adapter (``adapter/``) back on the backbone.

    ``SentenceTransformer(path)`` alone gives the backbone *without* the adapter.
    """
    from peft import PeftModel

    from embedforge.modules import load_embedder

    model = load_embedder(path, device=device)
    adapter_dir = Path(path) / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: no LoRA adapter in {ADAPTER_DIR}/ (was it trained with adapter: keep?)")
    set_backbone(model, PeftModel.from_pretrained(model[0].auto_model, os.fspath(adapter_dir)))
    model.eval()
    return model


def save_trained(
    model: Any, out_dir: Path, *, stage: str, config: Any, parent: str | None, ctx: Any,
    adapter: Path | None = None, train_stats: dict[str, Any] | None = None,
) -> Path:
    """Write the trained embedder (and, with ``adapter: keep``, its adapter in ``adapter/``) atomically."""
    from embedforge.model import read_lineage, save_model

    model.eval()
    source = (read_lineage(parent).get("source") if parent else None) or config.model
    extra: dict[str, Any] = {"train": train_stats or {}}
    if adapter is not None:
        extra["adapter"] = ADAPTER_DIR
    save_model(model, out_dir, stage=stage, source=source, config=config, parent=parent,
               recipe_hash=getattr(ctx, "recipe_hash", None), extra=extra,
               folders={ADAPTER_DIR: adapter} if adapter is not None else None)
    if adapter is not None:
        shutil.rmtree(adapter, ignore_errors=True)
    return out_dir
