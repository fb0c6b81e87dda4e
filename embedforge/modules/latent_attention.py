"""NV-Embed's latent attention pooling as a sentence-transformers module.

Lee et al., "NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models" (2024), section 3.2:
the decoder's last hidden states ``H`` (queries) attend over a trainable latent array (keys and values); the
result goes through a GEGLU MLP, both steps with residual connections, and the outputs are mean-pooled over the
text's tokens::

    H' = H + CrossAttn(LN(H), LN(latents))
    O  = H' + MLP(LN(H'))
    e  = masked_mean(O)

With ``zero_init`` (the default here) the two output projections start at zero, so an untrained head equals mean
pooling and training starts from the backbone's own mean embedding instead of from noise; NV-Embed itself
initialises everything randomly (``zero_init=False``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from embedforge.modules.common import CrossAttention, GEGLUFeedForward, TrainableHead, masked_mean, pooling_mask

logger = logging.getLogger(__name__)


class LatentAttentionPooling(TrainableHead):
    """Trainable latent-attention pooling (reads ``token_embeddings``, writes ``sentence_embedding``).

    Args:
        embedding_dimension: hidden size of the backbone's token embeddings (also the output size).
        num_latents: rows of the trainable latent array (NV-Embed: 512).
        num_heads: attention heads of the cross-attention (NV-Embed: 8).
        mlp_ratio: width multiplier of the GEGLU MLP (NV-Embed: 4).
        include_prompt: if False, instruction tokens (``prompt_length``) are left out of the final mean.
        zero_init: start the attention and MLP output projections at zero (head == mean pooling at init).
    """

    config_keys = ["embedding_dimension", "num_latents", "num_heads", "mlp_ratio", "include_prompt", "zero_init"]

    def __init__(
        self,
        embedding_dimension: int,
        num_latents: int = 512,
        num_heads: int = 8,
        mlp_ratio: int = 4,
        include_prompt: bool = True,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.embedding_dimension = embedding_dimension
        self.num_latents = num_latents
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.include_prompt = include_prompt
        self.zero_init = zero_init
        self.latents = torch.nn.Parameter(torch.randn(num_latents, embedding_dimension))
        self.norm_query = torch.nn.LayerNorm(embedding_dimension)
        self.norm_latents = torch.nn.LayerNorm(embedding_dimension)
        self.attention = CrossAttention(embedding_dimension, num_heads)
        self.norm_mlp = torch.nn.LayerNorm(embedding_dimension)
        self.mlp = GEGLUFeedForward(embedding_dimension, mlp_ratio)
        if zero_init:
            for linear in (self.attention.to_out, self.mlp.proj_out):
                torch.nn.init.zeros_(linear.weight)
                torch.nn.init.zeros_(linear.bias)

    def transform_tokens(self, hidden: Tensor) -> Tensor:
        """The per-token part of the head: cross-attention to the latents and the MLP, each with a residual."""
        latents = self.norm_latents(self.latents).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        hidden = hidden + self.attention(self.norm_query(hidden), latents)
        return hidden + self.mlp(self.norm_mlp(hidden))

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        tokens = features["token_embeddings"]
        mask = pooling_mask(features, include_prompt=self.include_prompt)
        out = self.transform_tokens(tokens.to(self.latents.dtype))
        features["sentence_embedding"] = masked_mean(out, mask)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension
