"""Trainable multi-layer pooling: learned queries attend over per-layer sentence states.

Each selected hidden layer of the backbone is mean-pooled over the text's tokens, a learned layer embedding is
added to it, and a few learned queries cross-attend over these per-layer vectors; the queries' outputs are averaged
and projected. The result is added to the last selected layer's mean, and the projection starts at zero, so an
untrained head equals mean pooling of that layer and training learns how much the other layers should contribute.
Intermediate layers often carry more transferable sentence information than the last layer of a decoder trained for
next-token prediction (e.g. Jiang et al. 2024, "Scaling sentence embeddings with LLMs"; Skean et al. 2025, "Layer by
layer").

The backbone must return all hidden states: set ``output_hidden_states=True`` on its config (the embedder builder
does), which makes the sentence-transformers ``Transformer`` module put them in ``features["all_layer_embeddings"]``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from embedforge.modules.common import CrossAttention, TrainableHead, masked_mean, pooling_mask

logger = logging.getLogger(__name__)


class MultiLayerPooling(TrainableHead):
    """Cross-attention pooling over the per-layer mean states of several hidden layers.

    Args:
        embedding_dimension: hidden size of the backbone (also the output size).
        layers: indices into the backbone's hidden states (0 = embeddings output, -1 = last layer); default: all
            transformer layers (1 .. last). The last listed layer is the residual base.
        num_hidden_states: how many hidden states the backbone returns (num_hidden_layers + 1), used to
            resolve negative indices and the default.
        num_queries: learned queries.
        num_heads: attention heads.
        include_prompt: if False, instruction tokens are left out of every per-layer mean.
        zero_init: start the output projection at zero (head == mean of the last selected layer at init).
    """

    config_keys = [
        "embedding_dimension", "num_hidden_states", "layers", "num_queries", "num_heads", "include_prompt",
        "zero_init",
    ]

    def __init__(
        self,
        embedding_dimension: int,
        num_hidden_states: int,
        layers: list[int] | None = None,
        num_queries: int = 4,
        num_heads: int = 4,
        include_prompt: bool = True,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if layers is None or len(layers) == 0:
            layers = list(range(1, num_hidden_states))
        if any(not -num_hidden_states <= i < num_hidden_states for i in layers):
            raise ValueError(f"layers {layers} out of range for {num_hidden_states} hidden states")
        resolved = [i % num_hidden_states for i in layers]
        self.embedding_dimension = embedding_dimension
        self.num_hidden_states = num_hidden_states
        self.layers = resolved
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.include_prompt = include_prompt
        self.zero_init = zero_init
        dim = embedding_dimension
        self.layer_embeddings = torch.nn.Parameter(torch.randn(len(resolved), dim) * 0.02)
        self.queries = torch.nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.norm = torch.nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, num_heads)
        self.proj = torch.nn.Linear(dim, dim)
        if zero_init:
            torch.nn.init.zeros_(self.proj.weight)
            torch.nn.init.zeros_(self.proj.bias)

    def layer_states(self, features: dict[str, Any]) -> Tensor:
        """``(batch, n_layers, dim)``: the masked mean of every selected hidden layer."""
        hidden = features.get("all_layer_embeddings")
        if hidden is None:
            raise KeyError(
                "MultiLayerPooling needs all hidden states: load the backbone with output_hidden_states=True "
                "(features['all_layer_embeddings'] is missing)"
            )
        if len(hidden) != self.num_hidden_states:
            raise ValueError(f"expected {self.num_hidden_states} hidden states, got {len(hidden)}")
        mask = pooling_mask(features, include_prompt=self.include_prompt)
        dtype = self.queries.dtype
        return torch.stack([masked_mean(hidden[i].to(dtype), mask) for i in self.layers], dim=1)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        states = self.layer_states(features)
        context = self.norm(states + self.layer_embeddings.unsqueeze(0))
        queries = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        mixed = self.attention(queries, context).mean(dim=1)
        features["sentence_embedding"] = states[:, -1] + self.proj(mixed)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension
