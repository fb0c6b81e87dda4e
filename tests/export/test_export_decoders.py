"""Export of decoder embedders (bidirectional and causal) with every pooling head of the convert workflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedforge.export.config import ExportConfig
from embedforge.testing import sample_texts

TEXTS = sample_texts() + ["a", "word " * 150]  # the last one is longer than max_seq_length (64)
FAST = dict(fp16=False, int8=[], last_hidden_state=False, optimize="none")


def _embedder(llm_dir: Path, out: Path, **options) -> Path:
    from embedforge.convert.embedder import build_embedder
    from embedforge.model import save_model

    options.setdefault("max_seq_length", 64)
    model = build_embedder(str(llm_dir), **options)
    return save_model(model, out, stage="convert", source=str(llm_dir))


def _reference(model_dir: Path, texts: list[str]) -> np.ndarray:
    """PyTorch vectors, one text at a time (no padding), L2-normalized with numpy."""
    from embedforge.modules import load_embedder

    model = load_embedder(str(model_dir))
    emb = np.stack([model.encode([t], convert_to_numpy=True, normalize_embeddings=False)[0] for t in texts])
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _check(model_dir: Path, out: Path, **config) -> dict:
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model

    export_model(ExportConfig(model=str(model_dir), **{**FAST, **config}), out)
    got = OnnxEncoder(out).encode(TEXTS, batch_size=4)  # padded, length-sorted batches
    np.testing.assert_allclose(got, _reference(model_dir, TEXTS), atol=2e-5)
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("pooling", "padding_side"),
    [("mean", "right"), ("lasttoken", "left"), ("weightedmean", "right"),
     ("latent_attention", "right"), ("multi_layer", "left"), ("echo", "right")],
)
def test_llama_heads(tiny_llama_dir: Path, tmp_path: Path, pooling: str, padding_side: str) -> None:
    extra = {"latent_count": 8, "latent_heads": 4} if pooling == "latent_attention" else {}
    if pooling == "multi_layer":
        extra = {"multilayer_heads": 4}
    model_dir = _embedder(tiny_llama_dir, tmp_path / "model", pooling=pooling, padding_side=padding_side, **extra)
    manifest = _check(model_dir, tmp_path / "export")
    assert manifest["tokenizer"]["padding_side"] == padding_side
    if pooling == "echo":
        assert manifest["tokenizer"]["echo"] is not None and manifest["prompt_pooling"] is False


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma3", "phi3"])
def test_other_architectures(arch: str, tmp_path: Path) -> None:
    from embedforge.testing import tiny_decoder

    llm = tiny_decoder(arch, tmp_path / "llm")
    _check(_embedder(llm, tmp_path / "model", pooling="mean"), tmp_path / "export")


def test_causal_decoder_with_int8_and_token_graph(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from embedforge.export.encoder import OnnxEncoder

    model_dir = _embedder(tiny_llama_dir, tmp_path / "model", pooling="mean", bidirectional=False)
    manifest = _check(model_dir, tmp_path / "export", int8=["arm64"], last_hidden_state=True, fp16=True)
    assert manifest["fusion"]["applied"] is False  # decoders keep the plain graph
    assert {"fp32", "fp16", "int8_arm64", "last_hidden_state"} <= set(manifest["graphs"])
    # decoders keep each layer's MLP down and value projections in float by default (2 layers here) and skip
    # the first-token split unless asked for
    quant = manifest["graphs"]["int8_arm64"]["quantization"]
    kept = quant["kept_float"]
    assert quant["first_token_split"]["mlp_blocks"] == 0
    assert kept["patterns"] == ["down_proj", "v_proj", "head"] and kept["matmuls"] == 4
    assert sorted(n.split("/")[-2] for n in kept["nodes"]) == ["down_proj", "down_proj", "v_proj", "v_proj"]
    assert manifest["graphs"]["int8_arm64"]["quantization"]["embeddings"] == "int8"
    got = OnnxEncoder(tmp_path / "export", "onnx/model_qint8_arm64.onnx").encode(TEXTS)
    cos = (got * _reference(model_dir, TEXTS)).sum(1)
    assert cos.min() > 0.95


def _float_matmul_weights(graph: Path) -> set[str]:
    """Initializer names that a float MatMul / Gemm of ``graph`` multiplies by (the weights left unquantized)."""
    import onnx

    g = onnx.load(str(graph), load_external_data=False).graph
    names = {i.name for i in g.initializer}
    return {x for n in g.node if n.op_type in ("MatMul", "Gemm") for x in n.input if x in names}


def test_decoder_int8_keeps_a_dense_head_in_float(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A Dense head after pooling (the distilled students' projection) stays float in the int8 graph by default:
    onnxruntime rewrites a Gemm to "<name>_MatMul" before it reads the excluded nodes, which once quantized the
    head whatever the config said; ``int8_keep_float`` naming only the MLP quantizes it, and the head's int8
    activation scale (set by the pooled vector's outlier channels) moves the vectors away from fp32."""
    import torch
    from sentence_transformers.base.modules import Dense

    from embedforge.export.encoder import OnnxEncoder
    from embedforge.model import save_model
    from embedforge.modules import load_embedder

    model = load_embedder(str(_embedder(tiny_llama_dir, tmp_path / "base", pooling="mean")))
    dim = model.get_embedding_dimension()
    head = Dense(dim, 24, bias=True, activation_function=torch.nn.Identity())
    model.append(head)
    weight = f"chain.{len(model) - 1}.linear.weight"
    model_dir = save_model(model, tmp_path / "model", stage="convert", source="test")
    _check(model_dir, tmp_path / "auto", int8=["avx512_vnni"])
    graph = tmp_path / "auto" / "onnx" / "model_qint8_avx512_vnni.onnx"
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    kept = manifest["graphs"]["int8_avx512_vnni"]["quantization"]["kept_float"]["nodes"]
    assert [n for n in kept if not n.startswith("/chain.0/")] == [f"/chain.{len(model) - 1}/linear/Gemm"]
    # the head's weight (transposed when the quantizer rewrites the Gemm as a MatMul) is still a float input
    assert any(w.startswith(weight) for w in _float_matmul_weights(graph))
    auto = OnnxEncoder(tmp_path / "auto", "onnx/model_qint8_avx512_vnni.onnx").encode(TEXTS)

    _check(model_dir, tmp_path / "mlp", int8=["avx512_vnni"], int8_keep_float=["down_proj"])
    quantized = tmp_path / "mlp" / "onnx" / "model_qint8_avx512_vnni.onnx"
    assert not any(w.startswith(weight) for w in _float_matmul_weights(quantized))
    mlp = OnnxEncoder(tmp_path / "mlp", "onnx/model_qint8_avx512_vnni.onnx").encode(TEXTS)
    ref = _reference(model_dir, TEXTS)
    assert (auto * ref).sum(1).mean() > (mlp * ref).sum(1).mean()


