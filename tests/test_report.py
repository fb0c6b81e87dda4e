"""Run directories and run reports: ``embedforge run --run-dir``, ``embedforge report``, plots, run.json, run.log."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedforge.cli import main
from embedforge.configs import opt
from embedforge.testing import sample_texts

PNG = b"\x89PNG\r\n\x1a\n"
STS_ROWS = ["sentence1\tsentence2\tscore", "a man plays guitar\ta man is playing a guitar\t4.8",
            "a dog runs\tthe stock market fell\t0.2", "a woman cuts an onion\tsomeone slices an onion\t4.0",
            "two dogs run in a field\tdogs are running on grass\t3.9", "the cat sleeps\tthe market rose\t0.4"]


def _recipe(root: Path, llm: Path) -> Path:
    """A tiny recipe: convert -> simcse (training) -> eval at full width and at two Matryoshka dims.

    Its own outs point at ``root/elsewhere``: with --run-dir nothing may be written there.
    """
    sts = root / "sts.tsv"
    sts.write_text("\n".join(STS_ROWS) + "\n")
    texts = root / "texts.jsonl"
    t = sample_texts()
    texts.write_text("".join(json.dumps({"text": f"{t[i % 10]} and {t[(i + 3) % 10]}"}) + "\n" for i in range(16)))
    recipe = root / "tiny.yaml"
    evals = "".join(
        f"  - name: {name}\n    stage: eval\n    out: ${{vars.out}}/{name}\n    model: ${{stages.tune.out}}\n"
        f"    tasks: ['sts:{sts}']\n" + (f"    truncate_dim: {dim}\n" if dim else "")
        for name, dim in (("score", None), ("dim16", 16), ("dim8", 8))
    )
    recipe.write_text(
        "# embedforge run tiny.yaml --run-dir DIR\nname: tiny\n"
        f"vars:\n  out: {root / 'elsewhere'}\nstages:\n"
        f"  - name: emb\n    stage: convert\n    out: ${{vars.out}}/model\n    model: {llm}\n"
        "    pooling: mean\n    max_seq_length: 32\n"
        "  - name: tune\n    stage: simcse\n    out: ${vars.out}/tuned\n    model: ${stages.emb.out}\n"
        f"    data: ['{texts}']\n    train: {{batch_size: 4, max_steps: 3, save_steps: 2, logging_steps: 1}}\n"
        "    max_seq_length: 32\n    lora_r: 4\n    lora_alpha: 8\n"
        + evals
    )
    return recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``(root, run dir, CLI output)`` of the tiny recipe run once with --run-dir."""
    from embedforge.testing import tiny_decoder

    root = tmp_path_factory.mktemp("report")
    recipe = _recipe(root, tiny_decoder("llama", root / "llm"))
    run_dir = root / "runs" / "r1"
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.INFO)  # the console level the CLI sets outside pytest (run.log gets the same records)
    try:
        res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(run_dir)])
    finally:
        logger.setLevel(level)
    assert res.exit_code == 0, res.output
    return root, run_dir, res.output


def test_run_dir_relocates_every_stage(finished_run: tuple[Path, Path, str]) -> None:
    root, run_dir, output = finished_run
    assert not (root / "elsewhere").exists()  # the recipe's own outs are not used
    for name in ("emb", "tune", "score", "dim16", "dim8"):
        assert (run_dir / name / "embedforge.json").is_file(), name
        assert f"{name}: ran -> {run_dir.resolve() / name}" in output
    lineage = json.loads((run_dir / "tune" / "embedforge.json").read_text())
    assert lineage["parents"][0]["path"] == str(run_dir.resolve() / "emb")  # ${stages.emb.out} followed the move
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["format"] == "embedforge-run/1"
    assert [s["name"] for s in run["stages"]] == ["emb", "tune", "score", "dim16", "dim8"]
    for stage in run["stages"]:
        assert stage["status"] == "ran" and stage["seconds"] > 0 and stage["peak_rss_mb"] > 50


