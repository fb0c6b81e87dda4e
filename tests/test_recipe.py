"""Recipes: typed configs, references, overrides, located errors, resume; every shipped recipe validates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pytest

from embedforge import stages
from embedforge.configs import ConfigError, check, opt
from embedforge.model import LINEAGE_FILE, make_lineage
from embedforge.recipe import (
    RecipeError, build_config, load_recipe, parse_overrides, run_recipe, shipped_recipes,
)
from embedforge.testing import error_line, run_cli


class Color(str, Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class ToyConfig:
    """A stage used only by these tests."""

    model: str = opt(help="input")
    size: int = opt(3, help="a number")
    color: Color = opt(Color.RED, help="an enum")
    tags: list[str] = opt(factory=list, help="a list")
    rate: float | None = opt(None, help="optional float")

    def __post_init__(self) -> None:
        check(self.size > 0, "size", "must be positive")


RUNS: list[tuple[str, Path]] = []


def toy_runner(config: ToyConfig, out_dir: Path, ctx) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.txt").write_text(f"{config.model}|{config.size}|{config.color.value}")
    (out_dir / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="toy", source=config.model, config=config)))
    RUNS.append((ctx.stage_name, out_dir))


@pytest.fixture(autouse=True)
def toy_stage(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:toy_runner"))
    RUNS.clear()
    yield


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


RECIPE = """\
# embedforge run r.yaml
name: demo
vars:
  base: {base}
stages:
  - name: first
    stage: toy
    out: ${{vars.base}}/first
    model: some/hub-model
    size: 4
    color: blue
  - name: second
    stage: toy
    out: ${{vars.base}}/second
    model: ${{stages.first.out}}
    tags: [a, b]
