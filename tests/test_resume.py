"""Stage-level resume: an output is reused only when its config and the identity of every input are unchanged."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedforge import stages
from embedforge.cli import main
from embedforge.configs import opt
from embedforge.model import LINEAGE_FILE, input_identity, make_lineage, read_lineage
from embedforge.recipe import load_recipe, parse_overrides, plan_recipe, run_recipe


@dataclass
class ToyConfig:
    """A stage used only by these tests: it reads ``model`` (a file, a toy output or a name)."""

    model: str = opt(help="input model (a toy output or a name)")
    data: str = opt("", help="a data file read instead of the model")
    size: int = opt(3, help="a number")


RUNS: list[str] = []


def copy_runner(config: ToyConfig, out_dir: Path, ctx) -> None:
    """Copies its input (a toy output's result.txt or a data file) so a test can see what it was made from."""
    src = Path(config.data or config.model)
    text = (src / "result.txt").read_text() if src.is_dir() else src.read_text() if src.is_file() else config.model
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.txt").write_text(f"{text}+{config.size}")
    (out_dir / "config.json").write_text("{}")  # looks like a model to the pre-flight checks of later stages
    (out_dir / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="toy", source=config.model, config=config)))
    RUNS.append(ctx.stage_name)


FORCED: list[bool] = []


def self_skipping_runner(config: ToyConfig, out_dir: Path, ctx) -> None:
    """Like the distill stage: skips itself when its config matches the existing output, unless forced."""
    from embedforge.model import is_complete

    FORCED.append(ctx.force)
    if is_complete(out_dir, config) and not ctx.force:
        return
    copy_runner(config, out_dir, ctx)


