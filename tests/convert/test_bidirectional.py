"""Bidirectional attention through ``config.is_causal=False`` on tiny random decoders of every supported family."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from embedforge.convert.bidirectional import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    is_bidirectional,
    set_bidirectional,
)
from embedforge.testing import ARCHS, tiny_decoder

# attention kernels per family (Gemma 2 has no sdpa path in transformers)
CASES = [(arch, impl) for arch in ARCHS for impl in ("eager", "sdpa") if not (arch == "gemma2" and impl == "sdpa")]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {arch: tiny_decoder(arch, root / arch) for arch in ARCHS}


def _load(path: Path, impl: str = "eager") -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation=impl).eval()


def _states(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _first_token_sees_last(model: torch.nn.Module, with_mask: bool = False) -> bool:
    """Does the first token's state change when only the last token changes? (computed here, not by the lib)"""
    a = torch.tensor([[5, 9, 13, 17, 21, 25]], device=next(model.parameters()).device)
    b = a.clone()
    b[0, -1] = 30
    mask = torch.ones_like(a) if with_mask else None
    return not torch.allclose(_states(model, a, mask)[0, 0], _states(model, b, mask)[0, 0], atol=1e-6, rtol=0)


def test_every_tiny_family_is_listed_as_supported() -> None:
    from embedforge.testing import tiny_config

    for arch in ARCHS:
        assert tiny_config(arch, 64).model_type in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize(("arch", "impl"), CASES)
def test_first_token_sees_future_only_when_bidirectional(tiny_dirs: dict[str, Path], arch: str, impl: str) -> None:
    model = _load(tiny_dirs[arch], impl)
    assert not _first_token_sees_last(model) and not _first_token_sees_last(model, with_mask=True)
    set_bidirectional(model)
    assert is_bidirectional(model)
    assert _first_token_sees_last(model) and _first_token_sees_last(model, with_mask=True)
    set_bidirectional(model, False)
    assert not _first_token_sees_last(model)


@pytest.mark.parametrize(("arch", "impl"), CASES)
def test_padding_does_not_change_real_tokens(tiny_dirs: dict[str, Path], arch: str, impl: str) -> None:
    model = _load(tiny_dirs[arch], impl)
    long = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])
    short = torch.tensor([[7, 11, 15, 19]])
    pad = torch.zeros(1, 3, dtype=torch.long)
    for bidirectional in (True, False):
        set_bidirectional(model, bidirectional)
        alone = _states(model, short)[0]
        for side in ("right", "left"):
            padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
            mask = (torch.arange(7) < 4) if side == "right" else (torch.arange(7) >= 3)
            states = _states(model, torch.cat([long, padded]), torch.stack([torch.ones(7), mask]).long())
            real = states[1, :4] if side == "right" else states[1, 3:]
            # rotary positions are relative, so a left-padded row matches the unpadded one too
            torch.testing.assert_close(real, alone, rtol=1e-4, atol=1e-4, msg=f"{side} padding, {bidirectional=}")
            torch.testing.assert_close(states[0], _states(model, long)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("EMBEDFORGE_SLOW") != "1",
    reason="flex attention compiles for ~90 s on CPU; runs on GPU or with EMBEDFORGE_SLOW=1",
)
def test_flex_attention(tmp_path: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # flex attention's GPU kernels need a head dimension of at least 16 (the shared tiny models have 8)
    src = tiny_decoder("llama", tmp_path / "llama-hd16", hidden_size=64, intermediate_size=128)
    flex = set_bidirectional(_load(src, "flex_attention").to(device))
    eager = set_bidirectional(_load(src, "eager").to(device))
    ids = torch.tensor([[5, 9, 13, 17, 21, 25], [7, 11, 15, 19, 0, 0]], device=device)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], device=device)
    torch.testing.assert_close(_states(flex, ids, mask)[:, :4], _states(eager, ids, mask)[:, :4], rtol=1e-4, atol=1e-4)
    assert _first_token_sees_last(flex)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_kept_after_save_and_load(tiny_dirs: dict[str, Path], arch: str, tmp_path: Path) -> None:
    model = set_bidirectional(_load(tiny_dirs[arch]))
    model.save_pretrained(tmp_path)
    again = _load(tmp_path, "sdpa")
    assert again.config.is_causal is False
    assert _first_token_sees_last(again)


def test_kept_under_lora_and_after_merge(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = set_bidirectional(_load(tiny_dirs["llama"], "sdpa"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter non-trivial so the merge changes weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert is_bidirectional(peft_model)
    assert _first_token_sees_last(peft_model)
    ids = torch.tensor([[5, 9, 13, 17]])
    with_adapter = _states(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert merged.config.is_causal is False and _first_token_sees_last(merged)
    torch.testing.assert_close(_states(merged, ids), with_adapter, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path)
    assert _first_token_sees_last(_load(tmp_path))


def test_kept_when_plain_sentence_transformer_loads(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.convert.embedder import build_embedder

    build_embedder(tiny_dirs["qwen2"], pooling="mean").save(str(tmp_path))
    loaded = SentenceTransformer(str(tmp_path), device="cpu")
    backbone = loaded[0].auto_model
    assert backbone.config.is_causal is False and _first_token_sees_last(backbone)
    # and through the sentence-transformers forward: the first token's output depends on a later word
    a = loaded.encode(["dogs are running fast"], output_value="token_embeddings")[0]
    b = loaded.encode(["dogs are running slowly"], output_value="token_embeddings")[0]
    assert not torch.allclose(torch.as_tensor(a)[0], torch.as_tensor(b)[0], atol=1e-6)


def test_unsupported_architecture_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import GPTNeoConfig, GPTNeoModel

    cfg = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=64, max_position_embeddings=64,
                       attention_types=[[["global", "local"], 1]], window_size=8)
    model = GPTNeoModel(cfg).eval()
    with pytest.raises(UnsupportedArchitectureError) as err:
        set_bidirectional(model)
    message = str(err.value)
    assert "gpt_neo" in message and all(t in message for t in ("llama", "mistral", "qwen2", "qwen3", "phi3"))
    assert model.config.is_causal is True  # left causal


def test_untested_architecture_passing_the_probe_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXModel

    cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=64, max_position_embeddings=64)
    model = GPTNeoXModel(cfg).eval()
    with caplog.at_level(logging.WARNING):
        set_bidirectional(model)
    assert "not in the tested list" in caplog.text
    assert _first_token_sees_last(model)
