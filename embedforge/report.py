"""Run reports: what each stage of a run recorded, as markdown, a self-contained HTML page and PNG plots.

``embedforge run RECIPE --run-dir DIR`` writes every stage's output to ``DIR/<stage name>`` and records the run in
``DIR/run.json``; at the end (and by ``embedforge report DIR`` at any time, without rerunning anything)
:func:`build_report` reads the records below and writes ``DIR/report.md``, ``DIR/report.html`` (every image
embedded as base64: it opens offline) and ``DIR/plots/*.png``. A plot whose data is absent is skipped with a note
saying what is missing; nothing here fails because a stage recorded less.

Records the report reads (the contract between the stages and this module)
-------------------------------------------------------------------------

``DIR/run.json`` (written by :mod:`embedforge.recipe` while the run goes)::

    {"format": "embedforge-run/1", "recipe": "recipes/quickstart.yaml", "recipe_name": "quickstart",
     "recipe_hash": "...", "status": "running" | "complete" | "failed" | "interrupted",
     "started": ISO-8601, "finished": ISO-8601 | null, "error": "one line" | null,
     "stages": [{"name": "embedder", "stage": "convert", "out": "/abs/DIR/embedder",
                 "status": "pending" | "running" | "ran" | "skipped" | "failed",
                 "reason": "why it ran or was skipped", "started": ..., "finished": ..., "seconds": 12.3,
                 "peak_rss_mb": 812.0, "peak_gpu_mb": null}]}

Each stage's ``out/embedforge.json`` (lineage, :func:`embedforge.model.make_lineage`): ``stage``, ``source``,
``parents[].path``, ``config_hash``, ``metrics``, and for training stages ``extra.train`` with
``loss_history: [[step, loss], ...]`` (the trainer's logged losses; a stage with several phases has
``extra.train.stages.<phase>.loss_history``). The report draws one loss curve per training stage (and phase).

An eval stage's ``out/metrics.json``, in one of two forms:

1. plain (what ``embedforge eval`` writes): ``{task: {metric: value, ..., "seconds": s}}``; the artifact is the
   model the eval's ``embedforge.json`` names as ``source``, called by the eval stage's name; its size on disk is
   measured by the report, its dimension is the eval config's ``truncate_dim``.
2. artifacts (one eval out scoring several artifacts)::

    {"artifacts": [{"name": "onnx-int8",          # unique label shown in plots and tables
                    "kind": "pytorch" | "onnx" | "binary" | ...,   # free text, shown in the table
                    "path": "/abs/path/of/the/artifact",           # optional
                    "size_mb": 131.2,                # size on disk in MiB (optional: measured from path)
                    "throughput": 85.0,              # texts per second as measured (optional)
                    "dim": 256 | null,               # Matryoshka dimension evaluated (null: full width)
                    "precision": "float" | "binary", # of the vectors compared (default "float")
                    "results": {task: {metric: value, ...}}}]}

The quality of an artifact is the mean over its tasks of each task's headline metric
(:func:`embedforge.evaluation.main_score`: Spearman for STS, nDCG@10 for retrieval, accuracy for classification),
times 100. Quality vs Matryoshka dimension uses the artifacts (or plain evals) that name a ``dim``, one line per
``precision``. An export stage's ``out/manifest.json`` ``graphs.<name>.size_mb`` fills the artifact table's size of
ONNX artifacts that do not give one.

:func:`table` and :func:`metrics_table` also make the markdown tables of ``embedforge eval`` and ``bench/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if value is None:
        return "-"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts); columns default to the union of keys in first-seen order."""
    if not rows:
        return "_no rows_"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per task with every metric it reported."""
    rows = [{"task": task, **{k: v for k, v in m.items()}} for task, m in results.items()]
    return table(rows)


def bar_plot(values: dict[str, float], path: str | Path, title: str = "", ylabel: str = "") -> Path:
    """Save a simple bar chart (PNG) of ``values`` to ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, len(values) * 0.9), 3.2))
    ax.bar(list(values), list(values.values()))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
