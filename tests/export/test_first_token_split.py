"""The first-token split of MLP blocks before dynamic int8 (embedforge.export.precision.split_first_token)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

H, F = 32, 64


def _mlp_graph(path: Path, *, mixing: bool = False) -> None:
    """x -> MatMul(up) + bias -> Gelu -> MatMul(down) -> y, optionally with a Softmax over tokens in between (not a
    per-token block: it must be left alone)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (H, F)).astype(np.float32), "w_up"),
             numpy_helper.from_array(rng.normal(0, 0.1, F).astype(np.float32), "b_up"),
             numpy_helper.from_array(rng.normal(0, 0.2, (F, H)).astype(np.float32), "w_down")]
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["up"], name="up"),
             helper.make_node("Add", ["up", "b_up"], ["up_b"], name="bias"),
             helper.make_node("Softmax" if mixing else "Relu", ["up_b"], ["act"], name="act", **({"axis": 1} if mixing else {})),
             helper.make_node("MatMul", ["act", "w_down"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", H])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def test_split_is_exact_in_float_and_gives_the_first_token_its_own_int8_scale(tmp_path: Path) -> None:
    from embedforge.export.precision import quantize_int8_dynamic, split_first_token

    _mlp_graph(tmp_path / "mlp.onnx")
    assert split_first_token(tmp_path / "mlp.onnx", tmp_path / "split.onnx", ["down"]) == ["down"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "split.onnx")).graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Slice") == 2 and ops.count("Concat") == 1

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (3, 20, H)).astype(np.float32)
    x[:, 0] *= 40.0  # an outlier first token, as BERT's [CLS] or an LLM's attention-sink token
    ref = _run(tmp_path / "mlp.onnx", x)
    np.testing.assert_allclose(_run(tmp_path / "split.onnx", x), ref, rtol=1e-5, atol=1e-4)

    quantize_int8_dynamic(tmp_path / "mlp.onnx", tmp_path / "plain_int8.onnx")
    quantize_int8_dynamic(tmp_path / "split.onnx", tmp_path / "split_int8.onnx")
    # both halves share one int8 weight tensor per projection
    weights = [i.name for i in onnx.load(str(tmp_path / "split_int8.onnx")).graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_quantized")]
    assert sorted(weights) == ["w_down_quantized", "w_up_quantized"]

    def err(path: Path) -> float:  # relative error on the ordinary tokens
        got = _run(path, x)
        return float(np.linalg.norm(got[:, 1:] - ref[:, 1:]) / np.linalg.norm(ref[:, 1:]))

    plain, split = err(tmp_path / "plain_int8.onnx"), err(tmp_path / "split_int8.onnx")
    assert split < plain / 3, (plain, split)


def test_token_mixing_block_is_left_unsplit(tmp_path: Path) -> None:
    from embedforge.export.precision import split_first_token

    _mlp_graph(tmp_path / "mix.onnx", mixing=True)
    assert split_first_token(tmp_path / "mix.onnx", tmp_path / "out.onnx", ["down"]) == []
    x = np.random.default_rng(2).normal(0, 1, (2, 5, H)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "out.onnx", x), _run(tmp_path / "mix.onnx", x))


def test_bert_export_splits_every_mlp_block(tiny_st_dir: Path, tmp_path: Path) -> None:
    import json

    from embedforge.export.config import ExportConfig
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model
    from embedforge.testing import sample_texts

    out = export_model(ExportConfig(model=str(tiny_st_dir), int8=["avx512_vnni"], fp16=False,
                                    last_hidden_state=False), tmp_path / "exp")
    quant = json.loads((out / "manifest.json").read_text())["graphs"]["int8_avx512_vnni"]["quantization"]
    assert quant["first_token_split"]["mlp_blocks"] == 2  # the tiny BERT has two layers
    assert not list((out / "onnx").glob("*.tmp.onnx"))  # the intermediate graph is not published
    texts = sample_texts()
    fp32 = OnnxEncoder(out, "onnx/model.onnx").encode(texts)
    int8 = OnnxEncoder(out, "onnx/model_qint8_avx512_vnni.onnx").encode(texts)
    assert (fp32 * int8).sum(1).min() > 0.99
