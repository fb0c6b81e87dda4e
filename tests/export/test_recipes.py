"""The shipped export recipes validate into typed configs without building anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedforge.export.config import ExportConfig
from embedforge.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "export").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_export_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    exports = [s for s in recipe.stages if isinstance(s.config, ExportConfig)]
    assert exports, f"{path.name} has no export stage"
    for stage in exports:
        assert stage.config.model and stage.config.fp32


def test_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"minilm_onnx.yaml", "smollm2_onnx.yaml"}
