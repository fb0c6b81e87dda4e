"""The ``convert`` stage: config validation, the runner's output format, and the shipped zero-shot recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedforge.configs import ConfigError, StageContext
from embedforge.convert.config import ConvertConfig, PoolingMode
from embedforge.testing import sample_texts

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "convert").glob("zero-shot*.yaml"))


def test_config_module_imports_without_torch() -> None:
    code = "import sys, embedforge.convert.config; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_checks_name_the_key() -> None:
    with pytest.raises(ConfigError, match="pooling: 'cls' is not one of .*'mean'.*'echo'") as err:
        ConvertConfig(model="m", pooling="cls")
    assert err.value.key == "pooling"
    with pytest.raises(ConfigError, match="echo_template") as err:
        ConvertConfig(model="m", pooling="echo", echo_template="Repeat: {text}")
    assert err.value.key == "echo_template"
    with pytest.raises(ConfigError, match="max_seq_length"):
        ConvertConfig(model="m", max_seq_length=0)
    with pytest.raises(ConfigError, match="layers: keep at least one layer, got 0"):
        ConvertConfig(model="m", layers=0)
    with pytest.raises(ConfigError, match="layers: cannot be combined with multi_layer"):
        ConvertConfig(model="m", pooling="multi_layer", layers=2)
    assert ConvertConfig(model="m", pooling="last_token").pooling == PoolingMode.LAST_TOKEN
    assert ConvertConfig(model="m", pooling="Weighted-Mean").pooling == PoolingMode.WEIGHTED_MEAN


def test_recipe_loader_builds_the_config(tmp_path: Path) -> None:
    from embedforge.recipe import RecipeError, load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: convert\n    out: /tmp/x\n    model: m\n    pooling: max\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:5: .*pooling"):
        load_recipe(bad)


def _scored_file(tmp_path: Path) -> Path:
    texts = sample_texts()
    rows = [{"sentence1": texts[i], "sentence2": texts[(i + k) % len(texts)], "score": float(5 - k)}
            for i in range(len(texts)) for k in (0, 1, 3)]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_convert_writes_a_plain_loadable_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.convert.embedder import build_embedder_from_config
    from embedforge.convert.pipeline import run_convert
    from embedforge.model import is_complete, read_lineage

    cfg = ConvertConfig(model=str(tiny_llama_dir), pooling="lasttoken", query_prompt="query: ", max_seq_length=64,
                        eval_tasks=[f"sts:{_scored_file(tmp_path)}"])
    out = tmp_path / "converted"
    run_convert(cfg, out, StageContext(recipe_hash="abc"))
    lineage = read_lineage(out)
    assert lineage["stage"] == "convert" and lineage["source"] == str(tiny_llama_dir)
    assert lineage["config"]["pooling"] == "lasttoken" and lineage["recipe_hash"] == "abc"
    assert lineage["extra"]["bidirectional"] is True and lineage["extra"]["embedding_dimension"] == 32
    sts = next(iter(lineage["metrics"].values()))
    assert -100 <= sts["spearman"] <= 100
    assert is_complete(out, cfg)

    loaded = SentenceTransformer(str(out), device="cpu")
    assert loaded[0].auto_model.config.is_causal is False and loaded.max_seq_length == 64
    fresh = build_embedder_from_config(cfg)
    texts = sample_texts()
    np.testing.assert_allclose(loaded.encode(texts), fresh.encode(texts), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_query(texts), fresh.encode_query(texts), atol=1e-6)


def test_run_convert_with_a_trainable_head(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from embedforge.convert.embedder import build_embedder_from_config
    from embedforge.convert.pipeline import run_convert
    from embedforge.modules import load_embedder

    cfg = ConvertConfig(model=str(tiny_llama_dir), pooling="latent_attention", latent_count=16, latent_heads=4,
                        zero_init_heads=False, seed=7)
    out = tmp_path / "latent"
    run_convert(cfg, out, StageContext())
    modules = json.loads((out / "modules.json").read_text())
    assert modules[1]["type"] == "embedforge_latent_attention.LatentAttentionPooling"  # code shipped in the dir
    loaded = load_embedder(out)
    texts = sample_texts()
    # same seed -> same head weights: the saved model equals a fresh build
    np.testing.assert_allclose(loaded.encode(texts), build_embedder_from_config(cfg).encode(texts), atol=1e-6)


def test_first_layers_then_distill_from_a_teacher(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """convert (causal, first layer only) -> distill (``student: model``) from another embedder's vectors: the
    student keeps one causal layer, gains a fitted head to the teacher's space and gets closer to the teacher."""
    import torch

    from embedforge.convert.pipeline import run_convert
    from embedforge.distill.config import DistillConfig
    from embedforge.distill.pipeline import run as run_distill
    from embedforge.typed_config import build_config
    from embedforge.model import read_lineage
    from embedforge.modules import load_embedder

    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    run_convert(ConvertConfig(model=str(tiny_llama_dir), bidirectional=False, layers=1, max_seq_length=32),
                student_dir, StageContext())
    run_convert(ConvertConfig(model=str(tiny_llama_dir), pooling="weightedmean", max_seq_length=32, seed=3),
                teacher_dir, StageContext())
    assert read_lineage(student_dir)["extra"]["kept_layers"] == [0]
    start = load_embedder(student_dir)
    assert start[0].auto_model.config.num_hidden_layers == 1 and len(start[0].auto_model.layers) == 1

    texts = sample_texts() * 4
    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": f"{t} #{i}"}) + "\n" for i, t in enumerate(texts)))
    cfg = build_config(DistillConfig, dict(
        model=str(teacher_dir), student="model", student_model=str(student_dir), texts=[str(texts_file)],
        projection="always", max_seq_length=32,
        train=dict(batch_size=8, max_steps=6, epochs=None, learning_rate=5e-4, warmup_ratio=0.0, save_steps=100)))
    out = tmp_path / "distilled"
    run_distill(cfg, out, StageContext(cache_dir=tmp_path / "cache"))
    student = load_embedder(out)
    assert any(type(m).__name__ == "Dense" for m in student)
    # the lineage follows the weights (the converted student), not the teacher
    assert read_lineage(out)["parents"][0]["path"] == str(student_dir)
    assert read_lineage(out)["parents"][0]["stage"] == "convert"
    backbone = student[0].auto_model
    assert len(backbone.layers) == 1 and backbone.config.is_causal is not False
    ids = student.tokenizer(["one two three four"], return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % backbone.config.vocab_size
    with torch.no_grad():
        first = backbone(input_ids=ids).last_hidden_state[0, 0]
        first_changed = backbone(input_ids=changed).last_hidden_state[0, 0]
    torch.testing.assert_close(first, first_changed)  # still causal: the first token cannot see the last

    probe = [f"{t} #{i}" for i, t in enumerate(texts)]
    teacher_vecs = load_embedder(teacher_dir).encode(probe)
    cos_start = float(np.mean(np.sum(start.encode(probe) * teacher_vecs, axis=1)))
    cos_end = float(np.mean(np.sum(student.encode(probe) * teacher_vecs, axis=1)))
    assert cos_end > cos_start + 0.05, (cos_start, cos_end)


def test_there_are_zero_shot_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"zero-shot.yaml", "zero-shot-echo.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path: Path) -> None:
    from embedforge.recipe import load_recipe

    first_line = path.read_text().splitlines()[0]
    assert first_line == f"# embedforge run recipes/convert/{path.name}"
    recipe = load_recipe(path)
    converts = [s for s in recipe.stages if s.stage == "convert"]
    assert converts and all(isinstance(s.config, ConvertConfig) for s in converts)
