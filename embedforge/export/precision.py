"""Derived graphs: fused fp32, fp16, dynamic int8 per CPU family, and static QDQ int8.

All of them are made from the exported fp32 graph with onnxruntime's own tools:

- fusion: ``onnxruntime.transformers.optimizer.optimize_model`` (BERT-style attention, embedding layer norm,
  skip layer norm, bias GELU) for encoder models; decoders keep the plain graph.
- fp16: ``OnnxModel.convert_float_to_float16(keep_io_types=True)`` so callers still feed int64 ids and get float32
  vectors back.
- dynamic int8: ``onnxruntime.quantization.quantize_dynamic`` with per-channel symmetric int8 weights; activations
  are quantized at run time. The CPU targets differ only in ``reduce_range`` (7-bit weights on AVX2 without VNNI,
  where 8-bit products can saturate). Before quantizing, :func:`split_first_token` can run each MLP block on the
  first token and on the rest separately, so the first token's outlier activations get their own dynamic scale.
- static int8: ``quantize_static`` in QDQ format with activation ranges calibrated on texts.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from embedforge.export.encoder import Tokenize

logger = logging.getLogger(__name__)

#: model_type values whose graphs onnxruntime's BERT fusions understand
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet", "ernie", "nomic_bert"}

#: per-target settings of the dynamic int8 graphs (documented in the manifest)
INT8_TARGETS: dict[str, dict[str, Any]] = {
    "avx512_vnni": {"per_channel": True, "reduce_range": False},
    "avx2": {"per_channel": True, "reduce_range": True},
    "arm64": {"per_channel": True, "reduce_range": False},
}


def _float_type() -> int:
    import onnx

    return onnx.TensorProto.FLOAT


def fuse_transformer(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, model_type: str,
                     num_heads: int, hidden_size: int) -> dict[str, int] | None:
    """Write a fused copy of ``src`` to ``dst`` for BERT-like ``model_type``; return fused-op counts or None.

    None (and no file) when the model type is not BERT-like or no attention got fused (fusing only some pieces
    gains little and changes numerics).
    """
    if model_type not in BERT_LIKE:
        return None
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                     opt_level=1)
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention") and not stats.get("MultiHeadAttention"):
        logger.info("transformer optimizer fused no attention in %s (%s); keeping the plain graph", src, stats)
        return None
    fused.save_model_to_file(str(dst))
    return stats


def to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Convert a graph's weights and compute to fp16, keeping int64 inputs and float32 outputs."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True, use_symbolic_shape_infer=False)
    model.save_model_to_file(str(dst))


#: the most quantization-sensitive MatMuls of a BERT-like encoder, for ``ExportConfig.int8_keep_float``: the MLP
#: output projections of the first three layers (leave-one-group-out sensitivity on all-MiniLM-L6-v2: FFN-down is
#: the most sensitive kind and layers 0-2 hold most of its error). Keeping them (and the embedding tables) in float
#: halves the mean cosine error of long documents and lifts STS-B to 100% of fp32, but SciFact nDCG@10 only from
#: 98.3% to 98.45% at 19% less int8 throughput, so it is an option, not the default
#: (bench/results/export_minilm.md; the ablation run is in git history). The first-token split (:func:`split_first_token`, on by default) halves
#: the same error at 0-5% of the speed (bench/results/export_minilm.md): the outliers sit on one token.
SENSITIVE_MATMULS = ("ffn_down:0,1,2",)

#: what a decoder's dynamic int8 graphs keep in float by default. On the quickstart student (SmolLM2, 8 layers,
#: Dense head; mean cosine to fp32 over the SciFact corpus, bench/results/int8_keep_float.md): every MatMul int8
#: 0.921; MLP down projections float 0.973 (the earlier default, which quantized the head regardless); the head
#: too 0.989 (its input is the pooled hidden state, whose few outlier channels set the per-batch activation
#: scale); head, down and value projections 0.9985, at 1.57x the fp32 graph's speed (1.73x before)
DECODER_KEEP_FLOAT = ("down_proj", "v_proj", "head")

#: op types whose weights dynamic int8 quantizes (``Attention`` is onnxruntime's fused Q/K/V projection)
MATMUL_OPS = ("MatMul", "Gemm", "Attention")

#: name patterns of the MLP output projection ("FFN down") of layer ``{i}``, per exporter naming
_FFN_DOWN = (re.compile(r"/layer\.(\d+)/output/dense/MatMul"),  # BERT family (not attention/output)
             re.compile(r"/layers\.(\d+)/mlp/down_proj/MatMul"))  # Llama / Qwen / Mistral / Gemma


def _ffn_down_layers(name: str) -> int | None:
    for pattern in _FFN_DOWN:
        match = pattern.search(name)
        if match and "/attention/" not in name:
            return int(match.group(1))
    return None


#: name pattern of the MatMuls after the transformer (a Dense head on the pooled vector): the export wrapper's
#: modules are ``chain.0`` (the transformer), ``chain.1`` (pooling), ``chain.2``... (heads, normalization)
_HEAD = re.compile(r"^/chain\.[1-9]\d*/")


def matmul_nodes(src: str | os.PathLike[str], patterns: list[str]) -> list[str]:
    """Names of the MatMul/Gemm/Attention nodes of a graph selected by ``patterns``.

    A pattern is a substring of the node name, ``ffn_down:<layers>`` — the MLP output projections of the listed
    layers (comma-separated indices, negative ones count from the last layer; ``ffn_down:all`` for every layer),
    resolved from the exporter's node names for BERT-like encoders and Llama-style decoders alike — or ``head``:
    the MatMuls after the transformer (a Dense layer on the pooled vector).
    """
    import onnx

    if not patterns:
        return []
    graph = onnx.load(str(src), load_external_data=False).graph
    nodes = [n.name for n in graph.node if n.op_type in MATMUL_OPS]
    ffn = {name: layer for name in nodes if (layer := _ffn_down_layers(name)) is not None}
    n_layers = max(ffn.values()) + 1 if ffn else 0
    wanted_layers: set[int] = set()
    substrings = []
    for p in patterns:
        if p.startswith("ffn_down:"):
            spec = p.split(":", 1)[1]
            if spec == "all":
                wanted_layers.update(range(n_layers))
                continue
            for item in spec.split(","):
                i = int(item)
                wanted_layers.add(i + n_layers if i < 0 else i)
        elif p != "head":
            substrings.append(p)
    head = "head" in patterns
    return [n for n in nodes if any(p in n for p in substrings) or ffn.get(n, -1) in wanted_layers
            or (head and _HEAD.match(n) is not None)]


#: ops that act on each token's vector on its own (elementwise, or a MatMul / Gemm by a constant weight): an MLP
#: block built from them can run on the first token and on the other tokens separately with the same result
_PER_TOKEN_OPS = {"MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
                  "BiasGelu", "FastGelu", "QuickGelu", "Silu", "Softplus", "Cast", "Identity"}


def _mlp_block(down: Any, producers: dict[str, Any], consumers: dict[str, list[Any]],
               constants: set[str]) -> tuple[str, list[Any]] | None:
    """The MLP block that ends in MatMul ``down``: ``(input tensor, nodes in graph order)``, or None when the nodes
    between the block's input projections and ``down`` are not all per-token ops read only inside the block."""
    inside: dict[int, Any] = {id(down): down}
    block_input: str | None = None
    stack = [down.input[0]]
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or node.op_type not in _PER_TOKEN_OPS:
            return None  # reached a graph input or a token-mixing op before any input projection
        if id(node) in inside:
            continue
        inside[id(node)] = node
        if node.op_type == "MatMul" and node.input[1] in constants:  # an input projection (up / gate)
            if block_input not in (None, node.input[0]):
                return None
            block_input = node.input[0]
            continue
        stack.extend(t for t in node.input if t and t not in constants)
    if block_input is None:
        return None
    for n in inside.values():  # intermediate tensors must not leak out of the block
        if n is not down and any(id(c) not in inside for t in n.output for c in consumers.get(t, [])):
            return None
    return block_input, list(inside.values())


