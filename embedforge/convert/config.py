"""Config of the ``convert`` stage: an LLM becomes a zero-shot embedder (torch-free).

The stage loads the decoder, switches its attention to bidirectional (or keeps it causal), puts a pooling head
after it and saves a sentence-transformers directory. Training stages (MNTP, SimCSE, contrastive) start from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from embedforge.backbone import LAYERS_HELP, LayerSpec, check_layers
from embedforge.configs import check, choice, opt


class PoolingMode(str, enum.Enum):
    """How token states become one vector."""

    MEAN = "mean"                      # masked mean (sentence-transformers Pooling)
    WEIGHTED_MEAN = "weightedmean"     # position-weighted mean, SGPT (sentence-transformers Pooling)
    LAST_TOKEN = "lasttoken"           # state of the appended EOS token (sentence-transformers Pooling)
    LATENT_ATTENTION = "latent_attention"  # NV-Embed latent attention head (trainable)
    MULTI_LAYER = "multi_layer"        # learned queries over per-layer means (trainable)
    ECHO = "echo"                      # text repeated in a template, second copy mean-pooled

    @classmethod
    def _missing_(cls, value: object) -> PoolingMode | None:
        """Accept common spellings: ``last_token``, ``weighted_mean``, ``latent``, ``multilayer``, case-insensitive."""
        if not isinstance(value, str):
            return None
        key = value.strip().lower().replace("-", "_")
        aliases = {"last_token": "lasttoken", "weighted_mean": "weightedmean", "latent": "latent_attention",
                   "multilayer": "multi_layer", "nv_embed": "latent_attention"}
        key = aliases.get(key, key)
        return next((m for m in cls if m.value == key), None)


class DType(str, enum.Enum):
    """Weights' dtype when loading the backbone."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    AUTO = "auto"


class AttnImplementation(str, enum.Enum):
    """transformers attention kernel; ``auto`` lets transformers pick (sdpa where available)."""

    AUTO = "auto"
    EAGER = "eager"
    SDPA = "sdpa"
    FLEX = "flex_attention"
    FLASH2 = "flash_attention_2"


class PaddingSide(str, enum.Enum):
    """Which end of a batch row the pad tokens go to."""

    RIGHT = "right"
    LEFT = "left"


#: Pooling modes that sentence-transformers' own ``Pooling`` module implements.
ST_POOLING_MODES = (PoolingMode.MEAN, PoolingMode.WEIGHTED_MEAN, PoolingMode.LAST_TOKEN)


@dataclass
class ConvertConfig:
    """Turn a decoder LLM into a zero-shot embedding model (bidirectional attention + pooling head)."""

    model: str = opt(help="the LLM: hub id, local directory, .gguf file or alias (smollm2-135m)")
    pooling: PoolingMode = opt(
        PoolingMode.MEAN,
        help="mean | weightedmean | lasttoken | latent_attention | multi_layer | echo",
    )
    bidirectional: bool = opt(True, help="switch attention to bidirectional (config.is_causal=False)")
    normalize: bool = opt(True, help="L2-normalize embeddings (adds a Normalize module)")
    max_seq_length: int = opt(512, help="longest input in tokens; longer texts are truncated")
    query_prompt: str | None = opt(
        None, help="instruction put before queries (saved as the model's 'query' prompt; excluded from pooling); "
        "end it with a newline, not a space, which BPE tokenizers merge into the text's first word"
    )
    doc_prompt: str | None = opt(
        None, help="instruction put before documents (saved as the 'document' prompt; excluded from pooling)"
    )
    include_prompt: bool = opt(False, help="pool over the prompt's tokens too (default: exclude them)")
    append_eos: bool | None = opt(
        None, help="append the EOS token to every input (default: only for lasttoken pooling)"
    )
    padding_side: PaddingSide = opt(PaddingSide.RIGHT, help="right | left (every head handles both)")
    echo_template: str = opt(
        "Rewrite the sentence: {text}\nRewritten sentence: {text}",
        help="echo pooling only: the template, with {text} exactly twice; the second copy is pooled",
    )
    latent_count: int = opt(512, help="latent_attention: rows of the trainable latent array (NV-Embed: 512)")
    latent_heads: int = opt(8, help="latent_attention: attention heads (must divide the hidden size)")
    latent_mlp_ratio: int = opt(4, help="latent_attention: GEGLU MLP width multiplier")
    multilayer_layers: list[int] | None = opt(
        None, help="multi_layer: hidden-state indices to pool (0 = embeddings, -1 = last); default all layers"
    )
    multilayer_queries: int = opt(4, help="multi_layer: learned queries")
    multilayer_heads: int = opt(4, help="multi_layer: attention heads (must divide the hidden size)")
    zero_init_heads: bool = opt(
        True, help="trainable heads start as mean pooling (zero output projections); False = random (NV-Embed)"
    )
    layers: LayerSpec | None = opt(None, help=LAYERS_HELP + "; unset keeps all (fewer: a cheaper embedder)")
    dtype: DType = opt(DType.FLOAT32, help="float32 | bfloat16 | float16 | auto")
    attn_implementation: AttnImplementation = opt(
        AttnImplementation.AUTO, help="auto | eager | sdpa | flex_attention | flash_attention_2"
    )
    trust_remote_code: bool = opt(False, help="allow the model's own Python code (off unless you trust it)")
    seed: int = opt(0, help="seed for the trainable heads' initial weights")
    eval_tasks: list[str] = opt(
        factory=list, help="built-in tasks to score the converted model on (e.g. [stsb-dev]); recorded in lineage"
    )

    def __post_init__(self) -> None:
        self.pooling = choice(PoolingMode, self.pooling, "pooling")
        self.dtype = choice(DType, self.dtype, "dtype")
        self.attn_implementation = choice(AttnImplementation, self.attn_implementation, "attn_implementation")
        self.padding_side = choice(PaddingSide, self.padding_side, "padding_side")
        check(bool(self.model), "model", "name the LLM to convert")
        check(self.max_seq_length > 0, "max_seq_length", "must be positive")
        check_layers(self.layers)
        check(self.layers is None or self.pooling != PoolingMode.MULTI_LAYER, "layers",
              "cannot be combined with multi_layer pooling (its head is sized to the layers)")
        check(self.latent_count > 0, "latent_count", "must be positive")
        check(self.latent_heads > 0, "latent_heads", "must be positive")
        check(self.latent_mlp_ratio > 0, "latent_mlp_ratio", "must be positive")
        check(self.multilayer_queries > 0, "multilayer_queries", "must be positive")
        check(self.multilayer_heads > 0, "multilayer_heads", "must be positive")
        if self.pooling == PoolingMode.ECHO:
            check(
                self.echo_template.count("{text}") == 2, "echo_template", "must contain {text} exactly twice"
            )
