"""Students: a layer subset of the teacher, a static token table, or any HF model; plus the projection head.

All builders return a ``SentenceTransformer`` whose last module is ``Normalize``, so that a saved student is
an ordinary model directory.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from embedforge.evaluation import l2_normalize

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- layer subsets


def layer_student(teacher: Any, keep: Sequence[int]) -> Any:
    """A copy of the teacher ``SentenceTransformer`` that keeps only the transformer layers ``keep``
    (sorted 0-based indices, see :func:`embedforge.backbone.select_layers`)."""
    from embedforge.backbone import keep_layers

    backbone = getattr(teacher[0], "auto_model", None)
    if backbone is None or not hasattr(backbone, "config"):
        raise ValueError("a layer student needs a teacher whose first module is a transformers model")
    student = copy.deepcopy(teacher)
    keep_layers(student, keep)
    return student


# ---------------------------------------------------------------------------------------- static student

_POOLING_TO_M2V = {"mean": "mean", "cls": "first", "lasttoken": "last"}


def _teacher_pooling(teacher: Any) -> str:
    """model2vec's name for the teacher's pooling (mean when it cannot tell)."""
    for module in teacher:
        mode = getattr(module, "pooling_mode", None)
        if mode is not None:
            mode = mode[0] if isinstance(mode, (list, tuple)) else mode
            return _POOLING_TO_M2V.get(str(getattr(mode, "value", mode)), "mean")
    return "mean"


def static_student(teacher: Any, *, dims: int | None = None, sif: float | None = 1e-4,
                   teacher_path: str | os.PathLike[str] | None = None) -> Any:
    """A static student: model2vec distils a token table from the teacher (one forward pass per token, PCA,
    SIF weighting); it becomes a sentence-transformers ``StaticEmbedding`` followed by ``Normalize``.

    ``dims`` defaults to the teacher's dimension (PCA then only rotates, putting the high-variance directions
    first, which suits Matryoshka prefixes).
    """
    try:
        from model2vec.distill import distill_from_model
    except ImportError as exc:
        raise ImportError(
            "the static student needs model2vec's distillation: pip install 'model2vec>=0.10' 'skeletoken>=0.6,<0.7'"
        ) from exc
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    transformer = teacher[0]
    backbone, tokenizer = transformer.auto_model, transformer.tokenizer
    if teacher_path is not None and Path(teacher_path).is_dir():
        backbone.name_or_path = os.fspath(teacher_path)  # a local path keeps model2vec off the hub
    out_dim = int(teacher.get_embedding_dimension())
    pca = dims if dims is not None and dims < out_dim else "auto"
    m2v = distill_from_model(backbone, tokenizer, pca_dims=pca, sif_coefficient=sif, quantize_to="float32",
                             pooling=_teacher_pooling(teacher), device=str(teacher.device))
    table = np.asarray(m2v.embedding, dtype=np.float32)
    mapping, weights = getattr(m2v, "token_mapping", None), getattr(m2v, "weights", None)
    if mapping is not None:
        table = table[np.asarray(mapping)]
    if weights is not None:
        table = table * np.asarray(weights, dtype=np.float32)[:, None]
    embedding = StaticEmbedding(m2v.tokenizer, embedding_weights=torch.from_numpy(np.ascontiguousarray(table)))
    logger.info("static student: %d tokens x %d dims", table.shape[0], table.shape[1])
    return SentenceTransformer(modules=[embedding, Normalize()], device="cpu")


# ---------------------------------------------------------------------------------------- any HF model


def model_student(spec: str, *, max_seq_length: int = 128) -> Any:
    """A student from any model: a sentence-transformers directory as it is, else an HF model with mean
    pooling and normalization (decoders get bidirectional attention through ``config.is_causal = False``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embedforge.model import load_model
    from embedforge.sources import resolve_source

    path = resolve_source(spec)
    if Path(path).is_dir() and (Path(path) / "modules.json").is_file():
        student = load_model(path)
        student.max_seq_length = max_seq_length
        return student
    transformer = Transformer(os.fspath(path), max_seq_length=max_seq_length)
    config = transformer.auto_model.config
    if any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])):
        config.is_causal = False
    tok = transformer.tokenizer
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean"), Normalize()]
    return SentenceTransformer(modules=modules, device="cpu")