def split_first_token(src: str | os.PathLike[str], dst: str | os.PathLike[str], down_nodes: list[str]) -> list[str]:
    """Run each MLP block ending in one of ``down_nodes`` twice: on the first token and on the others.

    Transformers put outlier activations on the first token (BERT's [CLS]; the attention-sink token of LLMs, see
    "Massive Activations in Large Language Models", Sun et al. 2024): on all-MiniLM-L6-v2 the [CLS] row of the MLP
    input is about 9x larger than the median token's. Dynamic int8 picks one activation scale per tensor, so that
    row costs every other token most of its 256 levels. Split along the sequence axis, each half gets its own scale
    while both copies share the same int8 weights; the float graph computes exactly the same vectors (only
    per-token ops are split). Returns the names of the blocks' down projections that were split; a block that is not
    a clean per-token MLP is left as it is. Valid for right-padded inputs (position 0 is a real token).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                         for o in n.output}
    producers = {t: n for n in graph.node for t in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    wanted = set(down_nodes)
    blocks = []
    taken: set[int] = set()
    for node in graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in constants:
            found = _mlp_block(node, producers, consumers, constants)
            if found is None or any(id(n) in taken for n in found[1]):
                logger.info("%s: not a per-token MLP block, left unsplit", node.name)
                continue
            taken.update(id(n) for n in found[1])
            blocks.append((node, *found))
    if not blocks:
        onnx.save(model, str(dst))
        return []
    graph.initializer.extend([
        helper.make_tensor("split_first_token_0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("split_first_token_1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("split_first_token_end", TensorProto.INT64, [1], [2**62]),
        helper.make_tensor("split_first_token_axis", TensorProto.INT64, [1], [-2]),
    ])
    replacement: dict[int, list[Any]] = {}  # id of the block's down node -> the nodes that replace the block
    removed: set[int] = set()
    order = {id(n): i for i, n in enumerate(graph.node)}
    for down, block_input, nodes in blocks:
        nodes.sort(key=lambda n: order[id(n)])
        inner = {t for n in nodes for t in n.output}
        new = []
        halves = (("first", "split_first_token_0", "split_first_token_1"),
                  ("rest", "split_first_token_1", "split_first_token_end"))
        for tag, begin, end in halves:
            sliced = f"{block_input}_{tag}_token"
            new.append(helper.make_node("Slice", [block_input, begin, end, "split_first_token_axis"], [sliced],
                                        name=f"{down.name}_slice_{tag}"))
            for n in nodes:
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                copy.name = f"{n.name}_{tag}"
                for i, t in enumerate(copy.input):
                    copy.input[i] = sliced if t == block_input else f"{t}_{tag}" if t in inner else t
                for i, t in enumerate(copy.output):
                    copy.output[i] = f"{t}_{tag}"
                new.append(copy)
        new.append(helper.make_node("Concat", [f"{down.output[0]}_first", f"{down.output[0]}_rest"],
                                    [down.output[0]], name=f"{down.name}_concat", axis=-2))
        replacement[id(down)] = new
        removed.update(id(n) for n in nodes)
    rebuilt = []
    for n in graph.node:
        if id(n) in replacement:
            rebuilt.extend(replacement[id(n)])
        elif id(n) not in removed:
            rebuilt.append(n)
    del graph.node[:]
    graph.node.extend(rebuilt)
    onnx.save(model, str(dst))
    return [down.name for down, _, _ in blocks]


def quantize_int8_dynamic(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, per_channel: bool = True,
                          reduce_range: bool = False, keep_float: list[str] | None = None,
                          quantize_embeddings: bool = True) -> list[str]:
    """Dynamic int8: symmetric int8 weights (per output channel), uint8 activations quantized per batch.

    MatMuls selected by ``keep_float`` (see :func:`matmul_nodes`) stay in float; ``quantize_embeddings=False``
    keeps a fused embedding layer's tables in float too (they cost no compute, only file size). Returns the names
    of the nodes kept in float.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = matmul_nodes(src, keep_float or [])
    # the quantizer first rewrites each Gemm as a MatMul named "<gemm>_MatMul" (plus an Add) and only then reads
    # nodes_to_exclude, so an excluded Gemm is named both ways (without the alias it was quantized regardless)
    aliases = [f"{n}_MatMul" for n in excluded]
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range,
        nodes_to_exclude=excluded + aliases, op_types_to_quantize=None if quantize_embeddings else list(MATMUL_OPS),
        extra_options={"DefaultTensorType": _float_type(), "MatMulConstBOnly": True},
        use_external_data_format=_is_large(src),
    )
    return excluded


