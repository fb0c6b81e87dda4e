"""Teacher-vector cache: fingerprints, reuse, resume after a lost shard, two processes, several teachers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from embedforge.distill.teacher import (
    EncodeSettings,
    await_teacher,
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


@pytest.fixture(scope="module")
def big_teacher(tmp_path_factory) -> Path:
    """A decoder embedder whose weight file is over 2 MiB (hidden 256), so a change can sit far from both ends."""
    from embedforge.convert.embedder import build_embedder
    from embedforge.model import save_model
    from embedforge.testing import tiny_decoder

    root = tmp_path_factory.mktemp("big-teacher")
    llm = tiny_decoder("llama", root / "llm", hidden_size=256, intermediate_size=512)
    return save_model(build_embedder(llm, pooling="mean", bidirectional=True, max_seq_length=32), root / "teacher",
                      stage="convert", source=str(llm))


def test_changed_middle_of_a_big_weight_file_is_a_cache_miss(big_teacher, texts, tmp_path):
    import json

    teacher = shutil.copytree(big_teacher, tmp_path / "teacher")
    weights = max(teacher.rglob("*.safetensors"), key=lambda f: f.stat().st_size)
    size = weights.stat().st_size
    assert size > 2 * 2**20 + 1024
    settings = EncodeSettings(shard_size=16, batch_size=16)
    first = encode_teacher(str(teacher), texts[:20], tmp_path / "cache", settings, show_progress=False)
    assert first.encoded_shards == [0, 1]

    data = bytearray(weights.read_bytes())
    data[size // 2] ^= 0xFF  # one byte in the middle: more than 1 MiB from either end
    weights.write_bytes(bytes(data))
    second = encode_teacher(str(teacher), texts[:20], tmp_path / "cache", settings, show_progress=False)
    assert second.directory != first.directory
    assert second.encoded_shards == [0, 1] and second.reused_shards == []
    assert second.teacher_fingerprint != first.teacher_fingerprint and len(first.teacher_fingerprint) == 64
    assert json.loads((second.directory / "meta.json").read_text())["teacher_fingerprint"] == \
        second.teacher_fingerprint


def test_file_digests_are_memoized_by_path_size_and_mtime(bert_teacher, tmp_path, monkeypatch):
    import json
    import os

    from embedforge.distill import teacher as T

    teacher = shutil.copytree(bert_teacher, tmp_path / "teacher")
    old = 1_600_000_000
    for f in teacher.rglob("*"):
        os.utime(f, (old, old))  # settled files: their digests may be memoized
    memo = tmp_path / "digests.json"
    first = directory_fingerprint(teacher, digest_cache=memo)
    entries = json.loads(memo.read_text())
    weights = next(teacher.rglob("*.safetensors"))
    assert entries[os.fspath(weights.resolve())]["size"] == weights.stat().st_size

    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (reads.append(str(f)), real_open(f, *a, **k))[1])
    assert directory_fingerprint(teacher, digest_cache=memo) == first
    assert not [r for r in reads if r.endswith(".safetensors")]  # unchanged: not read again
    monkeypatch.undo()

    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, new mtime (and too recent to be memoized)
    assert directory_fingerprint(teacher, digest_cache=memo) != first
    assert os.fspath(weights.resolve()) not in json.loads(memo.read_text())
    assert T.directory_fingerprint(teacher) != first


def test_other_processes_wait_for_the_finished_cache_and_write_nothing(bert_teacher, texts, tmp_path):
    """A torchrun process other than the first finds the first one's cache by fingerprint, reads it once it is
    finished, and writes nothing into it; an unfinished cache is a one-line RunError after the wait."""
    from embedforge.errors import RunError

    settings = EncodeSettings(shard_size=40)
    with pytest.raises(RunError) as err:
        await_teacher(str(bert_teacher), texts, tmp_path, settings, timeout_s=0.0, poll_s=0.01)
    assert "were not finished by the first process within 0 s" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "teacher-vectors").exists()  # waiting wrote nothing, not even the digest memo

    first = encode_teacher(str(bert_teacher), texts, tmp_path, settings, show_progress=False)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "teacher-vectors").rglob("*")}
    other = await_teacher(str(bert_teacher), texts, tmp_path, settings, timeout_s=0.0)
    assert (other.directory, other.dim, other.teacher_fingerprint) == (first.directory, 32, first.teacher_fingerprint)
    assert other.encoded_shards == [] and other.reused_shards == [0, 1, 2]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "teacher-vectors").rglob("*")} == files
    vectors, _ = teacher_targets([str(bert_teacher)], texts, tmp_path, settings, encode=False)
    np.testing.assert_allclose(vectors, load_vectors(first.directory), atol=1e-6)
