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
    batch_size: 4
    max_steps: 6
    learning_rate: 0.05
    lora_r: 4
    lora_alpha: 8
    lora_dropout: 0.0
    max_seq_length: 32
    logging_steps: 1
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
