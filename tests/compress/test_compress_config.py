"""Compress / binarizer configs: torch-free import, validation errors naming the key, shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embedforge.compress.config import BinarizerConfig, CompressConfig, EmbeddingPrecision, WeightQuant
from embedforge.configs import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "compress").glob("*.yaml"))


def test_config_module_imports_without_torch():
    code = ("import sys; import embedforge.compress.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_enums_are_converted_at_the_boundary():
    cfg = CompressConfig(model="m", weights="quanto-int8", embedding_precision="ubinary")
    assert cfg.weights is WeightQuant.QUANTO_INT8 and cfg.embedding_precision is EmbeddingPrecision.UBINARY


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"weights": "int3"}, "weights"),
    ({"embedding_precision": "fp8"}, "embedding_precision"),
    ({"layers": {"spread": 2, "every": 2}}, "layers"),
    ({"layers": [1, 1]}, "layers"),
    ({"heal_steps": 10}, "heal_steps"),  # healing without pruning
    ({"layers": {"spread": 0}}, "layers.spread"),
    ({"truncate_dim": 0}, "truncate_dim"),
])
def test_compress_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        CompressConfig(model="m", **kwargs)
    assert err.value.key == key


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"bits": 0}, "bits"),
    ({"bits": 9}, "bits"),
    ({"output": "bits"}, "output"),
    ({"batch_size": 1}, "batch_size"),
    ({"sym_weight": 0.0, "asym_weight": 0.0, "mse_weight": 0.0}, "sym_weight"),
])
def test_binarizer_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        BinarizerConfig(model="m", **kwargs)
    assert err.value.key == key


def test_stages_registered():
    from embedforge.stages import config_class, runner

    assert config_class("compress") is CompressConfig
    assert config_class("binarizer") is BinarizerConfig
    assert callable(runner("compress")) and callable(runner("binarizer"))


def test_there_are_compress_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    from embedforge.recipe import load_recipe

    recipe = load_recipe(path)
    ours = [s for s in recipe.stages if s.stage in ("compress", "binarizer")]
    assert ours
    for stage in ours:
        assert isinstance(stage.config, (CompressConfig, BinarizerConfig))
    assert path.read_text().startswith(f"# embedforge run recipes/compress/{path.name}")


def test_recipe_error_names_file_line_and_key(tmp_path):
    from embedforge.recipe import RecipeError, load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: compress\n    out: /tmp/x\n    model: minilm-l6\n    weights: int3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:5: .*weights"):
        load_recipe(bad)
