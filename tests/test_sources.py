"""Model sources: directories, hub ids, aliases and GGUF caching."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedforge.sources import SourceError, resolve_source


def test_local_directory_and_hub_id(tmp_path: Path) -> None:
    assert resolve_source(tmp_path) == tmp_path
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        resolve_source(str(tmp_path / "nope" / "model"))
    with pytest.raises(SourceError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "model.gguf"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(SourceError, match="is a file"):
        resolve_source(str(f))


def test_gguf_is_dequantized_once_and_cached(tmp_path: Path, isolated_cache: Path) -> None:
    """Write a real GGUF file from a tiny Llama with the gguf package, then load it through resolve_source."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from embedforge.testing import tiny_config

    cfg = tiny_config("llama", vocab_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(gguf, model, cfg, path)
    resolved = resolve_source(str(path))
    assert Path(resolved).is_dir() and (Path(resolved) / "model.safetensors").is_file()
    assert isolated_cache in Path(resolved).parents
    stamp = (Path(resolved) / "model.safetensors").stat().st_mtime_ns
    assert resolve_source(str(path)) == resolved
    assert (Path(resolved) / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    loaded = AutoModelForCausalLM.from_pretrained(resolved).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    np.testing.assert_allclose(loaded(ids).logits.detach().numpy(), model(ids).logits.detach().numpy(), atol=1e-4)


def _write_llama_gguf(gguf, model, cfg, path: Path) -> None:
    """A minimal llama GGUF (f32 tensors, GGML names, a tiny 'llama' tokenizer) for the loader test."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    tokens = [f"t{i}" for i in range(cfg.vocab_size)]
    w.add_token_list(tokens)
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(x: np.ndarray, n_head: int) -> np.ndarray:
        # llama.cpp stores q/k rows interleaved for its rope; transformers undoes this on load.
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_alias_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedforge import sources

    monkeypatch.setitem(sources.ALIASES, "fake-model", sources.Alias("no_such_pkg_xyz", "m", "pip install fake"))
    with pytest.raises(SourceError, match="pip install fake"):
        resolve_source("fake-model")
