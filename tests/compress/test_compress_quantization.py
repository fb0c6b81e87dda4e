"""Embedding quantization: packed layouts vs FAISS / sentence-transformers, int8 calibration artifacts."""

from __future__ import annotations

import numpy as np
import pytest

from embedforge.compress.quantization import (
    BinaryRescoreIndex,
    EmbeddingQuantizer,
    Int8Calibration,
    binary_search,
    faiss_binary_index,
    hamming_distances,
    pack_binary,
    rescore,
    truncate,
    unpack_binary,
)


@pytest.fixture()
def vecs() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_packed_layout_is_numpy_packbits_msb_first(vecs):
    codes = pack_binary(vecs)
    assert codes.dtype == np.uint8 and codes.shape == (300, 8)
    # Independent: byte j holds dims 8j..8j+7, first dim in the most significant bit.
    bits = (vecs > 0).astype(np.int64)
    manual = (bits.reshape(300, 8, 8) * (1 << np.arange(7, -1, -1))).sum(-1).astype(np.uint8)
    np.testing.assert_array_equal(codes, manual)
    np.testing.assert_array_equal(unpack_binary(codes, 64), bits)


def test_binary_and_ubinary_are_sentence_transformers_bytes(vecs):
    """Both precisions store exactly the bytes sentence-transformers' quantize_embeddings gives for that name."""
    from sentence_transformers.util.quantization import quantize_embeddings

    for precision in ("binary", "ubinary"):
        ours = EmbeddingQuantizer(precision=precision)(vecs)
        theirs = quantize_embeddings(vecs, precision=precision)
        assert ours.dtype == theirs.dtype, precision
        np.testing.assert_array_equal(ours, theirs, err_msg=precision)
    # the two layouts differ in the stored bytes but not in hamming distances
    ub, b = EmbeddingQuantizer(precision="ubinary")(vecs), EmbeddingQuantizer(precision="binary")(vecs)
    assert not np.array_equal(ub.view(np.int8), b)
    np.testing.assert_array_equal(hamming_distances(b[:5], b), hamming_distances(ub[:5], ub))


def test_vespa_int8_view_is_the_packed_bytes(vecs):
    signed = pack_binary(vecs, signed=True)
    assert signed.dtype == np.int8
    # Vespa's recipe: np.packbits(...).astype(np.int8) -- the same bytes reinterpreted.
    np.testing.assert_array_equal(signed, np.packbits(vecs > 0, axis=-1).astype(np.int8))


def test_faiss_binary_flat_search_equals_numpy_hamming(vecs):
    docs, queries = pack_binary(vecs[:250]), pack_binary(vecs[250:])
    index = faiss_binary_index(docs)
    dist, ids = binary_search(index, queries, 250)
    # Independent hamming: count differing unpacked bits.
    qb, db = unpack_binary(queries), unpack_binary(docs)
    expected = (qb[:, None, :] != db[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_distances(queries, docs), expected)
    for i in range(len(queries)):
        np.testing.assert_array_equal(dist[i], expected[i, ids[i]])
        np.testing.assert_array_equal(np.sort(dist[i]), np.sort(expected[i]))
    # Vespa int8 layout searched through the same index gives the same result.
    dist2, ids2 = binary_search(index, pack_binary(vecs[250:], signed=True), 250)
    np.testing.assert_array_equal(dist2, dist)


def test_int8_calibration_matches_st_and_round_trips(tmp_path, vecs):
    from sentence_transformers.util.quantization import quantize_embeddings

    calib_set, data = vecs[:200], vecs[200:]
    quant = EmbeddingQuantizer.calibrate("int8", calib_set)
    codes = quant(data)
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, quantize_embeddings(data, "int8", calibration_embeddings=calib_set))
    quant.save(tmp_path)
    again = EmbeddingQuantizer.load(tmp_path)
    np.testing.assert_array_equal(again(data), codes)
    np.testing.assert_allclose(again.calibration.ranges, np.stack([calib_set.min(0), calib_set.max(0)]))
    # Dequantized values sit within one bucket of the input (inside the calibrated range).
    calib = quant.calibration
    inside = (data >= calib.ranges[0]) & (data <= calib.ranges[1])
    err = np.abs(calib.dequantize(codes) - data)
    assert np.all(err[inside] <= np.broadcast_to(calib.steps, data.shape)[inside] * 1.0001)
    # scores() is the float query against the dequantized documents.
    np.testing.assert_allclose(calib.scores(data[:7], codes), data[:7] @ calib.dequantize(codes).T,
                               rtol=1e-4, atol=1e-4)


def test_uint8_and_percentile_calibration(vecs):
    calib = Int8Calibration.fit(vecs, precision="uint8", percentile=1.0)
    codes = calib.quantize(vecs)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255
    np.testing.assert_allclose(calib.ranges[0], np.percentile(vecs, 1.0, axis=0), rtol=1e-5)


