"""The mntp / simcse / contrastive stages end to end on a tiny random Llama: outputs, adapters, resume, NaN."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedforge.configs import StageContext
from embedforge.convert.train_config import ContrastiveConfig, MntpConfig, SimcseConfig
from embedforge.testing import sample_texts, sigterm_at
from embedforge.training.options import TrainOptions

FAST = dict(max_seq_length=32, lora_r=4, lora_alpha=8)


def fast(**changes: Any) -> TrainOptions:
    """The training options of these tests: 3 steps of 4 examples, a checkpoint every 2 steps, a high rate."""
    return TrainOptions(**{"batch_size": 4, "max_steps": 3, "save_steps": 2, "logging_steps": 1,
                           "learning_rate": 5e-3, **changes})


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedforge.convert.embedder import build_embedder
    from embedforge.model import save_model
    from embedforge.testing import tiny_decoder

    root = tmp_path_factory.mktemp("train")
    llm = tiny_decoder("llama", root / "llm")
    model = build_embedder(llm, pooling="mean", bidirectional=True, max_seq_length=32)
    return save_model(model, root / "embedder", stage="convert", source=os.fspath(llm))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    t = sample_texts()
    files = {"triplets": root / "triplets.jsonl", "pairs": root / "pairs.jsonl", "texts": root / "texts.jsonl"}
    with files["triplets"].open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"anchor": f"{t[i % 10]} {i}", "positive": t[(i + 1) % 10],
                                 "negative": t[(i + 5) % 10]}) + "\n")
    with files["pairs"].open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"anchor": f"question {i}: {t[i % 10]}", "positive": t[(i + 2) % 10]}) + "\n")
    with files["texts"].open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"text": f"{t[i % 10]} and then {t[(i + 3) % 10]}"}) + "\n")
    return files


def _vectors(path_or_model, texts=None) -> np.ndarray:
    from embedforge.modules import load_embedder

    model = load_embedder(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    return model.encode(texts or sample_texts()[:4], convert_to_numpy=True)


def test_contrastive_merge_equals_kept_adapter(embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.convert.train_model import load_with_adapter
    from embedforge.convert.training import run_contrastive
    from embedforge.model import read_lineage

    common = dict(model=str(embedder_dir), data=[str(data_files["triplets"])], lora_dropout=0.0, train=fast(), **FAST)
    run_contrastive(ContrastiveConfig(**common), tmp_path / "merged", StageContext())
    run_contrastive(ContrastiveConfig(**common, adapter="keep"), tmp_path / "kept", StageContext())

    start = _vectors(embedder_dir)
    merged = _vectors(tmp_path / "merged")
    assert not np.allclose(start, merged, atol=1e-4)  # training moved the model
    # Plain SentenceTransformer loading works and gives the merged model.
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "merged")).encode(sample_texts()[:4]), merged,
                               atol=1e-5)
    # adapter: keep -> the saved backbone is the untouched start; with its adapter it equals the merged model
    np.testing.assert_allclose(_vectors(tmp_path / "kept"), start, atol=1e-5)
    np.testing.assert_allclose(_vectors(load_with_adapter(tmp_path / "kept")), merged, atol=1e-4)
    lineage = read_lineage(tmp_path / "merged")
    assert lineage["stage"] == "contrastive" and lineage["extra"]["train"]["steps"] == 3
    assert lineage["parents"][0]["stage"] == "convert"
    assert not (tmp_path / "merged.ckpt").exists()  # checkpoints are removed once the model is saved


def test_contrastive_two_stages_prompts_filtering_and_truncation(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoConfig

    from embedforge.convert.training import run_contrastive
    from embedforge.model import read_lineage

    cfg = ContrastiveConfig(
        model=str(embedder_dir), data=[str(data_files["pairs"])],
        stage2_data=[str(data_files["triplets"]), str(data_files["pairs"])], stage2_max_steps=2,
        prompts={"pairs": "Find the related sentence: "}, false_negative_margin=0.0, layers=1,
        gradient_checkpointing=True, train=fast(), **FAST,
    )
    run_contrastive(cfg, tmp_path / "out", StageContext())
    stats = read_lineage(tmp_path / "out")["extra"]["train"]["stages"]
    assert stats["stage1"]["steps"] == 3 and stats["stage2"]["steps"] == 2
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 1
    assert AutoConfig.from_pretrained(tmp_path / "out").is_causal is False


def test_gradcache_loss_runs(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedforge.convert import training

    made = []
    original = training.contrastive_loss
    monkeypatch.setattr(training, "contrastive_loss", lambda *a: made.append(original(*a)) or made[-1])
    cfg = ContrastiveConfig(model=str(embedder_dir), data=[str(data_files["triplets"])], cache_minibatch=2,
                            train=fast(max_steps=2), **FAST)
    training.run_contrastive(cfg, tmp_path / "out", StageContext())
    assert type(made[0]).__name__ == "CachedMultipleNegativesRankingLoss" and made[0].mini_batch_size == 2
    assert not np.allclose(_vectors(embedder_dir), _vectors(tmp_path / "out"), atol=1e-4)


def test_simcse_trains_from_raw_text(embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path) -> None:
    from embedforge.convert.training import run_simcse
    from embedforge.model import read_lineage

    llm = embedder_dir.parent / "llm"  # an LLM, not an embedder: the stage builds a bidirectional mean embedder
    cfg = SimcseConfig(model=str(llm), data=[str(data_files["texts"])], train=fast(precision="bf16"), **FAST)
    run_simcse(cfg, tmp_path / "out", StageContext())  # bf16 autocast (on CPU here)
    lineage = read_lineage(tmp_path / "out")
    assert lineage["stage"] == "simcse" and lineage["source"] == str(llm)
    assert not np.allclose(_vectors(embedder_dir), _vectors(tmp_path / "out"), atol=1e-4)


def test_mntp_updates_the_backbone_and_keeps_it_bidirectional(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from embedforge.convert.training import run_mntp

    run_mntp(MntpConfig(model=str(embedder_dir), data=[str(data_files["texts"])], mask_probability=0.3,
                        train=fast(), **FAST), tmp_path / "out", StageContext())
    before, after = load_file(embedder_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(before) == set(after)  # same layout: no LoRA or LM-head leftovers
    changed = [k for k in before if not torch.allclose(before[k], after[k])]
    assert any("layers.0.self_attn.q_proj" in k for k in changed)
    assert AutoConfig.from_pretrained(tmp_path / "out").is_causal is False


def test_sigterm_checkpoints_and_rerun_resumes(embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path) -> None:
    from embedforge.training.guard import TrainingInterrupted
    from embedforge.convert.training import run_contrastive
    from embedforge.model import read_lineage

    cfg = ContrastiveConfig(model=str(embedder_dir), data=[str(data_files["triplets"])],
                            train=fast(max_steps=4, save_steps=100), **FAST)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted, match="Rerun"):
        run_contrastive(cfg, out, StageContext(extra={"train_callbacks": [sigterm_at(1)]}))
    assert (tmp_path / "out.ckpt" / "checkpoint-1" / "trainable.safetensors").is_file()
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    run_contrastive(cfg, out, StageContext())
    train = read_lineage(out)["extra"]["train"]["stages"]["stage1"]
    assert train["resumed_from"].endswith("checkpoint-1") and train["steps"] == 4


def test_mntp_sigterm_checkpoints_and_rerun_resumes(embedder_dir: Path, data_files: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """MNTP's checkpoint holds the trained module's weights (backbone LoRA) and a rerun resumes from it."""
    from safetensors.torch import load_file

    from embedforge.convert.training import run_mntp
    from embedforge.model import read_lineage
    from embedforge.training.guard import TrainingInterrupted

    cfg = MntpConfig(model=str(embedder_dir), data=[str(data_files["texts"])], train=fast(save_steps=100), **FAST)
    with pytest.raises(TrainingInterrupted, match="Rerun"):
        run_mntp(cfg, tmp_path / "out", StageContext(extra={"train_callbacks": [sigterm_at(1)]}))
    assert (tmp_path / "out.ckpt" / "checkpoint-1" / "trainable.safetensors").is_file()
    assert not (tmp_path / "out").exists()
    assert any("lora_B" in name for name in load_file(tmp_path / "out.ckpt" / "checkpoint-1" / "trainable.safetensors"))
    run_mntp(cfg, tmp_path / "out", StageContext())
    train = read_lineage(tmp_path / "out")["extra"]["train"]
    assert train["resumed_from"].endswith("checkpoint-1") and train["steps"] == 3
    assert not (tmp_path / "out.ckpt").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedforge.convert import losses
    from embedforge.training.guard import NanLossError
    from embedforge.convert.training import run_contrastive

    original = losses.FilteredInfoNCELoss.compute_loss_from_embeddings
    calls = {"n": 0}

    def poisoned(self, embeddings, labels=None):  # noqa: ANN001
        calls["n"] += 1
        loss = original(self, embeddings, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(losses.FilteredInfoNCELoss, "compute_loss_from_embeddings", poisoned)
    cfg = ContrastiveConfig(model=str(embedder_dir), data=[str(data_files["triplets"])], train=fast(max_steps=5),
                            **FAST)
    with pytest.raises(NanLossError, match="step 3.*checkpoint-2"):
        run_contrastive(cfg, tmp_path / "out", StageContext())
    ckpts = sorted(p.name for p in (tmp_path / "out.ckpt").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2"]
    assert not (tmp_path / "out").exists()


def test_qlora_without_cuda_is_refused_before_loading(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedforge.convert import train_model
    from embedforge.convert.training import run_contrastive
    from embedforge.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_model, "load_start_model", lambda *a: pytest.fail("the model was loaded"))
    cfg = ContrastiveConfig(model=str(embedder_dir), data=[str(data_files["pairs"])], quantization="4bit",
                            train=fast(), **FAST)
    with pytest.raises(UsageError, match=r"needs a CUDA GPU.*quantization: none") as err:
        run_contrastive(cfg, tmp_path / "out", StageContext())
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


@pytest.mark.parametrize("stage", ["simcse", "contrastive"])
def test_qlora_without_bitsandbytes_names_the_pip_line(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    import importlib.util

    from embedforge.convert import train_model, training
    from embedforge.errors import UsageError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(train_model, "load_start_model", lambda *a: pytest.fail("the model was loaded"))
    if stage == "simcse":
        cfg: Any = SimcseConfig(model=str(embedder_dir), data=[str(data_files["texts"])], quantization="4bit",
                                train=fast(), **FAST)
        runner = training.run_simcse
    else:
        cfg = ContrastiveConfig(model=str(embedder_dir), data=[str(data_files["pairs"])], quantization="4bit",
                                train=fast(), **FAST)
        runner = training.run_contrastive
    with pytest.raises(UsageError) as err:
        runner(cfg, tmp_path / "out", StageContext())
    assert str(err.value) == ("quantization: 4bit (QLoRA) needs bitsandbytes, which is not installed: "
                              "pip install 'embedforge[gpu]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_qlora_trains_and_merges_on_gpu(embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path) -> None:
    from embedforge.convert.training import run_contrastive

    cfg = ContrastiveConfig(model=str(embedder_dir), data=[str(data_files["triplets"])], quantization="4bit",
                            gradient_checkpointing=True, train=fast(precision="bf16"), **FAST)
    run_contrastive(cfg, tmp_path / "out", StageContext())
    assert not np.allclose(_vectors(embedder_dir), _vectors(tmp_path / "out"), atol=1e-4)
    stats = json.loads((tmp_path / "out" / "embedforge.json").read_text())["extra"]["train"]
    assert stats["peak_gpu_mb"] > 0


class _DropoutProbe(__import__("transformers").TrainerCallback):
    """At the start of training: two forward passes of the same batch in train mode, then two in eval mode."""

    def __init__(self) -> None:
        self.train_equal: bool | None = None
        self.eval_equal: bool | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        features = model.tokenize(sample_texts()[:4])
        was_training = model.training
        with torch.no_grad():
            model.train()
            a, b = (model(dict(features))["sentence_embedding"] for _ in range(2))
            self.train_equal = torch.equal(a, b)
            model.eval()
            c, d = (model(dict(features))["sentence_embedding"] for _ in range(2))
            self.eval_equal = torch.equal(c, d)
        model.train(was_training)
        return control


@pytest.mark.parametrize("lora_r", [0, 4])
def test_simcse_views_differ_by_dropout_in_training_only(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path, lora_r: int
) -> None:
    from transformers import AutoConfig

    from embedforge.convert.training import run_simcse

    probe = _DropoutProbe()
    cfg = SimcseConfig(model=str(embedder_dir), data=[str(data_files["texts"])], train=fast(max_steps=1),
                       **{**FAST, "lora_r": lora_r, "lora_dropout": 0.0})
    run_simcse(cfg, tmp_path / "out", StageContext(extra={"train_callbacks": [probe]}))
    assert probe.train_equal is False, "the two SimCSE views are identical: dropout is not active in training"
    assert probe.eval_equal is True
    # The saved model carries no training dropout.
    assert AutoConfig.from_pretrained(tmp_path / "out").attention_dropout == 0.0


def test_recipe_train_key_reaches_the_contrastive_trainer(
    embedder_dir: Path, data_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train: {learning_rate: X}`` in a recipe sets the trainer's rate; every other training option keeps the
    contrastive stage's own default (batch 32, max_steps 100, logging every 10 steps, warmup 0.05, seed 0)."""
    from click.testing import CliRunner

    from embedforge.cli import main
    from embedforge.model import read_lineage
    from embedforge.training import engine

    made = []
    original = engine.trainer_arguments
    monkeypatch.setattr(engine, "trainer_arguments", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    out = tmp_path / "tuned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: lr\nstages:\n  - name: tune\n    stage: contrastive\n    model: {embedder_dir}\n"
                      f"    out: {out}\n    data: ['{data_files['triplets']}']\n    lora_r: 4\n    lora_alpha: 8\n"
                      "    train: {learning_rate: 0.0123}\n")
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert len(made) == 1
    args = made[0]
    assert args.learning_rate == 0.0123
    assert (args.per_device_train_batch_size, args.logging_steps, args.seed, args.save_steps) == (32, 10, 0, 50)
    assert args.max_steps == 1  # 24 triplets at batch 32: one pass (epochs 1.0) comes before max_steps 100
    train = read_lineage(out)["config"]["train"]
    assert train["learning_rate"] == 0.0123
    assert (train["batch_size"], train["max_steps"], train["epochs"], train["warmup_ratio"]) == (32, 100, 1.0, 0.05)
    assert read_lineage(out)["extra"]["train"]["steps"] == 1