@pytest.fixture(autouse=True)
def toy_stage(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:copy_runner"))
    RUNS.clear()
    FORCED.clear()
    yield


RECIPE = """\
# embedforge run r.yaml
name: chain
stages:
  - name: first
    stage: toy
    out: {base}/first
    model: toy-model
    data: {data}
    size: 1
  - name: second
    stage: toy
    out: {base}/second
    model: ${{stages.first.out}}
  - name: third
    stage: toy
    out: {base}/third
    model: ${{stages.second.out}}
"""


@pytest.fixture()
def chain(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data.txt"
    data.write_text("hello")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(base=tmp_path / "runs", data=data))
    return path, data


def _statuses(path: Path, *overrides: str) -> list[str]:
    return [s for _, s in run_recipe(load_recipe(path, parse_overrides(list(overrides))))]


def test_changed_upstream_config_reruns_every_downstream_stage(chain: tuple[Path, Path]) -> None:
    path, _ = chain
    assert _statuses(path) == ["ran", "ran", "ran"]
    assert _statuses(path) == ["skipped", "skipped", "skipped"]
    assert _statuses(path, "first.size=5") == ["ran", "ran", "ran"]
    third = load_recipe(path).stages[2].out
    assert (third / "result.txt").read_text() == "hello+5+3+3"  # made from the new upstream output
    second = third.parent / "second"
    assert read_lineage(third)["inputs"] == {str(second): input_identity(second)}
    assert _statuses(path, "first.size=5") == ["skipped", "skipped", "skipped"]


def test_only_a_stage_whose_input_was_remade_elsewhere_reruns(chain: tuple[Path, Path]) -> None:
    path, _ = chain
    recipe = load_recipe(path)
    assert _statuses(path) == ["ran", "ran", "ran"]
    # the second stage's output is made again (same config) by a run of that stage alone
    assert [s for _, s in run_recipe(recipe, force=True, only=["second"])] == ["ran"]
    assert _statuses(path) == ["skipped", "skipped", "ran"]


def test_changed_data_file_reruns_but_a_touched_identical_one_does_not(chain: tuple[Path, Path]) -> None:
    path, data = chain
    assert _statuses(path) == ["ran", "ran", "ran"]
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new time
    assert _statuses(path) == ["skipped", "skipped", "skipped"]
    data.write_text("HELLO")  # same size, new content
    assert _statuses(path) == ["ran", "ran", "ran"]
    assert (load_recipe(path).stages[2].out / "result.txt").read_text() == "HELLO+1+3+3"


def test_output_without_recorded_inputs_is_made_again(chain: tuple[Path, Path]) -> None:
    path, _ = chain
    assert _statuses(path) == ["ran", "ran", "ran"]
    third = load_recipe(path).stages[2].out
    lineage = read_lineage(third)
    del lineage["inputs"]  # as written by an older embedforge, or a run killed before it recorded them
    (third / LINEAGE_FILE).write_text(json.dumps(lineage))
    plans = plan_recipe(load_recipe(path))
    assert [(p.run, p.reason) for p in plans][2] == (True, "its inputs were not recorded")
    assert _statuses(path) == ["skipped", "skipped", "ran"]


def test_a_rerun_stage_is_told_not_to_skip_itself(chain: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = chain
    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:self_skipping_runner"))
    assert _statuses(path) == ["ran", "ran", "ran"]
    assert FORCED == [False, False, False]  # fresh outputs: nothing to force
    data.write_text("other content")
    assert _statuses(path) == ["ran", "ran", "ran"]
    assert FORCED[3:] == [True, True, True]
    assert (load_recipe(path).stages[2].out / "result.txt").read_text() == "other content+1+3+3"


def test_dry_run_names_what_will_run_and_why(chain: tuple[Path, Path]) -> None:
    path, data = chain
    runs = path.parent / "runs"

    def dry(*args: str) -> list[str]:
        res = CliRunner().invoke(main, ["run", str(path), "--dry-run", *args])
        assert res.exit_code == 0, res.output
        return res.output.splitlines()

    assert dry() == [f"{n} (toy) -> {runs / n}: will run: no output" for n in ("first", "second", "third")]
    assert not runs.exists()  # a dry run writes nothing
    assert _statuses(path) == ["ran", "ran", "ran"]
    assert dry() == [f"{n} (toy) -> {runs / n}: skip: complete: same config and inputs"
                     for n in ("first", "second", "third")]
    assert dry("second.size=9") == [
        f"first (toy) -> {runs / 'first'}: skip: complete: same config and inputs",
        f"second (toy) -> {runs / 'second'}: will run: config changed",
        f"third (toy) -> {runs / 'third'}: will run: input {runs / 'second'} is remade by stage 'second'",
    ]
    data.write_text("changed")
    assert dry()[0] == f"first (toy) -> {runs / 'first'}: will run: input {data} changed"
    assert dry("--force", "--only", "third") == [
        f"first (toy) -> {runs / 'first'}: skip: not selected by --only",
        f"second (toy) -> {runs / 'second'}: skip: not selected by --only",
        f"third (toy) -> {runs / 'third'}: will run: forced (--force)",
    ]
    assert RUNS == ["first", "second", "third"]  # none of the dry runs ran a stage


def test_changed_pooling_reruns_eval_with_the_new_models_metrics(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from embedforge.evaluation import evaluate

    rows = ["sentence1\tsentence2\tscore", "a man plays guitar\ta man is playing a guitar\t4.8",
            "a dog runs\tthe stock market fell\t0.2", "a woman cuts an onion\tsomeone slices an onion\t4.0",
            "two dogs run in a field\tdogs are running on grass\t3.9"]
    sts = tmp_path / "sts.tsv"
    sts.write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# embedforge run r.yaml\nname: pool\nstages:\n"
        f"  - name: emb\n    stage: convert\n    out: {tmp_path / 'model'}\n    model: {tiny_llama_dir}\n"
        "    pooling: mean\n    max_seq_length: 32\n"
        f"  - name: score\n    stage: eval\n    out: {tmp_path / 'eval'}\n    model: ${{stages.emb.out}}\n"
        f"    tasks: ['sts:{sts}']\n"
    )
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "emb: ran" in res.output and "score: ran" in res.output
    res = CliRunner().invoke(main, ["run", str(recipe), "emb.pooling=lasttoken", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"emb (convert) -> {tmp_path / 'model'}: will run: config changed" in res.output
    assert f"score (eval) -> {tmp_path / 'eval'}: will run: input {tmp_path / 'model'} is remade by stage 'emb'" \
        in res.output
    res = CliRunner().invoke(main, ["run", str(recipe), "emb.pooling=lasttoken"])
    assert res.exit_code == 0, res.output
    assert "emb: ran" in res.output and "score: ran" in res.output
    assert read_lineage(tmp_path / "model")["config"]["pooling"] == "lasttoken"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())[f"sts:{sts}"]
    fresh = evaluate(str(tmp_path / "model"), [f"sts:{sts}"], show_progress=False)[f"sts:{sts}"]
    assert metrics["spearman"] == pytest.approx(fresh["spearman"], abs=1e-6)
    assert metrics["pearson"] == pytest.approx(fresh["pearson"], abs=1e-6)
    recorded = read_lineage(tmp_path / "eval")["inputs"]
    assert recorded[str(tmp_path / "model")] == input_identity(tmp_path / "model")
    assert recorded[str(sts)]["kind"] == "file"
    res = CliRunner().invoke(main, ["run", str(recipe), "emb.pooling=lasttoken"])
    assert res.exit_code == 0 and "emb: skipped" in res.output and "score: skipped" in res.output
