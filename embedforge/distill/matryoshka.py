"""The training objective: Jasper/Stella losses averaged over Matryoshka prefixes and Starbucks (layer, dim) pairs.

One forward pass of the student gives its full vector (and, for 2D training, the hidden state after every
layer). Each *view* of it is scored against the teacher with :class:`JasperStellaLoss`, and the views' losses
are averaged:

- a Matryoshka dim ``d``: the first ``d`` components of the final vector, renormalized (Kusupati et al., 2022);
- a Starbucks pair ``(layer, dim)``: the hidden state after ``layer`` sent through the student's remaining
  modules (pooling, projection, normalization), cut to ``dim`` (Zhuang et al., 2024, "Starbucks: Improved
  Training for 2D Matryoshka Embeddings"). The pairs are fixed, not sampled as in ``Matryoshka2dLoss``.

The object plugs into ``SentenceTransformerTrainer`` as its loss: the data set's ``label`` column holds each
text's row in the teacher matrix, so the (possibly large) teacher vectors never pass through Arrow or the
collator.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedforge.distill.losses import JasperStellaLoss

logger = logging.getLogger(__name__)


def prefix(vectors: Tensor, dim: int) -> Tensor:
    """The first ``dim`` components of each row, L2-normalized."""
    if dim > vectors.shape[-1]:
        raise ValueError(f"dim {dim} exceeds the embedding size {vectors.shape[-1]}")
    return F.normalize(vectors[..., :dim], dim=-1)


def pca_rotation(vectors: Any) -> Any:
    """An orthogonal D x D matrix whose columns are the principal axes of ``vectors`` (N x D), largest variance
    first; ``vectors @ R`` are the same vectors in those coordinates.

    The axes are the eigenvectors of the covariance of the rows (centered for fitting only: the rotated vectors
    are not shifted, so every cosine between full vectors is unchanged). The first ``d`` coordinates of a
    rotated vector are its components along the top ``d`` principal axes, so a Matryoshka prefix of a student
    that learns the rotated vectors starts where the teacher's information is. Signs are fixed so that each
    axis has its largest-magnitude entry positive (deterministic across runs).
    """
    import numpy as np

    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an N x D matrix with N >= 2, got shape {x.shape}")
    centered = x - x.mean(axis=0, keepdims=True)
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / (x.shape[0] - 1))
    order = np.argsort(eigenvalues)[::-1]
    rotation = eigenvectors[:, order]
    signs = np.sign(rotation[np.argmax(np.abs(rotation), axis=0), np.arange(rotation.shape[1])])
    rotation = rotation * np.where(signs == 0, 1.0, signs)
    return rotation.astype(np.float32)


def full_dims(dims: Sequence[int], full: int) -> list[int]:
    """The Matryoshka dims to train, largest first, with the full dimension always included."""
    bad = [d for d in dims if d > full]
    if bad:
        raise ValueError(f"matryoshka dims {bad} exceed the student's output dimension {full}")
    return sorted({*dims, full}, reverse=True)


def transformer_layers(model: Any) -> int:
    """Number of transformer layers of a SentenceTransformer whose first module is a ``Transformer``."""
    first = model[0]
    config = getattr(getattr(first, "auto_model", None), "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError("layer/dim pairs need a student whose first module is a transformer")
    return int(config.num_hidden_layers)


class DistillObjective(nn.Module):
    """Mean Jasper/Stella loss over the Matryoshka dims and (layer, dim) pairs of a student.

    Args:
        model: the student ``SentenceTransformer``.
        targets: teacher vectors, one row per training text (N x D).
        loss: the per-view loss.
        dims: Matryoshka dims (the full output dim is added when missing).
        layer_dims: Starbucks pairs ``(layer, dim)``; ``layer`` counts from 1 (the state after that layer).
        full_dim_weight: weight of the full-dimension view; every other view weighs 1 and the loss is the
            weighted mean.
        pieces: run the student's forward pass on up to this many length-sorted pieces of each batch, each padded
            only to its own longest text (:func:`~embedforge.distill.batching.split_features`); the losses still
            compare the whole batch. With lengths mixed in a batch this saves most of the padding.
    """

    def __init__(self, model: Any, targets: Tensor, loss: JasperStellaLoss, dims: Sequence[int] = (),
                 layer_dims: Iterable[Sequence[int]] = (), full_dim_weight: float = 1.0, pieces: int = 1):
        super().__init__()
        if pieces < 1:
            raise ValueError(f"pieces must be >= 1, got {pieces}")
        self.pieces = int(pieces)
        if full_dim_weight <= 0:
            raise ValueError(f"full_dim_weight must be positive, got {full_dim_weight}")
        self.full_dim_weight = float(full_dim_weight)
        self.model = model
        self.register_buffer("targets", torch.as_tensor(targets, dtype=torch.float32), persistent=False)
        self.loss = loss
        self.out_dim = int(model.get_embedding_dimension())
        self.dims = full_dims(dims, self.out_dim)
        self.layer_dims = [(int(layer), int(dim)) for layer, dim in layer_dims]
        if self.layer_dims:
            n_layers = transformer_layers(model)
            for layer, dim in self.layer_dims:
                if layer > n_layers or dim > self.out_dim:
                    raise ValueError(f"layer/dim pair ({layer}, {dim}) is outside the student "
                                     f"({n_layers} layers, {self.out_dim} dims)")
        # (name, weight) of each view, in the order _student_views returns them
        self.view_weights = [(f"dim{d}", self.full_dim_weight if d == self.out_dim else 1.0) for d in self.dims]
        self.view_weights += [(f"layer{layer}_dim{dim}", 1.0) for layer, dim in self.layer_dims]
        self.last_views: dict[str, float] = {}

    @property
    def student(self) -> Any:
        """The student itself: under torchrun the trainer puts its DDP wrapper in ``self.model`` (the forward pass
        goes through the wrapper, which syncs the gradients; the student's modules are read from inside it)."""
        model = self.model
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def teacher_rows(self, labels: Tensor) -> Tensor:
        """Teacher vectors for a batch: ``labels`` are row indices (1-D ints) or the vectors themselves."""
        if labels.ndim == 1 and not labels.is_floating_point():
            return self.targets[labels.to(self.targets.device)]
        return labels.float()

    def _layer_view(self, features: dict[str, Any], layer: int) -> Tensor:
        """The student's output when its transformer stops after ``layer``."""
        feats = {**features, "token_embeddings": features["all_layer_embeddings"][layer]}
        for module in list(self.student)[1:]:
            feats = module(feats)
        return feats["sentence_embedding"]

    def _student_views(self, features: dict[str, Any]) -> list[Tensor]:
        """The student's vector of each view (in ``self.dims`` order, then ``self.layer_dims``) for one batch."""
        config = getattr(getattr(self.student[0], "auto_model", None), "config", None)
        restore = None
        if self.layer_dims and config is not None:
            restore = config.output_hidden_states
            config.output_hidden_states = True
        try:
            out = self.model(features)
        finally:
            if restore is not None:
                config.output_hidden_states = restore
        student = out["sentence_embedding"]
        views = [prefix(student, d) for d in self.dims]
        views += [prefix(self._layer_view(out, layer), dim) for layer, dim in self.layer_dims]
        return views

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        from embedforge.distill.batching import split_features

        features = list(sentence_features)[0]
        side = getattr(getattr(self.student[0], "tokenizer", None), "padding_side", "right")
        pieces = split_features(features, self.pieces, side)
        per_piece = [self._student_views(sub) for _, sub in pieces]
        if pieces[0][0] is None:  # the batch stayed whole
            vectors = per_piece[0]
        else:  # back to the batch's row order, which the teacher rows (labels) follow
            inverse = torch.argsort(torch.cat([idx for idx, _ in pieces])).to(per_piece[0][0].device)
            vectors = [torch.cat([views[v] for views in per_piece])[inverse] for v in range(len(per_piece[0]))]
        teacher = self.teacher_rows(labels).to(vectors[0].device)
        total = vectors[0].new_zeros((), dtype=torch.float32)
        logged: dict[str, float] = {}
        # under bf16 autocast the student's vectors come out in bf16; the losses (similarity matrices, hinge
        # margins of 0.015) are computed in fp32, outside autocast
        with torch.autocast(vectors[0].device.type, enabled=False):
            for (name, weight), view in zip(self.view_weights, vectors):
                value = self.loss(view.float(), teacher.float())
                logged[name] = float(value.detach())
                total = total + weight * value
        self.last_views = logged
        return total / sum(weight for _, weight in self.view_weights)

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into the model card about this loss."""
        w = self.loss.weights
        return {"dims": self.dims, "layer_dims": self.layer_dims, "full_dim_weight": self.full_dim_weight,
                "cosine_weight": w.cosine, "similarity_weight": w.similarity, "relative_weight": w.relative,
                "margin": self.loss.relative.margin, "max_pairs": self.loss.relative.max_pairs}
