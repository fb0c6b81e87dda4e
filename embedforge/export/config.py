"""Configuration of the ``export`` stage (import-light: no torch, no onnxruntime).

One :class:`ExportConfig` describes which ONNX graphs an export directory gets, how each is checked against the
PyTorch model, and which server files are written next to them. The recipe loader and the CLI build it; the runner
is :func:`embedforge.export.pipeline.run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from embedforge.configs import check, choice, opt


class Exporter(str, Enum):
    """Which ``torch.onnx.export`` path builds the graph."""

    TORCHSCRIPT = "torchscript"  # tracing exporter: fast, and its graphs fuse with onnxruntime's BERT optimizer
    DYNAMO = "dynamo"  # torch.export based exporter


class Optimize(str, Enum):
    """Graph optimization before quantization."""

    AUTO = "auto"  # fuse attention / layer norm / GELU with onnxruntime's transformer optimizer for BERT-like models
    NONE = "none"
    TRANSFORMER = "transformer"  # always try the transformer optimizer (falls back to the plain graph on failure)


class AttnImplementation(str, Enum):
    """Attention kernel the backbone is traced with (the reference check always uses the model as loaded)."""

    EAGER = "eager"  # explicit matmul/softmax: the pattern onnxruntime's fusions recognise
    SDPA = "sdpa"
    KEEP = "keep"


class Int8Target(str, Enum):
    """CPU families that get their own dynamically quantized int8 graph (hub naming ``model_qint8_<target>``)."""

    AVX512_VNNI = "avx512_vnni"
    AVX2 = "avx2"
    ARM64 = "arm64"


@dataclass
class ExportConfig:
    """Export a model directory to ONNX graphs with pooling and normalization inside, checked against PyTorch."""

    model: str = opt(help="model directory (embedforge / sentence-transformers), alias or hub id to export")
    fp32: bool = opt(True, help="write onnx/model.onnx (fp32, the graph text-embeddings-inference serves)")
    fp16: bool = opt(True, help="write onnx/model_fp16.onnx (fp16 weights and compute, fp32 inputs/outputs; for GPU)")
    int8: list[str] = opt(
        help="CPU targets for dynamic per-channel int8 graphs onnx/model_qint8_<target>.onnx "
        "(avx512_vnni, avx2, arm64); empty list: none",
        factory=lambda: [t.value for t in Int8Target],
    )
    int8_keep_float: list[str] | None = opt(
        None, help="MatMuls the dynamic int8 graphs keep in float: substrings of node names, 'ffn_down:<layers>' "
        "(MLP output projections of the listed layers, e.g. 'ffn_down:0,1,2', 'ffn_down:-1', 'ffn_down:all') or "
        "'head' (a Dense layer after pooling); None: auto -- ['down_proj', 'v_proj', 'head'] for decoders, whose "
        "MLP inputs and pooled vectors carry outlier activations, none for encoders. ['ffn_down:0,1,2'] keeps a "
        "BERT-like encoder closest to fp32, at some int8 speed"
    )
    int8_split_first_token: bool | None = opt(
        None, help="int8 graphs: run each MLP block on the first token and on the other tokens separately, so the "
        "first token's outlier activations get their own dynamic scale (same int8 weights, same float result; "
        "right-padded models only). None: auto -- on for BERT-like encoders, whose first token ([CLS]) carries the "
        "outliers; off for decoders, whose default keeps the MLP down projections in float instead"
    )
    int8_embeddings: bool = opt(
        True, help="quantize the embedding tables (Gather / fused EmbedLayerNormalization) of the int8 graphs too "
        "(they cost no compute either way): about 4x smaller files; false keeps them float, slightly closer to fp32"
    )
    blockwise_int8: bool = opt(
        False, help="also write onnx/model_q8_blockwise.onnx: 8-bit weights in blocks of 32 with int8 compute on "
        "blockwise-quantized activations (MatMulNBits); slower than dynamic int8 but far closer to fp32 on LLMs"
    )
    static_int8: bool = opt(
        False, help="also write onnx/model_qdq_int8.onnx: static QDQ int8 calibrated on calibration_data texts"
    )
    calibration_data: str | None = opt(
        None, help="texts for static int8 calibration: a built-in name (e.g. 'texts'), a data file or beir:FOLDER; "
        "None: the built-in probe sentences"
    )
    calibration_size: int = opt(256, help="number of calibration texts for static int8")
    last_hidden_state: bool = opt(
        True, help="write onnx/model_last_hidden_state.onnx (token vectors, no pooling) for servers that pool "
        "themselves, e.g. Infinity"
    )
    binary: bool = opt(
        False, help="add a packed uint8 output 'binary_embedding' (numpy packbits of x > 0) to the float graphs"
    )
    truncate_dim: int | None = opt(None, help="Matryoshka truncation inside the graph (before normalization)")
    normalize: bool = opt(True, help="L2-normalize the sentence embedding inside the graph (after truncation)")
    optimize: str = opt(Optimize.AUTO.value, help="graph fusion before quantization: auto, none or transformer")
    exporter: str = opt(Exporter.TORCHSCRIPT.value, help="torch.onnx exporter: torchscript or dynamo")
    attn_implementation: str = opt(
        AttnImplementation.EAGER.value, help="attention kernel to trace: eager (fusable), sdpa, or keep as loaded"
    )
    opset: int = opt(17, help="ONNX opset of the exported graphs")
    max_seq_length: int | None = opt(None, help="token limit recorded for servers (default: the model's own)")
    probe_texts: str | None = opt(None, help="extra parity probe texts: a text file with one text per line")
    probe_max_tokens: int = opt(512, help="the long parity probe is made about this many tokens long (capped at "
                                "the model's max_seq_length)")
    fp32_min_cosine: float = opt(0.9999, help="parity: smallest cosine allowed between fp32 ONNX and PyTorch")
    fp32_max_abs: float = opt(1e-3, help="parity: largest absolute difference allowed for fp32, relative to the "
                              "largest reference magnitude (at least 1)")
    fp16_min_cosine: float = opt(0.995, help="parity: smallest cosine allowed for the fp16 graph")
    int8_min_cosine: float = opt(0.9, help="parity: smallest cosine allowed for int8 graphs")
    trust_remote_code: bool = opt(False, help="let transformers run model code shipped with the checkpoint")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "is required (the model directory to export)")
        self.optimize = choice(Optimize, self.optimize, "optimize").value
        self.exporter = choice(Exporter, self.exporter, "exporter").value
        self.attn_implementation = choice(AttnImplementation, self.attn_implementation, "attn_implementation").value
        check(isinstance(self.int8, (list, tuple)), "int8", "must be a list of CPU targets")
        self.int8 = [choice(Int8Target, t, "int8").value for t in self.int8]
        check(len(set(self.int8)) == len(self.int8), "int8", "lists a target twice")
        check(self.fp32, "fp32", "cannot be turned off: every other graph is derived from onnx/model.onnx")
        check(self.truncate_dim is None or self.truncate_dim > 0, "truncate_dim", "must be a positive integer")
        check(11 <= self.opset <= 23, "opset", "must be between 11 and 23")
        check(self.calibration_size > 0, "calibration_size", "must be positive")
        check(self.probe_max_tokens >= 8, "probe_max_tokens", "must be at least 8")
        check(self.max_seq_length is None or self.max_seq_length > 0, "max_seq_length", "must be positive")
        for key in ("fp32_min_cosine", "fp16_min_cosine", "int8_min_cosine"):
            value = getattr(self, key)
            check(-1.0 <= value <= 1.0, key, "must be a cosine between -1 and 1")
        check(self.fp32_max_abs > 0, "fp32_max_abs", "must be positive")
