"""Layer pruning (+ healing) and vocabulary pruning on tiny BERT and decoder models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedforge.backbone import hf_model, keep_layers, layer_list
from embedforge.compress.pruning import count_parameters, heal
from embedforge.compress.vocab import prune_vocabulary, saved_size
from embedforge.testing import sample_texts


def _decoder_st(tmp_path: Path, arch: str = "llama", vocab_size: int = 420, layers: int = 4,
                chat_template: str | None = None):
    """A tiny decoder embedder (mean pooling) whose BPE tokenizer has real merges."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoModel

    from embedforge.testing import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=vocab_size)
    if chat_template:
        tok.chat_template = chat_template
    cfg = tiny_config(arch, vocab_size=len(tok), num_hidden_layers=layers)
    torch.manual_seed(0)
    hf = AutoModel.from_config(cfg)
    hf.config.is_causal = False
    d = tmp_path / f"{arch}-hf"
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    t = Transformer(str(d), max_seq_length=64)
    return SentenceTransformer(modules=[t, Pooling(32, pooling_mode="mean")], device="cpu")


def _bert_st(tmp_path: Path, layers: int = 4):
    from sentence_transformers import SentenceTransformer

    from embedforge.testing import tiny_bert_st

    return SentenceTransformer(str(tiny_bert_st(tmp_path / "bert", layers=layers)), device="cpu")


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen3"])
def test_prune_layers_equals_manual_forward_and_reloads(tmp_path, kind):
    from sentence_transformers import SentenceTransformer

    import copy
    import re

    from transformers import AutoModel

    model = _bert_st(tmp_path) if kind == "bert" else _decoder_st(tmp_path, kind)
    texts = sample_texts()
    n_before = count_parameters(model)
    original_state = {k: v.clone() for k, v in hf_model(model).state_dict().items()}
    config = copy.deepcopy(hf_model(model).config)
    _, _, layers = layer_list(hf_model(model))
    assert len(layers) == 4
    info = keep_layers(model, [0, 3])
    assert info == {"layers_before": 4, "layers_after": 2, "kept_layers": [0, 3]}
    assert hf_model(model).config.num_hidden_layers == 2
    assert count_parameters(model) < n_before
    out = model.encode(texts, convert_to_numpy=True)
    # Independent check: a fresh 2-layer model from the config, with layers 0 and 3's weights renamed to 0 and 1.
    config.num_hidden_layers = 2
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0], config.layer_types[3]]
    manual = AutoModel.from_config(config).eval()
    rename = {"0": "0", "3": "1"}
    state = {}
    for key, value in original_state.items():
        m = re.search(r"(layers?)\.(\d+)\.", key)
        if m is None:
            state[key] = value
        elif m.group(2) in rename:
            state[key[:m.start(2)] + rename[m.group(2)] + key[m.end(2):]] = value
    manual.load_state_dict(state, strict=True)
    feats = model[0].tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = manual(**feats).last_hidden_state
        got = hf_model(model)(**feats).last_hidden_state
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    model.save(str(tmp_path / "pruned"))
    again = SentenceTransformer(str(tmp_path / "pruned"), device="cpu")
    assert hf_model(again).config.num_hidden_layers == 2
    np.testing.assert_allclose(again.encode(texts, convert_to_numpy=True), out, atol=1e-5)


def test_pruned_layers_are_the_kept_originals(tmp_path):
    model = _decoder_st(tmp_path)
    _, _, layers = layer_list(hf_model(model))
    originals = [layers[1], layers[2]]
    keep_layers(model, [1, 2])
    _, _, now = layer_list(hf_model(model))
    assert list(now) == originals
    assert [m.self_attn.layer_idx for m in now] == [0, 1]


