"""Config of the ``eval`` recipe stage (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from embedforge.configs import check, opt


class ArtifactKind(str, Enum):
    """What one evaluated artifact is; recorded per artifact in metrics.json."""

    PYTORCH = "pytorch"                # the sentence-transformers model directory
    ONNX_FP32 = "onnx-fp32"            # onnx/model.onnx of an export directory
    ONNX_INT8 = "onnx-int8"            # a dynamic int8 graph of the same export
    BINARY_RESCORE = "binary-rescore"  # sign bits for the search, calibrated int8 vectors for the final scores


@dataclass
class EvalConfig:
    """Evaluate a model directory (and optionally its ONNX export, binary codes and Matryoshka prefixes) on
    built-in or custom tasks; writes metrics.json and report.md."""

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
    export: str | None = opt(
        None, help="an export directory of the model (manifest.json): its fp32 graph and one int8 graph are "
        "evaluated too, each encoding the task texts once"
    )
    int8_graph: str | None = opt(
        None, help="the int8 graph of `export` to evaluate, a file under it (e.g. onnx/model_qint8_avx2.onnx); "
        "None: onnx/model_qint8_avx512_vnni.onnx, else the first model_qint8_*.onnx the manifest lists"
    )
    binary_rescore: bool = opt(
        False, help="also score binary search with int8 rescoring, from the vectors of the int8 graph (the "
        "PyTorch model without `export`): retrieval takes the top rescore_depth documents by hamming distance "
        "of the sign bits and re-ranks them by float query . int8 document; STS pairs get the float . int8 score"
    )
    rescore_depth: int = opt(40, help="binary_rescore: candidates per query re-ranked with int8 vectors "
                             "(recall is then measured at min(100, rescore_depth))")
    truncate_dims: list[int] = opt(
        factory=list, help="Matryoshka prefixes to score as well, e.g. [256, 128, 64]: the PyTorch vectors (and "
        "the binary+rescore ones) cut to each size and renormalized, without encoding again"
    )

    def __post_init__(self) -> None:
        from embedforge.configs import ConfigError

        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.truncate_dim is None or self.truncate_dim > 0, "truncate_dim", "must be positive")
        check(bool(self.tasks), "tasks", "list at least one task")
        check(self.rescore_depth > 0, "rescore_depth", "must be positive")
        check(isinstance(self.truncate_dims, (list, tuple)) and all(
            isinstance(d, int) and d > 0 for d in self.truncate_dims), "truncate_dims",
            "must be a list of positive integers")
        check(len(set(self.truncate_dims)) == len(self.truncate_dims), "truncate_dims", "lists a size twice")
        check(self.int8_graph is None or self.export is not None, "int8_graph",
              "names a graph of `export`; set export to the export directory")
        check(self.truncate_dim is None or not self.multi_artifact, "truncate_dim",
              "evaluates one prefix of one model; with export, binary_rescore or truncate_dims use truncate_dims")
        for task in self.tasks:
            try:
                parse_task(task)
            except ValueError as exc:
                raise ConfigError(f"tasks: {exc}", key="tasks") from None

    @property
    def multi_artifact(self) -> bool:
        """Whether the stage evaluates more than the model itself (then metrics.json lists ``artifacts``)."""
        return bool(self.export or self.binary_rescore or self.truncate_dims)


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