"""


def test_build_config_converts_and_rejects() -> None:
    cfg = build_config(ToyConfig, {"model": "m", "color": "blue", "tags": ["x"], "rate": 1})
    assert cfg.color is Color.BLUE and cfg.rate == 1.0 and cfg.tags == ["x"]
    with pytest.raises(ConfigError, match="sise: unknown key for ToyConfig \\(did you mean 'size'\\?\\)"):
        build_config(ToyConfig, {"model": "m", "sise": 2})
    with pytest.raises(ConfigError, match="size: expected an integer, got str 'x'"):
        build_config(ToyConfig, {"model": "m", "size": "x"})
    with pytest.raises(ConfigError, match="color: 'green' is not one of 'red', 'blue'"):
        build_config(ToyConfig, {"model": "m", "color": "green"})
    with pytest.raises(ConfigError, match="model: required key is missing"):
        build_config(ToyConfig, {})
    with pytest.raises(ConfigError, match="size: must be positive"):
        build_config(ToyConfig, {"model": "m", "size": 0})


def test_references_overrides_and_run_then_resume(tmp_path: Path) -> None:
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs"))
    recipe = load_recipe(path, parse_overrides(["first.size=7", "vars.base=" + str(tmp_path / "other")]))
    first, second = recipe.stages
    assert first.config.size == 7 and first.out == (tmp_path / "other" / "first").resolve()
    assert second.config.model == str(first.out)
    assert [s for _, s in run_recipe(recipe)] == ["ran", "ran"]
    assert (first.out / "result.txt").read_text() == "some/hub-model|7|blue"
    assert [s for _, s in run_recipe(recipe)] == ["skipped", "skipped"]  # resume: complete outputs are kept
    assert [s for _, s in run_recipe(recipe, force=True)] == ["ran", "ran"]
    changed = load_recipe(path, parse_overrides(["first.size=8", "vars.base=" + str(tmp_path / "other")]))
    # a changed config reruns that stage, and the stage reading its output too
    assert [s for _, s in run_recipe(changed)] == ["ran", "ran"]


def test_errors_name_file_line_and_key(tmp_path: Path) -> None:
    text = RECIPE.format(base=tmp_path).replace("    size: 4\n", "    sise: 4\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:10: stage 'first': sise: unknown key"):
        load_recipe(_write(tmp_path, text))
    text = RECIPE.format(base=tmp_path).replace("size: 4", "size: four")
    with pytest.raises(RecipeError, match=r"r\.yaml:10: stage 'first': size: expected an integer"):
        load_recipe(_write(tmp_path, text))
    text = RECIPE.format(base=tmp_path).replace("model: some/hub-model", "model: ./missing/model")
    with pytest.raises(RecipeError, match=r"r\.yaml:9: .*model: file or directory not found: \./missing/model"):
        load_recipe(_write(tmp_path, text))
    text = RECIPE.format(base=tmp_path).replace("${stages.first.out}", "${stages.nope.out}")
    with pytest.raises(RecipeError, match=r"r\.yaml:15: stage 'second': model: \$\{stages\.nope\.out\} does not name a var or an earlier stage"):
        load_recipe(_write(tmp_path, text))
    text = RECIPE.format(base=tmp_path).replace("stage: toy\n    out: ${vars.base}/second", "stage: tpy\n    out: x")
    with pytest.raises(RecipeError, match=r"r\.yaml:13: stages\[1\]\.stage: 'tpy' is not a stage"):
        load_recipe(_write(tmp_path, text))
    with pytest.raises(RecipeError, match=r"r\.yaml:1: invalid YAML|r\.yaml:\d+: invalid YAML"):
        load_recipe(_write(tmp_path, "stages: [a, b\n"))
    with pytest.raises(RecipeError, match="unknown top-level key"):
        load_recipe(_write(tmp_path, "stage:\n  - stage: toy\n"))


def test_every_shipped_recipe_validates() -> None:
    found = shipped_recipes()
    assert found, "the repository ships recipes"
    for path in found:
        recipe = load_recipe(path)
        assert recipe.stages, path
        first = path.read_text().splitlines()[0]
        assert first.startswith("# embedforge run"), f"{path}: first line should show the command that runs it"


def test_registry_is_consistent() -> None:
    stages.check_registry()


def test_under_torchrun_other_ranks_wait_for_rank_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs"))
    recipe = load_recipe(path)
    assert [s for _, s in run_recipe(recipe)] == ["ran", "ran"]  # rank 0 (no torchrun) made the outputs
    RUNS.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert [s for _, s in run_recipe(recipe, force=True)] == ["waited", "waited"]
    assert RUNS == []  # rank 1 ran nothing itself
    monkeypatch.setenv("EMBEDFORGE_RANK_WAIT_S", "0")
    import shutil

    shutil.rmtree(recipe.stages[0].out)
    with pytest.raises(RecipeError, match="did not complete on rank 0"):
        run_recipe(recipe)


def test_training_stages_are_marked_distributed_in_the_registry() -> None:
    """Whether a stage runs on every torchrun rank is the registry's ``distributed`` flag, not a list in recipe.py."""
    every_training_stage = {"mntp", "simcse", "contrastive", "distill", "binarizer", "compress"}
    assert {name for name in stages.STAGES if stages.is_distributed(name)} == every_training_stage
    assert not stages.is_distributed("toy")  # a plain (config, runner) pair is single-process


def test_a_registered_distributed_stage_runs_on_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(stages.STAGES, "toy")
    stages.register("toy", f"{__name__}:ToyConfig", f"{__name__}:toy_runner", distributed=True)
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert [s for _, s in run_recipe(load_recipe(path))] == ["ran", "ran"]
    assert [name for name, _ in RUNS] == ["first", "second"]  # rank 1 ran both stages itself
    assert (tmp_path / "runs" / "second" / "result.txt").is_file()


class _Model:
    """Stands for a loaded model: it refers to itself, as a SentenceTransformer does, so only the cycle
    collector frees it."""

    def __init__(self) -> None:
        self.me = self


LEFT: list = []
SEEN_ALIVE: list[bool] = []


def leaky_runner(config: ToyConfig, out_dir: Path, ctx) -> None:
    import weakref

    SEEN_ALIVE.append(any(ref() is not None for ref in LEFT))  # is an earlier stage's model still in memory?
    LEFT.append(weakref.ref(_Model()))
    toy_runner(config, out_dir, ctx)


