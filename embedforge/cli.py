"""The ``embedforge`` command line: thin click commands over the library.

Each workflow command builds a one-stage recipe from its arguments and runs it through the same validation as
``embedforge run``, so a CLI call and a recipe stage with the same keys do the same thing. torch is imported only
when a stage runs.

Errors are reported as one line, ``Error: what, where, what to do``, with the exit status of their class (see
:mod:`embedforge.errors`): 2 for usage errors found before any work starts (bad keys, wrong types, bad data, missing
models, unwritable outputs), 1 for failures while a stage runs (including a full disk or a denied write), 130 for
an interrupted run. ``embedforge --debug ...`` (or ``EMBEDFORGE_DEBUG=1``) prints the traceback as well.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from embedforge import __version__
from embedforge.errors import (
    EmbedforgeError, Interrupted, UsageError, describe_os_error, from_os_error, one_line,
)

logger = logging.getLogger("embedforge")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _usage_error(exc: Exception) -> EmbedforgeError:
    """``exc`` as an error the CLI reports on one line (exit status 2 unless it carries its own)."""
    return exc if isinstance(exc, EmbedforgeError) else UsageError(str(exc))


class _ReportingGroup(click.Group):
    """The top-level group: turns embedforge errors, OS errors and Ctrl-C into one ``Error:`` line and an exit code.

    With ``--debug`` the traceback is printed first. Click's own usage errors keep click's format.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EmbedforgeError as exc:
            _report(ctx, exc, one_line(str(exc)) or type(exc).__name__, exc.exit_code)
        except OSError as exc:
            _report(ctx, exc, describe_os_error(exc), 1)
        except KeyboardInterrupt as exc:
            _report(ctx, exc, "interrupted (Ctrl-C); a rerun skips the stages that completed",
                    Interrupted.exit_code)


def _report(ctx: click.Context, exc: BaseException, message: str, code: int) -> None:
    if ctx.params.get("debug"):
        click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(), err=True)
    click.echo(f"Error: {message}", err=True)
    ctx.exit(code)


def _stage_values(config_file: str | None, overrides: tuple[str, ...], model: str | None) -> dict[str, Any]:
    """Merge a stage YAML file, KEY=VALUE overrides and the positional MODEL into one mapping of config keys."""
    from embedforge.recipe import RecipeError, load_yaml, parse_overrides, set_dotted

    values: dict[str, Any] = {}
    if config_file:
        doc, _ = load_yaml(Path(config_file).read_text(), config_file)
        if not isinstance(doc, dict):
            raise RecipeError(f"{config_file}: a stage config is a mapping of keys to values")
        values.update(doc)
    for key, value in parse_overrides(list(overrides)).items():
        set_dotted(values, key, value)  # train.learning_rate=1e-4 changes one key of the train mapping
    if model is not None:
        values["model"] = model
    return values


def _run_single(kind: str, model: str | None, out: str, config_file: str | None, overrides: tuple[str, ...],
                force: bool) -> None:
    from embedforge.recipe import RecipeError, run_recipe, single_stage

    try:
        values = _stage_values(config_file, overrides, model)
        recipe = single_stage(kind, values, out, source=f"embedforge {kind}")
    except (RecipeError, ValueError) as exc:
        raise _usage_error(exc) from None
    result = run_recipe(recipe, force=force)
    for stage, status in result:
        click.echo(f"{stage.name}: {status} -> {stage.out}")


_common_options = [
    click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="output directory"),
    click.option("--config", "-c", "config_file", type=click.Path(exists=True, dir_okay=False),
                 help="YAML file with the stage's keys"),
    click.option("--force", is_flag=True, help="redo the stage even if its output is complete"),
    click.argument("overrides", nargs=-1),
]


def _with_common(func: Any) -> Any:
    for opt in reversed(_common_options):
        func = opt(func)
    return func