def _is_large(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    size = p.stat().st_size + (p.with_name(p.name + ".data").stat().st_size if p.with_name(p.name + ".data").exists()
                               else 0)
    return size > 1_800_000_000


def quantize_int8_blockwise(src: str | os.PathLike[str], dst: str | os.PathLike[str], block_size: int = 32) -> None:
    """8-bit weights quantized in blocks along the input dimension (``MatMulNBits``), computed with int8 kernels
    on activations that are also quantized per block (``accuracy_level=4``), so one outlier channel only costs
    precision inside its own block."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nbits_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits_logger.level
    nbits_logger.setLevel(logging.WARNING)  # it logs one line per node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(str(src), bits=8, block_size=block_size, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=_is_large(src))
    finally:
        nbits_logger.setLevel(level)


class TextCalibrationReader:
    """Feeds tokenized calibration batches to ``quantize_static`` (the onnxruntime ``CalibrationDataReader``)."""

    def __init__(self, tokenize: Tokenize, texts: Sequence[str], input_names: Sequence[str], batch_size: int = 16):
        ids, types = tokenize(list(texts))
        order = np.argsort([len(r) for r in ids], kind="stable")
        self._feeds: list[dict[str, np.ndarray]] = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            feeds = tokenize.pad([ids[j] for j in idx], [types[j] for j in idx])
            self._feeds.append({k: v for k, v in feeds.items() if k in input_names})
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def quantize_int8_static(src: str | os.PathLike[str], dst: str | os.PathLike[str], reader: TextCalibrationReader,
                         *, per_channel: bool = True) -> None:
    """Static QDQ int8 of the MatMul/Gemm inputs with min-max activation ranges from ``reader``.

    Only matrix multiplications are quantized: softmax and normalization stay in float, which keeps the
    quality loss of transformer encoders small.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp_dir = Path(dst).parent
    # symbolic shape inference types the outputs of fused contrib ops; without it the MatMuls after a fused
    # Attention / SkipLayerNormalization are silently left in float
    inferred = tmp_dir / (Path(dst).stem + ".shapes.onnx")
    try:
        quant_pre_process(str(src), str(inferred), skip_optimization=True, auto_merge=True)
    except Exception as err:  # symbolic inference gives up on some shape expressions: ONNX inference only
        logger.warning("symbolic shape inference failed (%s); using ONNX shape inference only", err)
        quant_pre_process(str(src), str(inferred), skip_optimization=True, skip_symbolic_shape=True)
    quantize_static(
        str(inferred), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"DefaultTensorType": _float_type(), "MatMulConstBOnly": True, "ActivationSymmetric": False,
                       "WeightSymmetric": True},
    )
    inferred.unlink(missing_ok=True)
    for leftover in tmp_dir.glob("augmented_model*.onnx"):
        leftover.unlink()
