"""Weight quantization: optimum-quanto on CPU against the float model; bitsandbytes on GPU (or a clear error)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from embedforge.compress.weights import WeightQuantError, load_bnb, quantize_quanto, require_bnb, weight_bytes
from embedforge.testing import sample_texts


@pytest.fixture()
def st_model(tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedforge.testing import tiny_bert_st

    return SentenceTransformer(str(tiny_bert_st(tmp_path / "m")), device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-quanto not installed")
def test_quanto_shrinks_weights_and_keeps_vectors(st_model):
    texts = sample_texts()
    before = st_model.encode(texts, convert_to_numpy=True)
    lin_before = sum(m.weight.numel() for m in st_model.modules() if isinstance(m, torch.nn.Linear))
    bytes_before = weight_bytes(st_model)
    info = quantize_quanto(st_model, "int8")
    assert info["quantized_linear_layers"] > 0
    after = st_model.encode(texts, convert_to_numpy=True)
    cos = np.sum(before * after, axis=1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
    assert cos.min() > 0.999
    assert not np.allclose(before, after)  # the weights really changed
    # int8 linear weights take 1 byte instead of 4 (plus per-channel scales).
    assert bytes_before - weight_bytes(st_model) > 0.9 * lin_before * 3
    with pytest.raises(ValueError, match="int8"):
        quantize_quanto(st_model, "int4")


def test_bnb_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(WeightQuantError, match="CUDA GPU"):
        require_bnb()
    with pytest.raises(WeightQuantError, match="quanto-int8"):
        load_bnb(tmp_path, bits=8)


def test_bnb_bits_are_checked():
    from embedforge.compress.weights import bnb_config

    with pytest.raises(ValueError, match="8 or 4"):
        bnb_config(3)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_bnb_load_and_save_round_trip_on_gpu(tmp_path, bits):
    from embedforge.compress.pipeline import run
    from embedforge.compress.config import CompressConfig
    from embedforge.configs import StageContext
    from embedforge.testing import tiny_decoder
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    hf = tiny_decoder("llama", tmp_path / "llama", hidden_size=64, intermediate_size=128)
    t = Transformer(str(hf))
    src = tmp_path / "st"
    SentenceTransformer(modules=[t, Pooling(64)], device="cpu").save(str(src))
    texts = sample_texts()
    ref = SentenceTransformer(str(src), device="cuda").encode(texts, convert_to_numpy=True)
    out = tmp_path / f"bnb{bits}"
    run(CompressConfig(model=str(src), weights=f"bnb-{bits}bit"), out, StageContext())
    model = load_bnb(out, bits)
    got = model.encode(texts, convert_to_numpy=True)
    cos = np.sum(ref * got, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > (0.99 if bits == 8 else 0.9)
    assert any("Linear8bitLt" in type(m).__name__ or "Linear4bit" in type(m).__name__ for m in model.modules())
