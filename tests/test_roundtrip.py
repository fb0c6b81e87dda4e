"""What a stage writes loads back as what it is: a kept LoRA adapter through load_model, eval and export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedforge.cli import main
from embedforge.testing import sample_texts

TEXTS = sample_texts()[:6] + ["a", "dogs"]


def _vectors(model) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One recipe run: contrastive LoRA with ``adapter: keep`` on a tiny Llama, then the export of its output."""
    from embedforge.convert.embedder import build_embedder
    from embedforge.model import save_model
    from embedforge.testing import tiny_decoder

    root = tmp_path_factory.mktemp("roundtrip")
    llm = tiny_decoder("llama", root / "llm")
    embedder = save_model(build_embedder(llm, pooling="mean", bidirectional=True, max_seq_length=32),
                          root / "embedder", stage="convert", source=os.fspath(llm))
    t = sample_texts()
    triplets = root / "triplets.jsonl"
    with triplets.open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"anchor": f"{t[i % 10]} {i}", "positive": t[(i + 1) % 10],
                                 "negative": t[(i + 5) % 10]}) + "\n")
    sts = root / "sts.jsonl"
    with sts.open("w") as fh:
        for i in range(30):
            fh.write(json.dumps({"sentence1": t[i % 10], "sentence2": t[(i * 3 + 1) % 10],
                                 "score": float((i * 7) % 11) / 2}) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""# embedforge run recipe.yaml
stages:
  - name: tuned
    stage: contrastive
    model: {embedder}
    out: {root}/tuned
    data: [{triplets}]
    adapter: keep
    train: {{batch_size: 4, max_steps: 6, learning_rate: 0.05, logging_steps: 1}}
    lora_r: 4
    lora_alpha: 8
    lora_dropout: 0.0
    max_seq_length: 32
  - name: export
    stage: export
    model: ${{stages.tuned.out}}
    out: {root}/export
    fp16: false
    int8: []
    last_hidden_state: false
    optimize: none
""")
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    return {"embedder": embedder, "tuned": root / "tuned", "export": root / "export", "sts": sts}


@pytest.fixture(scope="module")
def reference(kept_run: dict[str, Path]) -> dict[str, np.ndarray]:
    """The adapted model's vectors (peft wrapper, adapter unmerged) and the bare backbone's."""
    from embedforge.convert.train_model import load_with_adapter
    from embedforge.modules import load_embedder

    adapted = _vectors(load_with_adapter(kept_run["tuned"]))
    backbone = _vectors(load_embedder(kept_run["tuned"]))
    assert np.abs(adapted - backbone).max() > 1e-2, "training must move the vectors for these tests to mean much"
    return {"adapted": adapted, "backbone": backbone}


def test_load_model_puts_kept_adapter_back(kept_run: dict[str, Path], reference: dict[str, np.ndarray]) -> None:
    from peft import PeftModel

    from embedforge.model import load_model, read_lineage

    assert read_lineage(kept_run["tuned"])["extra"]["adapter"] == "adapter"
    merged = _vectors(load_model(kept_run["tuned"]))
    np.testing.assert_allclose(merged, reference["adapted"], atol=1e-4)
    assert np.abs(merged - reference["backbone"]).max() > 1e-2
    wrapped = load_model(kept_run["tuned"], merge_adapter=False)
    assert isinstance(wrapped[0].auto_model, PeftModel)
    np.testing.assert_allclose(_vectors(wrapped), reference["adapted"], atol=1e-5)


def test_eval_cli_scores_the_adapted_model(kept_run: dict[str, Path], tmp_path: Path) -> None:
    from embedforge.convert.train_model import load_with_adapter
    from embedforge.evaluation import evaluate
    from embedforge.modules import load_embedder

    task = f"sts:{kept_run['sts']}"
    adapted = evaluate(load_with_adapter(kept_run["tuned"]), [task], show_progress=False)[task]["spearman"]
    backbone = evaluate(load_embedder(kept_run["tuned"]), [task], show_progress=False)[task]["spearman"]
    assert abs(adapted - backbone) > 0.5
    res = CliRunner().invoke(main, ["eval", str(kept_run["tuned"]), "--task", task, "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    cli_score = json.loads((tmp_path / "e" / "metrics.json").read_text())[task]["spearman"]
    assert cli_score == pytest.approx(adapted, abs=1e-3)


def test_export_traces_and_checks_the_adapted_model(kept_run: dict[str, Path],
                                                    reference: dict[str, np.ndarray]) -> None:
    from embedforge.export.encoder import OnnxEncoder

    onnx = OnnxEncoder(kept_run["export"]).encode(TEXTS, batch_size=4)
    adapted = reference["adapted"] / np.linalg.norm(reference["adapted"], axis=1, keepdims=True)
    backbone = reference["backbone"] / np.linalg.norm(reference["backbone"], axis=1, keepdims=True)
    np.testing.assert_allclose(onnx, adapted, atol=1e-4)
    assert np.abs(onnx - backbone).max() > 1e-2
    manifest = json.loads((kept_run["export"] / "manifest.json").read_text())
    assert "merged into the exported weights" in manifest["source_model"]["adapter"]


def test_load_model_refuses_a_recorded_adapter_that_is_missing(kept_run: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from embedforge.errors import UsageError
    from embedforge.model import load_model

    copy = tmp_path / "copy"
    shutil.copytree(kept_run["tuned"], copy)
    shutil.rmtree(copy / "adapter")
    with pytest.raises(UsageError, match=r"records a kept LoRA adapter but .*adapter_config.json is missing"):
        load_model(copy)


def test_load_model_reapplies_quanto_weights(tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    from embedforge.compress.config import CompressConfig
    from embedforge.compress.pipeline import run
    from embedforge.compress.weights import load_compressed
    from embedforge.configs import StageContext
    from embedforge.model import load_model
    from embedforge.testing import tiny_bert_st

    out = tmp_path / "quanto"
    run(CompressConfig(model=str(tiny_bert_st(tmp_path / "bert")), weights="quanto-int8"), out, StageContext())
    loaded = load_model(out)
    assert any(type(m).__name__ == "QLinear" for m in loaded.modules())
    np.testing.assert_allclose(_vectors(loaded), _vectors(load_compressed(out)), atol=1e-6)
    floats = load_model(out, weight_quantization=False)  # what export traces from
    assert not any(type(m).__name__ == "QLinear" for m in floats.modules())


# ------------------------------------------------------------------------------- prompts left out of pooling

@pytest.fixture(scope="module")
def merging_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose byte-level BPE has learnt merges such as "Ġthe" (the default tiny one has none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from embedforge.testing import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=300)
    assert tok.convert_ids_to_tokens(tok("query: the")["input_ids"])[-1] == "Ġthe"
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("merging") / "llm"
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_prompt_that_merges_with_the_text_is_refused(merging_llm: Path, tmp_path: Path) -> None:
    from embedforge.configs import ConfigError
    from embedforge.convert.config import ConvertConfig
    from embedforge.convert.embedder import build_embedder
    from embedforge.convert.pipeline import run_convert
    from embedforge.configs import StageContext

    with pytest.raises(ConfigError, match=r"^query_prompt: 'query: ' ends in a token that the tokenizer merges with "
                                          r"the text's first word.*end it with a newline instead, e.g. 'query:\\n'$"):
        run_convert(ConvertConfig(model=str(merging_llm), query_prompt="query: "), tmp_path / "out", StageContext())
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="^doc_prompt: 'passage: '"):
        build_embedder(merging_llm, prompts={"document": "passage: "})
    # Included prompts and echo pooling count their own tokens: nothing to refuse.
    build_embedder(merging_llm, prompts={"query": "query: "}, include_prompt=True)


def test_one_word_query_pools_its_own_tokens(merging_llm: Path) -> None:
    import torch

    from embedforge.convert.embedder import build_embedder

    model = build_embedder(merging_llm, pooling="mean", normalize=False, prompts={"query": "query:\n"})
    tok = model[0].tokenizer
    for word in ("the", "a", "dogs"):
        ids = tok("query:\n" + word)["input_ids"]
        n_prompt = len(tok("query:\n")["input_ids"])
        assert len(ids) > n_prompt  # the text keeps at least one token of its own
        with torch.inference_mode():
            pooled = model.encode([word], prompt_name="query", convert_to_numpy=True)[0]
            tokens = model.encode([word], prompt_name="query", output_value="token_embeddings")[0].numpy()
        assert np.linalg.norm(pooled) > 1e-3
        np.testing.assert_allclose(pooled, tokens[n_prompt:].mean(0), atol=1e-5)


def test_contrastive_prompts_are_checked_before_training(merging_llm: Path, tmp_path: Path) -> None:
    from embedforge.configs import ConfigError, StageContext
    from embedforge.convert.embedder import build_embedder
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.training import run_contrastive
    from embedforge.model import save_model
    from embedforge.training.options import TrainOptions

    embedder = save_model(build_embedder(merging_llm, max_seq_length=32), tmp_path / "embedder", stage="convert",
                          source=str(merging_llm))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": t, "positive": t[::-1]}) + "\n" for t in sample_texts()))
    common = dict(model=str(embedder), data=[str(pairs)], train=TrainOptions(batch_size=4, max_steps=2), lora_r=4,
                  lora_alpha=8)
    with pytest.raises(ConfigError, match=r"^prompts\.pair: no data set of this stage is named 'pair' "
                                          r"\(its data sets: pairs\)$"):
        ContrastiveConfig(**common, prompts={"pair": "Find the related sentence:\n"})
    with pytest.raises(ConfigError, match=r"^prompts\.pairs: 'Find the related sentence: ' ends in a token"):
        run_contrastive(ContrastiveConfig(**common, prompts={"pairs": "Find the related sentence: "}),
                        tmp_path / "tuned", StageContext())
    assert not (tmp_path / "tuned").exists() and not (tmp_path / "tuned.ckpt").exists()


def test_load_model_warns_about_a_saved_merging_prompt(merging_llm: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from embedforge.convert.embedder import build_embedder
    from embedforge.model import load_model, save_model

    model = build_embedder(merging_llm, prompts={"query": "query:\n"})
    model.prompts["query"] = "query: "  # as saved before embedforge refused such prompts
    out = save_model(model, tmp_path / "old", stage="convert", source=str(merging_llm))
    with caplog.at_level(logging.WARNING, logger="embedforge.modules.loading"):
        load_model(out)
    assert "prompts.query: 'query: ' ends in a token that the tokenizer merges" in caplog.text


def test_load_model_refuses_bitsandbytes_weights_without_a_gpu(tiny_st_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from embedforge.errors import UsageError
    from embedforge.model import load_model

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    copy = shutil.copytree(tiny_st_dir, tmp_path / "bnb")
    (copy / "weight_quantization.json").write_text(json.dumps({"method": "bitsandbytes", "bits": 8}))
    with pytest.raises(UsageError, match=r"bnb holds bitsandbytes-quantized weights, which load only on a CUDA GPU: "
                                         r"bitsandbytes 8-bit/4-bit weights need a CUDA GPU"):
        load_model(copy)
    (copy / "weight_quantization.json").write_text(json.dumps({"method": "gptq"}))
    with pytest.raises(UsageError, match=r"unknown weight quantization method 'gptq'"):
        load_model(copy)


def test_export_of_a_quanto_model_says_it_traced_the_float_weights(tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    from embedforge.compress.config import CompressConfig
    from embedforge.compress.pipeline import run
    from embedforge.configs import StageContext
    from embedforge.export.config import ExportConfig
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model
    from embedforge.model import load_model
    from embedforge.testing import tiny_bert_st

    compressed = tmp_path / "quanto"
    run(CompressConfig(model=str(tiny_bert_st(tmp_path / "bert")), weights="quanto-int8"), compressed,
        StageContext())
    out = export_model(ExportConfig(model=str(compressed), fp16=False, int8=[], last_hidden_state=False,
                                    optimize="none"), tmp_path / "export")
    note = json.loads((out / "manifest.json").read_text())["source_model"]["weight_quantization"]
    assert note.startswith("quanto weight quantization not applied")
    floats = _vectors(load_model(compressed, weight_quantization=False))
    np.testing.assert_allclose(OnnxEncoder(out).encode(TEXTS, batch_size=4), floats, atol=1e-5)


def test_eval_and_teacher_prompts_that_merge_are_refused(merging_llm: Path, tmp_path: Path) -> None:
    from embedforge.configs import ConfigError
    from embedforge.convert.embedder import build_embedder
    from embedforge.distill.teacher import EncodeSettings, encode_teacher
    from embedforge.model import save_model

    model_dir = save_model(build_embedder(merging_llm, max_seq_length=32), tmp_path / "m", stage="convert",
                           source=str(merging_llm))
    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": t, "sentence2": t[::-1], "score": i % 5}) + "\n"
                           for i, t in enumerate(sample_texts())))
    res = CliRunner().invoke(main, ["eval", str(model_dir), "--task", f"sts:{sts}", "--query-prompt", "query: "])
    assert res.exit_code == 2, res.output  # a usage error: one line, no traceback
    assert res.output.splitlines()[-1].startswith(
        "Error: query_prompt: 'query: ' ends in a token that the tokenizer merges")
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["eval", str(model_dir), "--task", f"sts:{sts}", "--query-prompt", "query:\n"])
    assert res.exit_code == 0, res.output
    with pytest.raises(ConfigError, match=r"^teacher_prompt: 'query: ' ends in a token"):
        encode_teacher(str(model_dir), sample_texts(), tmp_path / "cache", EncodeSettings(prompt="query: "),
                       show_progress=False)
    assert not list((tmp_path / "cache" / "teacher-vectors").glob("*/shard-*.npy"))  # nothing encoded
