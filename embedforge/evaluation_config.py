"""Config of the ``eval`` recipe stage (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedforge.configs import check, opt


@dataclass
class EvalConfig:
    """Evaluate a model directory on built-in or custom tasks; writes metrics.json and report.md."""

    model: str = opt(help="model directory, alias or hub id to evaluate")
    tasks: list[str] = opt(
        factory=lambda: ["stsb-dev"],
        help="built-in tasks (stsb-dev, sick-trial, scifact-dev, banking77) or sts:FILE, "
        "retrieval:FOLDER[:split], classification:FILE",
    )
    batch_size: int = opt(32, help="texts per forward pass")
    truncate_dim: int | None = opt(None, help="evaluate the first N dimensions only (Matryoshka)")
    query_prompt: str | None = opt(None, help="text put before queries (default: the model's 'query' prompt)")
    doc_prompt: str | None = opt(None, help="text put before documents (default: the model's 'document' prompt)")
    record_in_model: bool = opt(True, help="also record the metrics in the model's embedforge.json")

    def __post_init__(self) -> None:
        from embedforge.configs import ConfigError

        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.truncate_dim is None or self.truncate_dim > 0, "truncate_dim", "must be positive")
        check(bool(self.tasks), "tasks", "list at least one task")
        for task in self.tasks:
            try:
                parse_task(task)
            except ValueError as exc:
                raise ConfigError(f"tasks: {exc}", key="tasks") from None


@dataclass(frozen=True)
class Task:
    """A parsed task spec: a built-in name, or ``sts:FILE``, ``retrieval:FOLDER[:split]``, ``classification:FILE``."""

    kind: str
    name: str
    path: str | None = None
    split: str | None = None


BUILTIN_TASKS = {
    "stsb-dev": Task("sts", "stsb-dev"),
    "sick-trial": Task("sts", "sick-trial"),
    "scifact-dev": Task("retrieval", "scifact-dev"),
    "banking77": Task("classification", "banking77"),
}


def parse_task(spec: str) -> Task:
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("sts", "retrieval", "classification") or not rest:
        raise ValueError(
            f"unknown task {spec!r}: use a built-in ({', '.join(BUILTIN_TASKS)}) or sts:FILE, "
            "retrieval:FOLDER[:split], classification:FILE"
        )
    split = None
    if kind == "retrieval" and ":" in rest and not Path(rest).exists():
        rest, split = rest.rsplit(":", 1)
    return Task(kind, spec, rest, split)
