"""Export of a tiny sentence-transformers BERT: every graph variant against PyTorch, server layouts, binary codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedforge.configs import ConfigError
from embedforge.export.config import ExportConfig
from embedforge.testing import sample_texts

TEXTS = sample_texts() + ["a", "the " * 200 + "end"]  # includes a text longer than max_seq_length (128)


def _st_reference(model_dir: Path, texts: list[str], truncate_dim: int | None = None) -> np.ndarray:
    """sentence-transformers' own vectors, truncated and L2-normalized with numpy."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    emb = st.encode(texts, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    if truncate_dim:
        emb = emb[:, :truncate_dim]
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def full_export(tiny_st_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedforge.export.pipeline import export_model

    out = tmp_path_factory.mktemp("export") / "tiny-bert"
    from embedforge.export.precision import SENSITIVE_MATMULS

    cfg = ExportConfig(model=str(tiny_st_dir), static_int8=True, binary=True, int8=["avx512_vnni", "avx2"],
                       int8_keep_float=list(SENSITIVE_MATMULS), int8_embeddings=False)
    return export_model(cfg, out)


def test_config_imports_without_torch() -> None:
    code = "import sys, embedforge.export.config as c; c.ExportConfig(model='x'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"int8": ["avx3"]}, "int8"), ({"exporter": "tf"}, "exporter"), ({"truncate_dim": 0}, "truncate_dim"),
     ({"fp32": False}, "fp32"), ({"int8_min_cosine": 2.0}, "int8_min_cosine"), ({"int8": ["avx2", "avx2"]}, "int8")],
)
def test_config_rejects_bad_values(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        ExportConfig(model="m", **changes)
    assert err.value.key == key


def test_layout_and_manifest(full_export: Path) -> None:
    onnx_dir = full_export / "onnx"
    expected = {"model.onnx", "model_last_hidden_state.onnx", "model_O2.onnx", "model_fp16.onnx",
                "model_qint8_avx512_vnni.onnx", "model_qint8_avx2.onnx", "model_qdq_int8.onnx"}
    assert expected <= {p.name for p in onnx_dir.iterdir()}
    for name in ("config.json", "tokenizer.json", "1_Pooling/config.json", "manifest.json", "SERVING.md",
                 "embedforge.json"):
        assert (full_export / name).is_file(), name
    pool = json.loads((full_export / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_mean_tokens"] is True and pool["pooling_mode_cls_token"] is False
    assert pool["word_embedding_dimension"] == 32
    m = json.loads((full_export / "manifest.json").read_text())
    assert m["inputs"] == ["input_ids", "attention_mask"]  # this tokenizer makes no token_type_ids
    assert m["outputs"] == ["sentence_embedding", "binary_embedding"]
    assert m["dims"] == {"sentence_embedding": 32, "binary_embedding": 4}
    assert m["normalized"] is True and m["pooling"]["mode"] == "mean"
    assert m["fusion"]["applied"] and m["fusion"]["ops"]["Attention"] == 2
    for name, info in m["graphs"].items():
        assert info["parity"]["passed"] and info["parity"]["probes"] >= 10, name
    assert m["graphs"]["fp32"]["parity"]["min_cosine"] > 0.9999
    assert m["graphs"]["fp16"]["parity"]["min_cosine"] > 0.999
    assert m["graphs"]["int8_avx2"]["quantization"]["reduce_range"] is True
    assert m["servers"]["vespa"]["binary_tensor"] == "tensor<int8>(x[4])"
    assert m["servers"]["qdrant"]["vectors"] == {"size": 32, "distance": "Dot"}
    assert m["servers"]["text-embeddings-inference"]["onnx"] == "onnx/model.onnx"
    lineage = json.loads((full_export / "embedforge.json").read_text())
    assert lineage["stage"] == "export"


@pytest.mark.parametrize("file", ["model.onnx", "model_O2.onnx", "model_fp16.onnx", "model_qint8_avx512_vnni.onnx",
                                  "model_qdq_int8.onnx"])
def test_onnx_encoder_matches_sentence_transformers(full_export: Path, tiny_st_dir: Path, file: str) -> None:
    from embedforge.export.encoder import OnnxEncoder

    enc = OnnxEncoder(full_export, f"onnx/{file}")
    got = enc.encode(TEXTS, batch_size=3)
    ref = _st_reference(tiny_st_dir, TEXTS)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    floor = 0.99999 if file in ("model.onnx", "model_O2.onnx") else 0.999
    assert cos.min() > floor
    if file == "model.onnx":
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_token_graph_matches_token_embeddings(full_export: Path, tiny_st_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.export.encoder import OnnxEncoder

    st = SentenceTransformer(str(tiny_st_dir), device="cpu")
    enc = OnnxEncoder(full_export, "onnx/model_last_hidden_state.onnx")
    got = enc.run(TEXTS, batch_size=4)["last_hidden_state"]
    for text, tokens in zip(TEXTS, got):
        ref = st.encode([text], output_value="token_embeddings")[0].numpy()
        assert tokens.shape == ref.shape
        np.testing.assert_allclose(tokens, ref, atol=1e-4)
    # a server pooling these itself (mean over real tokens, then L2) gets the sentence vectors back
    pooled = np.stack([t.mean(0) for t in got])
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, _st_reference(tiny_st_dir, TEXTS), atol=1e-4)


def test_binary_output_is_packbits_and_searchable_with_faiss(full_export: Path, tiny_st_dir: Path) -> None:
    import faiss

    from embedforge.export.encoder import OnnxEncoder

    enc = OnnxEncoder(full_export)
    floats = enc.encode(TEXTS)
    codes = enc.encode_binary(TEXTS)
    assert codes.dtype == np.uint8 and codes.shape == (len(TEXTS), 4)
    np.testing.assert_array_equal(codes, np.packbits(floats > 0, axis=-1))
    np.testing.assert_array_equal(codes, np.packbits(_st_reference(tiny_st_dir, TEXTS) > 0, axis=-1))
    index = faiss.IndexBinaryFlat(32)
    index.add(codes)
    dist, _ = index.search(codes[:3], len(TEXTS))
    bits = np.unpackbits(codes, axis=-1)
    hamming = (bits[:3, None, :] != bits[None, :, :]).sum(-1)  # independent hamming distances
    np.testing.assert_array_equal(np.sort(hamming, axis=1), dist)


def test_onnx_encoder_works_with_evaluation(full_export: Path, tiny_st_dir: Path) -> None:
    from embedforge.evaluation import evaluate_sts
    from embedforge.export.encoder import OnnxEncoder

    texts = sample_texts()
    pairs = {"sentence1": texts[:5], "sentence2": texts[5:], "score": [0.1, 0.5, 0.2, 0.9, 0.4]}
    onnx_scores = evaluate_sts(OnnxEncoder(full_export), pairs, show_progress=False)
    st_scores = evaluate_sts(str(tiny_st_dir), pairs, show_progress=False)
    assert onnx_scores["spearman"] == pytest.approx(st_scores["spearman"], abs=1e-6)
    # An export directory given by path is evaluated through its ONNX graph (what `embedforge eval DIR` does).
    from embedforge.evaluation import as_encoder

    assert isinstance(as_encoder(str(full_export)), OnnxEncoder)
    by_path = evaluate_sts(str(full_export), pairs, show_progress=False)
    assert by_path["spearman"] == pytest.approx(onnx_scores["spearman"], abs=1e-9)


def test_truncation_and_normalization_inside_graph(tiny_st_dir: Path, tmp_path: Path) -> None:
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model

    cfg = ExportConfig(model=str(tiny_st_dir), truncate_dim=16, fp16=False, int8=[], last_hidden_state=False,
                       optimize="none")
    out = export_model(cfg, tmp_path / "trunc")
    got = OnnxEncoder(out).encode(TEXTS)
    assert got.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, _st_reference(tiny_st_dir, TEXTS, truncate_dim=16), atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["dims"]["sentence_embedding"] == 16


def test_export_past_tolerance_fails_and_writes_nothing(tiny_st_dir: Path, tmp_path: Path) -> None:
    from embedforge.export.parity import ParityError
    from embedforge.export.pipeline import export_model

    cfg = ExportConfig(model=str(tiny_st_dir), fp16=False, int8=["avx2"], last_hidden_state=False,
                       optimize="none", int8_min_cosine=1.0)
    with pytest.raises(ParityError, match=r"model_qint8_avx2\.onnx does not match the PyTorch model: min cosine"):
        export_model(cfg, tmp_path / "strict")
    assert not (tmp_path / "strict").exists()


def test_dynamo_exporter(tiny_st_dir: Path, tmp_path: Path) -> None:
    from embedforge.export.pipeline import export_model

    cfg = ExportConfig(model=str(tiny_st_dir), exporter="dynamo", fp16=False, int8=[], last_hidden_state=False,
                       optimize="none")
    out = export_model(cfg, tmp_path / "dynamo")
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["fp32"]["parity"]["max_abs_diff"] < 1e-4


def test_stage_runner_via_registry(tiny_st_dir: Path, tmp_path: Path) -> None:
    from embedforge import stages
    from embedforge.configs import StageContext
    from embedforge.recipe import build_config

    cfg = build_config(stages.config_class("export"),
                       {"model": str(tiny_st_dir), "fp16": False, "int8": [], "last_hidden_state": False})
    stages.runner("export")(cfg, tmp_path / "staged", StageContext(recipe_hash="abc"))
    lineage = json.loads((tmp_path / "staged" / "embedforge.json").read_text())
    assert lineage["recipe_hash"] == "abc" and lineage["metrics"]["fp32"]["passed"]


def test_cli_export(tiny_st_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedforge.cli import main

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["export", str(tiny_st_dir), "--out", str(out), "fp16=false", "int8=[arm64]",
                                       "last_hidden_state=false"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["graphs"]) == {"fp32", "fp32_fused", "int8_arm64"}


def _float_matmuls(path: Path) -> tuple[set[str], int]:
    """Names of the MatMul nodes of a graph that still multiply by a float weight, and the MatMulInteger count."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name: i.data_type for i in graph.initializer}
    floats = {n.name for n in graph.node
              if n.op_type == "MatMul" and weights.get(n.input[1]) == onnx.TensorProto.FLOAT}
    return floats, sum(n.op_type == "MatMulInteger" for n in graph.node)


def test_int8_keep_float_recipe_keeps_sensitive_ffn_down_in_float(full_export: Path) -> None:
    from embedforge.export.precision import SENSITIVE_MATMULS

    m = json.loads((full_export / "manifest.json").read_text())
    for target in ("avx512_vnni", "avx2"):
        info = m["graphs"][f"int8_{target}"]
        kept = info["quantization"]["kept_float"]
        # the tiny model has 2 layers: both of its MLP output projections are among the first three
        assert kept["patterns"] == list(SENSITIVE_MATMULS)
        # (each split in two by the first-token split of its MLP block)
        assert sorted(kept["nodes"]) == [f"/chain.0/encoder/layer.{i}/output/dense/MatMul_{half}"
                                         for i in (0, 1) for half in ("first", "rest")]
        assert kept["matmuls"] == 4
        floats, n_int = _float_matmuls(full_export / info["file"])
        assert set(kept["nodes"]) <= floats  # still float MatMuls in the saved int8 graph
        assert n_int >= 2 and not any("attention" in n or "intermediate" in n for n in floats)
        # the parity of every int8 graph with PyTorch is recorded
        assert info["parity"]["passed"] and info["parity"]["min_cosine"] > 0.99
        assert info["quantization"]["embeddings"] == "float"  # int8_embeddings=False


def test_int8_keep_float_patterns_resolve_layers(full_export: Path, tmp_path: Path) -> None:
    from embedforge.export.precision import matmul_nodes, quantize_int8_dynamic

    base = full_export / "onnx" / "model_O2.onnx"
    last = matmul_nodes(base, ["ffn_down:-1"])
    assert last == ["/chain.0/encoder/layer.1/output/dense/MatMul"]
    assert matmul_nodes(base, ["ffn_down:0"]) == ["/chain.0/encoder/layer.0/output/dense/MatMul"]
    assert len(matmul_nodes(base, ["ffn_down:all"])) == 2
    assert matmul_nodes(base, ["Attention_1"]) == ["Attention_1"]  # fused Q/K/V projections can be kept too
    assert matmul_nodes(base, []) == []
    kept = quantize_int8_dynamic(base, tmp_path / "one.onnx", keep_float=["ffn_down:-1"])
    floats, _ = _float_matmuls(tmp_path / "one.onnx")
    assert kept == last and floats == set(last)
    quantize_int8_dynamic(base, tmp_path / "all.onnx", keep_float=[])
    assert _float_matmuls(tmp_path / "all.onnx")[0] == set()
