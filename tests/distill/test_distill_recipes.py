"""Every shipped distill recipe validates (types, keys, references) without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedforge.distill.config import DistillConfig

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "distill").glob("*.yaml"))


def test_there_are_distill_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    from embedforge.recipe import load_recipe

    recipe = load_recipe(path)
    distill = [s for s in recipe.stages if s.stage == "distill"]
    assert distill and all(isinstance(s.config, DistillConfig) for s in distill)
    for stage in distill:
        assert stage.config.matryoshka_dims, "shipped recipes train Matryoshka dims"


def test_recipe_errors_name_the_key(tmp_path):
    from embedforge.recipe import RecipeError, load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: distill\n    out: /tmp/x\n    model: minilm-l6\n    student: layers\n"
                   "    layers: {every: 2}\n    relative_margin: -1\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:7: .*relative_margin"):
        load_recipe(bad)
