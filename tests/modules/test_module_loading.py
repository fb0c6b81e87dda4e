"""Loading saved models that contain embedforge modules (sentence-transformers 6 gates foreign classes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedforge.modules import load_embedder, module_classes_for
from embedforge.modules.echo import EchoPooling, EchoTransformer
from embedforge.testing import sample_texts


@pytest.fixture(scope="module")
def echo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedforge.convert.embedder import build_embedder
    from embedforge.testing import tiny_decoder

    root = tmp_path_factory.mktemp("echo")
    model = build_embedder(tiny_decoder("llama", root / "llm"), pooling="echo")
    model.save(str(root / "model"))
    return root / "model"


def test_module_classes_are_resolved_from_modules_json(echo_dir: Path, tiny_st_dir: Path) -> None:
    classes = module_classes_for(echo_dir)
    assert classes == {
        "embedforge.modules.echo.EchoTransformer": EchoTransformer,
        "embedforge.modules.echo.EchoPooling": EchoPooling,
    }
    assert module_classes_for(tiny_st_dir) == {}  # plain sentence-transformers model


def test_load_embedder_loads_plain_and_embedforge_models(echo_dir: Path, tiny_st_dir: Path) -> None:
    texts = sample_texts()[:3]
    plain = load_embedder(tiny_st_dir)
    assert plain.encode(texts).shape == (3, 32)
    model = load_embedder(echo_dir)
    assert isinstance(model[0], EchoTransformer) and isinstance(model[1], EchoPooling)
    assert model.encode(texts).shape == (3, 32)


def test_fallback_without_the_private_hook(echo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from sentence_transformers import SentenceTransformer

    want = load_embedder(echo_dir).encode(sample_texts()[:2])
    monkeypatch.setattr(SentenceTransformer, "_load_with_module_classes", None)
    np.testing.assert_allclose(load_embedder(echo_dir).encode(sample_texts()[:2]), want, atol=1e-6)
    # a checkpoint that ships its own model code is not trusted implicitly
    custom = tmp_path / "custom"
    shutil.copytree(echo_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="auto_map"):
        load_embedder(custom)


def test_position_limit_of_learned_rotary_and_offset_tables(tiny_st_dir: Path, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModel, RobertaConfig, RobertaModel

    from embedforge.modules.loading import position_limit

    assert position_limit(load_embedder(tiny_st_dir)) == 128  # BERT: max_position_embeddings
    assert position_limit(AutoModel.from_pretrained(tiny_llama_dir)) is None  # rotary: no table to run off
    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=66, pad_token_id=1))
    assert position_limit(roberta) == 64  # positions start after the padding index


def test_convert_refuses_max_seq_length_beyond_position_embeddings(tiny_st_dir: Path) -> None:
    from embedforge.configs import ConfigError
    from embedforge.convert.config import ConvertConfig
    from embedforge.convert.embedder import build_embedder_from_config
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.train_model import load_start_model

    expected = (f"max_seq_length: 1024 is more than {tiny_st_dir} can read (its position embeddings cover 128 "
                "tokens); use at most 128")
    with pytest.raises(ConfigError) as info:
        load_start_model(ContrastiveConfig(model=str(tiny_st_dir), data=["pairs.jsonl"], max_seq_length=1024))
    assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:
        build_embedder_from_config(ConvertConfig(model=str(tiny_st_dir), max_seq_length=1024, pooling="mean"))
    assert str(info.value) == expected
    model, _ = load_start_model(ContrastiveConfig(model=str(tiny_st_dir), data=["pairs.jsonl"], max_seq_length=128))
    assert model.max_seq_length == 128