@click.group(cls=_ReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedforge")
@click.option("-v", "--verbose", count=True, help="more logging (-vv for debug)")
@click.option("-q", "--quiet", is_flag=True, help="warnings and errors only")
@click.option("--debug", is_flag=True, envvar="EMBEDFORGE_DEBUG",
              help="print the traceback of an error, not only its one-line message")
def main(verbose: int, quiet: bool, debug: bool) -> None:
    """Turn decoder LLMs into embedders; distill, compress and export them.

    Workflow commands take KEY=VALUE overrides for any key of their stage config
    (see `embedforge recipes explain STAGE`).
    """
    _setup_logging(-1 if quiet else verbose)


@main.command()
@click.argument("model")
@click.option("--step", type=click.Choice(["convert", "mntp", "simcse", "contrastive"]), default="convert",
              show_default=True, help="zero-shot conversion, or an adaptation / tuning step")
@_with_common
def convert(model: str, step: str, out: str, config_file: str | None, force: bool, overrides: tuple[str, ...]) -> None:
    """Make an embedder from MODEL (hub id, directory, .gguf file or alias such as smollm2-135m)."""
    _run_single(step, model, out, config_file, overrides, force)


@main.command()
@click.argument("model", required=False)
@_with_common
def distill(model: str | None, out: str, config_file: str | None, force: bool, overrides: tuple[str, ...]) -> None:
    """Train a small student from teacher MODEL's cached vectors."""
    _run_single("distill", model, out, config_file, overrides, force)


@main.command()
@click.argument("model")
@click.option("--step", type=click.Choice(["compress", "binarizer"]), default="compress", show_default=True,
              help="prune / quantize the model, or train a learned embedding binarizer")
@_with_common
def compress(model: str, step: str, out: str, config_file: str | None, force: bool,
             overrides: tuple[str, ...]) -> None:
    """Make MODEL smaller: layer / vocabulary pruning, weight quantization, embedding quantizers."""
    _run_single(step, model, out, config_file, overrides, force)


@main.command()
@click.argument("model")
@_with_common
def export(model: str, out: str, config_file: str | None, force: bool, overrides: tuple[str, ...]) -> None:
    """Export MODEL to ONNX (fp32 / fp16 / int8) with pooling and normalization in the graph."""
    _run_single("export", model, out, config_file, overrides, force)


@main.command("eval")
@click.argument("model")
@click.option("--task", "-t", "tasks", multiple=True, required=True,
              help="stsb-dev, sick-trial, scifact-dev, banking77, sts:FILE, retrieval:FOLDER[:split], "
              "classification:FILE (repeatable)")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="write metrics.json and report.md here")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--truncate-dim", type=int, default=None, help="evaluate the first N dimensions (Matryoshka)")
@click.option("--query-prompt", default=None, help="text put before queries")
@click.option("--doc-prompt", default=None, help="text put before documents")
def eval_cmd(model: str, tasks: tuple[str, ...], out: str | None, batch_size: int, truncate_dim: int | None,
             query_prompt: str | None, doc_prompt: str | None) -> None:
    """Evaluate MODEL (a model directory, alias or hub id) on STS, retrieval and classification tasks."""
    from embedforge.configs import ConfigError
    from embedforge.evaluation_config import EvalConfig

    try:
        config = EvalConfig(model=model, tasks=list(tasks), batch_size=batch_size, truncate_dim=truncate_dim,
                            query_prompt=query_prompt, doc_prompt=doc_prompt, record_in_model=out is not None)
    except ConfigError as exc:
        raise _usage_error(exc) from None
    from embedforge.data import DataError

    if out:
        from embedforge.preflight import check_writable

        check_writable(Path(out), "--out")  # before the model is loaded and the tasks are encoded
    try:
        if out:
            from embedforge.configs import StageContext
            from embedforge.evaluation import run_stage

            try:
                run_stage(config, Path(out), StageContext(stage_name="eval"))
            except OSError as exc:  # a full disk or a denied write names no file: name --out
                raise from_os_error(exc, "--out", out) from exc
            results = json.loads((Path(out) / "metrics.json").read_text())
        else:
            from embedforge.evaluation import evaluate

            results = evaluate(model, config.tasks, batch_size=batch_size, truncate_dim=truncate_dim,
                               query_prompt=query_prompt, doc_prompt=doc_prompt)
    except DataError as exc:
        raise _usage_error(exc) from None
    from embedforge.report import metrics_table

    click.echo(metrics_table(results))
    if out:
        click.echo(f"wrote {Path(out) / 'metrics.json'}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--force", is_flag=True, help="rerun stages whose outputs are already complete")