def test_decoder_int8_with_first_token_split(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from embedforge.export.encoder import OnnxEncoder

    model_dir = _embedder(tiny_llama_dir, tmp_path / "model", pooling="mean", bidirectional=True)
    manifest = _check(model_dir, tmp_path / "export", int8=["avx512_vnni"], int8_split_first_token=True,
                      int8_keep_float=[])
    quant = manifest["graphs"]["int8_avx512_vnni"]["quantization"]
    # both Llama MLP blocks (gate and up projections, SiLU, product, down projection) are split
    assert quant["first_token_split"]["mlp_blocks"] == 2
    assert all("mlp/down_proj" in n for n in quant["first_token_split"]["down_projections"])
    got = OnnxEncoder(tmp_path / "export", "onnx/model_qint8_avx512_vnni.onnx").encode(TEXTS)
    assert (got * _reference(model_dir, TEXTS)).sum(1).min() > 0.95


def test_model_binarizer_module_exports(tiny_st_dir: Path, tmp_path: Path) -> None:
    """A model that ends in the compress workflow's SignBinarizer keeps its packed output in the graph."""
    from sentence_transformers import SentenceTransformer

    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model
    from embedforge.model import save_model
    from embedforge.modules.binarizer import SignBinarizer

    st = SentenceTransformer(str(tiny_st_dir), device="cpu")
    binarized = SentenceTransformer(modules=[*st, SignBinarizer(32, output="passthrough")], device="cpu")
    model_dir = save_model(binarized, tmp_path / "model", stage="compress", source=str(tiny_st_dir))
    out = export_model(ExportConfig(model=str(model_dir), **FAST), tmp_path / "export")
    enc = OnnxEncoder(out)
    assert enc.output_names == ["sentence_embedding", "binary_embedding"]
    ref = st.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_array_equal(enc.encode_binary(TEXTS), np.packbits(ref > 0, axis=-1))
