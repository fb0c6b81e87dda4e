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