# ---------------------------------------------------------------------------------------- projection head


def _split_at_normalize(model: Any) -> tuple[list[nn.Module], list[nn.Module]]:
    from sentence_transformers.base.modules import Normalize

    modules = list(model)
    cut = len(modules)
    while cut > 0 and isinstance(modules[cut - 1], Normalize):
        cut -= 1
    return modules[:cut], modules[cut:]


def add_projection(model: Any, out_dim: int, *, identity: bool = False) -> Any:
    """A new SentenceTransformer with a linear ``Dense`` head to ``out_dim`` put before its ``Normalize``; the
    model's prompts, default prompt and similarity function are kept."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize

    body, _ = _split_at_normalize(model)
    in_dim = int(model.get_embedding_dimension())
    dense = Dense(in_dim, out_dim, bias=True, activation_function=nn.Identity())
    if identity:
        if in_dim != out_dim:
            raise ValueError(f"an identity projection needs equal dims, got {in_dim} -> {out_dim}")
        with torch.no_grad():
            dense.linear.weight.copy_(torch.eye(out_dim))
            dense.linear.bias.zero_()
    # the prompts travel with the model: a decoder student built with query/document instructions must be
    # served with them, and a later contrastive stage trains with them
    prompts = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
    return SentenceTransformer(modules=[*body, dense, Normalize()], device=str(model.device), prompts=prompts or None,
                               default_prompt_name=getattr(model, "default_prompt_name", None),
                               similarity_fn_name=getattr(model, "similarity_fn_name", None))


def _dense_head(model: Any, action: str) -> tuple[list[nn.Module], Any]:
    """The modules before the student's ``Dense`` head, and the head (the last module before ``Normalize``)."""
    from sentence_transformers.base.modules import Dense

    body, _ = _split_at_normalize(model)
    if not body or not isinstance(body[-1], Dense):
        raise ValueError(f"the student has no Dense head to {action}")
    return body[:-1], body[-1]


def set_projection(model: Any, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
    """Set the student's ``Dense`` head to ``y = x @ weight.T + bias`` (``weight`` is out x in)."""
    linear = _dense_head(model, "set")[1].linear
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
    if tuple(w.shape) != tuple(linear.weight.shape):
        raise ValueError(f"head weight of shape {tuple(w.shape)}, expected {tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(w)
        if linear.bias is not None:
            linear.bias.copy_(torch.zeros(w.shape[0]) if bias is None else torch.as_tensor(bias, dtype=torch.float32))


def fit_projection(model: Any, texts: Sequence[str], targets: np.ndarray, *, batch_size: int = 64) -> float:
    """Least-squares fit of the student's ``Dense`` head so that its outputs match ``targets`` on ``texts``.

    Starting from the best linear map (instead of a random one) saves the first part of training. Returns
    the mean cosine to the targets after the fit.
    """
    from sentence_transformers import SentenceTransformer

    body, dense = _dense_head(model, "fit")
    inner = SentenceTransformer(modules=body, device=str(model.device))
    with torch.inference_mode():
        x = inner.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    x1 = np.concatenate([x, np.ones((len(x), 1), dtype=x.dtype)], axis=1).astype(np.float64)
    solution, *_ = np.linalg.lstsq(x1, targets.astype(np.float64), rcond=None)
    with torch.no_grad():
        dense.linear.weight.copy_(torch.from_numpy(solution[:-1].T).float())
        dense.linear.bias.copy_(torch.from_numpy(solution[-1]).float())
    pred = x1 @ solution
    return float(np.mean(np.sum(l2_normalize(pred) * l2_normalize(targets), axis=1)))