def test_report_has_every_plot_as_png_and_a_self_contained_html(finished_run: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = finished_run
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert plots == ["lineage.png", "loss.png", "matryoshka.png", "stages.png", "tradeoff.png"]
    for name in plots:
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
        from PIL import Image

        with Image.open(run_dir / "plots" / name) as img:
            img.verify()
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5
    # no external reference: every src / href is an inline data URI, no stylesheet or script link
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    md = (run_dir / "report.md").read_text()
    for name in plots:
        assert f"](plots/{name})" in md
    # each plot has a caption; the tables carry the numbers (loss table, stage table, lineage with config hashes)
    assert md.count("\n_") >= 5
    assert "| curve | steps | first loss |" in md and "| tune |" in md
    tune_hash = json.loads((run_dir / "tune" / "embedforge.json").read_text())["config_hash"][:12]
    assert tune_hash in md and tune_hash in page
    assert "| dim8 | 8 | float |" in md and "| dim16 | 16 | float |" in md
    assert "Nothing: every stage's output is there." in md


def test_training_stage_records_loss_per_step(finished_run: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = finished_run
    history = json.loads((run_dir / "tune" / "embedforge.json").read_text())["extra"]["train"]["loss_history"]
    assert [step for step, _ in history] == [1, 2, 3]
    assert all(isinstance(loss, float) for _, loss in history)


def test_run_writes_run_log_and_ends_with_a_three_line_summary(finished_run: tuple[Path, Path, str]) -> None:
    _, run_dir, output = finished_run
    log = (run_dir / "run.log").read_text()
    assert "stage tune (simcse)" in log and "report written to" in log
    tail = output.strip().splitlines()[-3:]
    assert tail[0].startswith("run tiny: complete, 5/5 stages done")
    assert tail[1].startswith("best: score ")
    assert tail[2] == f"report: {run_dir.resolve() / 'report.html'}"


def test_report_command_rebuilds_without_rerunning(finished_run: tuple[Path, Path, str]) -> None:
    _, run_dir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/embedforge.json")}
    (run_dir / "report.html").unlink()
    (run_dir / "plots" / "loss.png").unlink()
    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert (run_dir / "report.html").is_file() and (run_dir / "plots" / "loss.png").read_bytes().startswith(PNG)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("*/embedforge.json")} == before
    assert res.output.strip().splitlines()[-1] == f"report: {run_dir.resolve() / 'report.html'}"


def test_report_of_a_half_finished_run_says_what_is_missing(
    finished_run: tuple[Path, Path, str], tmp_path: Path
) -> None:
    root, _, _ = finished_run
    run_dir = tmp_path / "half"
    res = CliRunner().invoke(main, ["run", str(root / "tiny.yaml"), "--run-dir", str(run_dir), "--only", "emb"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    for name, kind in (("tune", "simcse"), ("score", "eval"), ("dim16", "eval"), ("dim8", "eval")):
        assert f"missing: stage {name} ({kind}): not run yet; no output at {run_dir.resolve() / name}" in res.output
    assert "run tiny: complete, 1/5 stages done" in res.output
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["lineage.png", "stages.png"]
    md = (run_dir / "report.md").read_text()
    assert "No tradeoff plot" in md and "No Matryoshka plot" in md and "No loss plot" in md
    assert "- stage tune (simcse): not run yet" in md
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["ran", "pending", "pending", "pending", "pending"]


def test_report_refuses_a_directory_without_run_json(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip() == (f"Error: {tmp_path.resolve()}: no readable run.json, so this is not a run "
                                  "directory; run `embedforge run RECIPE --run-dir DIR` first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_run_dir_refuses_a_directory_embedforge_did_not_make(
    finished_run: tuple[Path, Path, str], tmp_path: Path
) -> None:
    root, _, _ = finished_run
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "thesis.tex").write_text("keep me")
    res = CliRunner().invoke(main, ["run", str(root / "tiny.yaml"), "--run-dir", str(run_dir)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (
        f"Error: --run-dir {run_dir.resolve()}: the directory holds files but no run.json, so embedforge did not "
        "make it; choose a new or empty directory")
    assert sorted(p.name for p in run_dir.iterdir()) == ["thesis.tex"]


def test_run_dir_refuses_a_stage_name_that_is_not_a_directory_name(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - name: plots\n    stage: eval\n    out: x\n    model: some/model\n"
                      "    tasks: [stsb-dev]\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--dry-run"])
    assert res.exit_code == 2
    assert f"Error: {recipe}: stages[0].name: 'plots' cannot name a directory of --run-dir" in res.output
    assert not (tmp_path / "run").exists()


def test_dry_run_shows_the_relocated_outs(finished_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    root, _, _ = finished_run
    res = CliRunner().invoke(main, ["run", str(root / "tiny.yaml"), "--run-dir", str(tmp_path / "d"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"emb (convert) -> {tmp_path.resolve() / 'd' / 'emb'}: will run" in res.output
    assert not (tmp_path / "d").exists()


def test_report_reads_the_artifacts_form_of_metrics(tmp_path: Path) -> None:
    """An eval stage scoring several artifacts (ONNX, int8, binary, Matryoshka dims) in one metrics.json."""
    from embedforge.report import build_report

    run_dir = tmp_path / "run"
    out = run_dir / "evals"
    out.mkdir(parents=True)
    (out / "embedforge.json").write_text(json.dumps({"stage": "eval", "config_hash": "ab" * 32}))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x" * 2**20)
    arts = [{"name": "pytorch", "kind": "pytorch", "size_mb": 500.0, "throughput": 40.0,
             "results": {"stsb-dev": {"spearman": 80.0}, "scifact-dev": {"ndcg@10": 40.0}}},
            {"name": "onnx-int8", "kind": "onnx", "path": str(model), "throughput": 120.0,
             "results": {"stsb-dev": {"spearman": 79.5}, "scifact-dev": {"ndcg@10": 39.0, "vs_pytorch": {
                 "delta": -1.0, "ci95_low": -2.25, "ci95_high": 0.5, "queries": 300}}}}]
    arts += [{"name": f"{p}-{d}", "kind": "matryoshka", "dim": d, "precision": p, "size_mb": 500.0,
              "results": {"stsb-dev": {"spearman": 70.0 + d / 64 - (5 if p == "binary" else 0)}}}
             for d in (64, 128, 256) for p in ("float", "binary")]
    export = run_dir / "export"  # a graph with external data: its manifest size counts both files
    (export / "onnx").mkdir(parents=True)
    (export / "onnx" / "model_fp32.onnx").write_bytes(b"x" * 1000)
    (export / "manifest.json").write_text(json.dumps({"graphs": {"fp32": {"file": "onnx/model_fp32.onnx",
                                                                          "size_mb": 33.0}}}))
    arts.append({"name": "onnx-fp32", "kind": "onnx", "path": str(export / "onnx" / "model_fp32.onnx"),
                 "results": {"stsb-dev": {"spearman": 80.0}, "scifact-dev": {"ndcg@10": 40.0}}})
    (out / "metrics.json").write_text(json.dumps({"artifacts": arts}))
    (run_dir / "run.json").write_text(json.dumps({
        "format": "embedforge-run/1", "recipe_name": "x", "status": "complete",
        "stages": [{"name": "export", "stage": "export", "out": str(export), "status": "ran", "seconds": 1.0},
                   {"name": "evals", "stage": "eval", "out": str(out), "status": "ran", "seconds": 3.0,
                    "peak_rss_mb": 900.0}]}))
    built = build_report(run_dir)
    assert sorted(p.name for p in built.plots) == ["lineage.png", "matryoshka.png", "stages.png", "tradeoff.png"]
    md = built.markdown.read_text()
    # size from path; the paired difference to PyTorch of the retrieval task in its own column
    assert "| onnx-int8 | onnx | full | float | 1.00 | 120.00 | 59.25 | 79.50 | 39.00 | -1.00 [-2.25, +0.50] |" in md
    assert "| pytorch | pytorch | full | float | 500.00 | 40.00 | 60.00 | 80.00 | 40.00 | - |" in md
    assert "| onnx-fp32 | onnx | full | float | 33.00 | - | 60.00 | 80.00 | 40.00 | - |" in md  # from the manifest
    assert "scifact-dev vs PyTorch |" in md and "95% bootstrap interval" in md
    assert "| binary-64 | 64 | binary | 66.00 |" in md and "| float-256 | 256 | float | 74.00 |" in md
    assert "No loss plot: this run has no training stage." in md
    assert built.summary[1] == "best: pytorch 60.0 (500 MiB); smallest: onnx-int8 59.2 (1 MiB)"


def test_export_shows_a_progress_bar_with_an_eta(tiny_st_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Export is one of the long steps: a bar counts the graphs it writes and checks, with the time left."""
    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import export_model

    cfg = ExportConfig(model=str(tiny_st_dir), fp16=False, int8=["avx2"], last_hidden_state=False, optimize="none")
    export_model(cfg, tmp_path / "onnx")
    err = capsys.readouterr().err
    assert re.search(r"export graphs: 100%\|[^|]*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err), err[-500:]


@dataclass
class StepConfig:
    """A stage used only by these tests: writes a marker, or fails when ``fail`` is set."""

    model: str = opt(help="a name")
    fail: bool = opt(False, help="raise a RunError instead of writing")
    interrupt: bool = opt(False, help="raise KeyboardInterrupt (Ctrl-C) instead of writing")


def step_runner(config: StepConfig, out_dir: Path, ctx: object) -> None:
    from embedforge.errors import RunError
    from embedforge.model import LINEAGE_FILE, make_lineage

    if config.interrupt:
        raise KeyboardInterrupt
    if config.fail:
        raise RunError(f"stage step: {config.model} diverged; lower the learning rate")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="step", source=config.model, config=config)))


def test_a_failed_run_is_recorded_and_still_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedforge import stages

    monkeypatch.setitem(stages.STAGES, "step", (f"{__name__}:StepConfig", f"{__name__}:step_runner"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: steps\nstages:\n"
                      "  - {name: a, stage: step, out: o/a, model: one}\n"
                      "  - {name: b, stage: step, out: o/b, model: two, fail: true}\n"
                      "  - {name: c, stage: step, out: o/c, model: three}\n")
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(run_dir)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == "Error: stage step: two diverged; lower the learning rate"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == "stage step: two diverged; lower the learning rate"
    assert [s["status"] for s in run["stages"]] == ["ran", "failed", "pending"]
    assert run["stages"][1]["seconds"] >= 0 and run["stages"][1]["finished"]
    md = (run_dir / "report.md").read_text()
    assert "status **failed**" in md and "Error: stage step: two diverged" in md
    assert f"- stage b (step): failed; no output at {run_dir.resolve() / 'b'}" in md
    assert f"- stage c (step): not run yet; no output at {run_dir.resolve() / 'c'}" in md
    assert (run_dir / "plots" / "stages.png").read_bytes().startswith(PNG)
    # a rerun with the fault fixed skips the stage that completed and keeps its measurements
    first = run["stages"][0]
    res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(run_dir), "b.fail=false"])
    assert res.exit_code == 0, res.output
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["skipped", "ran", "ran"] and run["status"] == "complete"
    assert run["stages"][0]["seconds"] == first["seconds"] and run["stages"][0]["peak_rss_mb"] == first["peak_rss_mb"]
    assert "Nothing: every stage's output is there." in (run_dir / "report.md").read_text()


def test_an_interrupted_run_is_recorded_as_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedforge import stages

    monkeypatch.setitem(stages.STAGES, "step", (f"{__name__}:StepConfig", f"{__name__}:step_runner"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: steps\nstages:\n  - {name: a, stage: step, out: o/a, model: one, interrupt: true}\n")
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(run_dir)])
    assert res.exit_code == 130
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "interrupted" and run["stages"][0]["status"] == "interrupted"
    assert f"- stage a (step): interrupted; no output at {run_dir.resolve() / 'a'}" in (run_dir / "report.md").read_text()
