"""The CLI: instant help, errors as one line with the exit code of their class, eval writes metrics."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedforge import stages
from embedforge.cli import main
from embedforge.configs import opt
from embedforge.model import LINEAGE_FILE, make_lineage


def test_help_does_not_import_torch() -> None:
    code = "import sys; from embedforge.cli import main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for cmd in ("convert", "distill", "compress", "export", "eval", "run", "recipes"):
        assert cmd in res.output


def test_unknown_key_is_a_usage_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# embedforge run r.yaml\nstages:\n  - stage: eval\n    model: x/y\n    out: o\n    taks: [stsb-dev]\n")
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 2
    assert res.output.startswith(
        f"Error: {recipe}:6: stage 'eval': taks: unknown key for EvalConfig (did you mean 'tasks'?)")
    assert len(res.output.splitlines()) == 1


def test_bad_data_column_is_a_usage_error_before_work(tmp_path: Path) -> None:
    data = tmp_path / "pairs.tsv"
    data.write_text("query\tdoc\tscore\na\tb\t1\n")
    res = CliRunner().invoke(main, ["eval", "some/model", "--task", f"sts:{data}"])
    assert res.exit_code == 2  # the data is checked before the (unreachable) model is loaded
    assert res.output.startswith(f"Error: {data}: missing column(s) 'sentence1', 'sentence2'")
    assert len(res.output.splitlines()) == 1


def test_eval_out_that_cannot_be_created_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    data = tmp_path / "sts.tsv"
    data.write_text("sentence1\tsentence2\tscore\na\tb\t1\n")
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    res = CliRunner().invoke(main, ["eval", "some/model", "--task", f"sts:{data}", "--out", str(blocker / "eval")])
    assert res.exit_code == 2  # the hub id is never resolved: the output is checked first
    assert res.output == (f"Error: --out: {blocker} is a file, so {blocker / 'eval'} cannot be created there; "
                          "choose another path\n")


def test_eval_command_writes_metrics(tiny_st_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "sts.tsv"
    rows = ["sentence1\tsentence2\tscore", "a man plays guitar\ta man is playing a guitar\t4.8",
            "a dog runs\tthe stock market fell\t0.2", "a woman cuts an onion\tsomeone slices an onion\t4.0"]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["eval", str(tiny_st_dir), "--task", f"sts:{data}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert -100 <= metrics[f"sts:{data}"]["spearman"] <= 100 and metrics[f"sts:{data}"]["n"] == 3
    assert "spearman" in (out / "report.md").read_text()


def test_eval_disk_full_names_the_output(tiny_st_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "sts.tsv"
    data.write_text("sentence1\tsentence2\tscore\na b\tc d\t1\ne f\tg h\t3\n")
    real = Path.write_text

    def write_text(self: Path, *args, **kwargs):
        if self.name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["eval", str(tiny_st_dir), "--task", f"sts:{data}", "--out", str(out)])
    assert res.exit_code == 1
    last = res.output.splitlines()[-1]
    assert last.startswith(f"Error: {out}: no space left on the device while writing it (") and last.endswith(
        "nothing was replaced: free space there or choose another output directory, then run again")
    assert "Traceback" not in res.output and not out.exists()


def test_top_level_learning_rate_on_mntp_is_refused_with_the_train_spelling(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: old\nstages:\n  - name: mntp\n    stage: mntp\n    model: some/embedder\n"
                      f"    out: {tmp_path / 'mntp'}\n    data: [texts]\n    learning_rate: 1.0e-4\n")
    res = CliRunner().invoke(main, ["recipes", "validate", str(recipe)])
    assert res.exit_code == 2
    assert res.output == (f"Error: {recipe}:8: stage 'mntp': learning_rate: training options moved under the "
                          "train: key; write train: {learning_rate: 0.0001}\n")
    assert not (tmp_path / "mntp").exists()


def test_workflow_command_validates_keys(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "o"), "no_such_key=1"])
    assert res.exit_code == 2 and "no_such_key: unknown key" in res.output


# ------------------------------------------------------------------------ run-time errors: one line, exit codes


@dataclass
class ToyConfig:
    """A stage used only by these tests; ``fail`` names what its runner does instead of finishing."""

    model: str = opt(help="input")
    fail: str = opt("", help="'', 'nan', 'interrupt', 'ctrl-c' or 'enospc'")


def toy_runner(config: ToyConfig, out_dir: Path, ctx) -> None:
    from embedforge.training.guard import NanLossError, TrainingInterrupted

    if config.fail == "nan":
        raise NanLossError("the training loss became nan at step 3; stopped before applying it. "
                           "No checkpoint was written yet.")
    if config.fail == "interrupt":
        raise TrainingInterrupted(f"training stopped on signal 15 at step 4; checkpoint in {out_dir}/ckpt. "
                                  "Rerun the same command to resume.")
    if config.fail == "ctrl-c":
        raise KeyboardInterrupt
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="toy", source=config.model, config=config)))
    (out_dir / "result.txt").write_text(config.model)


@pytest.fixture()
def toy_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:toy_runner"))

    def write(fail: str = "", second: str = "") -> Path:
        path = tmp_path / "r.yaml"
        path.write_text(f"stages:\n  - name: first\n    stage: toy\n    model: a/b\n    fail: '{fail}'\n"
                        f"    out: {tmp_path / 'runs' / 'first'}\n" + second)
        return path

    return write


def test_second_stage_bad_data_fails_before_the_first_stage_runs(tmp_path: Path, toy_recipe) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": \n')
    second = (f"  - name: tune\n    stage: contrastive\n    model: ${{stages.first.out}}\n"
              f"    out: {tmp_path / 'runs' / 'tuned'}\n    data: [{data}]\n")
    res = CliRunner().invoke(main, ["run", str(toy_recipe(second=second))])
    assert res.exit_code == 2
    assert res.output == f"Error: stage 'tune': data[0]: {data}:2: invalid JSON (Expecting value)\n"
    assert not (tmp_path / "runs" / "first").exists()


def test_unwritable_out_parent_is_a_usage_error(tmp_path: Path, toy_recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def mkstemp(*args, **kwargs):  # as on a read-only file system (root ignores permission bits, so simulate)
        raise OSError(errno.EROFS, "Read-only file system", str(Path(kwargs["dir"]) / ".probe"))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    res = CliRunner().invoke(main, ["run", str(toy_recipe())])
    assert res.exit_code == 2
    assert res.output == (f"Error: stage 'first': out: cannot create {tmp_path / 'runs' / 'first'} in {tmp_path}: "
                          "read-only file system; write the output to a writable location\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="permission bits do not stop root")
def test_out_parent_without_write_permission_is_refused(tmp_path: Path, toy_recipe) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs").chmod(0o500)
    try:
        res = CliRunner().invoke(main, ["run", str(toy_recipe())])
    finally:
        (tmp_path / "runs").chmod(0o700)
    assert res.exit_code == 2 and "permission denied" in res.output and len(res.output.splitlines()) == 1
    assert not (tmp_path / "runs" / "first").exists()


def test_disk_full_during_a_stage_is_one_line_exit_1(tmp_path: Path, toy_recipe,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def write_text(self: Path, *args, **kwargs):
        if self.name == "result.txt":  # a write that fails the way write(2) does: no file name in the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "runs" / "first"
    res = CliRunner().invoke(main, ["run", str(toy_recipe())])
    assert res.exit_code == 1
    assert res.output == (f"Error: stage 'first': {out}: no space left on the device; free some space or write "
                          "the output to a bigger disk\n")
    assert "Traceback" not in res.output


def test_nan_loss_is_one_line_and_the_traceback_needs_debug(toy_recipe) -> None:
    recipe = str(toy_recipe(fail="nan"))
    res = CliRunner().invoke(main, ["run", recipe])
    assert res.exit_code == 1
    assert res.output == ("Error: the training loss became nan at step 3; stopped before applying it. "
                          "No checkpoint was written yet.\n")
    res = CliRunner().invoke(main, ["--debug", "run", recipe])
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "NanLossError" in res.output
    assert lines[-1].startswith("Error: the training loss became nan at step 3")


def test_interruptions_exit_130(toy_recipe) -> None:
    res = CliRunner().invoke(main, ["run", str(toy_recipe(fail="interrupt"))])
    assert res.exit_code == 130
    assert res.output.startswith("Error: training stopped on signal 15 at step 4; checkpoint in ")
    assert len(res.output.splitlines()) == 1
    res = CliRunner().invoke(main, ["run", str(toy_recipe(fail="ctrl-c"))])
    assert res.exit_code == 130
    assert res.output == "Error: interrupted (Ctrl-C); a rerun skips the stages that completed\n"


@pytest.mark.slow
def test_minilm_onnx_recipe_scores_its_export(tiny_st_dir: Path, tmp_path: Path) -> None:
    """The shipped recipe's eval stage scores the export directory (its fp32 ONNX graph), as its comment says."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "export" / "minilm_onnx.yaml"
    data = tmp_path / "sts.tsv"
    rows = ["sentence1\tsentence2\tscore", "a man plays guitar\ta man is playing a guitar\t4.8",
            "a dog runs\tthe stock market fell\t0.2", "a woman cuts an onion\tsomeone slices an onion\t4.0"]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["run", str(recipe), f"vars.out={out}", f"onnx.model={tiny_st_dir}",
                                    "onnx.int8=[avx2]", "onnx.fp16=false",
                                    "onnx.last_hidden_state=false", f"eval.tasks=['sts:{data}']"])
    assert res.exit_code == 0, res.output
    assert f"eval: ran -> {out / 'eval'}" in res.output.splitlines()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics[f"sts:{data}"]["n"] == 3
    lineage = json.loads((out / "onnx" / "embedforge.json").read_text())
    assert lineage["metrics"]["eval"][f"sts:{data}"]["n"] == 3  # recorded in the export's own lineage
