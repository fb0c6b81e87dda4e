"""The one training engine: the ``train:`` options (stage defaults, moved keys, step budget) and the trainer every
stage builds (arguments, guarded run, resume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from embedforge.configs import ConfigError, opt
from embedforge.recipe import build_config, describe_config
from embedforge.training.options import Scheduler, TrainOptions, train_field


@dataclass
class ToyStage:
    """A training stage config as the real ones are written."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"text_limit": "data_limit"}

    model: str = opt(help="model")
    data_limit: int | None = opt(None, help="at most this many texts")
    train: TrainOptions = train_field(learning_rate=5e-5, max_steps=None, epochs=3.0, seed=7)


def test_train_keys_change_only_what_they_name() -> None:
    cfg = build_config(ToyStage, {"model": "m", "train": {"batch_size": 4, "learning_rate": "2e-4"}})
    assert cfg.train.batch_size == 4 and cfg.train.learning_rate == 2e-4
    # the rest are this stage's defaults, not TrainOptions' own
    assert (cfg.train.max_steps, cfg.train.epochs, cfg.train.seed) == (None, 3.0, 7)
    assert build_config(ToyStage, {"model": "m"}).train.learning_rate == 5e-5


@pytest.mark.parametrize(("key", "value", "says"), [
    ("learning_rate", 1e-4, "train: {learning_rate: 0.0001}"),
    ("lr", 0.001, "train: {learning_rate: 0.001}"),
    ("heal_lr", 5e-5, "train: {learning_rate: 5e-05}"),
    ("steps", 600, "train: {max_steps: 600}"),
    ("heal_steps", 200, "train: {max_steps: 200} and heal: true"),
    ("heal_steps", 0, "remove heal_steps"),
    ("epochs", 2, "train: {epochs: 2}"),
])
def test_a_top_level_training_key_names_its_new_place(key: str, value: object, says: str) -> None:
    with pytest.raises(ConfigError, match=r"moved|heal") as exc:
        build_config(ToyStage, {"model": "m", key: value})
    assert says in str(exc.value)
    assert str(exc.value).startswith(f"{key}:")


def test_a_renamed_key_names_its_new_name() -> None:
    with pytest.raises(ConfigError, match=r"^text_limit: renamed; write data_limit: 500$"):
        build_config(ToyStage, {"model": "m", "text_limit": 500})


def test_unknown_train_key_is_refused_with_its_full_name() -> None:
    with pytest.raises(ConfigError, match=r"train\.learnin_rate: unknown key .*did you mean 'learning_rate'"):
        build_config(ToyStage, {"model": "m", "train": {"learnin_rate": 1e-4}})
    with pytest.raises(ConfigError, match=r"train\.batch_size: must be positive"):
        build_config(ToyStage, {"model": "m", "train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="cannot both be null"):
        build_config(ToyStage, {"model": "m", "train": {"epochs": None}})


def test_explain_lists_train_keys_with_the_stages_defaults() -> None:
    rows = {r["key"]: r for r in describe_config(ToyStage)}
    assert rows["train.learning_rate"]["default"] == "5e-05"
    assert rows["train.epochs"]["default"] == "3.0"
    assert rows["train.lr_scheduler"]["default"] == "'linear'"
    assert "train" not in rows and all(r["help"] for r in rows.values() if r["key"].startswith("train."))


@pytest.mark.parametrize(("max_steps", "epochs", "drop_last", "world", "expected"), [
    (100, 1.0, False, 1, 4),      # 100 rows / 32 -> 4 steps per pass; the epoch bound comes first
    (3, 1.0, False, 1, 3),        # the step bound comes first
    (None, 2.5, False, 1, 10),    # ceil(2.5 * 4)
    (None, 1.0, True, 1, 3),      # 100 // 32 full batches
    (1000, None, False, 1, 1000),  # steps only
    (None, 1.0, False, 2, 2),     # two processes share a pass
])
def test_step_budget(max_steps: int | None, epochs: float | None, drop_last: bool, world: int,
                     expected: int) -> None:
    options = TrainOptions(batch_size=32, max_steps=max_steps, epochs=epochs)
    assert options.steps(100, world=world, drop_last=drop_last) == expected


def test_trainer_arguments_follow_the_options(tmp_path: Path) -> None:
    from embedforge.training.engine import trainer_arguments

    options = TrainOptions(learning_rate=3e-4, batch_size=8, warmup_ratio=0.1, weight_decay=0.01,
                           lr_scheduler=Scheduler.COSINE, save_steps=7, save_total_limit=1, seed=5, precision="fp32")
    args = trainer_arguments(options, tmp_path / "ckpt", 40)
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate) == (40, 8, 3e-4)
    assert (args.warmup_steps, args.weight_decay, args.save_steps, args.save_total_limit, args.seed) == \
        (4, 0.01, 7, 1, 5)
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine" and not args.bf16
    assert args.logging_steps == 1  # about 100 points: 40 steps -> every step
    phase2 = trainer_arguments(options, tmp_path / "ckpt", 40, learning_rate=1e-5, sentence_transformers=False)
    assert phase2.learning_rate == 1e-5 and type(phase2).__name__ == "TrainingArguments"


def _toy_problem(n: int = 64):
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return Dataset.from_dict({"x": x.tolist(), "y": y.tolist()})


def _toy_trainer(tmp_path: Path, steps: int, lr: float = 0.3):
    import torch

    from embedforge.training.engine import build_trainer, trainer_arguments

    model = torch.nn.Linear(4, 1)
    options = TrainOptions(learning_rate=lr, batch_size=8, max_steps=steps, epochs=None, save_steps=5,
                           precision="fp32", warmup_ratio=0.0)

    def loss(m, inputs):
        return torch.nn.functional.mse_loss(m(inputs["x"]).squeeze(-1), inputs["y"])

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}

    args = trainer_arguments(options, tmp_path / "ckpt", steps, sentence_transformers=False, disable_tqdm=True)
    return model, options, build_trainer(model, args, _toy_problem(), compute_loss=loss, data_collator=collate)


