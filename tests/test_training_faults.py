"""Training faults across every training stage: divergence, changed settings, cut-off checkpoints, planted pickles.

Each stage runs a few steps on a tiny random model. A diverging run must raise :class:`NanLossError` (exit code 1,
one line) and publish nothing; a rerun resumes only from a complete checkpoint made with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedforge.configs import StageContext
from embedforge.errors import RunError
from embedforge.training.guard import NanLossError, TrainingInterrupted
from embedforge.testing import sample_texts, sigterm_at

FAST = dict(batch_size=4, max_steps=3, save_steps=2, logging_steps=1, max_seq_length=32, learning_rate=5e-3,
            lora_r=4, lora_alpha=8)
HUGE_LR = 1.0e12


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def embedder_dir(root: Path) -> Path:
    from embedforge.convert.embedder import build_embedder
    from embedforge.model import save_model
    from embedforge.testing import tiny_decoder

    llm = tiny_decoder("llama", root / "llm")
    model = build_embedder(llm, pooling="mean", bidirectional=True, max_seq_length=32)
    return save_model(model, root / "embedder", stage="convert", source=os.fspath(llm))


@pytest.fixture(scope="module")
def bert_dir(root: Path) -> Path:
    from embedforge.testing import tiny_bert_st

    return tiny_bert_st(root / "bert", layers=3, seed=1)


@pytest.fixture(scope="module")
def files(root: Path) -> dict[str, Path]:
    t = sample_texts()
    out = {"texts": root / "texts.jsonl", "triplets": root / "triplets.jsonl"}
    with out["texts"].open("w") as fh:
        for i in range(48):
            fh.write(json.dumps({"text": f"{t[i % 10]} and then {t[(i + 3) % 10]} {i}"}) + "\n")
    with out["triplets"].open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"anchor": f"{t[i % 10]} {i}", "positive": t[(i + 1) % 10],
                                 "negative": t[(i + 5) % 10]}) + "\n")
    return out


def _vectors(path: Path) -> np.ndarray:
    from embedforge.modules import load_embedder

    return load_embedder(path).encode(sample_texts()[:4], convert_to_numpy=True)


def _assert_diverged(err: pytest.ExceptionInfo[NanLossError], out: Path) -> None:
    message = str(err.value)
    assert err.value.exit_code == 1 and "\n" not in message
    assert "published nothing" in message and "Lower the learning rate" in message
    assert not out.exists(), "a diverged run must not publish its output"


# ------------------------------------------------------------------------------------------ divergence


def _convert_config(stage: str, embedder_dir: Path, files: dict[str, Path], **changes: Any) -> Any:
    """A convert stage's config with :data:`FAST` and ``changes``; the training options go under ``train``."""
    from embedforge.convert.train_config import ContrastiveConfig, MntpConfig, SimcseConfig
    from embedforge.training.options import TRAIN_KEYS, TrainOptions

    merged = {**FAST, **changes}
    values: dict[str, Any] = {k: v for k, v in merged.items() if k not in TRAIN_KEYS}
    values["train"] = TrainOptions(**{k: v for k, v in merged.items() if k in TRAIN_KEYS})
    if stage == "mntp":
        return MntpConfig(model=str(embedder_dir), data=[str(files["texts"])], **values)
    if stage == "simcse":
        return SimcseConfig(model=str(embedder_dir), data=[str(files["texts"])], **values)
    return ContrastiveConfig(model=str(embedder_dir), data=[str(files["triplets"])], **values)


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, call: int) -> None:
    """Make ``cls.method`` return a NaN loss on its ``call``-th call."""
    original = getattr(cls, method)
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(cls, method, poisoned)


