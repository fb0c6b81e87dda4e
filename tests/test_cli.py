"""The CLI: instant help, usage errors exit 2 with located messages, eval writes metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from embedforge.cli import main


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
    assert "r.yaml:6: stage 'eval': taks: unknown key for EvalConfig (did you mean 'tasks'?)" in res.output


def test_bad_data_column_is_a_usage_error_before_work(tmp_path: Path) -> None:
    data = tmp_path / "pairs.tsv"
    data.write_text("query\tdoc\tscore\na\tb\t1\n")
    res = CliRunner().invoke(main, ["eval", "some/model", "--task", f"sts:{data}"])
    assert res.exit_code == 2  # the data is checked before the (unreachable) model is loaded
    assert "pairs.tsv: missing column(s) 'sentence1', 'sentence2'" in res.output


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


def test_workflow_command_validates_keys(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "o"), "no_such_key=1"])
    assert res.exit_code == 2 and "no_such_key: unknown key" in res.output
