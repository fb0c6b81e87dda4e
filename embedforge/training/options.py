"""The ``train:`` key of every training stage: one options dataclass for schedule, batch, precision and
checkpoints (torch-free: stage configs import it).

Each training stage config (``mntp``, ``simcse``, ``contrastive``, ``distill``, ``compress``'s healing,
``binarizer``) has a field ``train: TrainOptions`` whose default carries that stage's own defaults (a learning
rate that suits its objective, its step budget). In a recipe, the keys written under ``train:`` replace those
defaults one by one; the others keep the stage's values::

    - stage: distill
      train: {learning_rate: 2.0e-4, batch_size: 64}   # epochs, warmup, ... stay the distill defaults

Training length: ``max_steps`` and ``epochs`` both bound the run and it ends at whichever comes first; either may be
null (no bound of that kind), not both. The keys that used to sit at the top level of a stage (``learning_rate``,
``heal_lr``, ``lr``, ``steps``, ...) are refused with the ``train.`` spelling that replaces them
(:func:`moved_train_key`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

from embedforge.configs import check, choice, opt
from embedforge.training.precision import Precision

TRAIN_HELP = ("how the stage trains: learning_rate, batch_size, max_steps, epochs, warmup_ratio, weight_decay, "
              "lr_scheduler, precision, save_steps, save_total_limit, logging_steps, seed (keys you leave out keep "
              "this stage's defaults; see `embedforge recipes explain STAGE`)")


class Scheduler(str, enum.Enum):
    """How the learning rate moves after the linear warmup."""

    LINEAR = "linear"      # linear decay to 0 at the last step
    COSINE = "cosine"      # half a cosine down to 0 at the last step
    CONSTANT = "constant"  # stays at the peak


@dataclass
class TrainOptions:
    """How a stage trains: schedule, batch, precision, checkpoints and logging."""

    learning_rate: float = opt(1e-4, help="peak learning rate (reached after the warmup)")
    lr_scheduler: Scheduler = opt(Scheduler.LINEAR, help="linear | cosine | constant: the rate after the warmup")
    warmup_ratio: float = opt(0.05, help="fraction of the steps spent warming the learning rate up from 0")
    weight_decay: float = opt(0.0, help="AdamW weight decay")
    batch_size: int = opt(32, help="examples per device per optimizer step")
    max_steps: int | None = opt(
        100, help="optimizer steps at most (null: no step bound; the run ends at whichever of max_steps / epochs "
                  "comes first)")
    epochs: float | None = opt(1.0, help="passes over the data at most (null: no epoch bound)")
    precision: Precision = opt(
        Precision.AUTO, help="auto | fp32 | bf16: bf16 autocast for forward and backward; auto is bf16 on a CUDA "
                             "device that supports it, else fp32 (on a CPU, bf16 pays off only with AVX512-BF16 "
                             "or AMX)")
    save_steps: int = opt(
        50, help="write a resumable checkpoint every N steps (and on SIGTERM / Ctrl-C); a rerun resumes from it only "
                 "with the same training settings, otherwise it starts over")
    save_total_limit: int = opt(2, help="checkpoints kept on disk")
    logging_steps: int | None = opt(
        None, help="record the loss every N steps (null: about 100 points over the run, for the report's loss plot)")
    seed: int = opt(0, help="random seed (data order, initialisation of new weights)")

    def __post_init__(self) -> None:
        self.lr_scheduler = choice(Scheduler, self.lr_scheduler, "train.lr_scheduler")
        self.precision = choice(Precision, self.precision, "train.precision")
        check(self.learning_rate > 0, "train.learning_rate", "must be positive")
        check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.batch_size > 0, "train.batch_size", "must be positive")
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "must be positive (or null)")
        check(self.epochs is None or self.epochs > 0, "train.epochs", "must be positive (or null)")
        check(self.max_steps is not None or self.epochs is not None, "train.max_steps",
              "max_steps and epochs cannot both be null: the run needs an end")
        check(self.save_steps > 0, "train.save_steps", "must be positive")
        check(self.save_total_limit > 0, "train.save_total_limit", "must be positive")
        check(self.logging_steps is None or self.logging_steps > 0, "train.logging_steps", "must be positive")

    def steps(self, rows: int, world: int = 1, drop_last: bool = False) -> int:
        """Optimizer steps for ``rows`` examples over ``world`` processes: the smaller of ``max_steps`` and
        ``epochs`` passes (a pass is ``rows // global batch`` steps with ``drop_last``, else rounded up)."""
        per_pass = max(1, (rows // (self.batch_size * world)) if drop_last
                       else math.ceil(rows / (self.batch_size * world)))
        bounds = [self.max_steps] if self.max_steps is not None else []
        if self.epochs is not None:
            bounds.append(math.ceil(self.epochs * per_pass))
        return max(1, min(bounds))

    def log_every(self, steps: int) -> int:
        """``logging_steps``, or about 100 loss points over ``steps`` when it is null."""
        return self.logging_steps if self.logging_steps is not None else max(1, steps // 100)


def train_field(**defaults: Any) -> Any:
    """The ``train`` field of a training stage config, defaulting to :class:`TrainOptions` with ``defaults``."""
    return opt(factory=lambda: TrainOptions(**defaults), help=TRAIN_HELP)


#: Top-level keys of earlier releases whose value now lives under ``train:`` (old name -> new key).
RENAMED = {
    "lr": "learning_rate", "heal_lr": "learning_rate", "heal_batch_size": "batch_size", "steps": "max_steps",
    "heal_steps": "max_steps",
}
TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainOptions))


def moved_train_key(key: str, value: Any) -> str | None:
    """For a top-level key of a training stage that now lives under ``train:``, the message that says how to write
    it (None for any other key)."""
    new = RENAMED.get(key, key if key in TRAIN_KEYS else None)
    if new is None:
        return None
    if key == "heal_steps" and not value:
        return "healing is off unless heal: true (its steps go under train: {max_steps: N}); remove heal_steps"
    shown = "null" if value is None else value
    extra = " and heal: true" if key == "heal_steps" else ""
    return f"training options moved under the train: key; write train: {{{new}: {shown}}}{extra}"
