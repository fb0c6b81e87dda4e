"""Run reports: what each stage of a run recorded, as markdown, a self-contained HTML page and PNG plots.

``embedforge run RECIPE --run-dir DIR`` writes every stage's output to ``DIR/<stage name>`` and records the run in
``DIR/run.json``; at the end (and by ``embedforge report DIR`` at any time, without rerunning anything)
:func:`build_report` reads the records below and writes ``DIR/report.md``, ``DIR/report.html`` (every image
embedded as base64: it opens offline) and ``DIR/plots/*.png``: ``tradeoff`` (quality per artifact vs size on disk
and measured throughput), ``matryoshka`` (quality vs dimension, float and binary), ``loss`` (training loss per step
of every training stage), ``stages`` (time and peak memory per stage) and ``lineage`` (which output came from
which, with config hashes). Each has a one-line caption and a table with the same numbers. A plot whose data is
absent is skipped with a note saying what is missing; nothing here fails because a stage recorded less, and the
stages whose output is not there are listed under "Missing".

Records the report reads (the contract between the stages and this module)
-------------------------------------------------------------------------

``DIR/run.json`` (written by :mod:`embedforge.recipe` while the run goes)::

    {"format": "embedforge-run/1", "recipe": "recipes/quickstart.yaml", "recipe_name": "quickstart",
     "recipe_hash": "...", "status": "running" | "complete" | "failed" | "interrupted",
     "started": ISO-8601, "finished": ISO-8601 | null, "error": "one line" | null,
     "stages": [{"name": "embedder", "stage": "convert", "out": "/abs/DIR/embedder",
                 "status": "pending" | "running" | "ran" | "skipped" | "failed" | "interrupted",
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

import base64
import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------- run reports


REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
#: the plots :func:`build_report` draws (only these are replaced in ``plots/``)
PLOT_NAMES = ("tradeoff", "matryoshka", "loss", "stages", "lineage")
#: the headline metric of a task, by the metrics it reports (STS, retrieval, classification)
HEADLINE = ("spearman", "ndcg@10", "accuracy")
TRAINING_STAGES = frozenset({"mntp", "simcse", "contrastive", "distill", "binarizer"})


@dataclass
class Artifact:
    """One evaluated artifact: where it came from, what it costs, how well it scores."""

    name: str
    kind: str
    results: dict[str, dict[str, Any]]
    path: str | None = None
    size_mb: float | None = None
    throughput: float | None = None
    dim: int | None = None
    precision: str = "float"
    eval_stage: str = ""

    @property
    def quality(self) -> float | None:
        """Mean headline score over the artifact's tasks (None when no task has one)."""
        scores = [headline(m) for m in self.results.values() if isinstance(m, dict)]
        scores = [s for s in scores if s is not None]
        return sum(scores) / len(scores) if scores else None


@dataclass
class Block:
    """One piece of the report, rendered to both markdown and HTML."""

    kind: str  # "h1" | "h2" | "p" | "note" | "table" | "plot"
    text: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    image: Path | None = None


@dataclass
class RunReport:
    """What :func:`build_report` wrote and found."""

    markdown: Path
    html: Path
    plots: list[Path]
    missing: list[str]
    summary: list[str]


