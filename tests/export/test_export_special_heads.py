"""Export end to end of models whose head is not a plain pooled vector: a multi-bit learned binarizer and a
static (token-table) student. The ONNX graph must give what the PyTorch model gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedforge.export.config import ExportConfig
from embedforge.testing import sample_texts

TEXTS = sample_texts() + ["a", "the " * 300 + "end"]
FAST = dict(int8=[], fp16=False, last_hidden_state=False, optimize="none")


@pytest.mark.parametrize("output", ["float", "packed"])
def test_learned_binarizer_with_two_bits_exports(tiny_st_dir: Path, tmp_path: Path, output: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model
    from embedforge.modules import load_embedder
    from embedforge.modules.binarizer import LearnedBinarizer

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_st_dir), device="cpu")
    model.append(Normalize())
    binarizer = LearnedBinarizer(32, bits=2, output=output)
    with torch.no_grad():  # leave the identity start: random residual MLPs make level 1 differ from level 0
        for level in binarizer.levels:
            level.down.weight.normal_(0, 0.5)
    model.append(binarizer)
    src = tmp_path / "with-binarizer"
    model.save(str(src))

    out = export_model(ExportConfig(model=str(src), **FAST), tmp_path / "export")

    reference = load_embedder(src)
    features = [reference.encode([t], output_value=None)[0] for t in TEXTS]
    ref_codes = np.stack([f["binary_embedding"].numpy() for f in features])
    ref_vectors = np.stack([f["sentence_embedding"].float().numpy() for f in features])
    assert ref_codes.shape == (len(TEXTS), 8)  # 2 bits x 32 dims
    got = OnnxEncoder(out).run(TEXTS, batch_size=3)
    np.testing.assert_array_equal(np.stack(got["binary_embedding"]), ref_codes)
    if output == "float":
        ref = ref_vectors / np.linalg.norm(ref_vectors, axis=1, keepdims=True)
        np.testing.assert_allclose(np.stack(got["sentence_embedding"]), ref, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dims"]["binary_embedding"] == 8
    assert manifest["graphs"]["fp32"]["parity"]["bit_agreement"] == 1.0
    assert manifest["binary"]["layout"].startswith("2 levels of 32 sign bits")
    assert manifest["servers"]["faiss"]["binary_index"].startswith("IndexBinaryFlat(64)")
    assert manifest["servers"]["vespa"]["binary_tensor"] == "tensor<int8>(x[8])"


def test_bit_agreement_refuses_codes_of_another_width() -> None:
    from embedforge.export.parity import ParityError, bit_agreement

    floats = np.array([[0.5, -0.2, 0.1, -0.3, 0.2, 0.1, -0.1, 0.4]], dtype=np.float32)
    assert bit_agreement(floats, np.packbits(floats > 0, axis=-1)) == 1.0
    with pytest.raises(ParityError, match="binary output has 2 bytes per vector, the PyTorch model 1"):
        bit_agreement(floats, np.zeros((1, 2), dtype=np.uint8))


def _static_model(tiny_st_dir: Path, folder: Path) -> Path:
    """A static student as distill builds it (StaticEmbedding + Normalize), with a random token table."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    tokenizer = SentenceTransformer(str(tiny_st_dir), device="cpu")[0].tokenizer
    torch.manual_seed(0)
    table = torch.randn(tokenizer.vocab_size, 16)
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=table), Normalize()],
                        device="cpu").save(str(folder))
    return folder


def test_static_student_exports_and_matches_pytorch(tiny_st_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model

    src = _static_model(tiny_st_dir, tmp_path / "static")
    out = export_model(ExportConfig(model=str(src), int8=["avx2"], binary=True), tmp_path / "export")

    ref = SentenceTransformer(str(src), device="cpu").encode(TEXTS, convert_to_numpy=True)
    encoder = OnnxEncoder(out)
    got = encoder.encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(got, ref, atol=1e-5)  # every text whole: a token table has no length limit
    np.testing.assert_array_equal(encoder.encode_binary(TEXTS), np.packbits(ref > 0, axis=-1))
    int8 = OnnxEncoder(out, "onnx/model_qint8_avx2.onnx").encode(TEXTS, batch_size=4)
    assert float((int8 * ref).sum(1).min()) > 0.9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["max_length"] == 1_000_000 and manifest["dims"]["sentence_embedding"] == 16
    assert "last_hidden_state" not in manifest["graphs"]


def test_static_student_from_distill_exports(tiny_st_dir: Path, tmp_path: Path) -> None:
    """The student distill.students.static_student builds (when model2vec is installed) goes through export."""
    pytest.importorskip("model2vec.distill")
    from embedforge.distill.students import static_student
    from embedforge.export.pipeline import export_model
    from embedforge.modules import load_embedder

    student = static_student(load_embedder(tiny_st_dir), dims=8, teacher_path=tiny_st_dir)
    student.save(str(tmp_path / "student"))
    out = export_model(ExportConfig(model=str(tmp_path / "student"), **FAST), tmp_path / "export")
    from embedforge.export.encoder import OnnxEncoder

    np.testing.assert_allclose(OnnxEncoder(out).encode(TEXTS), student.encode(TEXTS, convert_to_numpy=True), atol=1e-5)


@pytest.mark.parametrize("max_seq_length", [129, 4096])
def test_export_refuses_max_seq_length_beyond_position_embeddings(tiny_st_dir: Path, tmp_path: Path,
                                                                   max_seq_length: int) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.configs import ConfigError
    from embedforge.export.pipeline import export_model
    from embedforge.modules.loading import position_limit

    model = SentenceTransformer(str(tiny_st_dir), device="cpu")
    assert position_limit(model) == model[0].auto_model.config.max_position_embeddings == 128
    with pytest.raises(ConfigError) as info:
        export_model(ExportConfig(model=str(tiny_st_dir), max_seq_length=max_seq_length), tmp_path / "export")
    assert str(info.value) == (f"max_seq_length: {max_seq_length} is more than {tiny_st_dir} can read (its position "
                               "embeddings cover 128 tokens); use at most 128")
    assert not (tmp_path / "export").exists()


def test_export_refuses_truncate_dim_beyond_the_model(tiny_st_dir: Path, tmp_path: Path) -> None:
    from embedforge.configs import ConfigError
    from embedforge.export.pipeline import export_model

    with pytest.raises(ConfigError) as info:
        export_model(ExportConfig(model=str(tiny_st_dir), truncate_dim=4096, binary=True), tmp_path / "export")
    assert str(info.value) == (f"truncate_dim: 4096 is larger than the 32 dimensions of {tiny_st_dir}; use at most "
                               "32 or leave it unset")
    assert not (tmp_path / "export").exists()


def test_static_student_evaluates(tiny_st_dir: Path, tmp_path: Path) -> None:
    """Evaluation cuts texts to the model's limit; a static table has none (max_seq_length is infinite)."""
    from embedforge.evaluation import encode
    from embedforge.model import load_model

    model = load_model(_static_model(tiny_st_dir, tmp_path / "static"))
    assert encode(model, TEXTS, show_progress=False).shape == (len(TEXTS), 16)
