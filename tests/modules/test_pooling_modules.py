"""Unit tests of the pooling heads on synthetic tensors: each against an independent computation, save/load,
padding-side invariance and ONNX export with dynamic batch and sequence axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedforge.modules.common import masked_mean, pooling_mask
from embedforge.modules.echo import EchoPooling
from embedforge.modules.latent_attention import LatentAttentionPooling
from embedforge.modules.multilayer import MultiLayerPooling

DIM = 16


def _batch(seed: int = 0, lengths: tuple[int, ...] = (7, 4, 5), side: str = "right", width: int | None = None):
    """Random token states for rows of the given lengths, padded on ``side``; returns (states, mask, rows)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    rows = [torch.randn(n, DIM, generator=g) for n in lengths]
    states = torch.randn(len(lengths), width, DIM, generator=g) * 100  # garbage at pads must not leak
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        states[i, span] = row
        mask[i, span] = 1
    return states, mask, rows


def _pad_to_side(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the left end (right padding) -> (states, mask) left-padded instead."""
    out, out_mask = torch.zeros_like(x), torch.zeros_like(mask)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        idx = mask[i].nonzero().squeeze(1)
        out[i, -n:] = x[i, idx]
        out_mask[i, -n:] = 1
    return out, out_mask


# --------------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_mean_matches_numpy(side: str) -> None:
    states, mask, rows = _batch(side=side)
    got = masked_mean(states, mask).numpy()
    want = np.stack([r.numpy().mean(axis=0) for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_mask_drops_prompt_tokens(side: str) -> None:
    states, mask, rows = _batch(side=side)
    features = {"token_embeddings": states, "attention_mask": mask, "prompt_length": 2}
    pm = pooling_mask(features, include_prompt=False)
    for i, row in enumerate(rows):
        real = mask[i].nonzero().squeeze(1)
        assert pm[i, real[:2]].sum() == 0 and pm[i, real[2:]].sum() == len(row) - 2
        assert pm[i][mask[i] == 0].sum() == 0
    assert torch.equal(pooling_mask(features, include_prompt=True), mask)
    features["prompt_length"] = torch.tensor([2])  # the trainer passes a tensor
    assert torch.equal(pooling_mask(features, include_prompt=False), pm)


# ------------------------------------------------------------------------------------------ latent attention
def _latent_reference(head: LatentAttentionPooling, states: torch.Tensor, rows_mask: torch.Tensor) -> np.ndarray:
    """NV-Embed's block recomputed with torch.nn.MultiheadAttention and a hand-written GEGLU."""
    mha = torch.nn.MultiheadAttention(DIM, head.num_heads, batch_first=True, bias=False)
    att = head.attention
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([att.to_q.weight, att.to_k.weight, att.to_v.weight]))
        mha.out_proj.weight.copy_(att.to_out.weight)
    out = []
    with torch.no_grad():
        for i in range(states.shape[0]):
            h = states[i][rows_mask[i] == 1].unsqueeze(0)
            lat = torch.nn.functional.layer_norm(head.latents, (DIM,), head.norm_latents.weight, head.norm_latents.bias)
            q = torch.nn.functional.layer_norm(h, (DIM,), head.norm_query.weight, head.norm_query.bias)
            h = h + mha(q, lat.unsqueeze(0), lat.unsqueeze(0), need_weights=False)[0] + att.to_out.bias
            x = torch.nn.functional.layer_norm(h, (DIM,), head.norm_mlp.weight, head.norm_mlp.bias)
            a = x @ head.mlp.proj_in.weight.T + head.mlp.proj_in.bias
            value, gate = a[..., : a.shape[-1] // 2], a[..., a.shape[-1] // 2:]
            g = 0.5 * gate * (1 + torch.erf(gate / np.sqrt(2.0)))
            h = h + (value * g) @ head.mlp.proj_out.weight.T + head.mlp.proj_out.bias
            out.append(h[0].mean(0).numpy())
    return np.stack(out)


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_latent_attention_matches_reference(side: str) -> None:
    head = LatentAttentionPooling(DIM, num_latents=8, num_heads=4, zero_init=False)
    _randomize(head)
    states, mask, _ = _batch(side=side)
    got = head({"token_embeddings": states, "attention_mask": mask})["sentence_embedding"].detach().numpy()
    np.testing.assert_allclose(got, _latent_reference(head, states, mask), rtol=1e-4, atol=1e-5)


def test_latent_attention_zero_init_is_mean_pooling() -> None:
    head = LatentAttentionPooling(DIM, num_latents=8, num_heads=4)
    states, mask, rows = _batch()
    got = head({"token_embeddings": states, "attention_mask": mask})["sentence_embedding"].detach().numpy()
    np.testing.assert_allclose(got, np.stack([r.numpy().mean(0) for r in rows]), rtol=1e-5, atol=1e-5)
    assert head.latents.shape == (8, DIM)
    assert LatentAttentionPooling(DIM).num_latents == 512  # NV-Embed's default


# -------------------------------------------------------------------------------------------- multi-layer
def _layers(seed: int, side: str, n_states: int = 4):
    g = torch.Generator().manual_seed(seed)
    states, mask, _ = _batch(seed=seed, side=side)
    hidden = tuple(torch.randn(states.shape, generator=g) for _ in range(n_states))
    return hidden, mask


def _multilayer_reference(head: MultiLayerPooling, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> np.ndarray:
    """Per-layer means, layer embeddings, learned queries through nn.MultiheadAttention, mean, residual."""
    mha = torch.nn.MultiheadAttention(DIM, head.num_heads, batch_first=True, bias=False)
    att = head.attention
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([att.to_q.weight, att.to_k.weight, att.to_v.weight]))
        mha.out_proj.weight.copy_(att.to_out.weight)
        out = []
        for i in range(mask.shape[0]):
            keep = mask[i] == 1
            per_layer = torch.stack([hidden[j][i][keep].mean(0) for j in head.layers])
            ctx = torch.nn.functional.layer_norm(per_layer + head.layer_embeddings, (DIM,), head.norm.weight,
                                                 head.norm.bias)
            q = head.queries.unsqueeze(0)
            mixed = (mha(q, ctx.unsqueeze(0), ctx.unsqueeze(0), need_weights=False)[0] + att.to_out.bias)[0].mean(0)
            out.append((per_layer[-1] + mixed @ head.proj.weight.T + head.proj.bias).numpy())
    return np.stack(out)


@pytest.mark.parametrize("side", ["right", "left"])
def test_multilayer_matches_reference(side: str) -> None:
    head = MultiLayerPooling(DIM, num_hidden_states=4, layers=[1, 2, -1], num_queries=3, num_heads=2, zero_init=False)
    _randomize(head)
    hidden, mask = _layers(0, side)
    got = head({"token_embeddings": hidden[-1], "all_layer_embeddings": hidden, "attention_mask": mask})
    np.testing.assert_allclose(got["sentence_embedding"].detach().numpy(), _multilayer_reference(head, hidden, mask),
                               rtol=1e-4, atol=1e-5)
    assert head.layers == [1, 2, 3]


def test_multilayer_zero_init_and_missing_states() -> None:
    head = MultiLayerPooling(DIM, num_hidden_states=4)
    assert head.layers == [1, 2, 3]
    hidden, mask = _layers(0, "right")
    got = head({"token_embeddings": hidden[-1], "all_layer_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(got["sentence_embedding"], masked_mean(hidden[-1], mask))
    with pytest.raises(KeyError, match="output_hidden_states"):
        head({"token_embeddings": hidden[-1], "attention_mask": mask})
    with pytest.raises(ValueError, match="out of range"):
        MultiLayerPooling(DIM, num_hidden_states=4, layers=[4])


# --------------------------------------------------------------------------------------------------- echo
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt", [None, 3])
def test_echo_pools_second_copy(side: str, prompt: int | None) -> None:
    lead, pre, mid, suf = 1, 3, 2, 1
    head = EchoPooling(DIM, leading_tokens=lead, prefix_tokens=pre, middle_tokens=mid, suffix_tokens=suf)
    text_lengths = [4, 1, 6]
    first = lead if prompt is None else prompt
    lengths = tuple(first + pre + L + mid + L + suf for L in text_lengths)
    states, mask, rows = _batch(lengths=lengths, side=side)
    features = {"token_embeddings": states, "attention_mask": mask}
    if prompt is not None:
        features["prompt_length"] = prompt
    got = head(features)["sentence_embedding"].numpy()
    want = []
    for row, L in zip(rows, text_lengths):
        start = first + pre + L + mid  # by hand: skip leading, prefix, the first copy and the middle
        want.append(row[start:start + L].numpy().mean(0))
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- save / load
def _heads() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    latent = LatentAttentionPooling(DIM, num_latents=8, num_heads=4, zero_init=False)
    multi = MultiLayerPooling(DIM, num_hidden_states=4, num_queries=2, num_heads=2, zero_init=False)
    _randomize(latent, 3)
    _randomize(multi, 4)
    return {"latent": latent, "multi": multi, "echo": EchoPooling(DIM, 1, 2, 1, 0)}


def _features(name: str, side: str = "right") -> dict:
    hidden, mask = _layers(5, side)
    return {"token_embeddings": hidden[-1], "all_layer_embeddings": hidden, "attention_mask": mask}


@pytest.mark.parametrize("name", ["latent", "multi", "echo"])
def test_save_load_same_vectors(name: str, tmp_path) -> None:
    head = _heads()[name]
    head.save(str(tmp_path))
    loaded = type(head).load(str(tmp_path))
    assert loaded.get_config_dict() == head.get_config_dict()
    a = head(_features(name))["sentence_embedding"]
    b = loaded(_features(name))["sentence_embedding"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["latent", "multi"])
def test_padding_side_invariance(name: str) -> None:
    head = _heads()[name]
    feats = _features(name, "right")
    left_hidden, left_mask = zip(*(_pad_to_side(h, feats["attention_mask"]) for h in feats["all_layer_embeddings"]))
    left = {"token_embeddings": left_hidden[-1], "all_layer_embeddings": left_hidden, "attention_mask": left_mask[0]}
    torch.testing.assert_close(head(feats)["sentence_embedding"], head(left)["sentence_embedding"],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- ONNX
class _Wrapped(torch.nn.Module):
    """(token states, mask[, more hidden states]) -> sentence embedding, for tracing."""

    def __init__(self, head: torch.nn.Module, n_states: int = 0) -> None:
        super().__init__()
        self.head, self.n_states = head, n_states

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, *hidden: torch.Tensor) -> torch.Tensor:
        features = {"token_embeddings": tokens, "attention_mask": mask}
        if self.n_states:
            features["all_layer_embeddings"] = (*hidden, tokens)
        return self.head(features)["sentence_embedding"]


@pytest.mark.parametrize(("name", "dynamo"), [("latent", False), ("multi", False), ("echo", False), ("echo", True)])
def test_onnx_export_dynamic_axes(name: str, dynamo: bool, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    head = _heads()[name].eval()
    n_extra = 3 if name == "multi" else 0
    wrapped = _Wrapped(head, n_extra + 1 if n_extra else 0).eval()

    def inputs(batch: int, seq: int, seed: int, side: str):
        g = torch.Generator().manual_seed(seed)
        toks = torch.randn(batch, seq, DIM, generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if side == "right":
            mask[0, seq - 3:] = 0
        else:
            mask[-1, :2] = 0
        return (toks, mask, *[torch.randn(batch, seq, DIM, generator=g) for _ in range(n_extra)])

    names = ["tokens", "mask"] + [f"h{i}" for i in range(n_extra)]
    path = tmp_path / f"{name}.onnx"
    example = inputs(2, 12, 0, "right")
    if dynamo:  # torch.export based exporter (the default from torch 2.9 on)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(wrapped, example, str(path), dynamo=True, input_names=names, output_names=["emb"],
                          dynamic_shapes=[{0: batch, 1: seq} for _ in names])
    else:  # TorchScript tracing exporter
        torch.onnx.export(wrapped, example, str(path), dynamo=False, input_names=names, output_names=["emb"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq, side in [(3, 17, "right"), (1, 13, "left"), (4, 15, "left")]:
        args = inputs(batch, seq, batch + seq, side)
        wanted = {i.name for i in session.get_inputs()}  # unused hidden states are pruned from the graph
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args) if n in wanted})[0]
        np.testing.assert_allclose(got, wrapped(*args).detach().numpy(), rtol=1e-4, atol=1e-5)
