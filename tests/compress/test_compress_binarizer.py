"""Binarizer modules (sign and learned multi-bit): packing, bit-op scoring, training, save/load, ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedforge.compress.binarizer import binarize, level_scores, train_binarizer
from embedforge.compress.config import BinarizerConfig
from embedforge.compress.quantization import faiss_binary_index, binary_search, hamming_distances, pack_binary
from embedforge.modules.binarizer import LearnedBinarizer, SignBinarizer, pack_bits, unpack_bits


def _config(bits: int = 2, **train: object) -> BinarizerConfig:
    """A binarizer config with the stage's own training defaults, except the ``train`` keys given."""
    from embedforge.recipe import build_config

    return build_config(BinarizerConfig, {"model": "unused", "bits": bits, "train": train})


def _clustered(n: int = 600, dim: int = 32, clusters: int = 12, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres with a shared offset (like real sentence embeddings: not centred)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) + 1.5 * rng.standard_normal(dim)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_bits", [8, 13, 64])
def test_pack_bits_matches_numpy_packbits(n_bits):
    bits = torch.randint(0, 2, (5, n_bits)).bool()
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1))
    np.testing.assert_array_equal(unpack_bits(packed, n_bits).numpy(), bits.numpy().astype(np.float32))


def test_learned_binarizer_starts_as_sign_and_bitops_equal_reconstruction_dots():
    x = _clustered(200)
    b = LearnedBinarizer(32, bits=3).eval()
    codes, recon = binarize(b, x)
    assert codes.shape == (200, 3 * 32 // 8)
    # Level 0 of an untrained binarizer is plain sign binarization.
    np.testing.assert_array_equal(codes[:, :4], pack_binary(x))
    # Popcount scoring equals the float inner products of the reconstructions (independent computation).
    scales = b.scales.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(level_scores(codes[:20], codes, scales, 32), recon[:20] @ recon.T, atol=1e-5)
    # Reconstruction is sum_t scale_t * (+-1 levels), read back from the packed bits.
    levels = unpack_bits(torch.from_numpy(codes), 96).numpy().reshape(200, 3, 32) * 2 - 1
    np.testing.assert_allclose(np.einsum("t,ntd->nd", scales, levels), recon, atol=1e-6)


def test_training_improves_similarity_preservation_over_sign(tmp_path):
    x = _clustered(800, seed=1)
    train, held = x[:600], x[600:]
    b, stats = train_binarizer(train, _config(max_steps=80, batch_size=128, learning_rate=3e-3), tmp_path / "ck")
    assert stats["steps"] == 80 and stats["loss_last"] < stats["loss_first"]
    teacher = held @ held.T
    iu = np.triu_indices(len(held), 1)
    codes, recon = binarize(b, held)
    sign = np.where(held > 0, 1.0, -1.0)

    def rank_corr(s: np.ndarray) -> float:
        from scipy.stats import spearmanr

        return float(spearmanr(s[iu], teacher[iu]).statistic)

    learned_corr = rank_corr(recon @ recon.T)
    sign_corr = rank_corr(sign @ sign.T)
    assert learned_corr > sign_corr + 0.02, (learned_corr, sign_corr)
    # And the same ranking through a FAISS binary index over the concatenated levels equals numpy hamming.
    index = faiss_binary_index(codes)
    dist, ids = binary_search(index, codes[:5], len(held))
    ham = hamming_distances(codes[:5], codes)
    for i in range(5):
        np.testing.assert_array_equal(dist[i], ham[i, ids[i]])


def _tiny_st(tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedforge.testing import tiny_bert_st

    return SentenceTransformer(str(tiny_bert_st(tmp_path / "st")), device="cpu")


def test_sign_binarizer_in_model_round_trip(tmp_path):
    from embedforge.modules import load_embedder
    from embedforge.testing import sample_texts

    model = _tiny_st(tmp_path)
    texts = sample_texts()
    floats = model.encode(texts, convert_to_numpy=True)
    model.append(SignBinarizer(32, output="packed"))
    packed = model.encode(texts, convert_to_numpy=True)
    np.testing.assert_array_equal(packed, pack_binary(floats))
    assert model.get_embedding_dimension() == 4
    model.save(str(tmp_path / "bin"))
    again = load_embedder(tmp_path / "bin")
    np.testing.assert_array_equal(again.encode(texts, convert_to_numpy=True), packed)


def test_learned_binarizer_in_model_round_trip(tmp_path):
    from embedforge.modules import load_embedder
    from embedforge.testing import sample_texts

    model = _tiny_st(tmp_path)
    texts = sample_texts()
    floats = model.encode(texts, convert_to_numpy=True)
    b, _ = train_binarizer(np.tile(floats, (20, 1)) + 0.01 * np.random.default_rng(0).standard_normal((200, 32)),
                           _config(max_steps=5, batch_size=64), tmp_path / "ck")
    codes, recon = binarize(b, floats)
    model.append(b)
    np.testing.assert_allclose(model.encode(texts, convert_to_numpy=True), recon, atol=1e-5)
    model.save(str(tmp_path / "learned"))
    again = load_embedder(tmp_path / "learned")
    np.testing.assert_allclose(again.encode(texts, convert_to_numpy=True), recon, atol=1e-5)
    again[-1].output = "packed"
    np.testing.assert_array_equal(again.encode(texts, convert_to_numpy=True), codes)


def test_learned_binarizer_exports_to_onnx_with_packed_output(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    b = LearnedBinarizer(32, bits=2, output="packed").eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))

    class Wrap(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner({"sentence_embedding": x})["sentence_embedding"]

    x = torch.from_numpy(_clustered(9))
    path = tmp_path / "bin.onnx"
    torch.onnx.export(Wrap(b), (x,), str(path), input_names=["sentence_embedding"], output_names=["codes"],
                      dynamic_axes={"sentence_embedding": {0: "batch"}, "codes": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = _clustered(5, seed=3)
    (out,) = sess.run(None, {"sentence_embedding": x2})
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, binarize(b, x2)[0])


def test_too_few_vectors_are_refused_in_one_line(tmp_path):
    from embedforge.data import DataError

    with pytest.raises(DataError, match=r"^binarizer: 1 training vector\(s\) for 1 process\(es\), but each batch "
                                        r"needs at least 2 per process; give more training texts") as err:
        train_binarizer(_clustered(1), _config(max_steps=2), tmp_path / "ck")
    assert err.value.exit_code == 2 and not (tmp_path / "ck").exists()