def test_matryoshka_truncation_before_quantization(tmp_path, vecs):
    t = truncate(vecs, 16)
    assert t.shape == (300, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    q = EmbeddingQuantizer(precision="ubinary", truncate_dim=16)
    np.testing.assert_array_equal(q(vecs), np.packbits(vecs[:, :16] > 0, axis=-1))
    assert q.code_width == 2
    q8 = EmbeddingQuantizer.calibrate("int8", vecs, truncate_dim=16)
    q8.save(tmp_path)
    loaded = EmbeddingQuantizer.load(tmp_path / "embedding_quantization.json")
    assert loaded.truncate_dim == 16 and loaded(vecs).shape == (300, 16)
    np.testing.assert_array_equal(loaded(vecs), q8(vecs))


def test_rescore_reranks_candidates_exactly(vecs):
    docs, queries = vecs[:250], vecs[250:260]
    rng = np.random.default_rng(1)
    cand = np.stack([rng.choice(250, 30, replace=False) for _ in range(10)])
    cand[0, -3:] = -1  # FAISS padding
    scores, ids = rescore(queries, cand, docs, 5)
    for i in range(10):
        c = cand[i][cand[i] >= 0]
        s = docs[c] @ queries[i]
        best = c[np.argsort(-s)[:5]]
        np.testing.assert_array_equal(ids[i], best)
        np.testing.assert_allclose(scores[i], np.sort(s)[::-1][:5], rtol=1e-5)
    calib = Int8Calibration.fit(vecs)
    s8, ids8 = rescore(queries, cand, calib.quantize(docs), 5, calibration=calib)
    # The single-query fast path agrees with the batched path.
    for i in range(1, 10):
        for cal, dv in ((None, docs), (calib, calib.quantize(docs))):
            one_s, one_ids = rescore(queries[i:i + 1], cand[i:i + 1], dv, 5, calibration=cal)
            all_s, all_ids = rescore(queries, cand, dv, 5, calibration=cal)
            np.testing.assert_array_equal(one_ids[0], all_ids[i])
            np.testing.assert_allclose(one_s[0], all_s[i], rtol=1e-4, atol=1e-5)
    deq = calib.dequantize(calib.quantize(docs))
    for i in range(10):
        c = cand[i][cand[i] >= 0]
        np.testing.assert_array_equal(ids8[i], c[np.argsort(-(deq[c] @ queries[i]), kind="stable")[:5]])


def test_quantizer_rejects_bad_input(vecs):
    with pytest.raises(ValueError, match="calibration"):
        EmbeddingQuantizer(precision="int8")
    with pytest.raises(ValueError, match="precision"):
        EmbeddingQuantizer(precision="int4")
    with pytest.raises(ValueError, match="dims"):
        Int8Calibration.fit(vecs).quantize(vecs[:, :10])


def test_binary_rescore_index_equals_hamming_then_int8_rescoring(tmp_path, vecs):
    docs, queries = vecs[:250], vecs[250:]
    calib = Int8Calibration.fit(docs)
    codes8 = calib.quantize(docs)
    np.save(tmp_path / "docs_int8.npy", codes8)
    mapped = np.load(tmp_path / "docs_int8.npy", mmap_mode="r")  # stage 2 reads the rows from disk
    index = BinaryRescoreIndex(pack_binary(docs), mapped, calib)
    assert index.binary_bytes == 250 * 8
    # depth = whole corpus: exactly the top-10 of the dequantized int8 scores (independent dense computation)
    scores, ids = index.search(queries, k=10, depth=250)
    dense = queries @ calib.dequantize(codes8).T
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(dense, expected, axis=1), rtol=1e-4, atol=1e-4)
    # depth 20: rescoring of FAISS's hamming candidates, the same as the generic rescore(); one query alone agrees
    _, cand = binary_search(faiss_binary_index(pack_binary(docs)), pack_binary(queries), 20)
    ref_s, ref_ids = rescore(queries, cand, codes8, 10, calibration=calib)
    s20, ids20 = index.search(queries, k=10, depth=20)
    np.testing.assert_array_equal(ids20, ref_ids)
    np.testing.assert_allclose(s20, ref_s, rtol=1e-4, atol=1e-4)
    for i in range(len(queries)):  # the one-query fast path agrees with the batched path
        one_s, one_ids = index.search(queries[i], k=10, depth=20)
        np.testing.assert_array_equal(one_ids[0], ids20[i])
        np.testing.assert_allclose(one_s[0], s20[i], rtol=1e-4, atol=1e-4)
    # fewer documents than asked for: FAISS pads with -1, which must rank last as id -1 / score -inf
    small = BinaryRescoreIndex.build(docs[:5], calib)
    s5, ids5 = small.search(queries[:2], k=10, depth=8)
    assert (ids5[:, 5:] == -1).all() and np.isneginf(s5[:, 5:]).all() and (ids5[:, :5] >= 0).all()


def test_truncate_dim_wider_than_the_vectors_is_refused(vecs):
    assert truncate(vecs, 64).shape == (300, 64)
    with pytest.raises(ValueError, match="truncate_dim 4096 is larger than the vectors' 64 dimensions"):
        EmbeddingQuantizer(precision="binary", truncate_dim=4096)(vecs)
    with pytest.raises(ValueError, match="truncate_dim 65 is larger than the vectors' 64 dimensions"):
        Int8Calibration.fit(vecs, truncate_dim=65)
