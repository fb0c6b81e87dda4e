"""The main-job recipes (quickstart, distill-student, llm2vec-gpu) build their typed configs, chain their stages as
documented, and a QLoRA stage is refused before the stages ahead of it run on a machine that cannot run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from embedforge.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _stages(name: str) -> dict[str, Any]:
    recipe = load_recipe(RECIPES / name)
    return {s.name: s for s in recipe.stages}


def _out(stage: Any) -> str:
    return str(stage.out)


def test_quickstart_is_the_whole_chain() -> None:
    stages = _stages("quickstart.yaml")
    assert [s.stage for s in stages.values()] == ["convert", "distill", "export", "eval"]
    distill, export, ev = stages["distilled"].config, stages["onnx"].config, stages["eval"].config
    assert distill.student_model == _out(stages["embedder"]) and distill.matryoshka_dims == [256, 128, 64]
    assert "scifact-corpus" in distill.texts and distill.train.precision.value == "bf16"
    # 300 steps of 64 texts: the step budget alone ends the run (one pass would be 330 steps)
    assert (distill.train.max_steps, distill.train.epochs, distill.train.batch_size) == (300, None, 64)
    assert (distill.train.learning_rate, distill.train.seed) == (2e-4, 42)
    assert export.model == _out(stages["distilled"]) and export.binary and export.int8
    assert ev.export == _out(stages["onnx"]) and ev.binary_rescore and ev.truncate_dims == [256, 128, 64]
    assert ev.tasks == ["stsb-dev", "sick-trial", "scifact-dev"]


def test_distill_student_has_two_students_each_exported_and_evaluated() -> None:
    stages = _stages("distill-student.yaml")
    assert {stages["layers"].config.student.value, stages["static"].config.student.value} == {"layers", "static"}
    for student in ("layers", "static"):
        assert stages[f"{student}_onnx"].config.model == _out(stages[student])
        ev = stages[f"eval_{student}"].config
        assert ev.model == _out(stages[student]) and ev.export == _out(stages[f"{student}_onnx"])
    layers, static = stages["layers"].config.train, stages["static"].config.train
    assert (layers.batch_size, layers.epochs, layers.max_steps, layers.learning_rate) == (64, 1.0, None, 2e-4)
    assert (static.batch_size, static.epochs, static.learning_rate, static.warmup_ratio) == (256, 2.0, 0.01, 0.0)
    assert layers.seed == static.seed == 42


def test_llm2vec_gpu_names_its_measurement_status_and_uses_qlora() -> None:
    text = (RECIPES / "llm2vec-gpu.yaml").read_text()
    assert "No GPU was available" in text
    stages = _stages("llm2vec-gpu.yaml")
    assert [s.stage for s in stages.values()][:4] == ["convert", "mntp", "simcse", "contrastive"]
    assert stages["embedder"].config.bidirectional
    assert stages["simcse"].config.quantization.value == "4bit"
    assert stages["contrastive"].config.quantization.value == "4bit"


def test_qlora_stage_without_cuda_stops_before_the_first_stage(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine can run QLoRA")
    from embedforge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: q
stages:
  - name: embedder
    stage: convert
    out: {tmp_path / 'embedder'}
    model: smollm2-135m
    layers: 1
  - name: tune
    stage: contrastive
    model: ${{stages.embedder.out}}
    out: {tmp_path / 'tuned'}
    data: [scifact-train-pairs]
    quantization: 4bit
""")
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert errors[0].startswith("Error: stage 'tune': quantization: 4bit (QLoRA) needs a CUDA GPU"), res.output
    assert not (tmp_path / "embedder").exists() and not (tmp_path / "tuned").exists()