def test_a_stage_model_is_freed_before_the_next_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:leaky_runner"))
    LEFT.clear()
    SEEN_ALIVE.clear()
    recipe = load_recipe(_write(tmp_path, RECIPE.format(base=tmp_path / "runs")))
    gc.disable()  # the collector must not run by chance: run_recipe has to run it
    try:
        assert [s for _, s in run_recipe(recipe)] == ["ran", "ran"]
    finally:
        gc.enable()
    assert SEEN_ALIVE == [False, False]
    assert all(ref() is None for ref in LEFT)


# ------------------------------------------------------------------------------ values, overrides, YAML safety






@pytest.mark.parametrize("spelling,value", [("2e-4", 2e-4), ("1E-3", 1e-3), (".5", 0.5), ("1e+12", 1e12),
                                            ("-3", -3.0), ("5.", 5.0)])
def test_every_float_spelling_is_a_float(tmp_path: Path, spelling: str, value: float) -> None:
    assert build_config(ToyConfig, {"model": "m", "rate": spelling}).rate == value
    text = RECIPE.format(base=tmp_path / "runs").replace("    size: 4\n", f"    size: 4\n    rate: {spelling}\n")
    path = _write(tmp_path, text)
    assert load_recipe(path).stages[0].config.rate == value  # in the YAML file
    assert load_recipe(path, parse_overrides([f"second.rate={spelling}"])).stages[1].config.rate == value
    res = run_cli("run", str(path), f"second.rate={spelling}")  # through the CLI, to the stage
    assert res.exit_code == 0, res.output
    assert [r[0] for r in RUNS] == ["first", "second"]
    assert json.loads((tmp_path / "runs" / "second" / LINEAGE_FILE).read_text())["config"]["rate"] == value


