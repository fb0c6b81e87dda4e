"""compress / binarizer stage runners on tiny models, end to end through the model format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedforge.compress.config import BinarizerConfig, CompressConfig
from embedforge.configs import StageContext
from embedforge.recipe import build_config
from embedforge.testing import sample_texts


@pytest.fixture()
def texts_file(tmp_path: Path) -> Path:
    words = " ".join(sample_texts()).split()
    rng = np.random.default_rng(0)
    rows = sample_texts() + [" ".join(rng.choice(words, 8)) for _ in range(150)]
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return f


def _bert(tmp_path: Path, layers: int = 4) -> Path:
    from embedforge.testing import tiny_bert_st

    return tiny_bert_st(tmp_path / "bert", layers=layers)


def test_compress_prune_heal_vocab_int8(tmp_path, texts_file):
    from embedforge.compress.pipeline import run
    from embedforge.data import load_texts
    from embedforge.compress.quantization import EmbeddingQuantizer
    from embedforge.compress.weights import load_compressed
    from embedforge.model import read_lineage

    src = _bert(tmp_path)
    out = tmp_path / "out"
    cfg = build_config(CompressConfig, {
        "model": str(src), "layers": {"spread": 2}, "heal": True, "heal_data": str(texts_file),
        "train": {"max_steps": 6, "batch_size": 8}, "vocab_corpus": str(texts_file), "embedding_precision": "int8",
        "calibration_data": str(texts_file)})
    run(cfg, out, StageContext(stage_name="compress"))
    lineage = read_lineage(out)
    assert lineage["stage"] == "compress"
    assert lineage["extra"]["layer_pruning"]["kept_layers"] == [0, 3]
    assert lineage["extra"]["vocab_pruning"]["vocab_after"] < lineage["extra"]["vocab_pruning"]["vocab_before"]
    m = lineage["metrics"]
    assert m["params_after"] < m["params_before"] and "heal_loss_last" in m and m["heal_steps"] == 6
    assert [step for step, _ in lineage["extra"]["train"]["loss_history"]] == list(range(1, 7))  # for the report
    assert not Path(f"{out}.ckpt").exists(), "checkpoints are dropped once the stage has finished"
    model = load_compressed(out)
    texts = load_texts(str(texts_file))
    vectors = model.encode(texts, convert_to_numpy=True)
    quant = EmbeddingQuantizer.load(out)
    assert quant.precision == "int8" and quant.calibration.dim == vectors.shape[1]
    # The saved ranges are the min/max of the (compressed) model's vectors on the calibration texts.
    np.testing.assert_allclose(quant.calibration.ranges, np.stack([vectors.min(0), vectors.max(0)]), atol=1e-5)


def test_compress_vocab_only_is_lossless_on_corpus(tmp_path, texts_file):
    from embedforge.compress.pipeline import run
    from embedforge.data import load_texts
    from embedforge.modules import load_embedder

    src = _bert(tmp_path, layers=2)
    out = tmp_path / "vocab"
    run(CompressConfig(model=str(src), vocab_corpus=str(texts_file), embedding_precision="ubinary",
                       truncate_dim=16), out, StageContext())
    texts = load_texts(str(texts_file))
    a = load_embedder(src).encode(texts, convert_to_numpy=True)
    b = load_embedder(out).encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    q = json.loads((out / "embedding_quantization.json").read_text())
    assert q == {"precision": "ubinary", "truncate_dim": 16, "calibration": None}


def test_compress_quanto_plan_reapplied_at_load(tmp_path):
    pytest.importorskip("optimum.quanto")
    from embedforge.compress.pipeline import run
    from embedforge.compress.weights import load_compressed, weight_bytes
    from embedforge.model import read_lineage
    from embedforge.modules import load_embedder

    src = _bert(tmp_path, layers=2)
    out = tmp_path / "quanto"
    run(CompressConfig(model=str(src), weights="quanto-int8"), out, StageContext())
    m = read_lineage(out)["metrics"]
    assert m["weight_bytes_quantized"] < m["weight_bytes_before"]
    assert m["quantized_cosine_to_input_min"] > 0.99
    plain, quantized = load_embedder(out), load_compressed(out)
    assert weight_bytes(quantized) < weight_bytes(plain)
    assert any(type(x).__name__ == "QLinear" for x in quantized.modules())


def test_compress_bnb_fails_clearly_without_cuda(tmp_path):
    import torch

    from embedforge.compress.pipeline import run
    from embedforge.compress.weights import WeightQuantError

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(WeightQuantError, match="CUDA GPU"):
        run(CompressConfig(model=str(tmp_path / "never-read"), weights="bnb-4bit"), tmp_path / "o", StageContext())


def test_binarizer_stage_appends_trained_module(tmp_path, texts_file):
    from embedforge.compress.binarizer import binarize
    from embedforge.compress.pipeline import run_binarizer
    from embedforge.model import read_lineage
    from embedforge.modules import load_embedder
    from embedforge.modules.binarizer import LearnedBinarizer

    src = _bert(tmp_path, layers=2)
    out = tmp_path / "bin"
    cfg = build_config(BinarizerConfig, {"model": str(src), "data": str(texts_file), "bits": 2, "output": "packed",
                                         "train": {"max_steps": 40, "batch_size": 64}})
    run_binarizer(cfg, out, StageContext())
    assert not (tmp_path / "bin.ckpt").exists(), "the vector cache is dropped once the stage has finished"
    lineage = read_lineage(out)
    assert lineage["extra"]["binarizer"]["code_bytes"] == 2 * 32 // 8
    assert "heldout_spearman_learned" in lineage["metrics"] and lineage["metrics"]["train_steps"] == 40
    assert [step for step, _ in lineage["extra"]["train"]["loss_history"]] == list(range(1, 41))  # for the report
    model = load_embedder(out)
    assert isinstance(model[-1], LearnedBinarizer)
    texts = sample_texts()
    codes = model.encode(texts, convert_to_numpy=True)
    assert codes.dtype == np.uint8 and codes.shape == (len(texts), 8)
    # Same codes as binarizing the float vectors of the model without the binarizer.
    floats = load_embedder(src).encode(texts, convert_to_numpy=True)
    np.testing.assert_array_equal(codes, binarize(model[-1], floats)[0])
    # A second binarizer on top of the first is refused before any work, naming the key.
    from embedforge.configs import ConfigError

    again = build_config(BinarizerConfig, {"model": str(out), "data": str(texts_file)})
    with pytest.raises(ConfigError, match=rf"^model: {out} already ends in a binarizer; give the model without one$"):
        run_binarizer(again, tmp_path / "twice", StageContext())
    assert not (tmp_path / "twice").exists() and not (tmp_path / "twice.ckpt").exists()


@pytest.mark.parametrize("settings, message", [
    ({"layers": {"spread": 9}}, "layers.spread: 9 layers asked but the model ({src}) has 2; use at most 2"),
    ({"layers": [0, 5]}, "layers: layer index 5 is out of range for the model ({src}), which has 2 layers "
                         "(0..1, or -2..-1)"),
    ({"embedding_precision": "binary", "truncate_dim": 4096},
     "truncate_dim: 4096 is larger than the model's 32 dimensions ({src}); use at most 32 or leave it unset"),
    ({"embedding_precision": "int8", "truncate_dim": 33, "calibration_data": "unused.jsonl"},
     "truncate_dim: 33 is larger than the model's 32 dimensions ({src}); use at most 32 or leave it unset"),
    ({"layers": {"spread": 1}, "heal": True, "heal_data": "unused.jsonl", "max_seq_length": 1024},
     "max_seq_length: 1024 is more than {src} can read (its position embeddings cover 128 tokens); use at most 128"),
])
def test_compress_refuses_what_the_model_does_not_have(tmp_path, texts_file, monkeypatch, settings, message):
    import embedforge.compress.pipeline as P
    from embedforge.configs import ConfigError

    src = _bert(tmp_path, layers=2)
    monkeypatch.setattr(P, "_vectors", lambda *a, **k: pytest.fail("encoded before checking the config"))
    out = tmp_path / "out"
    cfg = CompressConfig(model=str(src), **settings)
    with pytest.raises(ConfigError) as info:
        P.run(cfg, out, StageContext(stage_name="compress"))
    assert str(info.value) == message.format(src=src)
    assert not out.exists() and not Path(f"{out}.ckpt").exists()


def test_sign_binarizer_refuses_truncate_dim_beyond_its_input():
    from embedforge.modules.binarizer import SignBinarizer

    assert SignBinarizer(32, truncate_dim=16).get_embedding_dimension() == 2
    with pytest.raises(ValueError, match="truncate_dim 4096 is larger than the input's 32 dimensions"):
        SignBinarizer(32, truncate_dim=4096)


def test_compress_cuts_huge_texts_to_the_model_limit(tmp_path, texts_file, caplog):
    import logging

    from embedforge.compress.pipeline import run
    from embedforge.data import max_chars_for
    from embedforge.modules import load_embedder

    src = _bert(tmp_path, layers=2)
    limit = max_chars_for(load_embedder(src).max_seq_length)
    corpus = tmp_path / "huge.jsonl"
    corpus.write_text(texts_file.read_text() + json.dumps({"text": "hello world " * 100_000}) + "\n")
    with caplog.at_level(logging.WARNING, logger="embedforge.data"):
        run(CompressConfig(model=str(src), vocab_corpus=str(corpus)), tmp_path / "out", StageContext())
    assert [r.getMessage() for r in caplog.records if "were cut" in r.getMessage()] == [
        f"{corpus}: 1 text(s) longer than {limit} characters were cut to that length (the model reads no further)"]


@pytest.mark.parametrize("stage", ["compress", "binarizer"])
def test_recipe_train_key_reaches_the_trainer_and_keeps_the_stage_defaults(tmp_path, texts_file, trainer_args,
                                                                           stage):
    from embedforge.recipe import load_recipe
    from embedforge.stages import runner

    src = _bert(tmp_path, layers=2)
    extra = ("    layers: [0]\n    heal: true\n    heal_data: " + str(texts_file) + "\n" if stage == "compress"
             else "    data: " + str(texts_file) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - name: s\n    stage: {stage}\n    out: {tmp_path / 'out'}\n    model: {src}\n"
                      f"{extra}    train: {{learning_rate: 0.0123}}\n")
    (st,) = load_recipe(recipe).stages
    args = trainer_args(lambda: runner(stage)(st.config, st.out, StageContext()))
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if stage == "compress":
        assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size, scheduler, args.warmup_steps,
                args.weight_decay, args.seed) == (0.0123, 200, 32, "constant_with_warmup", 0, 0.01, 0)
    else:  # the batch is cut to the 144 training vectors there are (160 texts, 16 held out)
        assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size, scheduler, args.warmup_steps,
                args.weight_decay, args.max_grad_norm, args.dataloader_drop_last) == \
            (0.0123, 600, 144, "cosine", 30, 0.0, 0.0, True)
    assert not args.bf16
