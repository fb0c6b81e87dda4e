"""Build a sentence-transformers embedder around a decoder LLM.

:func:`build_embedder` returns ``SentenceTransformer([backbone, pooling head, (Normalize)])``:

1. resolve the source (hub id, directory, GGUF file or alias) with :func:`embedforge.sources.resolve_source`;
2. load the backbone as sentence-transformers' own ``Transformer`` module (``AutoModel``, no LM head), pinned to
   plain-text inputs so a chat template is never applied; echo pooling uses :class:`EchoTransformer` instead;
3. fix the tokenizer for embedding: a pad token (decoders often have none), the padding side, and an EOS token
   appended to every input for last-token pooling (written into ``tokenizer.json`` so reloads keep it);
4. switch the attention to bidirectional with ``config.is_causal = False`` (:mod:`.bidirectional`);
5. add the pooling head: sentence-transformers ``Pooling`` for mean / weighted mean / last token, the embedforge
   modules for latent attention, multi-layer and echo pooling; instruction tokens are excluded from pooling;
6. attach the query / document prompts.

Models whose modules are all sentence-transformers classes load with a plain ``SentenceTransformer(dir)``; those
with an embedforge head load with :func:`embedforge.modules.load_embedder`, or, once saved with
:func:`embedforge.model.save_model` (which ships the head's code), with ``SentenceTransformer(dir,
trust_remote_code=True)`` without embedforge.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from embedforge.convert.bidirectional import set_bidirectional
from embedforge.convert.config import ConvertConfig, PoolingMode
from embedforge.modules.prompts import (  # noqa: F401  (prompt checks moved to modules; re-exported here)
    check_model_prompts, check_prompt_tokens, pools_without_prompt, prompt_merges_with_text,
    weighted_mean_handles_left_padding,
)

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

#: Pin the backbone to the text modality: with a chat template present sentence-transformers would otherwise wrap
#: every text in it.
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def ensure_pad_token(tokenizer: Any, model: Any | None = None) -> None:
    """Give a tokenizer without a pad token one: its unk token if it has a distinct one, else its eos token."""
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None and tokenizer.unk_token not in (tokenizer.eos_token, tokenizer.bos_token):
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError("the tokenizer has no pad, unk or eos token to pad with")
        logger.info("tokenizer had no pad token; using %r", tokenizer.pad_token)
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def adds_eos(tokenizer: Any) -> bool:
    """True when the tokenizer already appends its EOS token to a single text."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and len(ids) > 0 and ids[-1] == tokenizer.eos_token_id


def append_eos_token(tokenizer: Any) -> None:
    """Make a fast tokenizer append EOS to every text, keeping whatever it puts in front (e.g. BOS).

    The template is written into the backend tokenizer's post-processor, which ``tokenizer.json`` stores, so the
    behaviour survives save and a plain reload. Truncation then keeps room for the EOS token.
    """
    from tokenizers import processors

    if tokenizer.eos_token is None:
        raise ValueError("last-token pooling needs an EOS token, and this tokenizer has none")
    if adds_eos(tokenizer):
        return
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    lead = full[: max(0, len(full) - len(plain))] if full[len(full) - len(plain):] == plain else []
    lead_tokens = tokenizer.convert_ids_to_tokens(lead)
    specials = {tok: idx for tok, idx in zip(lead_tokens, lead)}
    specials[tokenizer.eos_token] = tokenizer.eos_token_id
    prefix = " ".join(f"{t}:0" for t in lead_tokens)
    single = f"{prefix} $A:0 {tokenizer.eos_token}:0".strip()
    pair = f"{single} $B:1 {tokenizer.eos_token}:1"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(specials.items())
    )
    if not adds_eos(tokenizer):
        raise RuntimeError("could not make the tokenizer append its EOS token")


def _check_padding(cfg: ConvertConfig) -> None:
    if (cfg.pooling == PoolingMode.WEIGHTED_MEAN and cfg.padding_side.value == "left"
            and not weighted_mean_handles_left_padding()):
        raise ValueError(
            "pooling weightedmean with padding_side left needs sentence-transformers >= 6.1 (the installed version "
            "weighs tokens by absolute position, so padded rows would get wrong vectors); use padding_side right "
            "or upgrade sentence-transformers"
        )


def _check_prompts(tokenizer: Any, cfg: ConvertConfig) -> None:
    if cfg.pooling == PoolingMode.ECHO or cfg.include_prompt:
        return  # echo tokenizes the prompt on its own; included prompts are not cut
    for name, prompt in (("query_prompt", cfg.query_prompt), ("doc_prompt", cfg.doc_prompt)):
        if prompt:
            check_prompt_tokens(tokenizer, prompt, name)


