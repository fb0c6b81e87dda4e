"""Markdown tables of metrics, and a bar chart helper.

:func:`metrics_table` is what ``embedforge eval`` prints and what the ``eval`` stage writes to ``report.md``;
:func:`table` also makes the markdown tables of ``bench/dev/eval_check.py`` and ``bench/dev/convert_zeroshot.py``.
:func:`bar_plot` saves a PNG bar chart of a mapping of scores; nothing in embedforge or ``bench/`` calls it, it is
there for your own reports (it needs matplotlib, imported when called).
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
