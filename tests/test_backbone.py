"""The one layer toolkit: the ``layers`` vocabulary, its refusals, and the cut on every supported architecture."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from embedforge.backbone import check_layers, keep_layers, select_layers
from embedforge.configs import ConfigError

# ------------------------------------------------------------------------------------------------ vocabulary


@pytest.mark.parametrize(("n_total", "spec", "expected"), [
    (6, None, [0, 1, 2, 3, 4, 5]),
    (6, 2, [0, 1]),  # the first N
    (6, 6, [0, 1, 2, 3, 4, 5]),
    (6, [4, 0], [0, 4]),  # 0-based, kept in model order
    (6, [0, -1, 2], [0, 2, 5]),  # negatives count from the end
    (6, [-6], [0]),
    (6, {"every": 2}, [1, 3, 5]),
    (6, {"every": 3}, [2, 5]),
    (6, {"every": 1}, [0, 1, 2, 3, 4, 5]),
    (30, {"spread": 4}, [0, 10, 19, 29]),  # evenly spaced, first and last included
    (6, {"spread": 1}, [0]),
    (6, {"spread": 6}, [0, 1, 2, 3, 4, 5]),
])
def test_select_layers_table(n_total: int, spec: Any, expected: list[int]) -> None:
    assert select_layers(n_total, spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    (7, "layers: 7 layers asked but the model (m) has 6; use at most 6"),
    ([0, 6], "layers: layer index 6 is out of range for the model (m), which has 6 layers (0..5, or -6..-1)"),
    ([-7], "layers: layer index -7 is out of range for the model (m), which has 6 layers (0..5, or -6..-1)"),
    ([6, 9], "layers: layer indices [6, 9] are out of range for the model (m), which has 6 layers (0..5, or -6..-1)"),
    ([5, -1], "layers: [5, -1] names the same layer twice for a model with 6 layers (m)"),
    ({"every": 7}, "layers.every: 7 keeps no layer of the model (m), which has 6; use at most 6"),
    ({"spread": 7}, "layers.spread: 7 layers asked but the model (m) has 6; use at most 6"),
])
def test_select_layers_refuses_what_the_model_does_not_have(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        select_layers(6, spec, source="m")
    assert str(err.value) == message
    assert err.value.key.startswith("layers")


@pytest.mark.parametrize(("spec", "message"), [
    (0, "layers: keep at least one layer, got 0"),
    ([], "layers: the list is empty; name at least one layer, or leave layers unset"),
    ([1, 1], "layers: a layer is listed twice in [1, 1]"),
    ({"first": 2}, "layers: a mapping holds exactly one of every, spread (e.g. {every: 2}), got {'first': 2}"),
    ({"every": 2, "spread": 2}, "layers: a mapping holds exactly one of every, spread (e.g. {every: 2}), "
                                "got {'every': 2, 'spread': 2}"),
    ({"every": 0}, "layers.every: must be a positive integer, got 0"),
    ("all", "layers: expected N, a list of layer indices or {every: K} / {spread: N}, got 'all'"),
])
def test_check_layers_refuses_malformed_selections(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_layers(spec)
    assert str(err.value) == message


def test_backbone_imports_without_torch() -> None:
    code = "import sys, embedforge.backbone; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ old keys


def _stage_configs() -> dict[str, tuple[type, dict[str, Any]]]:
    from embedforge.compress.config import CompressConfig
    from embedforge.convert.config import ConvertConfig
    from embedforge.convert.train_config import ContrastiveConfig, MntpConfig, SimcseConfig
    from embedforge.distill.config import DistillConfig

    return {
        "convert": (ConvertConfig, {"model": "m"}),
        "mntp": (MntpConfig, {"model": "m"}),
        "simcse": (SimcseConfig, {"model": "m"}),
        "contrastive": (ContrastiveConfig, {"model": "m", "data": ["pairs.jsonl"]}),
        "distill": (DistillConfig, {"model": "m"}),
        "compress": (CompressConfig, {"model": "m"}),
    }


@pytest.mark.parametrize("stage", ["convert", "mntp", "simcse", "contrastive", "distill", "compress"])
@pytest.mark.parametrize(("key", "value", "spelled"), [
    ("keep_layers", 16, "layers: 16"),
    ("keep_layers", [1, 3, 5], "layers: [1, 3, 5]"),
    ("first_layers", 2, "layers: 2"),
    ("layer_stride", 2, "layers: {every: 2}"),
    ("num_layers", 20, "layers: {spread: 20}"),
])
def test_old_layer_keys_are_refused_with_the_new_spelling(stage: str, key: str, value: Any, spelled: str) -> None:
    from embedforge.recipe import build_config

    cls, base = _stage_configs()[stage]
    with pytest.raises(ConfigError) as err:
        build_config(cls, {**base, key: value})
    assert str(err.value) == f"{key}: no longer a key; did you mean 'layers'? (write {spelled})"


def test_old_layer_key_in_a_recipe_names_file_line_and_new_key(tmp_path) -> None:
    from embedforge.recipe import RecipeError, load_recipe

    bad = tmp_path / "old.yaml"
    bad.write_text("stages:\n  - stage: compress\n    out: /tmp/x\n    model: minilm-l6\n    num_layers: 4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert "old.yaml:5" in message and "\n" not in message
    assert "num_layers: no longer a key; did you mean 'layers'? (write layers: {spread: 4})" in message


def test_every_stage_config_takes_the_one_layers_key() -> None:
    from embedforge.recipe import build_config

    for stage, (cls, base) in _stage_configs().items():
        for spec in (2, [0, -1], {"every": 2}, {"spread": 2}):
            assert build_config(cls, {**base, "layers": spec}).layers == spec, stage


def test_shipped_recipes_use_only_the_layers_key() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    for path in root.rglob("*.yaml"):
        text = path.read_text()
        for old in ("keep_layers", "first_layers", "layer_stride", "num_layers"):
            assert old not in text, f"{path}: still says {old}"


# ------------------------------------------------------------------------------------------------ surgery

ALL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "bert")
KEEP = [0, 2, 3]


def _config(arch: str, n_layers: int, **overrides: Any) -> Any:
    import transformers as tf

    from embedforge.testing import tiny_config

    if arch == "bert":
        return tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, **overrides)
    if arch == "gemma":
        return tf.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              pad_token_id=0, **overrides)
    return tiny_config(arch, vocab_size=64, num_hidden_layers=n_layers, **overrides)


def _per_layer_types(arch: str) -> dict[str, Any]:
    """Alternate sliding / full attention (window 3) where the architecture has per-layer types, so that a cut
    that forgot to carry ``layer_types`` gives different vectors."""
    cfg = _config(arch, 4)
    if not isinstance(getattr(cfg, "layer_types", None), list):
        return {}
    extra: dict[str, Any] = {"layer_types": ["sliding_attention", "full_attention", "full_attention",
                                             "sliding_attention"], "sliding_window": 3}
    if arch in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = True
    return extra


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_keep_layers_equals_a_model_built_with_the_kept_layers(arch: str, tmp_path) -> None:
    """The cut model gives the same hidden states as a model built from config with len(KEEP) layers and the kept
    layers' weights copied in; its config and every layer_idx agree, and it reloads as the smaller model."""
    import torch
    from transformers import AutoModel

    from embedforge.backbone import layer_list

    extra = _per_layer_types(arch)
    torch.manual_seed(0)
    full = AutoModel.from_config(_config(arch, 4, **extra)).eval()
    state = full.state_dict()
    types = extra.get("layer_types")

    reference_extra = dict(extra)
    if types:
        reference_extra["layer_types"] = [types[k] for k in KEEP]
    reference = AutoModel.from_config(_config(arch, len(KEEP), **reference_extra)).eval()
    ref_parent, ref_attr, _ = layer_list(reference)
    prefix = [n for n, m in reference.named_modules() if m is getattr(ref_parent, ref_attr)][0]
    renamed = {}
    for name, tensor in state.items():
        if name.startswith(prefix + "."):
            index, _, rest = name[len(prefix) + 1:].partition(".")
            if int(index) not in KEEP:
                continue
            name = f"{prefix}.{KEEP.index(int(index))}.{rest}"
        renamed[name] = tensor
    reference.load_state_dict(renamed, strict=True)

    summary = keep_layers(full, KEEP)
    assert summary == {"layers_before": 4, "layers_after": 3, "kept_layers": KEEP}
    assert full.config.num_hidden_layers == 3 and len(layer_list(full)[2]) == 3
    if types:
        assert full.config.layer_types == [types[k] for k in KEEP]
    indices = [[m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")] for layer in layer_list(full)[2]]
    assert all(found == [i] * len(found) for i, found in enumerate(indices)), indices
    assert arch == "bert" or all(indices)  # decoders number their attention

    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = full(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        full.save_pretrained(tmp_path / "cut")
        again = AutoModel.from_pretrained(tmp_path / "cut").eval()
        reloaded = again(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(reloaded, want)
    assert again.config.num_hidden_layers == 3


def test_keep_layers_refuses_unsorted_or_missing_indices() -> None:
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(_config("llama", 4))
    for bad in ([2, 0], [0, 4], [1, 1], []):
        with pytest.raises(ValueError, match="sorted unique indices in \\[0, 4\\)"):
            keep_layers(model, bad)
    assert model.config.num_hidden_layers == 4 and len(model.layers) == 4


@pytest.mark.parametrize("spec", [2, [1, 3]])
def test_qlora_merge_reload_is_cut_like_the_trained_model(spec: Any, tmp_path) -> None:
    """finish_adapter merges a QLoRA adapter into a full-precision reload of the source: that reload gets the same
    cut as the trained model, layer_types and layer_idx included (its old inline copy kept layer_types whole)."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embedforge.backbone import apply_layers
    from embedforge.convert.train_config import SimcseConfig
    from embedforge.convert.train_model import add_lora, backbone_of, finish_adapter, set_backbone
    from embedforge.testing import sample_texts, tiny_decoder

    extra = _per_layer_types("qwen3")
    types = extra["layer_types"]
    path = tiny_decoder("qwen3", tmp_path / "qwen3", num_hidden_layers=4, **extra)
    model = SentenceTransformer(modules=[Transformer(str(path), max_seq_length=32), Pooling(32, "mean")],
                                device="cpu")
    backbone_of(model).config.is_causal = False  # as convert leaves it
    kept = apply_layers(model, spec)["kept_layers"]
    texts = sample_texts()[:4]
    before = model.encode(texts)
    config = SimcseConfig(model=str(path), lora_r=4, quantization="4bit", layers=spec)
    torch.manual_seed(0)
    set_backbone(model, add_lora(backbone_of(model), config))  # LoRA starts at zero: merging changes nothing
    assert finish_adapter(model, config, source_backbone=str(path)) is None
    merged = backbone_of(model)
    assert merged.config.num_hidden_layers == 2 and len(merged.layers) == 2
    assert merged.config.layer_types == [types[k] for k in kept]
    assert [layer.self_attn.layer_idx for layer in merged.layers] == [0, 1]
    np.testing.assert_allclose(model.encode(texts), before, atol=1e-5)


def test_a_selection_the_model_lacks_is_refused_before_any_work(tmp_path) -> None:
    """``embedforge run``: a distill stage asking for more layers than the teacher's config.json lists stops at
    pre-flight, exit 2, one line naming the stage, the key and the layer count; nothing is written."""
    import json

    from click.testing import CliRunner

    from embedforge.cli import main

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 6,
                                                     "max_position_embeddings": 128}))
    out = tmp_path / "runs" / "student"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - name: small\n    stage: distill\n    model: {teacher}\n    out: {out}\n"
                      "    student: layers\n    layers: {spread: 9}\n")
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    message = (f"stage 'small': layers.spread: 9 layers asked but the model ({teacher}) has 6; "
               "use at most 6")
    assert message in result.output
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_recipes_explain_spells_the_layers_type() -> None:
    from embedforge.distill.config import DistillConfig
    from embedforge.recipe import describe_config

    row = next(r for r in describe_config(DistillConfig) if r["key"] == "layers")
    assert row["type"] == "int | list[int] | dict[str, int] | None"
    assert "{every: K}" in row["help"] and "{spread: N}" in row["help"]
    assert next(r for r in describe_config(DistillConfig) if r["key"] == "data_limit")["type"] == "int | None"