@click.option("--only", multiple=True, help="run only the named stage(s)")
@click.option("--dry-run", is_flag=True, help="validate and print the plan, run nothing")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="write every stage to RUN_DIR/<stage name> (whatever the recipe's out keys say), with "
              "run.json, run.log and report.md / report.html")
def run(recipe: str, overrides: tuple[str, ...], force: bool, only: tuple[str, ...], dry_run: bool,
        run_dir: str | None) -> None:
    """Run a YAML RECIPE; KEY=VALUE overrides (vars.out=..., STAGE.KEY=...) apply first."""
    from embedforge.recipe import RecipeError, load_recipe, parse_overrides, plan_recipe, run_recipe

    try:
        parsed = load_recipe(recipe, parse_overrides(list(overrides)), run_dir=run_dir)
    except RecipeError as exc:
        raise _usage_error(exc) from None
    if dry_run:
        try:
            plans = plan_recipe(parsed, force=force, only=list(only) or None)
        except RecipeError as exc:
            raise _usage_error(exc) from None
        for plan in plans:
            verdict = "will run" if plan.run else "skip"
            click.echo(f"{plan.stage.name} ({plan.stage.stage}) -> {plan.stage.out}: {verdict}: {plan.reason}")
        return
    try:
        result = run_recipe(parsed, force=force, only=list(only) or None, run_dir=run_dir)
    except RecipeError as exc:
        raise _usage_error(exc) from None
    for stage, status in result:
        click.echo(f"{stage.name}: {status} -> {stage.out}")
    if run_dir is not None:
        _echo_summary(Path(run_dir))


def _echo_summary(run_dir: Path) -> None:
    """The three summary lines of a finished run (the last one says where the report is)."""
    from embedforge.report import run_summary

    for line in run_summary(run_dir):
        click.echo(line)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir: str) -> None:
    """(Re)build RUN_DIR/report.md and report.html from what the run's stages recorded; reruns nothing."""
    from embedforge.report import build_report

    built = build_report(run_dir)
    for line in built.missing:
        click.echo(f"missing: {line}")
    for line in built.summary:
        click.echo(line)


@main.group()
def recipes() -> None:
    """List, validate and explain recipes."""


@recipes.command("list")
def recipes_list() -> None:
    """Shipped recipes, with their first comment line."""
    from embedforge.recipe import shipped_recipes

    for path in shipped_recipes():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        click.echo(f"{path}  {first}")


@recipes.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help="KEY=VALUE override (repeatable)")
def recipes_validate(files: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Validate recipe FILES completely without running anything (exit 2 on the first error)."""
    from embedforge.recipe import RecipeError, load_recipe, parse_overrides

    for f in files:
        try:
            parsed = load_recipe(f, parse_overrides(list(overrides)))
        except RecipeError as exc:
            raise _usage_error(exc) from None
        click.echo(f"{f}: ok ({len(parsed.stages)} stages: {', '.join(s.name for s in parsed.stages)})")


@recipes.command("explain")
@click.argument("stage")
def recipes_explain(stage: str) -> None:
    """Every key of STAGE's config with its type, default and help."""
    from embedforge import stages
    from embedforge.recipe import describe_config

    try:
        cls = stages.config_class(stage)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    click.echo(f"{stage}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    for row in describe_config(cls):
        click.echo(f"  {row['key']}: {row['type']} = {row['default']}\n      {row['help']}")


@recipes.command("stages")
def recipes_stages() -> None:
    """The registered stage types."""
    from embedforge import stages

    for name in sorted(stages.STAGES):
        click.echo(name)


def entry() -> None:  # pragma: no cover - console entry point alias
    main(prog_name="embedforge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
