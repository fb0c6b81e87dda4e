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
    ({"heal": True}, "heal"),  # healing without pruning
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
    ({"train": {"batch_size": 1}}, "train.batch_size"),
    ({"data_limit": 1}, "data_limit"),
    ({"sym_weight": 0.0, "asym_weight": 0.0, "mse_weight": 0.0}, "sym_weight"),
])
def test_binarizer_config_errors_name_the_key(kwargs, key):
    from embedforge.recipe import build_config

    with pytest.raises(ConfigError) as err:
        build_config(BinarizerConfig, {"model": "m", **kwargs})
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


@pytest.mark.parametrize(("cls", "key", "value", "message"), [
    (CompressConfig, "heal_steps", 200, "heal_steps: training options moved under the train: key; write "
                                        "train: {max_steps: 200} and heal: true"),
    (CompressConfig, "heal_lr", 5e-5, "heal_lr: training options moved under the train: key; write "
                                      "train: {learning_rate: 5e-05}"),
    (CompressConfig, "heal_batch_size", 32, "heal_batch_size: training options moved under the train: key; write "
                                            "train: {batch_size: 32}"),
    (CompressConfig, "seed", 1, "seed: training options moved under the train: key; write train: {seed: 1}"),
    (BinarizerConfig, "steps", 600, "steps: training options moved under the train: key; write "
                                    "train: {max_steps: 600}"),
    (BinarizerConfig, "lr", 1e-3, "lr: training options moved under the train: key; write "
                                  "train: {learning_rate: 0.001}"),
    (BinarizerConfig, "batch_size", 512, "batch_size: training options moved under the train: key; write "
                                         "train: {batch_size: 512}"),
    (BinarizerConfig, "limit", 20000, "limit: renamed; write data_limit: 20000"),
])
def test_old_training_keys_name_their_new_place(cls, key, value, message):
    from embedforge.recipe import build_config

    with pytest.raises(ConfigError) as err:
        build_config(cls, {"model": "m", "layers": [0], key: value} if cls is CompressConfig
                     else {"model": "m", key: value})
    assert str(err.value) == message


def test_stage_defaults_are_the_old_loops_settings():
    """The shipped behaviour: healing 200 constant-rate steps of 32 texts at 5e-5 (AdamW decay 0.01, fp32); the
    binarizer 600 steps of 512 vectors at 1e-3, 5% warmup then cosine, no decay, fp32."""
    heal = CompressConfig(model="m").train
    assert (heal.max_steps, heal.epochs, heal.batch_size, heal.learning_rate, heal.lr_scheduler.value,
            heal.warmup_ratio, heal.weight_decay, heal.precision.value, heal.seed) == \
        (200, None, 32, 5e-5, "constant", 0.0, 0.01, "fp32", 0)
    binarizer = BinarizerConfig(model="m").train
    assert (binarizer.max_steps, binarizer.epochs, binarizer.batch_size, binarizer.learning_rate,
            binarizer.lr_scheduler.value, binarizer.warmup_ratio, binarizer.weight_decay, binarizer.precision.value,
            binarizer.seed) == (600, None, 512, 1e-3, "cosine", 0.05, 0.0, "fp32", 0)
