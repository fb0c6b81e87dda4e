"""Teacher-vector cache: fingerprints, reuse, resume after a lost shard, two processes, several teachers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from embedforge.distill.teacher import (
    EncodeSettings,
    cache_fingerprint,
    combine_teachers,
    directory_fingerprint,
    encode_teacher,
    load_vectors,
    teacher_targets,
)


def _reference(teacher, texts, max_len=128):
    """The teacher's vectors straight from sentence-transformers, normalized."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(teacher), device="cpu")
    model.max_seq_length = max_len
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def test_fingerprint_depends_on_teacher_texts_and_settings(bert_teacher, bert_teacher_b, texts, tmp_path):
    s = EncodeSettings(shard_size=32)
    base = cache_fingerprint(bert_teacher, texts, s)
    assert base == cache_fingerprint(bert_teacher, list(texts), EncodeSettings(shard_size=32, batch_size=7))
    assert base != cache_fingerprint(bert_teacher_b, texts, s)
    assert base != cache_fingerprint(bert_teacher, texts[:-1], s)
    assert base != cache_fingerprint(bert_teacher, texts, EncodeSettings(shard_size=32, max_seq_length=16))
    assert base != cache_fingerprint(bert_teacher, texts, EncodeSettings(shard_size=32, prompt="query: "))
    # Touching the weights changes the fingerprint; the lineage file does not.
    copy = shutil.copytree(bert_teacher, tmp_path / "copy")
    assert directory_fingerprint(copy) == directory_fingerprint(bert_teacher)
    (copy / "embedforge.json").write_text("{}")
    assert directory_fingerprint(copy) == directory_fingerprint(bert_teacher)
    weights = next(copy.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert directory_fingerprint(copy) != directory_fingerprint(bert_teacher)


def test_vectors_match_teacher_reused_and_resumed(bert_teacher, texts, tmp_path):
    settings = EncodeSettings(shard_size=40, batch_size=16)
    first = encode_teacher(str(bert_teacher), texts, tmp_path, settings, show_progress=False)
    assert first.encoded_shards == [0, 1, 2] and first.reused_shards == []
    vectors = load_vectors(first.directory)
    np.testing.assert_allclose(vectors, _reference(bert_teacher, texts), atol=1e-5)
    assert sorted(p.name for p in first.directory.glob("shard-*.npy")) == [f"shard-0000{i}.npy" for i in range(3)]

    again = encode_teacher(str(bert_teacher), texts, tmp_path, settings, show_progress=False)
    assert again.encoded_shards == [] and again.reused_shards == [0, 1, 2]

    # A lost shard (a crashed worker) is the only thing encoded again.
    (first.directory / "shard-00001.npy").unlink()
    resumed = encode_teacher(str(bert_teacher), texts, tmp_path, settings, show_progress=False)
    assert resumed.encoded_shards == [1] and resumed.reused_shards == [0, 2]
    np.testing.assert_allclose(load_vectors(resumed.directory), vectors, atol=1e-6)
    assert not list(first.directory.glob(".*tmp*"))  # no temporary files left behind


def test_two_processes_write_their_own_shards(bert_teacher, texts, tmp_path):
    settings = EncodeSettings(shard_size=24, batch_size=16)
    report = encode_teacher(str(bert_teacher), texts, tmp_path, settings, processes=2, show_progress=False)
    assert report.encoded_shards == [0, 1, 2, 3]
    np.testing.assert_allclose(load_vectors(report.directory), _reference(bert_teacher, texts), atol=1e-5)


def test_incomplete_cache_is_refused(bert_teacher, texts, tmp_path):
    report = encode_teacher(str(bert_teacher), texts[:10], tmp_path, EncodeSettings(shard_size=8),
                            show_progress=False)
    (report.directory / "done.json").unlink()
    with pytest.raises(FileNotFoundError, match="not complete"):
        load_vectors(report.directory)


def test_combine_teachers_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    got = combine_teachers([a, b], [2.0, 1.0])
    for i in range(4):
        row = np.concatenate([2.0 * a[i] / np.linalg.norm(a[i]), b[i] / np.linalg.norm(b[i])])
        np.testing.assert_allclose(got[i], row / np.linalg.norm(row), rtol=1e-5)
    # Cosine of two combined rows = weighted mean of the teachers' cosines (weights w^2 / sum w^2).
    cos_a = (a[0] @ a[1]) / (np.linalg.norm(a[0]) * np.linalg.norm(a[1]))
    cos_b = (b[0] @ b[1]) / (np.linalg.norm(b[0]) * np.linalg.norm(b[1]))
    assert got[0] @ got[1] == pytest.approx((4 * cos_a + cos_b) / 5, rel=1e-5)
    with pytest.raises(ValueError, match="rows"):
        combine_teachers([a, b[:3]])


def test_teacher_targets_concatenates_two_teachers(bert_teacher, bert_teacher_b, texts, tmp_path):
    targets, reports = teacher_targets([str(bert_teacher), str(bert_teacher_b)], texts[:20], tmp_path,
                                       EncodeSettings(shard_size=16), weights=[1.0, 1.0], show_progress=False)
    assert targets.shape == (20, 64) and [r.dim for r in reports] == [32, 32]
    expected = combine_teachers([_reference(bert_teacher, texts[:20]), _reference(bert_teacher_b, texts[:20])])
    np.testing.assert_allclose(targets, expected, atol=1e-5)
