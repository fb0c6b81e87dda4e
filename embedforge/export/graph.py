"""Build one ONNX graph from a sentence-transformers model: backbone, pooling head, extras, normalization.

:class:`EmbeddingGraph` runs the model's own module chain on a ``features`` dict built from the graph inputs, so
any head whose forward is traceable (sentence-transformers ``Pooling``, ``Dense``, ``Normalize`` and the
embedforge heads in :mod:`embedforge.modules`) exports without export-specific code. After the chain come the
optional Matryoshka truncation, L2 normalization and packed-bit output, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from embedforge.errors import RunError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

#: graph inputs in the order the graphs take them (those the tokenizer does not produce are left out)
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
SENTENCE_OUTPUT = "sentence_embedding"
TOKENS_OUTPUT = "last_hidden_state"
BINARY_OUTPUT = "binary_embedding"
#: ONNX protobufs are limited to 2 GB; bigger graphs keep their weights in a side file
EXTERNAL_DATA_BYTES = 1_800_000_000
#: the token limit recorded for a static token table, which reads texts of any length (effectively no truncation)
STATIC_TOKEN_LIMIT = 1_000_000


class ExportError(RunError, RuntimeError):
    """A model cannot be exported (unsupported module, unsupported option, exporter failure)."""


@dataclass
class GraphSpec:
    """What one exported graph takes and returns (recorded in ``manifest.json``)."""

    file: str
    inputs: list[str]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"dtype": ..., "shape": [...]}
    kind: str = "sentence_embedding"  # or "last_hidden_state"
    external_data: bool = False


def is_static(model: SentenceTransformer) -> bool:
    """True for a static token-table model (sentence-transformers ``StaticEmbedding`` first, e.g. a model2vec
    student): it takes a flat id list with bag offsets instead of padded ``input_ids`` / ``attention_mask``."""
    return len(model) > 0 and type(model[0]).__name__ == "StaticEmbedding"


def token_limit(model: SentenceTransformer, requested: int | None, source: str) -> int:
    """The token limit of the export (what its tokenizer truncates at and servers are told), set on the model.

    ``requested`` (the config's ``max_seq_length``) longer than the model's position table raises ``ConfigError``.
    A static token table has no limit of its own (its ``max_seq_length`` is infinite): it gets ``requested``, else
    the truncation its tokenizer carries (model2vec tokenizers stop at 512), else :data:`STATIC_TOKEN_LIMIT`.
    Otherwise the model's finite ``max_seq_length``, else the tokenizer's
    ``model_max_length``, else the position table's size, else 512.
    """
    import math

    from embedforge.modules.loading import check_max_seq_length, position_limit

    check_max_seq_length(model, requested, source)
    if is_static(model):
        own = (getattr(model[0].tokenizer, "truncation", None) or {}).get("max_length")
        limits = [int(v) for v in (requested, own) if v is not None]
        return min(limits) if limits else STATIC_TOKEN_LIMIT
    if requested is not None:
        model.max_seq_length = requested
    for value in (model.max_seq_length, getattr(getattr(model[0], "tokenizer", None), "model_max_length", None)):
        if isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 10**7:
            return int(value)
    return position_limit(model) or 512


def graph_inputs(model: SentenceTransformer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` with the model's own preprocessing and keep only the tensors a graph takes.

    A static token table gets padded ``input_ids`` / ``attention_mask`` built from its own token ids (no special
    tokens, as ``StaticEmbedding`` encodes), which the graph averages like its embedding bag does.
    """
    import torch

    if is_static(model):
        rows = [e.ids for e in model[0].tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        width = max(1, max((len(r) for r in rows), default=0))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
    features = model.preprocess(list(texts))
    return {name: features[name] for name in INPUT_ORDER if name in features}


class EmbeddingGraph:
    """Factory for the traceable wrapper (a ``torch.nn.Module`` subclass built lazily, so importing is cheap)."""

    @staticmethod
    def build(
        model: SentenceTransformer,
        input_names: Sequence[str],
        *,
        kind: str = SENTENCE_OUTPUT,
        truncate_dim: int | None = None,
        normalize: bool = True,
        binary: bool = False,
    ) -> torch.nn.Module:
        """Return a module ``forward(input_ids, attention_mask, token_type_ids=None) -> tuple[Tensor, ...]`` (outputs
        in the order of :func:`output_names`)."""
        return _wrapper_class()(model, list(input_names), kind=kind, truncate_dim=truncate_dim,
                                normalize=normalize, binary=binary)


def _wrapper_class() -> type:
    import torch

    from embedforge.modules.binarizer import pack_bits

    class _Wrapper(torch.nn.Module):
        def __init__(self, model: Any, input_names: list[str], *, kind: str, truncate_dim: int | None,
                     normalize: bool, binary: bool) -> None:
            super().__init__()
            self.chain = torch.nn.ModuleList(list(model))
            self.static_bag = _static_bag(model)
            self.input_names = input_names
            self.kind = kind
            self.truncate_dim = truncate_dim
            self.normalize = normalize
            self.binary = binary
            self.has_model_binarizer = False

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            features: dict[str, Any] = {name: given[name] for name in self.input_names}
            chain = list(self.chain)
            if self.static_bag is not None:
                # StaticEmbedding's EmbeddingBag over the real tokens, written as a masked gather-and-average
                table, mode = self.static_bag.weight, self.static_bag.mode
                mask = attention_mask.unsqueeze(-1).to(table.dtype)
                rows = torch.nn.functional.embedding(input_ids, table)
                if self.kind == TOKENS_OUTPUT:
                    return (rows,)
                pooled = (rows * mask).sum(dim=1)
                if mode == "mean":
                    pooled = pooled / mask.sum(dim=1).clamp(min=1.0)
                features = {"input_ids": input_ids, "attention_mask": attention_mask, SENTENCE_OUTPUT: pooled}
                chain = chain[1:]
            elif self.kind == TOKENS_OUTPUT:
                return (self.chain[0](features)["token_embeddings"],)
            for module in chain:
                features = module(features)
            emb = features[SENTENCE_OUTPUT]
            if emb.is_floating_point():
                if self.truncate_dim is not None:
                    emb = emb[:, : self.truncate_dim]
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2.0, dim=-1)
            outputs = [emb]
            if BINARY_OUTPUT in features:  # the model carries its own binarizer module
                outputs.append(features[BINARY_OUTPUT])
            elif self.binary:
                outputs.append(pack_bits(emb > 0))
            return tuple(outputs)

    return _Wrapper


def _static_bag(model: SentenceTransformer) -> Any:
    """The ``EmbeddingBag`` of a static token-table model (None for others); only mean and sum bags export."""
    if not is_static(model):
        return None
    bag = model[0].embedding
    if bag.mode not in ("mean", "sum") or getattr(bag, "padding_idx", None) is not None:
        raise ExportError(f"a static embedding bag with mode {bag.mode!r} and padding_idx {bag.padding_idx} cannot be "
                          "exported; only mean or sum bags without padding_idx are supported")
    return bag


def output_names(model: SentenceTransformer, kind: str, binary: bool) -> list[str]:
    """Names of the graph outputs, matching what the wrapper returns."""
    if kind == TOKENS_OUTPUT:
        return [TOKENS_OUTPUT]
    names = [SENTENCE_OUTPUT]
    if binary or has_binarizer(model):
        names.append(BINARY_OUTPUT)
    return names


def has_binarizer(model: SentenceTransformer) -> bool:
    """True when one of the model's modules writes ``binary_embedding`` (an embedforge binarizer)."""
    return any(type(m).__name__.endswith("Binarizer") for m in model)


@contextlib.contextmanager
def attention_kernel(model: SentenceTransformer, implementation: str) -> Iterator[None]:
    """Temporarily switch every transformers model inside ``model`` to another attention implementation."""
    from transformers import PreTrainedModel

    changed: list[tuple[Any, str]] = []
    if implementation != "keep":
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and hasattr(module, "set_attn_implementation"):
                before = module.config._attn_implementation
                if before == implementation:
                    continue
                try:
                    module.set_attn_implementation(implementation)
                    changed.append((module, before))
                except (ValueError, ImportError) as err:  # model cannot switch: trace it as loaded
                    logger.warning("keeping %s attention for %s: %s", before, type(module).__name__, err)
    try:
        yield
    finally:
        for module, before in changed:
            module.set_attn_implementation(before)


def check_exportable(model: SentenceTransformer, *, truncate_dim: int | None = None, source: str = "the model") -> None:
    """Refuse a ``truncate_dim`` wider than the model's vectors (the manifest would record dimensions the graph
    does not have); warn about module chains whose behaviour a fixed graph cannot fully reproduce."""
    dim = model.get_embedding_dimension()
    if truncate_dim is not None and dim is not None and truncate_dim > dim:
        from embedforge.configs import ConfigError

        raise ConfigError(f"truncate_dim: {truncate_dim} is larger than the {dim} dimensions of {source}; use at "
                          f"most {dim} or leave it unset", key="truncate_dim")
    prompts = {k: v for k, v in (getattr(model, "prompts", None) or {}).items() if v}
    for module in model:
        if prompts and getattr(module, "include_prompt", True) is False:
            logger.warning(
                "%s excludes prompt tokens from pooling; the ONNX graph cannot know a prompt's length, so the "
                "export is checked and served without prompts (the model's prompts: %s)", type(module).__name__,
                sorted(prompts),
            )


def export_graph(
    model: SentenceTransformer,
    path: str | os.PathLike[str],
    *,
    example_texts: Sequence[str],
    kind: str = SENTENCE_OUTPUT,
    truncate_dim: int | None = None,
    normalize: bool = True,
    binary: bool = False,
    exporter: str = "torchscript",
    opset: int = 17,
    attn_implementation: str = "eager",
) -> GraphSpec:
    """Trace ``model`` into an ONNX file at ``path`` with dynamic batch and sequence axes.

    ``example_texts`` must tokenize to different lengths so the trace sees padding (a batch without padding lets
    some attention code skip the mask).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = graph_inputs(model, example_texts)
    if "attention_mask" not in example or bool(example["attention_mask"].all()):
        raise ExportError("the example batch for tracing must contain padding (texts of different lengths)")
    input_names = list(example)
    outputs = output_names(model, kind, binary and kind == SENTENCE_OUTPUT)
    wrapper = EmbeddingGraph.build(model, input_names, kind=kind, truncate_dim=truncate_dim, normalize=normalize,
                                   binary=binary and kind == SENTENCE_OUTPUT)
    wrapper.eval()
    args = tuple(example[name] for name in input_names)
    n_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    with torch.no_grad(), attention_kernel(model, attn_implementation):
        sample = wrapper(*args)
        try:
            if exporter == "dynamo":
                _export_dynamo(wrapper, args, path, input_names, outputs, opset, external)
            else:
                _export_torchscript(wrapper, args, path, input_names, outputs, opset)
        except Exception as err:  # exporter errors are long; keep the cause, add what was being exported
            raise ExportError(f"torch.onnx.export ({exporter}) failed for {path.name}: {err}") from err
    spec = GraphSpec(file=path.name, inputs=input_names, kind=kind, external_data=external)
    for name, value in zip(outputs, sample):
        shape: list[Any] = ["batch"] + (["sequence"] if kind == TOKENS_OUTPUT else []) + [int(value.shape[-1])]
        spec.outputs[name] = {"dtype": str(value.dtype).replace("torch.", ""), "shape": shape}
    logger.info("exported %s (%s) with inputs %s and outputs %s", path.name, exporter, input_names, outputs)
    return spec


def _export_torchscript(wrapper: Any, args: tuple[Any, ...], path: Path, input_names: list[str],
                        outputs: list[str], opset: int) -> None:
    import torch

    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in input_names}
    for name in outputs:
        axes[name] = {0: "batch", 1: "sequence"} if name == TOKENS_OUTPUT else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python conditions on shapes are expected here
        torch.onnx.export(
            wrapper, args, str(path), input_names=input_names, output_names=outputs, dynamic_axes=axes,
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def _export_dynamo(wrapper: Any, args: tuple[Any, ...], path: Path, input_names: list[str], outputs: list[str],
                   opset: int, external: bool) -> None:
    import torch
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence")
    shapes = {name: {0: batch, 1: seq} for name in input_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, str(path), input_names=input_names, output_names=outputs, dynamic_shapes=shapes,
            opset_version=max(opset, 18), dynamo=True, external_data=external, verbose=False,
        )