def _load_backbone(source: str, cfg: ConvertConfig) -> Any:
    """Step 2: the sentence-transformers input module around the decoder."""
    model_kwargs: dict[str, Any] = {"dtype": _torch_dtype(cfg.dtype.value), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation.value != "auto":
        model_kwargs["attn_implementation"] = cfg.attn_implementation.value
    kwargs: dict[str, Any] = dict(
        model_kwargs=model_kwargs,
        processor_kwargs={"trust_remote_code": cfg.trust_remote_code},
        config_kwargs={"trust_remote_code": cfg.trust_remote_code},
        max_seq_length=cfg.max_seq_length,
        modality_config=TEXT_ONLY,
        module_output_name="token_embeddings",
    )
    if cfg.pooling == PoolingMode.ECHO:
        from embedforge.modules.echo import EchoTransformer

        return EchoTransformer(source, echo_template=cfg.echo_template, **kwargs)
    from sentence_transformers.base.modules import Transformer

    return Transformer(source, **kwargs)


def _make_head(backbone: Any, cfg: ConvertConfig) -> Any:
    """Step 5: the pooling head."""
    import torch

    dim = backbone.get_embedding_dimension()
    mode = cfg.pooling
    include_prompt = cfg.include_prompt
    if mode in (PoolingMode.MEAN, PoolingMode.WEIGHTED_MEAN, PoolingMode.LAST_TOKEN):
        from sentence_transformers.sentence_transformer.modules import Pooling

        return Pooling(dim, pooling_mode=mode.value, include_prompt=include_prompt)
    torch.manual_seed(cfg.seed)
    if mode == PoolingMode.LATENT_ATTENTION:
        from embedforge.modules.latent_attention import LatentAttentionPooling

        return LatentAttentionPooling(
            dim, num_latents=cfg.latent_count, num_heads=cfg.latent_heads, mlp_ratio=cfg.latent_mlp_ratio,
            include_prompt=include_prompt, zero_init=cfg.zero_init_heads,
        )
    if mode == PoolingMode.MULTI_LAYER:
        from embedforge.modules.multilayer import MultiLayerPooling

        backbone.auto_model.config.output_hidden_states = True
        return MultiLayerPooling(
            dim, num_hidden_states=backbone.auto_model.config.num_hidden_layers + 1,
            layers=cfg.multilayer_layers, num_queries=cfg.multilayer_queries, num_heads=cfg.multilayer_heads,
            include_prompt=include_prompt, zero_init=cfg.zero_init_heads,
        )
    if mode == PoolingMode.ECHO:
        from embedforge.modules.echo import EchoPooling

        return EchoPooling(dim, **backbone.echo_lengths())
    raise ValueError(f"unknown pooling {mode!r}")


def build_embedder_from_config(cfg: ConvertConfig, *, device: str | None = None) -> SentenceTransformer:
    """Build the zero-shot embedder a :class:`ConvertConfig` describes (see module docstring for the steps)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    from embedforge.modules.loading import check_max_seq_length
    from embedforge.sources import resolve_source

    _check_padding(cfg)
    source = os.fspath(resolve_source(cfg.model))                            # 1
    backbone = _load_backbone(source, cfg)                                    # 2
    check_max_seq_length(backbone, cfg.max_seq_length, cfg.model)
    tokenizer = backbone.tokenizer                                            # 3
    ensure_pad_token(tokenizer, backbone.auto_model)
    tokenizer.padding_side = cfg.padding_side.value
    append = cfg.append_eos if cfg.append_eos is not None else cfg.pooling == PoolingMode.LAST_TOKEN
    if append:
        append_eos_token(tokenizer)
    _check_prompts(tokenizer, cfg)
    backbone.auto_model.config.use_cache = False
    set_bidirectional(backbone.auto_model, cfg.bidirectional)                 # 4
    head = _make_head(backbone, cfg)                                          # 5
    modules = [backbone, head] + ([Normalize()] if cfg.normalize else [])
    prompts = {name: text for name, text in (("query", cfg.query_prompt), ("document", cfg.doc_prompt)) if text}
    model = SentenceTransformer(modules=modules, prompts=prompts or None, device=device or "cpu")  # 6
    logger.info(
        "built %s embedder from %s: %s attention, %s pooling", type(backbone.auto_model).__name__, cfg.model,
        "bidirectional" if cfg.bidirectional else "causal", cfg.pooling.value,
    )
    return model


def build_embedder(
    source: str | os.PathLike[str],
    *,
    pooling: str | PoolingMode = "mean",
    bidirectional: bool = True,
    normalize: bool = True,
    max_seq_length: int = 512,
    prompts: dict[str, str] | None = None,
    device: str | None = None,
    **options: Any,
) -> SentenceTransformer:
    """Build a zero-shot embedder from an LLM.

    Args:
        source: hub id, local directory, ``.gguf`` file or alias.
        pooling: one of :class:`PoolingMode` (mean, weightedmean, lasttoken, latent_attention, multi_layer, echo).
        bidirectional: switch the attention to bidirectional.
        normalize: append a ``Normalize`` module.
        max_seq_length: truncation length in tokens.
        prompts: ``{"query": ..., "document": ...}`` instructions; their tokens are excluded from pooling.
        device: torch device (default cpu).
        **options: any other :class:`ConvertConfig` field (echo_template, latent_count, dtype, padding_side,
            trust_remote_code, append_eos, ...).
    """
    prompts = dict(prompts or {})
    unknown = set(prompts) - {"query", "document"}
    if unknown:
        raise ValueError(f"prompts: unknown names {sorted(unknown)}; use 'query' and 'document'")
    cfg = ConvertConfig(
        model=os.fspath(source), pooling=pooling, bidirectional=bidirectional, normalize=normalize,
        max_seq_length=max_seq_length, query_prompt=prompts.get("query"), doc_prompt=prompts.get("document"),
        **options,
    )
    return build_embedder_from_config(cfg, device=device)
