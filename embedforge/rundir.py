"""The run directory of ``embedforge run RECIPE --run-dir DIR``: stage outputs under DIR, ``run.json``, ``run.log``.

:func:`relocate` points every stage's ``out`` at ``DIR/<stage name>`` (and the recipe's ``vars.out``, when it has
one, at ``DIR``) before the recipe is validated, so ``${stages.NAME.out}`` references follow. :class:`RunRecord`
writes ``DIR/run.json`` (format in :mod:`embedforge.report`) as the run goes: every stage is listed up front as
``pending``, then gets its status, wall time and peak memory (resident set size sampled while it runs, and the
peak CUDA memory torch allocated when torch uses a GPU). :func:`log_to` copies the run's log records to
``DIR/run.log``. Import-light: psutil and torch are imported only while a run is recorded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from embedforge.errors import Interrupted, OutputError, UsageError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOG_FILE = "run.log"
RUN_FORMAT = "embedforge-run/1"
#: names the run directory keeps for itself (a stage may not be called one of these)
RESERVED_NAMES = frozenset({RUN_FILE, LOG_FILE, "report.md", "report.html", "plots"})
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def relocate(doc: dict[str, Any], run_dir: str | os.PathLike[str], source: str) -> None:
    """Point every stage's ``out`` of a parsed recipe document at ``run_dir/<stage name>`` (in place).

    A stage name that is not a plain file name, or that the run directory uses itself, is refused naming the
    stage, since it would become a directory name.
    """
    root = Path(run_dir).expanduser().resolve()
    variables = doc.get("vars")
    if isinstance(variables, dict) and "out" in variables:
        variables["out"] = os.fspath(root)  # files a recipe keeps beside its stages (caches) follow the run
    for i, raw in enumerate(doc.get("stages") or []):
        if not isinstance(raw, dict):
            continue  # validation reports it with its line
        name = str(raw.get("name") or raw.get("stage"))
        if not _SAFE_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise UsageError(f"{source}: stages[{i}].name: {name!r} cannot name a directory of --run-dir; "
                              "give the stage a name of letters, digits, '.', '_' or '-' (not run.json, run.log, "
                              "report.md, report.html or plots)")
        raw["out"] = os.fspath(root / name)


def check_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Refuse a run directory that holds files but no ``run.json`` (embedforge did not make it); returns it."""
    root = Path(run_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise OutputError(f"--run-dir {root}: exists and is not a directory; choose a directory path")
    if root.is_dir() and not (root / RUN_FILE).is_file() and any(root.iterdir()):
        raise OutputError(f"--run-dir {root}: the directory holds files but no {RUN_FILE}, so embedforge did not "
                          "make it; choose a new or empty directory")
    return root


class _PeakSampler:
    """Samples the resident memory of this process and its children on a thread; ``peak_mb`` is the highest sum."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, process: Any) -> None:
        import psutil

        rss = 0
        for proc in [process, *process.children(recursive=True)]:  # worker processes (teacher encoding) count
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
        rss /= 2**20
        self.peak_mb = rss if self.peak_mb is None else max(self.peak_mb, rss)

    def __enter__(self) -> "_PeakSampler":
        try:
            import psutil
        except ImportError:  # psutil comes with accelerate; without it the peak is simply not recorded
            return self
        process = psutil.Process()
        self._sample(process)

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self._sample(process)

        self._thread = threading.Thread(target=loop, name="embedforge-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            with contextlib.suppress(Exception):
                import psutil

                self._sample(psutil.Process())


def _cuda() -> Any:
    """torch.cuda when torch is already imported and sees a GPU, else None (never imports torch itself)."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_available() else None
    except Exception:  # a broken CUDA setup: no GPU numbers
        return None


class RunRecord:
    """``DIR/run.json``: the stages of one run with status, times and peak memory, rewritten after each change."""

    def __init__(self, run_dir: Path, recipe: Any) -> None:
        self.path = Path(run_dir) / RUN_FILE
        self.data: dict[str, Any] = {
            "format": RUN_FORMAT,
            "recipe": os.fspath(recipe.path) if recipe.path else None,
            "recipe_name": recipe.name,
            "recipe_hash": recipe.hash,
            "status": "running",
            "started": _now(),
            "finished": None,
            "error": None,
            "stages": [],
        }
        previous = {e.get("name"): e for e in read_run(run_dir).get("stages", []) if isinstance(e, dict)}
        for st in recipe.stages:
            entry = {"name": st.name, "stage": st.stage, "out": os.fspath(st.out), "status": "pending"}
            old = previous.get(st.name)
            if old and old.get("out") == entry["out"] and old.get("stage") == st.stage:
                # a rerun: keep what an earlier run measured (a skipped stage keeps its time and memory)
                entry = {**old, "status": old.get("status") if old.get("status") in ("ran", "skipped") else "pending"}
            self.data["stages"].append(entry)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def _entry(self, name: str) -> dict[str, Any]:
        return next(e for e in self.data["stages"] if e["name"] == name)

    def skipped(self, name: str, reason: str) -> None:
        self._entry(name).update(status="skipped", reason=reason)
        self.write()

    @contextlib.contextmanager
    def stage(self, name: str, reason: str) -> Iterator[None]:
        """Record one stage's run: status, start/end, seconds, peak RSS and peak GPU memory."""
        entry = self._entry(name)
        entry.update(status="running", reason=reason, started=_now())
        self.write()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        status = "failed"
        sampler = _PeakSampler()
        try:
            with sampler:
                yield
            status = "ran"
        except (KeyboardInterrupt, Interrupted):
            status = "interrupted"
            raise
        finally:
            cuda = cuda or _cuda()  # the stage may have imported torch itself
            entry.update(status=status, finished=_now(), seconds=round(time.perf_counter() - start, 2),
                         peak_rss_mb=None if sampler.peak_mb is None else round(sampler.peak_mb, 1),
                         peak_gpu_mb=round(cuda.max_memory_allocated() / 2**20, 1) if cuda is not None else None)
            self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, finished=_now(), error=error)
        self.write()


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``run.json`` of a run directory, or ``{}`` when there is none (or it is not readable JSON)."""
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def record_run(run_dir: Path, recipe: Any, report: Callable[[Path], Any]) -> Iterator[RunRecord]:
    """Record a run in ``run_dir/run.json`` and write its report at the end (``report(run_dir)``, e.g.
    :func:`embedforge.report.build_report`), whether it succeeded or not."""
    from embedforge.errors import one_line

    record = RunRecord(run_dir, recipe)
    logger.info("run %s: stages write to %s/<stage>; log in %s", recipe.name, run_dir, Path(run_dir) / LOG_FILE)
    try:
        yield record
    except (KeyboardInterrupt, Interrupted) as exc:
        record.finish("interrupted", one_line(str(exc)) or "interrupted")
        _report_quietly(run_dir, report)
        raise
    except BaseException as exc:
        record.finish("failed", one_line(str(exc)) or type(exc).__name__)
        _report_quietly(run_dir, report)
        raise
    record.finish("complete")
    report(run_dir)


def _report_quietly(run_dir: Path, report: Callable[[Path], Any]) -> None:
    """Write the report of a failed run; a failure to do so is logged, never raised over the run's own error."""
    try:
        report(run_dir)
    except Exception as exc:  # the stage's error is the one the user must see
        logger.warning("could not write the report of %s: %s", run_dir, exc)


@contextlib.contextmanager
def log_to(run_dir: Path) -> Iterator[Path]:
    """Copy the log records of everything the run does (console level) to ``run_dir/run.log`` (appended)."""
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