def _targets(n: int, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = rng.standard_normal((n, dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _heal_options(**train: object):
    """The compress stage's healing options (its own defaults), except the ``train`` keys given."""
    from embedforge.compress.config import CompressConfig
    from embedforge.recipe import build_config

    return build_config(CompressConfig, {"model": "m", "layers": [0], "heal": True, "train": train}).train


def test_healing_moves_pruned_model_towards_teacher(tmp_path):
    model = _bert_st(tmp_path)
    texts = sample_texts()
    teacher = _targets(len(texts))
    keep_layers(model, [0])

    def dist() -> float:
        s = model.encode(texts, convert_to_numpy=True)
        return float(np.mean(1 - np.sum(s * teacher, axis=1)))

    before = dist()
    metrics, stats = heal(model, texts, teacher, _heal_options(max_steps=40, learning_rate=3e-3, batch_size=5),
                          tmp_path / "ck", {"run": 1})
    assert dist() < before - 0.2
    assert metrics["heal_steps"] == stats["steps"] == 40
    assert metrics["heal_loss_last"] < metrics["heal_loss_first"]
    assert not model.training  # left ready to encode


def test_heal_resumes_from_checkpoint(tmp_path):
    from embedforge.testing import sigterm_at
    from embedforge.training.guard import TrainingInterrupted

    texts = sample_texts()
    teacher = _targets(len(texts))

    from sentence_transformers import SentenceTransformer

    # One saved model, loaded three times (tiny_bert_st's tokenizer training is not bit-reproducible).
    base = tmp_path / "base"
    _bert_st(tmp_path).save(str(base))

    def pruned():
        m = SentenceTransformer(str(base), device="cpu")
        keep_layers(m, [0])
        return m

    options = _heal_options(max_steps=20, learning_rate=1e-3, batch_size=4, save_steps=10)
    straight = pruned()
    heal(straight, texts, teacher, options, tmp_path / "straight", {"run": 1})
    # Interrupted run: stopped at step 15, after the step-10 checkpoint (15 is saved on the signal: remove it, as
    # if the process had been killed).
    with pytest.raises(TrainingInterrupted):
        heal(pruned(), texts, teacher, options, tmp_path / "ck", {"run": 1}, callbacks=[sigterm_at(15)])
    import shutil

    shutil.rmtree(tmp_path / "ck" / "checkpoint-15")
    assert (tmp_path / "ck" / "checkpoint-10").is_dir()
    resumed = pruned()
    _, stats = heal(resumed, texts, teacher, options, tmp_path / "ck", {"run": 1})
    assert stats["resumed_from"] == str(tmp_path / "ck" / "checkpoint-10") and stats["steps"] == 20
    np.testing.assert_allclose(resumed.encode(texts), straight.encode(texts), atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama", "gemma3"])
def test_vocab_pruning_keeps_corpus_outputs_and_shrinks(tmp_path, kind):
    from embedforge.modules import load_embedder

    model = _bert_st(tmp_path, layers=2) if kind == "bert" else _decoder_st(tmp_path, kind, layers=2)
    corpus = sample_texts()[:6]
    before = model.encode(corpus, convert_to_numpy=True)
    old_tok = model[0].tokenizer
    old_ids = old_tok(corpus)["input_ids"]
    model.save(str(tmp_path / "orig"))
    info = prune_vocabulary(model, corpus)
    assert info["vocab_after"] < info["vocab_before"]
    assert hf_model(model).get_input_embeddings().weight.shape[0] == info["vocab_after"]
    assert len(model[0].tokenizer) == info["vocab_after"]
    np.testing.assert_allclose(model.encode(corpus, convert_to_numpy=True), before, atol=1e-5)
    # Token by token: the new ids name the same strings as the old ones.
    new_ids = model[0].tokenizer(corpus)["input_ids"]
    for o, n in zip(old_ids, new_ids):
        assert old_tok.convert_ids_to_tokens(o) == model[0].tokenizer.convert_ids_to_tokens(n)
    model.save(str(tmp_path / "pruned"))
    assert saved_size(tmp_path / "pruned") < saved_size(tmp_path / "orig")
    again = load_embedder(tmp_path / "pruned")
    np.testing.assert_allclose(again.encode(corpus, convert_to_numpy=True), before, atol=1e-5)
    # Text outside the corpus still tokenizes (to kept tokens only).
    ids = again[0].tokenizer(["zebra quantum xylophone"])["input_ids"][0]
    assert max(ids) < info["vocab_after"]


def test_multilayer_head_follows_layer_pruning(tmp_path):
    from embedforge.modules.multilayer import MultiLayerPooling

    model = _bert_st(tmp_path)
    head = MultiLayerPooling(32, 5, layers=[2, 4])
    model.append(head)
    with pytest.raises(ValueError, match="layers \\[1\\]"):
        keep_layers(model, [0, 3])
    assert hf_model(model).config.num_hidden_layers == 4  # nothing changed after the refusal
    keep_layers(model, [1, 3])
    assert head.layers == [1, 2] and head.num_hidden_states == 3


def test_vocab_pruning_keeps_tokens_of_chat_template_and_prompts(tmp_path):
    from embedforge.modules import load_embedder

    # Words of the template and the prompt are in the BPE vocabulary (sample texts 5-9) but in no corpus text.
    template = ("{% for m in messages %}<s>scientists discovered a new species {{ m['content'] }}</s>"
                "{% endfor %}")
    model = _decoder_st(tmp_path, "llama", layers=2, chat_template=template)
    assert model.preprocess(["a"])["input_ids"].shape[1] > 10, "the chat template is applied"
    model.prompts = {"query": "protein folding determines: "}
    corpus = sample_texts()[:4]
    before = model.encode(corpus, convert_to_numpy=True)
    before_q = model.encode(corpus, prompt_name="query", convert_to_numpy=True)
    prune_vocabulary(model, corpus)
    np.testing.assert_allclose(model.encode(corpus, convert_to_numpy=True), before, atol=1e-5)
    np.testing.assert_allclose(model.encode(corpus, prompt_name="query", convert_to_numpy=True), before_q, atol=1e-5)
    model.save(str(tmp_path / "p"))
    np.testing.assert_allclose(load_embedder(tmp_path / "p").encode(corpus, convert_to_numpy=True), before, atol=1e-5)
