"""The distill stage end to end on tiny models: config checks, saved model, resume, training lowers the loss."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from embedforge.configs import ConfigError, StageContext
from embedforge.distill.config import DistillConfig, StudentKind


def distill_config(**values: Any) -> DistillConfig:
    """A DistillConfig built as a recipe stage is: ``train={...}`` changes only the keys it names, the other
    training options keep the distill stage's defaults (seed 42, save_total_limit 1, ...)."""
    from embedforge.typed_config import build_config

    return build_config(DistillConfig, values)


def test_config_imports_without_torch():
    code = "import sys, embedforge.distill.config as c; c.DistillConfig(model='x', layers=1); " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"layers": {"every": 2, "spread": 2}}, "layers"),
        ({"layers": {"first": 2}}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({}, "layers"),
        ({"student": "static", "layers": 2}, "layers"),
        ({"student": "model"}, "student_model"),
        ({"student": "nope"}, "student"),
        ({"layers": 1, "teacher_weights": [1.0, 2.0]}, "teacher_weights"),
        ({"layers": 1, "train": {"batch_size": 1}}, "train.batch_size"),
        ({"layers": 1, "layer_dims": [[0, 8]]}, "layer_dims"),
        ({"student": "static", "layer_dims": [[1, 8]]}, "layer_dims"),
        ({"layers": 1, "matryoshka_dims": [0]}, "matryoshka_dims"),
        ({"layers": 1, "full_dim_weight": 0.0}, "full_dim_weight"),
        ({"layers": 1, "train": {"precision": "fp16"}}, "train.precision"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        distill_config(model="teacher", **kwargs)
    assert err.value.key == key


def test_config_defaults_and_enums():
    cfg = DistillConfig(model="t", extra_teachers=["u"], student="static")
    assert cfg.student is StudentKind.STATIC
    assert cfg.teachers == ["t", "u"] and cfg.weights == [1.0, 1.0]
    assert (cfg.cosine_weight, cfg.similarity_weight, cfg.relative_weight, cfg.relative_margin) == (10, 200, 20, 0.015)


def test_stage_is_registered():
    from embedforge.stages import config_class, runner

    assert config_class("distill") is DistillConfig
    from embedforge.distill.pipeline import run

    assert runner("distill") is run


def test_run_layer_student_saves_a_matryoshka_model(bert_teacher, texts_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedforge.model import read_lineage

    cfg = distill_config(model=str(bert_teacher), texts=[str(texts_file)], layers=[0, 2],
                         train={"batch_size": 16, "max_steps": 4, "save_steps": 2}, matryoshka_dims=[16, 8],
                         layer_dims=[[1, 8]], shard_size=40, max_seq_length=32)
    out = tmp_path / "student"
    ctx = StageContext(cache_dir=tmp_path / "cache")
    from embedforge.distill.pipeline import run

    run(cfg, out, ctx)
    lineage = read_lineage(out)
    assert lineage["stage"] == "distill" and lineage["source"] == str(bert_teacher)
    assert lineage["extra"]["matryoshka_dims"] == [32, 16, 8]
    assert lineage["extra"]["layer_dims"] == [[1, 8]]
    assert lineage["extra"]["teachers"][0]["dim"] == 32
    from embedforge.distill.teacher import directory_fingerprint  # the whole files' digest, recorded once

    assert lineage["extra"]["teachers"][0]["fingerprint"] == directory_fingerprint(bert_teacher)
    assert lineage["metrics"]["distill"]["steps"] == 4
    assert not (tmp_path / "student.ckpt").exists()
    model = SentenceTransformer(str(out), device="cpu")
    assert model[0].auto_model.config.num_hidden_layers == 2
    assert model.max_seq_length == 128  # trained on 32 tokens, reads as much as the teacher
    emb = model.encode(["a man is playing a guitar"], truncate_dim=8)
    assert emb.shape == (1, 8)
    # A finished output is skipped on rerun.
    stamp = (out / "embedforge.json").stat().st_mtime_ns
    run(cfg, out, ctx)
    assert (out / "embedforge.json").stat().st_mtime_ns == stamp


def test_run_resumes_from_a_checkpoint(bert_teacher, texts_file, tmp_path):
    from embedforge.training.guard import TrainingInterrupted
    from embedforge.distill import pipeline
    from embedforge.testing import sigterm_at

    cfg = distill_config(model=str(bert_teacher), texts=[str(texts_file)], layers=1,
                         train={"batch_size": 16, "max_steps": 4, "save_steps": 100}, shard_size=64)
    out = tmp_path / "student"
    cache = tmp_path / "cache"
    # A first run is stopped by SIGTERM after step 2: it writes a checkpoint and publishes nothing.
    with pytest.raises(TrainingInterrupted, match="Rerun"):
        pipeline.run(cfg, out, StageContext(cache_dir=cache, extra={"train_callbacks": [sigterm_at(2)]}))
    assert (tmp_path / "student.ckpt" / "checkpoint-2" / "embedforge-train.json").is_file()
    assert not out.exists()

    pipeline.run(cfg, out, StageContext(cache_dir=cache))
    stats = json.loads((out / "embedforge.json").read_text())["metrics"]["distill"]
    assert stats["resumed_from"] == str(tmp_path / "student.ckpt" / "checkpoint-2") and stats["steps"] == 4


def test_two_teachers_any_model_student_gets_a_fitted_projection(bert_teacher, bert_teacher_b, texts, tmp_path):
    """Two concatenated teachers (64 dims) and a 32-dim decoder student: the head is fitted, not random."""
    from embedforge.distill import pipeline, students
    from embedforge.distill.losses import CosineLoss
    from embedforge.testing import tiny_decoder

    decoder = tiny_decoder("qwen2", tmp_path / "qwen2")
    cfg = DistillConfig(model=str(bert_teacher), extra_teachers=[str(bert_teacher_b)], teacher_weights=[1, 2],
                        student="model", student_model=str(decoder), texts=["unused"])
    targets, _ = pipeline.teacher_vectors(cfg, texts, tmp_path / "cache")
    assert targets.shape == (len(texts), 64)
    student = pipeline.build_student(cfg, 64, texts, targets)
    assert student.get_embedding_dimension() == 64
    assert student[0].auto_model.config.is_causal is False
    torch.manual_seed(0)
    unfitted = students.add_projection(students.model_student(str(decoder)), 64)
    t = torch.tensor(targets)
    fitted_loss = CosineLoss()(torch.tensor(student.encode(texts)), t).item()
    random_loss = CosineLoss()(torch.tensor(unfitted.encode(texts)), t).item()
    assert fitted_loss < 0.5 * random_loss, (fitted_loss, random_loss)


def test_embedder_student_keeps_its_prompts_through_the_head(bert_teacher, bert_teacher_b, texts, tmp_path):
    """An embedforge decoder embedder built with a query instruction stays an embedder with that instruction
    after the distill stage puts a head on it (it was lost once, so a later stage trained with a prompt that
    evaluation then left out)."""
    from embedforge.convert.embedder import build_embedder
    from embedforge.distill import pipeline
    from embedforge.model import load_model
    from embedforge.testing import tiny_decoder

    decoder = tiny_decoder("qwen2", tmp_path / "qwen2")
    embedder = build_embedder(str(decoder), pooling="mean", bidirectional=False, max_seq_length=32,
                              prompts={"query": "Find the passage: "})
    embedder.similarity_fn_name = "dot"
    embedder.save(str(tmp_path / "embedder"))
    cfg = DistillConfig(model=str(bert_teacher), extra_teachers=[str(bert_teacher_b)], student="model",
                        student_model=str(tmp_path / "embedder"), texts=["unused"])
    targets, _ = pipeline.teacher_vectors(cfg, texts, tmp_path / "cache")
    student = pipeline.build_student(cfg, 64, texts, targets)
    assert student.get_embedding_dimension() == 64  # the 32-dim decoder under a fitted 64-dim head
    assert student.prompts.get("query") == "Find the passage: "
    assert student.similarity_fn_name == "dot"
    student.save(str(tmp_path / "student"))
    again = load_model(tmp_path / "student")
    assert again.prompts.get("query") == "Find the passage: "
    # the instruction is used at encode time and excluded from pooling: with it the query vector changes
    plain = again.encode(["a claim about cells"])
    prompted = again.encode(["a claim about cells"], prompt_name="query")
    assert not np.allclose(plain, prompted, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_lowers_the_loss(bert_teacher, texts, tmp_path, precision):
    """A random decoder student trained on the teacher vectors gets closer to them, in fp32 and under bf16
    autocast (which must really run in bf16, with fp32 weights kept)."""
    from embedforge.distill import pipeline
    from embedforge.distill.losses import JasperStellaLoss
    from embedforge.testing import tiny_decoder

    decoder = tiny_decoder("qwen2", tmp_path / "qwen2")
    cfg = distill_config(model=str(bert_teacher), student="model", student_model=str(decoder), texts=["unused"],
                         train={"batch_size": 16, "max_steps": 12, "learning_rate": 2e-4, "warmup_ratio": 0.0,
                                "save_steps": 100, "precision": precision})
    targets, _ = pipeline.teacher_vectors(cfg, texts, tmp_path / "cache")
    student = pipeline.build_student(cfg, 32, texts, targets)
    loss = JasperStellaLoss(max_pairs=10_000)
    seen: set[torch.dtype] = set()
    student[0].auto_model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))

    def full_loss() -> float:
        emb = torch.tensor(student.encode(texts, batch_size=32))
        return loss(emb, torch.tensor(targets)).item()

    before = full_loss()
    seen.clear()
    pipeline.train_student(student, cfg, texts, targets, tmp_path / "ckpt")
    assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    after = full_loss()
    assert np.isfinite(after) and after < 0.9 * before, (before, after)


def test_cli_distill_command(bert_teacher, texts_file, tmp_path, monkeypatch):
    """``embedforge distill TEACHER --out DIR key=value ...`` runs the stage and writes a model directory."""
    from click.testing import CliRunner

    from embedforge.cli import main
    from embedforge.model import read_lineage

    monkeypatch.setenv("EMBEDFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cli-student"
    result = CliRunner().invoke(main, ["distill", str(bert_teacher), "--out", str(out), f"texts=[{texts_file}]",
                                       "layers=1", "train.max_steps=2", "train.batch_size=8",
                                       "matryoshka_dims=[16]"])
    assert result.exit_code == 0, result.output
    assert read_lineage(out)["extra"]["matryoshka_dims"] == [32, 16]
    bad = CliRunner().invoke(main, ["distill", str(bert_teacher), "--out", str(out), "layers=0"])
    assert bad.exit_code == 2 and "layers: keep at least one layer, got 0" in bad.output
    old = CliRunner().invoke(main, ["distill", str(bert_teacher), "--out", str(out), "first_layers=1"])
    assert old.exit_code == 2, old.output
    assert "first_layers: no longer a key; did you mean 'layers'? (write layers: 1)" in old.output
    # training options live under train:, and text_limit is data_limit: the old spellings say where they went
    moved = CliRunner().invoke(main, ["distill", str(bert_teacher), "--out", str(out), "layers=1", "max_steps=2"])
    assert moved.exit_code == 2, moved.output
    assert "max_steps: training options moved under the train: key; write train: {max_steps: 2}" in moved.output
    renamed = CliRunner().invoke(main, ["distill", str(bert_teacher), "--out", str(out), "layers=1", "text_limit=5"])
    assert renamed.exit_code == 2, renamed.output
    assert "text_limit: renamed; write data_limit: 5" in renamed.output


def test_pca_rotated_targets_and_length_batches(bert_teacher, texts_file, tmp_path):
    """target_rotation=pca: a layer student's head starts as the rotation (its vectors are the unrotated
    student's, rotated), the run trains with length-grouped batches and records the rotation."""
    from sentence_transformers import SentenceTransformer

    from embedforge.distill import pipeline
    from embedforge.distill.matryoshka import pca_rotation
    from embedforge.model import read_lineage

    cfg = distill_config(model=str(bert_teacher), texts=[str(texts_file)], layers=[0, 2],
                         train={"batch_size": 16, "max_steps": 3, "save_steps": 100}, matryoshka_dims=[8],
                         target_rotation="pca", batching="length", max_seq_length=32)
    from embedforge.data import load_texts

    texts = load_texts(cfg.texts)
    targets, _ = pipeline.teacher_vectors(cfg, texts, tmp_path / "cache")
    rotated, rotation = pipeline.rotate_targets(cfg, targets)
    np.testing.assert_allclose(rotated, targets @ pca_rotation(targets), atol=1e-6)
    plain = pipeline.build_student(DistillConfig(**{**cfg.__dict__, "target_rotation": "none"}), 32, texts, targets)
    student = pipeline.build_student(cfg, 32, texts, rotated, rotation)
    assert len(student) == len(plain) + 1  # the head
    sample = texts[:10]
    np.testing.assert_allclose(student.encode(sample), plain.encode(sample) @ rotation, atol=1e-5)

    out = tmp_path / "student"
    pipeline.run(cfg, out, StageContext(cache_dir=tmp_path / "cache"))
    lineage = read_lineage(out)
    assert lineage["extra"]["target_rotation"] == "pca" and lineage["metrics"]["distill"]["steps"] == 3
    assert SentenceTransformer(str(out), device="cpu").encode(sample, truncate_dim=8).shape == (10, 8)


def test_rotation_needs_a_head():
    with pytest.raises(ConfigError) as err:
        DistillConfig(model="t", layers=1, target_rotation="pca", projection="never")
    assert err.value.key == "target_rotation"
    with pytest.raises(ConfigError) as err:
        DistillConfig(model="t", layers=1, batching="sorted")
    assert err.value.key == "batching"


def test_run_refuses_missing_teacher_layers_before_encoding(bert_teacher, texts_file, tmp_path, monkeypatch):
    """The layer selection is checked against the teacher before its vectors are computed (the long part)."""
    from embedforge.configs import ConfigError, StageContext
    from embedforge.distill import pipeline

    monkeypatch.setattr(pipeline, "teacher_vectors", lambda *a, **k: pytest.fail("encoded before the check"))
    cfg = DistillConfig(model=str(bert_teacher), texts=[str(texts_file)], layers=[0, 3], max_seq_length=32)
    out = tmp_path / "student"
    with pytest.raises(ConfigError) as err:
        pipeline.run(cfg, out, StageContext(cache_dir=tmp_path / "cache"))
    assert str(err.value) == (f"layers: layer index 3 is out of range for the model ({bert_teacher}), which has 3 "
                              "layers (0..2, or -3..-1)")
    assert not out.exists()


def test_recipe_train_key_reaches_the_trainer_and_keeps_the_distill_defaults(bert_teacher, texts_file, tmp_path,
                                                                               trainer_args):
    """``train: {batch_size: 4}`` on a distill stage of a recipe changes the trainer's batch size only: the learning
    rate (1e-4), seed (42), checkpoint settings and the epoch-bounded step count stay the distill stage's."""
    from embedforge.distill import pipeline
    from embedforge.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - name: student\n    stage: distill\n    model: {bert_teacher}\n"
                      f"    out: {tmp_path / 'student'}\n    texts: [{texts_file}]\n    layers: 1\n"
                      "    max_seq_length: 32\n    train: {batch_size: 4}\n")
    cfg = load_recipe(recipe).stages[0].config
    train = cfg.train
    assert (train.batch_size, train.learning_rate, train.seed, train.max_steps, train.epochs) == (4, 1e-4, 42, None, 1.0)
    assert (train.warmup_ratio, train.save_steps, train.save_total_limit, train.logging_steps) == (0.05, 200, 1, None)

    args = trainer_args(lambda: pipeline.run(cfg, tmp_path / "student", StageContext(cache_dir=tmp_path / "cache")))
    assert args.per_device_train_batch_size == 4
    assert (args.learning_rate, args.seed, args.save_steps, args.save_total_limit) == (1e-4, 42, 200, 1)
    assert args.max_steps == 96 // 4  # one pass (epochs 1.0, no step bound) over the 96 texts, full batches only
    assert args.warmup_steps == int(0.05 * 24) and args.dataloader_drop_last
    assert args.lr_scheduler_type == "linear"
