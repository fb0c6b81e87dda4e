"""The benchmark runner on a tiny experiment (seconds): one result schema, atomic writes, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import run as bench_run

STS = ["sentence1\tsentence2\tscore", "a man plays guitar\ta man is playing a guitar\t4.8",
       "a dog runs\tthe stock market fell\t0.2", "a woman cuts an onion\tsomeone slices an onion\t4.0"]


def _experiment(tmp_path: Path, model: Path, metric_key: str = "") -> Path:
    data = tmp_path / "sts.tsv"
    metric_key = metric_key or f'["sts:{data}", spearman]'
    data.write_text("\n".join(STS) + "\n")
    path = tmp_path / "tiny_eval.yaml"
    path.write_text(f"""\
description: a tiny random model scored on three STS pairs
recipe:
  name: tiny
  vars:
    out: runs/never-used
  stages:
    - name: score
      stage: eval
      model: {model}
      out: ${{vars.out}}/eval
      tasks: ["sts:{data}"]
overrides:
  score.batch_size: 2
metrics:
  spearman: {{stage: score, key: {metric_key}}}
""")
    return path


def test_a_recipe_experiment_writes_one_result_in_the_schema(tiny_st_dir: Path, tmp_path: Path) -> None:
    exp = _experiment(tmp_path, tiny_st_dir)
    metrics_file = tmp_path / "work" / "eval" / "metrics.json"
    out = tmp_path / "results"
    assert bench_run.main([str(exp), "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    result = json.loads((out / "tiny_eval.json").read_text())
    assert tuple(result) == bench_run.RESULT_KEYS
    assert result["experiment"] == "tiny_eval" and result["description"].startswith("a tiny random model")
    task = next(iter(json.loads(metrics_file.read_text())))  # the eval stage wrote into --work (vars.out)
    assert result["metrics"]["spearman"] == json.loads(metrics_file.read_text())[task]["spearman"]
    assert set(result["machine"]) == {"cpu_model", "cores", "torch_threads", "gpu"}
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    assert result["command"].startswith("python -m bench.run ") and str(exp) in result["command"]
    assert result["git_commit"] is None or len(result["git_commit"].split("+")[0]) == 40
    assert result["timings"]["stages"]["score"]["status"] == "ran"
    assert result["timings"]["total_s"] >= result["timings"]["stages"]["score"]["seconds"] > 0
    assert len(result["config_hash"]) == 16
    assert sorted(p.name for p in out.iterdir()) == ["tiny_eval.json"]  # no temporary file left


def test_the_config_hash_follows_the_experiment_not_the_paths(tiny_st_dir: Path, tmp_path: Path) -> None:
    exp = _experiment(tmp_path, tiny_st_dir)
    first = bench_run.config_hash(bench_run.load_experiment(exp).spec())
    exp.write_text(exp.read_text().replace("batch_size: 2", "batch_size: 3"))
    assert bench_run.config_hash(bench_run.load_experiment(exp).spec()) != first


def test_a_missing_metric_fails_and_writes_nothing(tiny_st_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    exp = _experiment(tmp_path, tiny_st_dir, metric_key="[nope, pearsonn]")
    out = tmp_path / "results"
    code = bench_run.main([str(exp), "--out", str(out), "--work", str(tmp_path / "work")])
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after the progress bars: the one-line error
    assert code == 1
    assert last == (f"Error: {exp}: metrics.spearman: no metric at nope/pearsonn (missing 'nope'); "
                    "fix the experiment's metrics")
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("metrics: {a: {key: [x]}}\n", "give exactly one of 'recipe'"),
    ("command: [python, -c, 'pass']\nmetrics: {a: {stage: s, key: [x]}}\n", "metrics.a: 'stage' is only for recipes"),
    ("recipe: recipes/nope.yaml\nmetrics: {a: {stage: s, key: [x]}}\n", "recipe: recipes/nope.yaml is not a file"),
    ("command: [python]\nmetrics: {}\n", "metrics: expected a mapping"),
    ("command: [python]\nmetric: {a: {key: [x]}}\n", "unknown key 'metric'"),
])
def test_bad_experiment_files_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          text: str, message: str) -> None:
    exp = tmp_path / "bad.yaml"
    exp.write_text(text)
    assert bench_run.main([str(exp), "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {exp}: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_a_command_experiment_reads_the_scripts_results(tmp_path: Path) -> None:
    script = "import json, sys, pathlib; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); " \
             "(p / 'results.json').write_text(json.dumps({'a': {'b': 0.5}}))"
    exp = tmp_path / "cmd.yaml"
    exp.write_text(json.dumps({"command": ["python", "-c", script, "{work}"], "metrics": {"ab": {"key": ["a", "b"]}}}))
    out = tmp_path / "results"
    assert bench_run.main([str(exp), "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    result = json.loads((out / "cmd.json").read_text())
    assert result["metrics"] == {"ab": 0.5} and result["timings"]["total_s"] > 0
    exp.write_text(json.dumps({"command": [sys.executable, "-c", "raise SystemExit(3)"],
                               "metrics": {"ab": {"key": ["a"]}}}))
    (out / "cmd.json").unlink()
    assert bench_run.main([str(exp), "--out", str(out), "--work", str(tmp_path / "w")]) == 1
    assert not (out / "cmd.json").exists()


def test_a_command_that_writes_no_new_results_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "results.json").write_text(json.dumps({"a": 1.0}))  # left by an earlier run
    exp = tmp_path / "cmd.yaml"
    exp.write_text(json.dumps({"command": ["python", "-c", "pass"], "metrics": {"a": {"key": ["a"]}}}))
    assert bench_run.main([str(exp), "--out", str(tmp_path / "results"), "--work", str(work)]) == 1
    assert "the command wrote no new" in capsys.readouterr().err
    assert (work / "results.json").is_file() and not (tmp_path / "results").exists()


def test_a_shipped_recipe_runs_with_overrides_into_the_work_folder(tmp_path: Path) -> None:
    exp = tmp_path / "r.yaml"
    exp.write_text("recipe: recipes/export/minilm_onnx.yaml\noverrides: {onnx.fp16: false}\n"
                   "metrics: {s: {stage: eval, key: [stsb-dev, spearman]}}\n")
    recipe = bench_run._load_recipe(bench_run.load_experiment(exp), tmp_path / "work")
    assert [st.out for st in recipe.stages] == [tmp_path / "work" / "onnx", tmp_path / "work" / "eval"]
    assert recipe.stages[0].config.fp16 is False
    exp.write_text(exp.read_text().replace("{stage: eval,", "{stage: evl,"))
    with pytest.raises(Exception, match=r"metrics\.s: no stage named 'evl' \(stages: onnx, eval\)"):
        bench_run.run_experiment(exp, tmp_path / "results", tmp_path / "work")
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_a_recipe_files_comments_do_not_change_the_config_hash(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe's header states its measured time: writing it there must not make that very result stale."""
    monkeypatch.setattr(bench_run, "ROOT", tmp_path)
    (tmp_path / "r.yaml").write_text("# measured: not yet\nstages:\n  - {stage: eval, model: m, tasks: [stsb-dev]}\n")
    exp = tmp_path / "e.yaml"
    exp.write_text("recipe: r.yaml\nmetrics: {s: {stage: eval, key: [stsb-dev, spearman]}}\n")

    def spec_hash() -> str:
        return bench_run.config_hash(bench_run.load_experiment(exp).spec())

    first = spec_hash()
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("not yet", "15.4 min"))
    assert spec_hash() == first
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("stsb-dev]", "sick-trial]"))
    assert spec_hash() != first
