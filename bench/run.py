"""Run one benchmark experiment and write its result in the one result schema.

    python -m bench.run bench/experiments/NAME.yaml [--out bench/results] [--work runs/bench/NAME] [--force]

An experiment file (``bench/experiments/*.yaml``) is either

* a **recipe** experiment: ``recipe:`` is the path of a recipe (relative to the repository root) or an inline
  recipe mapping, ``overrides:`` a mapping of recipe overrides (``vars.X``, ``STAGE.KEY``), run stage by stage
  through :func:`embedforge.recipe.run_recipe`; or
* a **command** experiment: ``command:`` a list of arguments (``python`` is this interpreter, ``{work}`` the work
  directory) for a bespoke script under ``bench/dev/`` that writes ``{work}/results.json``.

``metrics:`` maps each metric name to where it is read: ``{stage: NAME, key: [a, b]}`` (the stage's
``metrics.json`` for an eval stage, else the ``metrics`` of its ``embedforge.json``) or ``{key: [a, b]}`` (the
script's ``results.json``); in a list, a key part ``FIELD=VALUE`` picks the one element whose FIELD is VALUE.
A metric that is missing fails the run; nothing is written then.

The result, ``OUT/<experiment>.json``, is written atomically with the keys in :data:`RESULT_KEYS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import ROOT, config_hash, git_commit, machine, write_json

logger = logging.getLogger("bench.run")

#: The keys of every result file, in this order (converted results add ``converted_from``).
RESULT_KEYS = ("experiment", "description", "command", "git_commit", "machine", "config_hash", "started",
               "metrics", "timings")
EXPERIMENT_KEYS = ("name", "description", "recipe", "overrides", "command", "metrics")


@dataclass
class Metric:
    """Where one metric is read: a stage's metrics (recipe experiments) or the script's results.json."""

    name: str
    key: list[str]
    stage: str | None = None


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    path: Path
    description: str
    metrics: list[Metric]
    recipe: str | dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    command: list[str] | None = None

    def spec(self) -> dict[str, Any]:
        """What the config hash covers: the recipe (its parsed document when it is a file, so that editing its
        comments, e.g. the measured time in its header, keeps the result current), overrides, command, metrics."""
        recipe: Any = self.recipe
        if isinstance(recipe, str):
            recipe = {"file": recipe, "document": yaml_load(ROOT / recipe)}
        return {"recipe": recipe, "overrides": self.overrides, "command": self.command,
                "metrics": [[m.name, m.stage, m.key] for m in self.metrics]}


def _bad(path: Path, message: str) -> Exception:
    from embedforge.errors import UsageError

    return UsageError(f"{path}: {message}")


def load_experiment(path: str | os.PathLike[str]) -> Experiment:
    """Read and check an experiment file; nothing runs."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise _bad(p, "experiment file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise _bad(p, f"invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise _bad(p, f"an experiment is a mapping with keys {', '.join(EXPERIMENT_KEYS)}")
    unknown = [k for k in doc if k not in EXPERIMENT_KEYS]
    if unknown:
        raise _bad(p, f"unknown key {unknown[0]!r}; valid keys: {', '.join(EXPERIMENT_KEYS)}")
    if ("recipe" in doc) == ("command" in doc):
        raise _bad(p, "give exactly one of 'recipe' (a recipe file or mapping) and 'command' (a bench/dev script)")
    recipe = doc.get("recipe")
    if recipe is not None and not isinstance(recipe, (str, dict)):
        raise _bad(p, "recipe: expected the path of a recipe file or an inline recipe mapping")
    if isinstance(recipe, str) and not (ROOT / recipe).is_file():
        raise _bad(p, f"recipe: {recipe} is not a file (paths are relative to the repository root)")
    command = doc.get("command")
    if command is not None and (not isinstance(command, list) or not command
                                or not all(isinstance(a, (str, int, float)) for a in command)):
        raise _bad(p, "command: expected a non-empty list of arguments, e.g. [python, -m, bench.dev.x, --out, '{work}']")
    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, dict) or (overrides and command is not None):
        raise _bad(p, "overrides: expected a mapping of recipe overrides (recipe experiments only)")
    raw_metrics = doc.get("metrics")
    if not isinstance(raw_metrics, dict) or not raw_metrics:
        raise _bad(p, "metrics: expected a mapping NAME: {stage: STAGE, key: [a, b]} (stage for recipes only)")
    metrics = []
    for name, where in raw_metrics.items():
        if not isinstance(where, dict) or not isinstance(where.get("key"), list) or not where["key"]:
            raise _bad(p, f"metrics.{name}: expected {{key: [a, b]}} (plus stage: NAME for a recipe experiment)")
        stage = where.get("stage")
        if (stage is None) == (recipe is not None):
            raise _bad(p, f"metrics.{name}: 'stage' is {'required' if recipe is not None else 'only for recipes'}")
        metrics.append(Metric(name=str(name), key=[str(k) for k in where["key"]], stage=stage))
    return Experiment(name=str(doc.get("name") or p.stem), path=p, description=str(doc.get("description") or ""),
                      metrics=metrics, recipe=recipe, overrides=overrides,
                      command=[str(a) for a in command] if command is not None else None)


_MISSING = object()


def _step(value: Any, part: str) -> Any:
    """One step of a metric key: a mapping's key, or in a list the element whose ``FIELD`` is ``VALUE`` for a
    ``FIELD=VALUE`` part (else the element at an integer index)."""
    if isinstance(value, dict):
        return value.get(part, _MISSING)
    if isinstance(value, list):
        field_name, sep, wanted = part.partition("=")
        if sep:
            found = [v for v in value if isinstance(v, dict) and str(v.get(field_name)) == wanted]
            return found[0] if len(found) == 1 else _MISSING
        if part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            return value[int(part)]
    return _MISSING


