"""The one model format: atomic save, lineage, plain SentenceTransformer round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedforge.model import (
    LINEAGE_FILE, atomic_dir, config_hash, is_complete, load_model, make_lineage, read_lineage, save_model,
    update_metrics, write_lineage,
)
from embedforge.testing import sample_texts


def test_save_then_plain_sentence_transformer_gives_same_vectors(tiny_st_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = load_model(tiny_st_dir)
    before = model.encode(sample_texts())
    out = save_model(model, tmp_path / "saved", stage="test", source=str(tiny_st_dir), config={"a": 1},
                     metrics={"stsb": 12.5})
    plain = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(plain.encode(sample_texts()), before, atol=1e-6)
    assert list(out.glob("*.bin")) == [] and list(out.glob("**/*.safetensors"))
    lineage = read_lineage(out)
    assert lineage["stage"] == "test" and lineage["source"] == str(tiny_st_dir)
    assert lineage["metrics"] == {"stsb": 12.5}
    assert lineage["config_hash"] == config_hash({"a": 1})


def test_lineage_chains_parents(tiny_st_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_st_dir)
    first = save_model(model, tmp_path / "a", stage="convert", source="llm")
    second = save_model(model, tmp_path / "b", stage="distill", source="teacher", parent=first)
    parents = read_lineage(second)["parents"]
    assert parents[0]["stage"] == "convert" and parents[0]["source"] == "llm"


def _mark(directory: Path, stage: str = "convert") -> None:
    (directory / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage=stage, source="x")))


def test_save_model_writes_side_files_and_folders_in_the_same_save(tiny_st_dir: Path, tmp_path: Path) -> None:
    """Stages with side files (compress's quantization plan, a kept adapter) save through save_model too."""
    side = tmp_path / "adapter-src"
    side.mkdir()
    (side / "adapter_config.json").write_text("{}")
    out = save_model(load_model(tiny_st_dir), tmp_path / "m", stage="compress", source="x",
                     extra={"adapter": "adapter"}, files={"plan.json": '{"a": 1}\n'}, folders={"adapter": side})
    assert (out / "plan.json").read_text() == '{"a": 1}\n'
    assert (out / "adapter" / "adapter_config.json").read_text() == "{}"
    assert read_lineage(out)["stage"] == "compress" and read_lineage(out)["extra"] == {"adapter": "adapter"}
    assert (side / "adapter_config.json").is_file()  # copied, not moved: the caller owns its folder
    assert (out / "README.md").is_file()  # still finished as a model directory


def test_write_lineage_builds_or_writes_a_record(tmp_path: Path) -> None:
    written = write_lineage(tmp_path, stage="export", source="src", config={"b": 2}, metrics={"m": 1.0})
    on_disk = json.loads((tmp_path / LINEAGE_FILE).read_text())
    assert on_disk == written and on_disk["stage"] == "export" and on_disk["config_hash"] == config_hash({"b": 2})
    record = make_lineage(stage="eval", source="s")
    assert write_lineage(tmp_path, record) is record and read_lineage(tmp_path)["stage"] == "eval"
    with pytest.raises(TypeError, match="not both"):
        write_lineage(tmp_path, record, stage="x")


def test_atomic_dir_leaves_old_output_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "ok.txt").write_text("first")
        _mark(tmp)
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "ok.txt").write_text("second, half written")
            raise RuntimeError("interrupted")
    assert (out / "ok.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs and no lock file left behind


def test_atomic_dir_replaces_an_embedforge_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    _mark(out)
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_is_complete_and_update_metrics(tiny_st_dir: Path, tmp_path: Path) -> None:
    assert not is_complete(tmp_path / "missing")
    out = save_model(load_model(tiny_st_dir), tmp_path / "m", stage="s", source="x", config={"k": 1})
    assert is_complete(out) and is_complete(out, {"k": 1}) and not is_complete(out, {"k": 2})
    update_metrics(out, {"eval": {"stsb-dev": {"spearman": 50.0}}})
    assert json.loads((out / LINEAGE_FILE).read_text())["metrics"]["eval"]["stsb-dev"]["spearman"] == 50.0
