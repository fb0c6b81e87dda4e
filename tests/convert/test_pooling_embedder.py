"""The embedder end to end on a tiny decoder: every pooling head against a hand computation on the backbone's
own hidden states, prompts excluded from pooling, padding-side invariance and save -> load -> same vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedforge.convert import embedder as embedder_module
from embedforge.convert.embedder import adds_eos, build_embedder, ensure_pad_token, weighted_mean_handles_left_padding
from embedforge.testing import sample_texts, tiny_decoder, tiny_tokenizer

TEXTS = sample_texts()[:3] + ["short one", "a"]
PROMPT = "query: "
SMALL_HEADS = {"latent_count": 8, "latent_heads": 4, "multilayer_heads": 4}


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_decoder("llama", tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def no_bos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2-style decoder whose tokenizer adds no BOS token."""
    path = tiny_decoder("qwen2", tmp_path_factory.mktemp("qwen2") / "m")
    tiny_tokenizer(bos=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(decoder_dir: Path):
    """The backbone and tokenizer loaded directly with transformers, bidirectional set by hand."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(decoder_dir).eval()
    model.config.is_causal = False
    return model, AutoTokenizer.from_pretrained(decoder_dir)


def _hidden(model, ids: list[int], all_layers: bool = False):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=all_layers)
    return [h[0].numpy() for h in out.hidden_states] if all_layers else out.last_hidden_state[0].numpy()


def _unit(rows: list[np.ndarray]) -> np.ndarray:
    x = np.stack(rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _encode(model, texts, **kw) -> np.ndarray:
    return model.encode(texts, batch_size=8, convert_to_numpy=True, **kw)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mean_and_weighted_mean_match_hand_computation(decoder_dir: Path, reference, side: str) -> None:
    model, tok = reference
    if side == "left" and not weighted_mean_handles_left_padding():
        pytest.skip("sentence-transformers < 6.1: weightedmean refuses left padding (tested below)")
    mean = build_embedder(decoder_dir, pooling="mean", padding_side=side)
    weighted = build_embedder(decoder_dir, pooling="weightedmean", padding_side=side)
    mean_rows, weighted_rows = [], []
    for text in TEXTS:
        h = _hidden(model, tok(text)["input_ids"])
        mean_rows.append(h.mean(0))
        w = np.arange(1, len(h) + 1, dtype=np.float64)[:, None]  # SGPT: weight i for the i-th token
        weighted_rows.append((h * w).sum(0) / w.sum())
    np.testing.assert_allclose(_encode(mean, TEXTS), _unit(mean_rows), atol=2e-5)
    np.testing.assert_allclose(_encode(weighted, TEXTS), _unit(weighted_rows), atol=2e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pools_the_appended_eos(decoder_dir: Path, reference, side: str) -> None:
    model, tok = reference
    emb = build_embedder(decoder_dir, pooling="lasttoken", padding_side=side)
    batch = emb.preprocess(TEXTS)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert row[mask.bool()][-1].item() == tok.eos_token_id
    rows = [_hidden(model, tok(t)["input_ids"] + [tok.eos_token_id])[-1] for t in TEXTS]
    np.testing.assert_allclose(_encode(emb, TEXTS), _unit(rows), atol=2e-5)


def test_eos_appended_also_without_bos_and_survives_plain_reload(no_bos_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    emb = build_embedder(no_bos_dir, pooling="lasttoken")
    tok = emb.tokenizer
    plain = tok("a", add_special_tokens=False)["input_ids"]
    assert adds_eos(tok) and tok("a")["input_ids"] == plain + [tok.eos_token_id]
    emb.save(str(tmp_path))
    again = SentenceTransformer(str(tmp_path), device="cpu")
    assert adds_eos(again.tokenizer)
    np.testing.assert_allclose(_encode(again, TEXTS), _encode(emb, TEXTS), atol=1e-6)
    # mean pooling leaves the tokenizer alone
    assert not adds_eos(build_embedder(no_bos_dir, pooling="mean").tokenizer)


@pytest.mark.parametrize("pooling", ["mean", "weightedmean", "latent_attention", "multi_layer"])
def test_prompt_tokens_are_excluded_from_pooling(decoder_dir: Path, reference, pooling: str) -> None:
    model, tok = reference
    emb = build_embedder(decoder_dir, pooling=pooling, prompts={"query": PROMPT}, **SMALL_HEADS)
    n_prompt = len(tok(PROMPT)["input_ids"])  # bos + instruction tokens
    rows = []
    for text in TEXTS:
        ids = tok(PROMPT + text)["input_ids"]
        h = _hidden(model, ids)[n_prompt:]
        if pooling == "weightedmean":  # positions keep their place in the full sequence
            w = np.arange(n_prompt + 1, len(ids) + 1, dtype=np.float64)[:, None]
            rows.append((h * w).sum(0) / w.sum())
        else:  # the trainable heads start as mean pooling (zero-initialised output projections)
            rows.append(h.mean(0))
    np.testing.assert_allclose(_encode(emb, TEXTS, prompt_name="query"), _unit(rows), atol=2e-5)
    np.testing.assert_allclose(emb.encode_query(TEXTS, convert_to_numpy=True), _unit(rows), atol=2e-5)


def test_multi_layer_head_reads_every_hidden_state(decoder_dir: Path, reference) -> None:
    model, tok = reference
    emb = build_embedder(decoder_dir, pooling="multi_layer", zero_init_heads=False, normalize=False, **SMALL_HEADS)
    head = emb[1]
    assert head.layers == [1, 2] and emb[0].auto_model.config.output_hidden_states
    # a hand computation of the head on the per-layer means (the head's own weights, plain torch ops)
    rows = []
    for text in TEXTS:
        hs = _hidden(model, tok(text)["input_ids"], all_layers=True)
        with torch.no_grad():
            per_layer = torch.tensor(np.stack([hs[i].mean(0) for i in head.layers]))
            ctx = torch.nn.functional.layer_norm(per_layer + head.layer_embeddings, (per_layer.shape[1],),
                                                 head.norm.weight, head.norm.bias)
            att = head.attention
            q = (head.queries @ att.to_q.weight.T).reshape(head.num_queries, head.num_heads, -1).transpose(0, 1)
            k = (ctx @ att.to_k.weight.T).reshape(len(head.layers), head.num_heads, -1).transpose(0, 1)
            v = (ctx @ att.to_v.weight.T).reshape(len(head.layers), head.num_heads, -1).transpose(0, 1)
            p = torch.softmax(q @ k.transpose(1, 2) / np.sqrt(q.shape[-1]), dim=-1)
            mixed = (p @ v).transpose(0, 1).reshape(head.num_queries, -1) @ att.to_out.weight.T + att.to_out.bias
            rows.append((per_layer[-1] + mixed.mean(0) @ head.proj.weight.T + head.proj.bias).numpy())
    np.testing.assert_allclose(_encode(emb, TEXTS), np.stack(rows), atol=2e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_echo_pools_exactly_the_second_copy(decoder_dir: Path, reference, side: str, with_prompt: bool) -> None:
    model, tok = reference
    template = "Rewrite the sentence: {text}\nRewritten sentence: {text}"
    emb = build_embedder(decoder_dir, pooling="echo", padding_side=side, echo_template=template,
                         prompts={"query": PROMPT})
    backbone = emb[0]
    rows = []
    for text in TEXTS:
        ids = backbone.echo_ids(text, PROMPT if with_prompt else None)
        spec = backbone.echo_spec()  # what an exported model's tokenizer side rebuilds
        assert ids[: len(spec["bos"]) + (0 if with_prompt else len(spec["prefix"]))] == (
            spec["bos"] + ([] if with_prompt else spec["prefix"]))
        plain = tok.decode(ids, skip_special_tokens=True)
        assert plain == (PROMPT if with_prompt else "") + template.format(text=text)
        copy = tok(" " + text, add_special_tokens=False)["input_ids"]
        # find the second copy by searching from the end, then pool it by hand
        start = max(i for i in range(len(ids) - len(copy) + 1) if ids[i:i + len(copy)] == copy)
        assert ids.count(copy[0]) >= 2
        rows.append(_hidden(model, ids)[start:start + len(copy)].mean(0))
    got = _encode(emb, TEXTS, prompt_name="query") if with_prompt else _encode(emb, TEXTS)
    np.testing.assert_allclose(got, _unit(rows), atol=2e-5)


def test_echo_truncates_both_copies_equally(decoder_dir: Path) -> None:
    emb = build_embedder(decoder_dir, pooling="echo", max_seq_length=64)
    long_text = " ".join(TEXTS)
    batch = emb.preprocess([long_text, "a"])
    assert batch["input_ids"].shape[1] == 64
    n = int(batch["attention_mask"][0].sum())
    assert (n - sum(emb[0].echo_lengths().values())) % 2 == 0  # two copies of equal length
    ids = batch["input_ids"][0][:n].tolist()
    half = (n - sum(emb[0].echo_lengths().values())) // 2
    lead, pre, mid = (emb[0].echo_lengths()[k] for k in ("leading_tokens", "prefix_tokens", "middle_tokens"))
    first = ids[lead + pre: lead + pre + half]
    second = ids[lead + pre + half + mid: lead + pre + 2 * half + mid]
    assert first == second and len(first) > 0
    with pytest.raises(ValueError, match="max_seq_length"):
        emb[0].echo_ids("text", max_length=10)


POOLINGS = ["mean", "weightedmean", "lasttoken", "latent_attention", "multi_layer", "echo"]


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_side_does_not_change_vectors(decoder_dir: Path, pooling: str) -> None:
    if pooling == "weightedmean" and not weighted_mean_handles_left_padding():
        pytest.skip("sentence-transformers < 6.1: weightedmean refuses left padding (tested below)")
    opts = dict(SMALL_HEADS, zero_init_heads=False, seed=3, prompts={"query": PROMPT})
    right = build_embedder(decoder_dir, pooling=pooling, padding_side="right", **opts)
    left = build_embedder(decoder_dir, pooling=pooling, padding_side="left", **opts)
    np.testing.assert_allclose(_encode(right, TEXTS), _encode(left, TEXTS), atol=2e-5)
    # instruction tokens are excluded on both sides alike
    np.testing.assert_allclose(_encode(right, TEXTS, prompt_name="query"), _encode(left, TEXTS, prompt_name="query"),
                               atol=2e-5)


def test_weighted_mean_with_left_padding_needs_a_fixed_sentence_transformers(
    decoder_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedder_module, "weighted_mean_handles_left_padding", lambda: False)
    with pytest.raises(ValueError, match="sentence-transformers >= 6.1"):
        build_embedder(decoder_dir, pooling="weightedmean", padding_side="left")
    build_embedder(decoder_dir, pooling="weightedmean", padding_side="right")  # right padding is right everywhere
    build_embedder(decoder_dir, pooling="mean", padding_side="left")


def test_left_padded_weighted_mean_loads_right_padded_on_an_old_sentence_transformers(
    decoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weightedmean model saved with left padding (possible on sentence-transformers >= 6.1) and loaded where the
    weighted mean ignores padding (< 6.1) pads on the right instead, and its padded rows keep their vectors."""
    import json

    from embedforge.model import load_model

    right = build_embedder(decoder_dir, pooling="weightedmean", padding_side="right")
    right.save(str(tmp_path))
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "left"}))
    alone = np.stack([_encode(right, [t])[0] for t in TEXTS])

    if weighted_mean_handles_left_padding():  # the installed version pools left padding right: kept
        assert load_model(tmp_path)[0].tokenizer.padding_side == "left"
    import embedforge.modules.prompts as prompts_module

    monkeypatch.setattr(prompts_module, "weighted_mean_handles_left_padding", lambda: False)
    old = load_model(tmp_path)
    assert old[0].tokenizer.padding_side == "right"
    np.testing.assert_allclose(_encode(old, TEXTS), alone, atol=2e-5)
    mean = build_embedder(decoder_dir, pooling="mean", padding_side="left")
    mean.save(str(tmp_path / "mean"))
    assert load_model(tmp_path / "mean")[0].tokenizer.padding_side == "left"  # other poolings: untouched