def headline(metrics: dict[str, Any]) -> float | None:
    """The headline number of one task's metrics: Spearman, nDCG@10 or accuracy (x100), whichever it has."""
    for key in HEADLINE:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def dir_size_mb(path: str | os.PathLike[str] | None) -> float | None:
    """Size on disk of a file or directory tree in MiB (symlinks not followed); None when it does not exist."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 2**20
    if not p.is_dir():
        return None
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            fp = Path(root) / f
            if not fp.is_symlink():
                total += fp.stat().st_size
    return total / 2**20


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _artifacts(stage: dict[str, Any], out: Path, export_sizes: dict[str, float]) -> list[Artifact]:
    """The artifacts one eval stage scored, from its ``metrics.json`` (either form) and ``embedforge.json``."""
    metrics = _read_json(out / "metrics.json")
    if not metrics:
        return []
    lineage = _read_json(out / "embedforge.json")
    if isinstance(metrics.get("artifacts"), list):
        found = []
        for i, a in enumerate(metrics["artifacts"]):
            if not isinstance(a, dict) or not isinstance(a.get("results"), dict):
                logger.warning("%s: artifacts[%d] has no results; left out of the report", out / "metrics.json", i)
                continue
            name = str(a.get("name") or f"{stage['name']}[{i}]")
            size = _num(a.get("size_mb"))
            if size is None:
                path = a.get("path")  # an exported graph's size in its manifest counts its external data file
                size = export_sizes.get(os.fspath(Path(path).resolve())) if path else None
                size = size if size is not None else dir_size_mb(path)
            dim = a.get("dim")
            found.append(Artifact(name=name, kind=str(a.get("kind") or ""), results=a["results"],
                                  path=a.get("path"), size_mb=size, throughput=_num(a.get("throughput")),
                                  dim=int(dim) if isinstance(dim, int) and not isinstance(dim, bool) else None,
                                  precision=str(a.get("precision") or "float"), eval_stage=stage["name"]))
        return found
    config = lineage.get("config") or {}
    source = lineage.get("source") or config.get("model")
    results = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    dim = config.get("truncate_dim")
    return [Artifact(name=stage["name"], kind="pytorch", results=results, path=source,
                     size_mb=dir_size_mb(source), dim=int(dim) if isinstance(dim, int) else None,
                     eval_stage=stage["name"])]


def _loss_curves(stage: dict[str, Any], lineage: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """``{label: [(step, loss), ...]}`` from a training stage's ``extra.train`` (one curve per phase)."""
    train = (lineage.get("extra") or {}).get("train") or {}
    curves: dict[str, list[tuple[float, float]]] = {}

    def take(label: str, record: Any) -> None:
        history = record.get("loss_history") if isinstance(record, dict) else None
        points = [(float(p[0]), float(p[1])) for p in history or []
                  if isinstance(p, (list, tuple)) and len(p) == 2 and _num(p[0]) is not None and _num(p[1]) is not None]
        if points:
            curves[label] = points

    take(stage["name"], train)
    for phase, record in (train.get("stages") or {}).items() if isinstance(train.get("stages"), dict) else []:
        take(f"{stage['name']}/{phase}", record)
    return curves


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    _plt().close(fig)
    return path