def test_text_is_not_a_float(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rate: expected float or None, got 'abc'"):
        build_config(ToyConfig, {"model": "m", "rate": "abc"})
    res = run_cli("run", str(_write(tmp_path, RECIPE.format(base=tmp_path / "runs"))), "second.rate=abc")
    assert res.exit_code == 2
    assert error_line(res.output).endswith("stage 'second': rate: expected float or None, got 'abc'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["null", "''", "' '", "[a]"])
def test_null_or_empty_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs"))
    res = run_cli("run", str(path), f"second.out={value}")
    assert res.exit_code == 2
    assert "stage 'second': out: expected the directory the stage writes, got " in error_line(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no ./None, nothing run
    text = RECIPE.format(base=tmp_path / "runs").replace("out: ${vars.base}/second", f"out: {value}")
    with pytest.raises(RecipeError, match=r"r\.yaml:14: stage 'second': out: expected the directory"):
        load_recipe(_write(tmp_path, text))


def test_override_of_an_unknown_var_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs"))
    res = run_cli("run", str(path), "vars.bsae=/elsewhere")
    assert res.exit_code == 2
    assert error_line(res.output) == (f"{path}: override 'vars.bsae': the recipe has no var 'bsae' "
                                       "(did you mean 'base'?); vars: base")
    res = run_cli("recipes", "validate", str(path), "--set", "vars.nosuch=1")
    assert res.exit_code == 2 and "the recipe has no var 'nosuch'; vars: base" in error_line(res.output)
    assert not (tmp_path / "runs").exists()
    assert load_recipe(path, parse_overrides(["vars.base=/x"])).stages[0].out == Path("/x/first")


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path: Path) -> None:
    text = RECIPE.format(base=tmp_path / "runs").replace("    size: 4\n", "    size: 4\n    color: red\n    size: 5\n")
    path = _write(tmp_path, text)
    res = run_cli("recipes", "validate", str(path))
    assert res.exit_code == 2
    assert error_line(res.output) == f"{path}:12: stages[0].size: duplicate key (first given at line 10); keep one"
    with pytest.raises(RecipeError, match=r"r\.yaml:4: vars: duplicate key \(first given at line 1\)"):
        load_recipe(_write(tmp_path, "vars: {}\nname: x\nstages: []\nvars: {}\n"))


def test_merge_keys_still_work(tmp_path: Path) -> None:
    text = (f"# embedforge run r.yaml\nvars:\n  base: {tmp_path}\n  common: &c {{model: m, size: 2}}\nstages:\n"
            "  - stage: toy\n    out: ${vars.base}/o\n    <<: *c\n    size: 6\n")
    cfg = load_recipe(_write(tmp_path, text)).stages[0].config
    assert (cfg.model, cfg.size) == ("m", 6)


def test_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb = _write(tmp_path, "\n".join(rows) + "\n")
    assert len(bomb.read_bytes()) < 400
    proc = subprocess.run([sys.executable, "-m", "embedforge.cli", "recipes", "validate", str(bomb)],
                          capture_output=True, text=True, timeout=60)  # the unbounded loader ran for minutes
    assert proc.returncode == 2
    assert f"Error: {bomb}:6: aliases expand this document to more than 100000 values" in proc.stderr
    cyclic = _write(tmp_path, "vars: &v\n  self: *v\nstages: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:1: an alias refers to the node that contains it"):
        load_recipe(cyclic)


@pytest.mark.parametrize("tagged,tag", [("!!python/name:os.system x", "!!python/name:os.system"),
                                        ("!custom 3", "!custom"), ("!custom [a, b]", "!custom"),
                                        ("!!set {a, b}", "!!set"), ("!!str [a]", "!!str")])
def test_yaml_tags_are_refused_in_one_line(tmp_path: Path, tagged: str, tag: str) -> None:
    text = RECIPE.format(base=tmp_path / "runs").replace("    tags: [a, b]", f"    tags: {tagged}")
    path = _write(tmp_path, text)
    res = run_cli("recipes", "validate", str(path))
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == (f"{path}:16: YAML tag {tag} is not supported in recipes; remove it (values "
                                       "are plain text, numbers, true/false, null, lists and mappings)")
    assert "Traceback" not in res.output


def test_task_files_are_checked_by_their_path_part(tmp_path: Path) -> None:
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na\tb\t1\n")
    beir = tmp_path / "beir"
    beir.mkdir()
    labeled = tmp_path / "labels.jsonl"
    labeled.write_text('{"text": "a", "label": "x"}\n')
    tasks = f"['sts:{sts}', 'classification:{labeled}', 'retrieval:{beir}', 'retrieval:{beir}:dev', stsb-dev]"
    text = (f"# embedforge run r.yaml\nstages:\n  - stage: eval\n    model: some/model\n    out: {tmp_path}/e\n"
            f"    tasks: {tasks}\n")
    recipe = load_recipe(_write(tmp_path, text))
    assert len(recipe.stages[0].config.tasks) == 5
    res = run_cli("recipes", "validate", str(_write(tmp_path, text.replace(str(sts), str(tmp_path / "nope.tsv")))))
    assert res.exit_code == 2
    assert error_line(res.output).endswith(f"stage 'eval': tasks[0]: file or directory not found: {tmp_path}/nope.tsv")
    missing = text.replace(f"retrieval:{beir}:dev", f"retrieval:{tmp_path}/gone:dev")
    with pytest.raises(RecipeError, match=r"tasks\[3\]: file or directory not found: .*/gone$"):
        load_recipe(_write(tmp_path, missing))
    convert = (f"# embedforge run r.yaml\nstages:\n  - stage: convert\n    model: some/llm\n    out: {tmp_path}/c\n"
               f"    eval_tasks: ['sts:{sts}']\n")
    assert load_recipe(_write(tmp_path, convert)).stages[0].config.eval_tasks == [f"sts:{sts}"]


def test_null_var_inside_an_out_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs"))
    res = run_cli("run", str(path), "vars.base=null")
    assert res.exit_code == 2
    assert error_line(res.output) == (f"{path}:8: stage 'first': out: ${{vars.base}} is null and cannot be part of "
                                       "the text '${vars.base}/first'; give it a text value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no ./None/first


def test_a_value_yaml_cannot_build_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, RECIPE.format(base=tmp_path / "runs").replace("    tags: [a, b]", "    tags: [2024-13-45]"))
    res = run_cli("recipes", "validate", str(path))
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == (f"{path}:16: invalid value '2024-13-45': month must be in 1..12; quote it to "
                                       "keep it as text")