@pytest.mark.parametrize("stage", ["mntp", "simcse", "contrastive"])
def test_convert_stages_stop_on_divergence(stage: str, embedder_dir: Path, files: dict[str, Path],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedforge.convert import training

    runner = {"mntp": training.run_mntp, "simcse": training.run_simcse, "contrastive": training.run_contrastive}
    if stage == "simcse":  # cosine-bounded: a huge learning rate gives huge weights, not a NaN loss, in 6 steps
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        _nan_on_call(monkeypatch, MultipleNegativesRankingLoss, "compute_loss_from_embeddings", 2)
        cfg = _convert_config(stage, embedder_dir, files, max_steps=6)
    else:  # the reproduction: a learning rate far too high
        cfg = _convert_config(stage, embedder_dir, files, learning_rate=HUGE_LR, max_steps=6)
    with pytest.raises(NanLossError) as err:
        runner[stage](cfg, tmp_path / "out", StageContext())
    _assert_diverged(err, tmp_path / "out")
    assert str(err.value).startswith(f"{stage}: ")


def _distill_config(bert_dir: Path, files: dict[str, Path], **train: Any) -> Any:
    """A one-layer distill stage on the test texts; ``train`` keys change only themselves (distill defaults stay)."""
    from embedforge.distill.config import DistillConfig
    from embedforge.typed_config import build_config

    return build_config(DistillConfig, {"model": str(bert_dir), "texts": [str(files["texts"])], "layers": 1,
                                        "max_seq_length": 32, "train": {"batch_size": 8, "save_steps": 100, **train}})


def test_distill_stops_on_divergence(bert_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    from embedforge.distill.pipeline import run

    cfg = _distill_config(bert_dir, files, max_steps=6, learning_rate=HUGE_LR)
    with pytest.raises(NanLossError) as err:
        run(cfg, tmp_path / "student", StageContext(cache_dir=tmp_path / "cache"))
    _assert_diverged(err, tmp_path / "student")
    assert str(err.value).startswith("distill: ")


def test_distill_refuses_nan_weights_even_when_the_loss_stayed_finite(
    bert_dir: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last optimizer step can break the weights after the last loss was computed: checked before saving."""
    import torch

    from embedforge.distill import pipeline

    real_train = pipeline.train_student

    def train_then_break(student, *args, **kwargs):  # noqa: ANN001, ANN202
        stats = real_train(student, *args, **kwargs)
        with torch.no_grad():
            next(student.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(pipeline, "train_student", train_then_break)
    cfg = _distill_config(bert_dir, files, max_steps=2)
    with pytest.raises(NanLossError, match=r"trained weights are NaN or infinite") as err:
        pipeline.run(cfg, tmp_path / "student", StageContext(cache_dir=tmp_path / "cache"))
    _assert_diverged(err, tmp_path / "student")


def _compress_config(bert_dir: Path, files: dict[str, Path], **train: Any) -> Any:
    """A healing compress config: the stage's own training defaults except the ``train`` keys given."""
    from embedforge.compress.config import CompressConfig
    from embedforge.recipe import build_config

    return build_config(CompressConfig, {"model": str(bert_dir), "layers": {"spread": 2}, "heal": True,
                                         "heal_data": str(files["texts"]), "max_seq_length": 32,
                                         "train": {"batch_size": 8, **train}})


def test_compress_heal_stops_on_divergence(bert_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    from embedforge.compress.pipeline import run

    cfg = _compress_config(bert_dir, files, max_steps=6, learning_rate=HUGE_LR)
    with pytest.raises(NanLossError) as err:
        run(cfg, tmp_path / "small", StageContext())
    _assert_diverged(err, tmp_path / "small")
    assert str(err.value).startswith("compress (heal): ")


def test_binarizer_stops_on_divergence_and_records_its_stage(
    bert_dir: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedforge.compress import binarizer
    from embedforge.compress.config import BinarizerConfig
    from embedforge.compress.pipeline import run_binarizer
    from embedforge.model import read_lineage
    from embedforge.recipe import build_config

    real_loss = binarizer.binarizer_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        loss, parts = real_loss(*args, **kwargs)
        return (loss * float("inf") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(binarizer, "binarizer_loss", poisoned)
    cfg = build_config(BinarizerConfig, {"model": str(bert_dir), "data": str(files["texts"]),
                                         "train": {"max_steps": 5, "batch_size": 16}})
    with pytest.raises(NanLossError, match=r"^binarizer: the training loss became inf at step 3;") as err:
        run_binarizer(cfg, tmp_path / "bin", StageContext())
    _assert_diverged(err, tmp_path / "bin")
    # With a finite loss the stage publishes, and its lineage names the binarizer stage (not compress).
    monkeypatch.setattr(binarizer, "binarizer_loss", real_loss)
    run_binarizer(cfg, tmp_path / "bin", StageContext())
    assert read_lineage(tmp_path / "bin")["stage"] == "binarizer"


# ------------------------------------------------------------------------------------------ changed settings


def test_changed_learning_rate_starts_over_instead_of_resuming(
    embedder_dir: Path, files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from embedforge.convert.training import run_contrastive
    from embedforge.model import read_lineage

    out = tmp_path / "out"
    first = _convert_config("contrastive", embedder_dir, files, learning_rate=1e-3, max_steps=4, save_steps=100)
    with pytest.raises(TrainingInterrupted):
        run_contrastive(first, out, StageContext(extra={"train_callbacks": [sigterm_at(2)]}))
    assert (tmp_path / "out.ckpt" / "checkpoint-2" / "embedforge-train.json").is_file()

    second = _convert_config("contrastive", embedder_dir, files, learning_rate=1e-7, max_steps=4, save_steps=100)
    with caplog.at_level(logging.WARNING, logger="embedforge.training.guard"):
        run_contrastive(second, out, StageContext())
    lines = [r.getMessage() for r in caplog.records if "training config changed" in r.getMessage()]
    assert len(lines) == 1 and "(train.learning_rate: 0.001 -> 1e-07); starting over" in lines[0]
    assert str(tmp_path / "out.ckpt" / "checkpoint-2") in lines[0]
    train = read_lineage(out)["extra"]["train"]["stages"]["stage1"]
    assert train["resumed_from"] is None and train["steps"] == 4
    # The result is exactly what a fresh run at the new learning rate gives: nothing of the old schedule is left.
    run_contrastive(second, tmp_path / "fresh", StageContext())
    np.testing.assert_allclose(_vectors(out), _vectors(tmp_path / "fresh"), atol=1e-6)


def test_distill_changed_settings_start_over(bert_dir: Path, files: dict[str, Path], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from embedforge.distill.pipeline import run
    from embedforge.model import read_lineage

    ctx = dict(cache_dir=tmp_path / "cache")
    with pytest.raises(TrainingInterrupted):
        run(_distill_config(bert_dir, files, max_steps=4, learning_rate=1e-3), tmp_path / "s",
            StageContext(**ctx, extra={"train_callbacks": [sigterm_at(2)]}))
    with caplog.at_level(logging.WARNING, logger="embedforge.training.guard"):
        run(_distill_config(bert_dir, files, max_steps=4, learning_rate=1e-7), tmp_path / "s", StageContext(**ctx))
    changed = [r.getMessage() for r in caplog.records if "training config changed" in r.getMessage()]
    assert len(changed) == 1 and changed[0].endswith("starting over"), changed
    assert "(train.learning_rate: 0.001 -> 1e-07)" in changed[0]
    stats = read_lineage(tmp_path / "s")["metrics"]["distill"]
    assert stats["resumed_from"] is None and stats["steps"] == 4


def test_nan_message_points_at_the_last_good_checkpoint(embedder_dir: Path, files: dict[str, Path],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedforge.convert import losses
    from embedforge.convert.training import run_contrastive

    original = losses.FilteredInfoNCELoss.compute_loss_from_embeddings
    calls = {"n": 0}

    def poisoned(self, embeddings, labels=None):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss = original(self, embeddings, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(losses.FilteredInfoNCELoss, "compute_loss_from_embeddings", poisoned)
    cfg = _convert_config("contrastive", embedder_dir, files, max_steps=5)
    with pytest.raises(NanLossError) as err:
        run_contrastive(cfg, tmp_path / "out", StageContext())
    _assert_diverged(err, tmp_path / "out")
    last = tmp_path / "out.ckpt" / "checkpoint-2"
    assert f"unchanged ones resume from the last good checkpoint {last}" in str(err.value)
    assert "changed settings start over" in str(err.value)


# ------------------------------------------------------------------------------------------ cut-off checkpoints


def test_cut_off_checkpoint_is_skipped_for_the_previous_one(
    embedder_dir: Path, files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from embedforge.convert.training import run_contrastive
    from embedforge.model import read_lineage

    cfg = _convert_config("contrastive", embedder_dir, files, max_steps=4, save_steps=1)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted):
        run_contrastive(cfg, out, StageContext(extra={"train_callbacks": [sigterm_at(2)]}))
    ckpt = tmp_path / "out.ckpt"
    # The step-2 save was cut off (killed, or "[enforce fail at inline_container.cc:672]" on a full disk).
    (ckpt / "checkpoint-2" / "trainer_state.json").unlink()
    (ckpt / "checkpoint-2" / "embedforge-train.json").unlink()
    with caplog.at_level(logging.WARNING, logger="embedforge.training.guard"):
        run_contrastive(cfg, out, StageContext())
    lines = [r.getMessage() for r in caplog.records if "incomplete" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint-2 (no trainer_state.json); resuming from checkpoint-1" in lines[0]
    train = read_lineage(out)["extra"]["train"]["stages"]["stage1"]
    assert train["resumed_from"].endswith("checkpoint-1") and train["steps"] == 4


def test_distill_skips_a_cut_off_checkpoint(bert_dir: Path, files: dict[str, Path], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from embedforge.distill.pipeline import run
    from embedforge.model import read_lineage

    cfg = _distill_config(bert_dir, files, max_steps=3)
    ctx = dict(cache_dir=tmp_path / "cache")
    with pytest.raises(TrainingInterrupted):
        run(cfg, tmp_path / "s", StageContext(**ctx, extra={"train_callbacks": [sigterm_at(2)]}))
    partial = tmp_path / "s.ckpt" / "checkpoint-2"
    (partial / "trainer_state.json").unlink()  # cut off while being written
    with caplog.at_level(logging.WARNING, logger="embedforge.training.guard"):
        run(cfg, tmp_path / "s", StageContext(**ctx))
    assert any("checkpoint-2 (no trainer_state.json); starting over" in r.getMessage() for r in caplog.records)
    stats = read_lineage(tmp_path / "s")["metrics"]["distill"]
    assert stats["resumed_from"] is None and stats["steps"] == 3


# ------------------------------------------------------------------------------------------ no pickle


class _Planted:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_planted_pickle_in_the_heal_checkpoint_never_runs(bert_dir: Path, files: dict[str, Path],
                                                          tmp_path: Path) -> None:
    import torch

    from embedforge.compress.pipeline import run
    from embedforge.model import read_lineage
    from embedforge.testing import sigterm_at

    marker = tmp_path / "pickle-ran"
    ckpt = tmp_path / "small.ckpt"
    ckpt.mkdir()
    torch.save({"model": _Planted(marker), "signature": None}, ckpt / "heal.pt")  # the old loop's file name
    cfg = _compress_config(bert_dir, files, max_steps=3)
    run(cfg, tmp_path / "small", StageContext())
    assert not marker.exists(), "a pickle from the checkpoint folder was executed"
    assert read_lineage(tmp_path / "small")["metrics"]["heal_steps"] == 3
    # A pickle planted in a complete checkpoint of this very run (the trainer's RNG state file) is never executed
    # either: the rerun refuses to unpickle it instead of resuming.
    out = tmp_path / "again"
    with pytest.raises(TrainingInterrupted):
        run(cfg, out, StageContext(extra={"train_callbacks": [sigterm_at(2)]}))
    rng_file = tmp_path / "again.ckpt" / "checkpoint-2" / "rng_state.pth"
    assert rng_file.is_file()
    torch.save({"python": _Planted(marker)}, rng_file)
    with pytest.raises(RunError, match=r"checkpoint-2 holds a file that cannot be loaded safely .*remove .*"
                                       r"checkpoint-2 and rerun$"):
        run(cfg, out, StageContext())
    assert not marker.exists(), "a pickle from the checkpoint folder was executed"
    assert not out.exists()


def test_no_pickle_loading_in_the_package() -> None:
    import embedforge

    root = Path(embedforge.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle in ("weights_only=False", "import pickle", "pickle.load", "allow_pickle=True"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
        if "torch.load(" in text and "weights_only=True" not in text:
            offenders.append(f"{path.relative_to(root)}: torch.load without weights_only=True")
    assert offenders == []


def test_heal_checkpoints_on_sigterm_resumes_and_restarts_on_changed_settings(
    bert_dir: Path, files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from embedforge.compress.pipeline import run
    from embedforge.model import read_lineage
    from embedforge.testing import sigterm_at
    from embedforge.training.guard import TRAIN_RECORD

    cfg = _compress_config(bert_dir, files, max_steps=8, learning_rate=1e-3, save_steps=100)
    run(cfg, tmp_path / "straight", StageContext())
    out = tmp_path / "small"
    with pytest.raises(TrainingInterrupted, match=r"^compress \(heal\): .* at step 5; .*Rerun") as err:
        run(cfg, out, StageContext(extra={"train_callbacks": [sigterm_at(5)]}))
    assert err.value.exit_code == 130 and "\n" not in str(err.value)  # interrupted, as for Ctrl-C
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert not out.exists()
    assert json.loads((tmp_path / "small.ckpt" / "checkpoint-5" / TRAIN_RECORD).read_text())["step"] == 5
    run(cfg, out, StageContext())
    train = read_lineage(out)["extra"]["train"]
    assert train["resumed_from"] == str(tmp_path / "small.ckpt" / "checkpoint-5")
    np.testing.assert_allclose(_vectors(out), _vectors(tmp_path / "straight"), atol=1e-5)
    # Changed settings: the checkpoint is not used, and the log names the change.
    with pytest.raises(TrainingInterrupted):
        run(cfg, tmp_path / "other", StageContext(extra={"train_callbacks": [sigterm_at(5)]}))
    changed = _compress_config(bert_dir, files, max_steps=8, learning_rate=1e-4, save_steps=100)
    with caplog.at_level(logging.WARNING, logger="embedforge.training.guard"):
        run(changed, tmp_path / "other", StageContext())
    assert any("(train.learning_rate: 0.001 -> 0.0001); starting over" in r.getMessage() for r in caplog.records)
    assert read_lineage(tmp_path / "other")["extra"]["train"]["resumed_from"] is None


def test_resume_point_restarts_when_the_input_model_was_remade(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Same config, but the model directory it names was written again (an earlier stage rerun with --force)."""
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.training.guard import resume_point, training_settings, write_record

    model = tmp_path / "embedder"
    model.mkdir()
    (model / "embedforge.json").write_text(json.dumps({"stage": "convert", "created": "2026-01-01T00:00:00+00:00"}))
    cfg = ContrastiveConfig(model=str(model), data=["pairs.jsonl"])
    resume_safe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_steps=7, logging_steps=3))
    ckpt = tmp_path / "out.ckpt" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    write_record(ckpt, training_settings(cfg))
    assert resume_point(ckpt.parent, training_settings(cfg)) == str(ckpt)
    # Only keys that do not change the computation differ: still resumes.
    assert resume_point(ckpt.parent, training_settings(resume_safe)) == str(ckpt)
    (model / "embedforge.json").write_text(json.dumps({"stage": "convert", "created": "2026-02-02T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING, logger="embedforge.training.guard"):
        assert resume_point(ckpt.parent, training_settings(cfg)) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"training config changed since the checkpoint in {ckpt} (model_created: \"2026-01-01T00:00:00+00:00\" -> "
        "\"2026-02-02T00:00:00+00:00\"); starting over"
    ]
    assert not ckpt.exists() and ckpt.parent.is_dir()  # the stale checkpoint is gone, the folder is kept