@pytest.mark.parametrize("pooling", POOLINGS)
def test_save_load_same_vectors(decoder_dir: Path, tmp_path: Path, pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.modules import load_embedder

    emb = build_embedder(decoder_dir, pooling=pooling, prompts={"query": PROMPT}, zero_init_heads=False,
                         **SMALL_HEADS)
    emb.save(str(tmp_path))
    want, want_q = _encode(emb, TEXTS), emb.encode_query(TEXTS, convert_to_numpy=True)
    loaders = [load_embedder(str(tmp_path))]
    if pooling in ("mean", "weightedmean", "lasttoken"):  # only sentence-transformers modules: plain load works
        loaders.append(SentenceTransformer(str(tmp_path), device="cpu"))
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            SentenceTransformer(str(tmp_path), device="cpu")
        loaders.append(SentenceTransformer(str(tmp_path), device="cpu", trust_remote_code=True))
    for loaded in loaders:
        assert loaded[0].auto_model.config.is_causal is False
        assert loaded.prompts.get("query") == PROMPT
        np.testing.assert_allclose(_encode(loaded, TEXTS), want, atol=1e-6)
        np.testing.assert_allclose(loaded.encode_query(TEXTS, convert_to_numpy=True), want_q, atol=1e-6)


def test_chat_template_is_never_applied(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tiny_decoder("llama", tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}<s>user {{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(path)
    emb = build_embedder(path, pooling="mean")
    assert list(emb[0].modality_config) == ["text"]
    got = emb.preprocess(["a man is playing"])["input_ids"][0].tolist()
    assert got == tok("a man is playing")["input_ids"]


def test_causal_option_and_missing_pad_token(decoder_dir: Path, reference) -> None:
    model, tok = reference
    causal = build_embedder(decoder_dir, pooling="mean", bidirectional=False)
    assert causal[0].auto_model.config.is_causal is True
    # with causal attention the first token's state ignores what follows
    ids = tok(TEXTS[0])["input_ids"]
    with torch.no_grad():
        a = causal[0].auto_model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, 0]
        b = causal[0].auto_model(input_ids=torch.tensor([ids[:-1] + [7]]), use_cache=False).last_hidden_state[0, 0]
    torch.testing.assert_close(a, b)

    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    ensure_pad_token(no_pad)
    assert no_pad.pad_token == no_pad.unk_token == "<unk>"
    with pytest.raises(ValueError, match="prompts"):
        build_embedder(decoder_dir, prompts={"passage": "p: "})


@pytest.mark.parametrize("pooling", ["mean", "lasttoken", "latent_attention", "echo"])
def test_bfloat16_backbone_stays_close_to_float32(decoder_dir: Path, pooling: str) -> None:
    fp32 = build_embedder(decoder_dir, pooling=pooling, **SMALL_HEADS)
    bf16 = build_embedder(decoder_dir, pooling=pooling, dtype="bfloat16", **SMALL_HEADS)
    assert bf16[0].auto_model.dtype == torch.bfloat16
    a, b = _encode(fp32, TEXTS), np.asarray(_encode(bf16, TEXTS), dtype=np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.isfinite(b).all() and cosine.min() > 0.98


def test_prompt_ending_in_a_merging_space_is_refused(tmp_path: Path) -> None:
    from embedforge.configs import ConfigError
    from embedforge.convert.embedder import prompt_merges_with_text

    tok = tiny_tokenizer(vocab_size=300)  # large enough to learn the merge "Ġa"
    assert prompt_merges_with_text(tok, "query: ")  # [..., ':', 'Ġ'] alone, [..., ':', 'Ġa', ...] before "a man"
    assert not prompt_merges_with_text(tok, "query:\n") and not prompt_merges_with_text(tok, "query:")
    path = tiny_decoder("llama", tmp_path / "m")
    tok.save_pretrained(path)
    with pytest.raises(ConfigError, match="query_prompt: 'query: ' ends in a token that the tokenizer merges"):
        build_embedder(path, prompts={"query": "query: "})
