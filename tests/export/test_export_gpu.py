"""fp16 graph on the CUDA execution provider (skipped without a GPU or without onnxruntime-gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedforge.export.config import ExportConfig
from embedforge.testing import sample_texts


@pytest.mark.gpu
def test_fp16_graph_on_cuda_matches_pytorch(tiny_st_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA execution provider")
    out = export_model(ExportConfig(model=str(tiny_st_dir), int8=[], last_hidden_state=False), tmp_path / "gpu")
    enc = OnnxEncoder(out, "onnx/model_fp16.onnx", providers=["CUDAExecutionProvider"])
    assert enc.session.get_providers()[0] == "CUDAExecutionProvider"
    texts = sample_texts()
    got = enc.encode(texts)
    ref = SentenceTransformer(str(tiny_st_dir), device="cuda").encode(texts, convert_to_numpy=True)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999