def test_a_function_loss_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    from embedforge.training.engine import run_training
    from embedforge.training.guard import TRAIN_RECORD, TRAINABLE_FILE

    _, options, trainer = _toy_trainer(tmp_path, 20)
    settings = {"train": {"learning_rate": options.learning_rate}, "model": "toy"}
    stats = run_training(trainer, tmp_path / "ckpt", settings, where="toy")
    assert stats["steps"] == 20 and stats["resumed_from"] is None
    losses = [loss for _, loss in stats["loss_history"]]
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3]) / 4  # it learned the linear map
    last = tmp_path / "ckpt" / "checkpoint-20"
    assert (last / TRAINABLE_FILE).is_file() and (last / TRAIN_RECORD).is_file()

    # killed after step 15: the rerun resumes there and ends where the uninterrupted run ended
    import shutil

    import torch

    shutil.rmtree(last)
    model, _, again = _toy_trainer(tmp_path, 20)
    stats = run_training(again, tmp_path / "ckpt", settings, where="toy")
    assert stats["resumed_from"] == str(tmp_path / "ckpt" / "checkpoint-15") and stats["steps"] == 20
    assert torch.allclose(model.weight, trainer.model.weight, atol=1e-6)

    # changed settings start over instead of continuing the old schedule
    _, _, fresh = _toy_trainer(tmp_path, 20)
    assert run_training(fresh, tmp_path / "ckpt", {**settings, "model": "other"}, where="toy")["resumed_from"] is None


def test_a_nan_loss_stops_the_function_trainer(tmp_path: Path) -> None:
    import torch

    from embedforge.training.engine import build_trainer, run_training, trainer_arguments
    from embedforge.training.guard import NanLossError

    model = torch.nn.Linear(4, 1)
    options = TrainOptions(batch_size=8, max_steps=3, epochs=None, precision="fp32")
    args = trainer_arguments(options, tmp_path / "ckpt", 3, sentence_transformers=False, disable_tqdm=True)

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows])}

    before = model.weight.detach().clone()
    trainer = build_trainer(model, args, _toy_problem(), data_collator=collate,
                            compute_loss=lambda m, inputs: m(inputs["x"]).sum() * float("nan"))
    with pytest.raises(NanLossError, match="toy: the training loss became nan at step 1"):
        run_training(trainer, tmp_path / "ckpt", {"x": 1}, where="toy")
    assert torch.equal(model.weight, before)


def test_build_trainer_needs_exactly_one_loss(tmp_path: Path) -> None:
    from embedforge.training.engine import build_trainer

    with pytest.raises(TypeError, match="either loss or compute_loss"):
        build_trainer(object(), object(), [], loss=None, compute_loss=None)