def plot_tradeoff(artifacts: list[Artifact], path: Path) -> Path:
    """Quality vs size on disk and vs measured throughput, one point per artifact (one figure, two panels)."""
    plt = _plt()
    with_tp = [a for a in artifacts if a.throughput is not None and a.quality is not None]
    panels = 2 if with_tp else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    sized = [a for a in artifacts if a.size_mb is not None and a.quality is not None]
    color = {a.name: f"C{i % 10}" for i, a in enumerate(artifacts)}  # one colour per artifact in both panels
    ax = axes[0][0]
    for a in sized:
        ax.scatter(a.size_mb, a.quality, s=40, color=color[a.name])
        ax.annotate(a.name, (a.size_mb, a.quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("quality (mean headline score)")
    ax.set_title("quality vs size")
    ax.grid(alpha=0.3)
    if with_tp:
        ax = axes[0][1]
        for a in with_tp:
            ax.scatter(a.throughput, a.quality, s=40, color=color[a.name])
            ax.annotate(a.name, (a.throughput, a.quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("throughput (texts / s)")
        ax.set_title("quality vs speed")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_matryoshka(artifacts: list[Artifact], path: Path) -> Path:
    """Quality vs Matryoshka dimension, one line per vector precision (float, binary)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for precision in sorted({a.precision for a in artifacts}):
        points = sorted((a.dim, a.quality) for a in artifacts if a.precision == precision)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=precision)
    ax.set_xscale("log", base=2)
    ticks = sorted({a.dim for a in artifacts if a.dim})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("dimensions kept")
    ax.set_ylabel("quality (mean headline score)")
    ax.set_title("quality vs Matryoshka dimension")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_losses(curves: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """Training loss per step, one panel per training stage (phase)."""
    plt = _plt()
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.4), squeeze=False)
    for ax, (label, points) in zip(axes[0], curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_stages(stages: list[dict[str, Any]], path: Path) -> Path:
    """Wall time and peak memory per stage (two horizontal bar panels)."""
    plt = _plt()
    names = [s["name"] for s in stages]
    seconds = [_num(s.get("seconds")) or 0.0 for s in stages]
    rss = [_num(s.get("peak_rss_mb")) or 0.0 for s in stages]
    gpu = [_num(s.get("peak_gpu_mb")) for s in stages]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 1.8))
    ax1.barh(names, seconds)
    ax1.set_xlabel("wall time (s)")
    ax1.invert_yaxis()
    ax1.set_title("time per stage")
    ax2.barh(names, rss, label="peak RSS")
    if any(g is not None for g in gpu):
        ax2.barh(names, [g or 0.0 for g in gpu], height=0.4, label="peak GPU")
        ax2.legend()
    ax2.set_xlabel("peak memory (MiB)")
    ax2.invert_yaxis()
    ax2.set_title("memory per stage")
    return _save(fig, path)


def plot_lineage(rows: list[dict[str, Any]], path: Path) -> Path:
    """Boxes for the outputs (and outside sources), arrows from each one's parent, one column per generation."""
    plt = _plt()
    names = [r["stage"] for r in rows]
    parent = {r["stage"]: str(r["made from"]) for r in rows if r["made from"] not in ("-", None)}
    depth: dict[str, int] = {}

    def level(node: str, seen: frozenset[str] = frozenset()) -> int:
        if node not in depth:
            up = parent.get(node)
            depth[node] = 0 if up is None or node in seen else level(up, seen | {node}) + 1
        return depth[node]

    for name in names:
        level(name)
    columns: dict[int, list[str]] = {}
    for node in depth:
        columns.setdefault(depth[node], []).append(node)
    where = {node: (col, -i) for col, nodes in columns.items() for i, node in enumerate(nodes)}
    hashes = {r["stage"]: r["config hash"] for r in rows}
    tall = max(len(v) for v in columns.values())
    fig, ax = plt.subplots(figsize=(2.8 * len(columns) + 1, 0.9 * tall + 1))
    for node, up in parent.items():
        (x0, y0), (x1, y1) = where[up], where[node]
        ax.annotate("", xy=(x1 - 0.32, y1), xytext=(x0 + 0.32, y0),
                    arrowprops={"arrowstyle": "->", "color": "#555"})
    for node, (x, y) in where.items():
        label = node if node in hashes else Path(node).name or node
        if node not in hashes:
            sub = "\n(source)"
        else:
            sub = f"\n{hashes[node]}" if hashes[node] != "-" else ""
        ax.text(x, y, label + sub, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "#e8f0fb" if node in hashes else "#f3f3f3", "ec": "#4a6fa5"})
    ax.set_xlim(-0.6, max(columns) + 0.6)
    ax.set_ylim(-tall + 0.4, 0.6)
    ax.axis("off")
    return _save(fig, path)


def _f(value: Any, digits: int = 1) -> Any:
    return None if value is None else round(float(value), digits)


def paired_text(metrics: Any) -> str | None:
    """``+0.12 [-0.80, +1.05]`` from a task's ``vs_pytorch`` record (eval stage), None without one."""
    return format_paired(metrics.get("vs_pytorch") if isinstance(metrics, dict) else None)


def format_paired(p: Any) -> str | None:
    """``+0.12 [-0.80, +1.05]`` from a record of :func:`embedforge.evaluation.paired_difference`, None for none."""
    if not isinstance(p, dict) or not all(_num(p.get(k)) is not None for k in ("delta", "ci95_low", "ci95_high")):
        return None
    return f"{p['delta']:+.2f} [{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}]"


def _task_label(task: str) -> str:
    """A short column name for a task: ``sts:/long/path/sts.tsv`` becomes ``sts:sts.tsv``."""
    kind, sep, rest = task.partition(":")
    return f"{kind}:{Path(rest).name}" if sep and ("/" in rest or os.sep in rest) else task


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def _missing(stages: list[dict[str, Any]]) -> list[str]:
    """One line per stage whose output is not there (not run yet, failed, or removed since)."""
    lines = []
    for s in stages:
        out = Path(s.get("out") or "")
        if not (out / "embedforge.json").is_file():
            status = s.get("status") or "pending"
            why = {"pending": "not run yet", "running": "was running when the run stopped", "failed": "failed",
                   "interrupted": "interrupted"}.get(status, f"{status}, but its output is gone")
            lines.append(f"stage {s['name']} ({s.get('stage')}): {why}; no output at {out}")
    return lines


def summary_lines(run: dict[str, Any], stages: list[dict[str, Any]], artifacts: list[Artifact],
                  report: Path) -> list[str]:
    """Three lines: how the run went and what it cost; the best and the smallest artifact; where the report is."""
    done = sum(1 for s in stages if (Path(s.get("out") or "") / "embedforge.json").is_file())
    seconds = sum(_num(s.get("seconds")) or 0.0 for s in stages)
    rss = [_num(s.get("peak_rss_mb")) for s in stages if _num(s.get("peak_rss_mb")) is not None]
    peak = f", peak memory {max(rss) / 1024:.1f} GiB" if rss else ""
    first = (f"run {run.get('recipe_name') or '?'}: {run.get('status') or 'unknown'}, {done}/{len(stages)} stages "
             f"done, {_duration(seconds)} of stage time{peak}")
    scored = [a for a in artifacts if a.quality is not None]
    scored = [a for a in scored if a.dim is None] or scored  # full-width artifacts, scored on the same tasks
    if scored:
        best = max(scored, key=lambda a: a.quality or 0.0)
        second = f"best: {best.name} {best.quality:.1f}"
        if best.size_mb is not None:
            second += f" ({best.size_mb:.0f} MiB)"
        sized = [a for a in scored if a.size_mb is not None]
        if sized:
            small = min(sized, key=lambda a: a.size_mb or 0.0)
            if small is not best:
                second += f"; smallest: {small.name} {small.quality:.1f} ({small.size_mb:.0f} MiB)"
    else:
        second = "no evaluation results recorded"
    return [first, second, f"report: {report}"]


def _collect(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]], list[Artifact]]:
    """``(run.json, its stages, each stage's lineage, the evaluated artifacts)`` of a run directory."""
    from embedforge.errors import UsageError
    from embedforge.rundir import RUN_FILE, read_run

    run = read_run(root)
    if not run or not isinstance(run.get("stages"), list):
        raise UsageError(f"{root}: no readable {RUN_FILE}, so this is not a run directory; run "
                         "`embedforge run RECIPE --run-dir DIR` first")
    stages = [dict(s) for s in run["stages"] if isinstance(s, dict) and s.get("name")]
    for s in stages:  # a run directory moved or copied elsewhere: its stages are still DIR/<name>
        here = root / str(s["name"])
        if not Path(s.get("out") or "").exists() and here.is_dir():
            s["out"] = os.fspath(here)
    lineages = {s["name"]: _read_json(Path(s.get("out") or "") / "embedforge.json") for s in stages}
    export_sizes: dict[str, float] = {}
    for s in stages:
        manifest = _read_json(Path(s.get("out") or "") / "manifest.json")
        for info in (manifest.get("graphs") or {}).values():
            if isinstance(info, dict) and _num(info.get("size_mb")) is not None and info.get("file"):
                export_sizes[os.fspath((Path(s["out"]) / info["file"]).resolve())] = float(info["size_mb"])
    artifacts = [a for s in stages if s.get("stage") == "eval"
                 for a in _artifacts(s, Path(s.get("out") or ""), export_sizes)]
    return run, stages, lineages, artifacts


def run_summary(run_dir: str | os.PathLike[str]) -> list[str]:
    """The three summary lines of a run directory (as :func:`build_report` writes them), without writing."""
    root = Path(run_dir).expanduser().resolve()
    run, stages, _, artifacts = _collect(root)
    return summary_lines(run, stages, artifacts, root / REPORT_HTML)


def build_report(run_dir: str | os.PathLike[str]) -> RunReport:
    """(Re)write ``report.md``, ``report.html`` and ``plots/`` of a run directory from what its stages recorded.

    Nothing is rerun. A stage without output is listed under "Missing"; a plot without data is replaced by a
    note. Raises :class:`~embedforge.errors.UsageError` when ``run_dir`` has no ``run.json``.
    """
    root = Path(run_dir).expanduser().resolve()
    run, stages, lineages, artifacts = _collect(root)
    curves: dict[str, list[tuple[float, float]]] = {}
    for s in stages:
        curves.update(_loss_curves(s, lineages[s["name"]]))
    missing = _missing(stages)
    plots_dir = root / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    for name in PLOT_NAMES:  # plots of an earlier build that may have no data now
        (plots_dir / f"{name}.png").unlink(missing_ok=True)

    blocks: list[Block] = [Block("h1", f"Run report: {run.get('recipe_name') or root.name}")]
    error = f" Error: {run['error']}" if run.get("error") else ""
    blocks.append(Block("p", f"Recipe `{run.get('recipe')}` (hash {str(run.get('recipe_hash') or '')[:12]}), "
                             f"status **{run.get('status')}**, started {run.get('started')}, finished "
                             f"{run.get('finished') or '-'}.{error}"))
    plots: list[Path] = []

    def plot(name: str, draw: Any, data: Any, caption: str) -> None:
        path = draw(data, plots_dir / f"{name}.png")
        plots.append(path)
        blocks.append(Block("plot", caption, image=path))

    # quality vs size and speed
    blocks.append(Block("h2", "Artifacts: quality, size, speed"))
    full = [a for a in artifacts if a.dim is None]
    if any(a.size_mb is not None and a.quality is not None for a in full):
        plot("tradeoff", plot_tradeoff, full, "Higher is better, further left is smaller (and further right is "
             "faster): the artifacts up and to the left give up least quality for what they save.")
    else:
        blocks.append(Block("note", "No tradeoff plot: no eval stage recorded a scored artifact with a size "
                                    "(metrics.json of an eval stage)."))
    if artifacts:
        tasks = list(dict.fromkeys(t for a in artifacts for t in a.results))
        rows = [{"artifact": a.name, "kind": a.kind, "dim": a.dim or "full", "precision": a.precision,
                 "size MiB": _f(a.size_mb), "texts/s": _f(a.throughput), "quality": _f(a.quality, 2),
                 **{_task_label(t): _f(headline(a.results.get(t) or {}), 2) for t in tasks}} for a in artifacts]
        paired = [t for t in tasks if any(paired_text(a.results.get(t)) for a in artifacts)]
        for row, a in zip(rows, artifacts):
            row.update({f"{_task_label(t)} vs PyTorch": paired_text(a.results.get(t)) for t in paired})
        blocks.append(Block("table", rows=rows))
        blocks.append(Block("p", "Quality is the mean of each task's headline score (Spearman x100 for STS, "
                                 "nDCG@10 for retrieval, accuracy for classification)."))
        if paired:
            blocks.append(Block("p", "\"vs PyTorch\": the artifact's nDCG@10 minus the full PyTorch model's over "
                                     "the same queries, with a 95% bootstrap interval over queries in brackets: an "
                                     "interval that contains 0 is a gap the choice of queries alone could make."))

    # Matryoshka
    blocks.append(Block("h2", "Quality vs Matryoshka dimension"))
    dims = [a for a in artifacts if a.dim is not None and a.quality is not None]
    if len(dims) >= 2:
        plot("matryoshka", plot_matryoshka, dims, "How much quality each cut of the vector costs: the dimension "
             "where a line flattens is the smallest worth serving; the binary line shows what 1 bit per "
             "dimension keeps.")
        ordered = sorted(dims, key=lambda a: (a.precision, a.dim or 0))
        blocks.append(Block("table", rows=[{"artifact": a.name, "dim": a.dim, "precision": a.precision,
                                            "quality": _f(a.quality, 2)} for a in ordered]))
    else:
        blocks.append(Block("note", "No Matryoshka plot: fewer than two evaluated artifacts name a dimension "
                                    "(eval truncate_dim, or artifacts[].dim in metrics.json)."))

    # training
    blocks.append(Block("h2", "Training loss"))
    trained = [s for s in stages if s.get("stage") in TRAINING_STAGES]
    if curves:
        plot("loss", plot_losses, curves, "Loss per optimizer step for every training stage: a curve still "
             "falling at the end had budget to use; a flat or rising one did not need (or could not use) more.")
        blocks.append(Block("table", rows=[{"curve": k, "steps": int(v[-1][0]), "first loss": f"{v[0][1]:.4g}",
                                            "last loss": f"{v[-1][1]:.4g}", "min loss": f"{min(p[1] for p in v):.4g}"}
                                           for k, v in curves.items()]))
    elif trained:
        blocks.append(Block("note", "No loss plot: the training stages (" + ", ".join(s["name"] for s in trained)
                                    + ") recorded no extra.train.loss_history in their embedforge.json."))
    else:
        blocks.append(Block("note", "No loss plot: this run has no training stage."))

    # time and memory
    blocks.append(Block("h2", "Time and memory per stage"))
    measured = [s for s in stages if _num(s.get("seconds")) is not None]
    if measured:
        plot("stages", plot_stages, measured, "Where the run spent its budget: the longest bar is the stage to "
             "shorten first, the highest memory bar the one that sets the machine you need.")
    else:
        blocks.append(Block("note", "No time plot: no stage has run yet."))
    blocks.append(Block("table", rows=[{"stage": s["name"], "type": s.get("stage"), "status": s.get("status"),
                                        "seconds": _f(s.get("seconds")), "peak RSS MiB": _f(s.get("peak_rss_mb")),
                                        "peak GPU MiB": _f(s.get("peak_gpu_mb")), "reason": s.get("reason")}
                                       for s in stages]))

    # lineage
    blocks.append(Block("h2", "Lineage"))
    blocks.append(Block("p", "Which output was made from which, with the hash of the config that made it "
                             "(the same hash means the same settings)."))
    by_out = {os.fspath(Path(s.get("out") or "")): s["name"] for s in stages}
    rows = []
    for s in stages:
        lin = lineages[s["name"]]
        parents = lin.get("parents") or []
        made_from = (by_out.get(os.fspath(parents[0].get("path")), parents[0].get("path"))
                     if parents and isinstance(parents[0], dict) and parents[0].get("path") else lin.get("source"))
        rows.append({"stage": s["name"], "type": s.get("stage"), "made from": made_from or "-",
                     "config hash": str(lin.get("config_hash") or "-")[:12], "created": lin.get("created") or "-",
                     "out": s.get("out")})
    if any(lineages[s["name"]] for s in stages):
        plot("lineage", plot_lineage, rows, "Read left to right: each box is an output with the hash of the config "
             "that made it, each arrow points from the model it was made from.")
    blocks.append(Block("table", rows=rows))

    blocks.append(Block("h2", "Missing"))
    if missing:
        blocks.extend(Block("p", f"- {line}") for line in missing)
        blocks.append(Block("p", "Rerun the recipe with the same --run-dir to make them; complete stages are skipped."))
    else:
        blocks.append(Block("p", "Nothing: every stage's output is there."))

    md_path, html_path = root / REPORT_MD, root / REPORT_HTML
    summary = summary_lines(run, stages, artifacts, html_path)
    blocks.insert(2, Block("p", "<br>".join(summary[:2])))
    _write_atomic(md_path, _markdown(blocks, root))
    _write_atomic(html_path, _html(blocks, str(blocks[0].text)))
    logger.info("report written to %s and %s", md_path, html_path)
    return RunReport(markdown=md_path, html=html_path, plots=plots, missing=missing, summary=summary)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _markdown(blocks: list[Block], root: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "table":
            out.append(table(b.rows, b.columns or None))
        elif b.kind == "plot" and b.image is not None:
            out.append(f"![{b.image.stem}]({b.image.relative_to(root).as_posix()})\n\n_{b.text}_")
        elif b.kind == "note":
            out.append(f"> {b.text}")
        else:
            out.append(b.text.replace("<br>", "  \n"))
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f3f3f3}img{max-width:100%}figcaption{font-style:italic;color:#555}"
        ".note{color:#8a5a00;background:#fff8e6;padding:6px 10px;border-left:3px solid #e0a800}")


def _inline(text: str) -> str:
    """Escape text for HTML, keeping the report's own ``**bold**``, `` `code` `` and ``<br>``."""
    escaped = html.escape(text).replace("&lt;br&gt;", "<br>")
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _html(blocks: list[Block], title: str) -> str:
    """A single self-contained page: styles inline, plots as base64 data URIs, no external reference."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "table":
            cols = b.columns or list(dict.fromkeys(k for r in b.rows for k in r))
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                           for r in b.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b.kind == "plot" and b.image is not None:
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(b.image.stem)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "note":
            parts.append(f"<p class=\"note\">{_inline(b.text)}</p>")
        else:
            parts.append(f"<p>{_inline(b.text)}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
