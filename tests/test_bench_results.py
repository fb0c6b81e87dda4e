"""The committed benchmark results: one per experiment, in the runner's schema, and the README table made from them."""

from __future__ import annotations

import json

from bench import run as bench_run
from bench import table as bench_table
from bench._common import ROOT


def test_every_shipped_experiment_parses_and_has_a_result() -> None:
    experiments = sorted((ROOT / "bench" / "experiments").glob("*.yaml"))
    assert experiments
    results = {p.stem for p in (ROOT / "bench" / "results").glob("*.json")}
    for path in experiments:
        exp = bench_run.load_experiment(path)
        assert exp.name == path.stem and exp.description, path
        assert exp.name in results, f"{path}: no bench/results/{exp.name}.json"
    for name in results:
        result = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
        assert tuple(k for k in result if k != "converted_from") == bench_run.RESULT_KEYS, name
        assert (ROOT / "bench" / "experiments" / f"{name}.yaml").is_file(), f"{name}.json has no experiment"
        assert result["metrics"] and all(isinstance(v, (int, float)) for v in result["metrics"].values()), name
        exp = bench_run.load_experiment(ROOT / "bench" / "experiments" / f"{name}.yaml")
        assert list(result["metrics"]) == [m.name for m in exp.metrics], f"{name}: metrics differ from the experiment's"
        assert result["config_hash"] == bench_run.config_hash(exp.spec()), \
            f"{name}: the experiment changed since this result was made; rerun it with python -m bench.run"
        if "converted_from" in result:
            assert result["converted_from"].startswith("bench/results/"), name


def test_the_readme_benchmark_table_is_generated_from_the_results() -> None:
    readme = (ROOT / "README.md").read_text()
    assert bench_table.update_readme(readme) == readme, "README is stale: run python -m bench.table"
    for path in (ROOT / "bench" / "results").glob("*.json"):
        assert f"`{path.stem}`" in readme


def test_the_table_follows_the_result_files(tmp_path) -> None:
    result = {"experiment": "x", "description": "a | b", "metrics": {"ndcg": 0.98765, "speedup": 3.0},
              "machine": {"cpu_model": "Some CPU", "cores": 2, "torch_threads": 1, "gpu": None}}
    (tmp_path / "x.json").write_text(json.dumps(result))
    text = "intro\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\nrest\n"
    new = bench_table.update_readme(text, tmp_path)
    assert new.startswith("intro\n<!-- bench-table:start -->\n| experiment |") and new.endswith("end -->\nrest\n")
    assert "| `x` | a \\| b | ndcg 0.98765, speedup 3 | Some CPU, 2 cores, 1 thread | bench.run |" in new
    assert "old" not in new and bench_table.update_readme(new, tmp_path) == new