def lookup(data: Any, key: list[str], where: str) -> float:
    from embedforge.errors import RunError

    value = data
    for part in key:
        value = _step(value, part)
        if value is _MISSING:
            raise RunError(f"{where}: no metric at {'/'.join(key)} (missing {part!r}); fix the experiment's metrics")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RunError(f"{where}: {'/'.join(key)} is {value!r}, not a number; point the metric at a number")
    return value


def _stage_metrics(out: Path) -> Any:
    from embedforge.model import LINEAGE_FILE

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    return json.loads((out / LINEAGE_FILE).read_text()).get("metrics", {})


def _load_recipe(exp: Experiment, work: Path) -> Any:
    """The experiment's recipe with its overrides; a recipe's ``vars.out`` (when it has one) becomes ``work``."""
    from embedforge.recipe import _apply_overrides, load_recipe, validate_recipe

    overrides = dict(exp.overrides)
    if isinstance(exp.recipe, str):
        path = ROOT / exp.recipe
        doc = yaml_load(path)
        if isinstance(doc, dict) and isinstance(doc.get("vars"), dict) and "out" in doc["vars"]:
            overrides.setdefault("vars.out", str(work))
        return load_recipe(path, overrides)
    doc = json.loads(json.dumps(exp.recipe))  # a copy: overrides must not change the parsed experiment
    if isinstance(doc.get("vars"), dict) and "out" in doc["vars"]:
        overrides.setdefault("vars.out", str(work))
    if overrides:
        _apply_overrides(doc, overrides, str(exp.path))
    return validate_recipe(doc, {}, str(exp.path), recipe_dir=ROOT)


def yaml_load(path: Path) -> Any:
    """A YAML file's document (``None`` when it does not parse: the recipe loader then says why)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


def _run_recipe(exp: Experiment, work: Path, force: bool) -> tuple[dict[str, float], dict[str, Any]]:
    from embedforge.recipe import run_recipe

    recipe = _load_recipe(exp, work)
    names = {st.name: st for st in recipe.stages}
    for m in exp.metrics:
        if m.stage not in names:
            from embedforge.errors import UsageError

            raise UsageError(f"{exp.path}: metrics.{m.name}: no stage named {m.stage!r} (stages: {', '.join(names)})")
    stages: dict[str, Any] = {}
    for st in recipe.stages:
        t0 = time.perf_counter()
        [(_, status)] = run_recipe(recipe, force=force, only=[st.name])
        stages[st.name] = {"status": status, "seconds": round(time.perf_counter() - t0, 3)}
    metrics = {m.name: lookup(_stage_metrics(names[m.stage].out), m.key, f"{exp.path}: metrics.{m.name}")
               for m in exp.metrics}
    return metrics, {"stages": stages}


def _run_command(exp: Experiment, work: Path) -> tuple[dict[str, float], dict[str, Any]]:
    from embedforge.errors import RunError

    assert exp.command is not None
    argv = [sys.executable if a == "python" else a.replace("{work}", str(work)) for a in exp.command]
    results = work / "results.json"
    before = results.stat().st_mtime_ns if results.is_file() else None  # an earlier run's file is not this run's
    proc = subprocess.run(argv, cwd=ROOT)
    if proc.returncode != 0:
        raise RunError(f"{exp.path}: command exited with {proc.returncode}: {' '.join(argv)}")
    if not results.is_file() or results.stat().st_mtime_ns == before:
        raise RunError(f"{exp.path}: the command wrote no new {results}; its script must write results.json there")
    data = json.loads(results.read_text())
    return {m.name: lookup(data, m.key, f"{results}: metrics.{m.name}") for m in exp.metrics}, {}


def display_command(exp: Experiment, work: Path, default_work: Path) -> str:
    """The command line that reproduces this result (``--work`` only when it was not the default)."""
    parts = ["python -m bench.run", _rel(exp.path)]
    if Path(work).resolve() != default_work.resolve():
        parts += ["--work", _rel(work)]
    return " ".join(parts)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run_experiment(path: str | os.PathLike[str], out: str | os.PathLike[str] = ROOT / "bench" / "results",
                   work: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Run one experiment; write and return ``out/<experiment>.json`` (written only when every metric was read)."""
    exp = load_experiment(path)
    out_dir = Path(out)
    default_work = ROOT / "runs" / "bench" / exp.name
    work_dir = Path(work) if work is not None else default_work
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    spec_hash = config_hash(exp.spec())
    t0 = time.perf_counter()
    if exp.command is not None:
        metrics, timings = _run_command(exp, work_dir)
    else:
        metrics, timings = _run_recipe(exp, work_dir, force)
    timings = {"total_s": round(time.perf_counter() - t0, 3), **timings}
    result = {"experiment": exp.name, "description": exp.description,
              "command": display_command(exp, work_dir, default_work), "git_commit": git_commit(),
              "machine": machine(), "config_hash": spec_hash, "started": started, "metrics": metrics,
              "timings": timings}
    target = out_dir / f"{exp.name}.json"
    write_json(target, result)
    return target


def main(argv: list[str] | None = None) -> int:
    from embedforge.errors import EmbedforgeError

    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="an experiment file, e.g. bench/experiments/eval_check.yaml")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="folder the result <experiment>.json is written to")
    parser.add_argument("--work", default=None, help="folder for models and script outputs "
                        "(default runs/bench/<experiment>)")
    parser.add_argument("--force", action="store_true", help="rerun recipe stages whose outputs are complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        target = run_experiment(args.experiment, args.out, args.work, force=args.force)
    except EmbedforgeError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return exc.exit_code
    sys.stdout.write(f"{target}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
