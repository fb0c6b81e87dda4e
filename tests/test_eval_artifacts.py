"""The eval stage scores every artifact of a run in one pass: the PyTorch model, its fp32 and int8 ONNX graphs,
binary search with int8 rescoring and Matryoshka prefixes; each record carries size, throughput and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedforge.configs import ConfigError, StageContext
from embedforge.evaluation_config import EvalConfig

WORDS = ("cat dog bird fish tree rock river cloud stone leaf sun moon star wind rain snow road hill lake field "
         "apple bread cheese milk honey salt").split()


def _sentence(rng: np.random.Generator, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A small STS file and a small BEIR folder (40 documents, 8 queries with one relevant document each)."""
    root = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    rows = ["sentence1\tsentence2\tscore"]
    for i in range(30):
        a = _sentence(rng)
        b = a if i % 3 == 0 else _sentence(rng)
        rows.append(f"{a}\t{b}\t{5.0 if i % 3 == 0 else float(i % 5)}")
    sts = root / "sts.tsv"
    sts.write_text("\n".join(rows) + "\n")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [_sentence(rng, 12) for _ in range(40)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": " ".join(docs[i].split()[:5])})
                                                + "\n" for i in range(8)))
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                            + "".join(f"q{i}\td{i}\t1\n" for i in range(8)))
    return [f"sts:{sts}", f"retrieval:{beir}:dev"]


@pytest.fixture(scope="module")
def export_dir(tiny_st_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import export_model

    cfg = ExportConfig(model=str(tiny_st_dir), fp16=False, int8=["avx2"], last_hidden_state=False, binary=True)
    return export_model(cfg, tmp_path_factory.mktemp("export") / "tiny-bert")


def test_one_stage_scores_every_artifact(tiny_st_dir: Path, export_dir: Path, tasks: list[str],
                                         tmp_path: Path) -> None:
    from embedforge.evaluation import run_stage

    config = EvalConfig(model=str(tiny_st_dir), tasks=tasks, export=str(export_dir), binary_rescore=True,
                        truncate_dims=[16], rescore_depth=20, record_in_model=False)
    out = tmp_path / "eval"
    run_stage(config, out, StageContext(stage_name="eval"))

    results = json.loads((out / "metrics.json").read_text())
    records = {r["name"]: r for r in results["artifacts"]}
    assert list(records) == ["pytorch", "onnx-fp32", "onnx-int8", "binary-rescore", "pytorch@16",
                             "binary-rescore@16"]
    assert {r["kind"] for r in records.values()} == {"pytorch", "onnx-fp32", "onnx-int8", "binary-rescore"}
    # sizes are the files' real sizes; a vector's storage follows the kind and the dims
    fp32 = export_dir / "onnx" / "model.onnx"
    int8 = export_dir / "onnx" / "model_qint8_avx2.onnx"
    assert records["onnx-fp32"]["size_bytes"] == fp32.stat().st_size
    assert records["onnx-int8"]["size_bytes"] == int8.stat().st_size
    assert records["onnx-int8"]["graph"] == "onnx/model_qint8_avx2.onnx"
    assert records["pytorch"]["size_bytes"] == sum(p.stat().st_size for p in tiny_st_dir.rglob("*") if p.is_file())
    assert records["binary-rescore"]["vectors_from"] == "onnx-int8"
    assert records["pytorch"]["dims"] == 32 and records["pytorch@16"]["dims"] == 16
    assert records["pytorch"]["vector_bytes"] == 128 and records["binary-rescore@16"]["vector_bytes"] == 2 + 16
    # the quality-vs-dimension curves: PyTorch (float) and binary points carry dim, the ONNX copies do not
    assert [(r["dim"], r["precision"]) for r in records.values()] == [
        (32, "float"), (None, "float"), (None, "float"), (32, "binary"), (16, "float"), (16, "binary")]
    for r in records.values():
        assert r["throughput"] > 0 and r["throughput_texts"] == records["pytorch"]["throughput_texts"]
    # the top-level task metrics stay those of the PyTorch model at full size (what `embedforge eval` reports)
    sts, ret = tasks[0], tasks[1]
    assert results[sts] == records["pytorch"]["results"][sts]
    # fp32 ONNX is the same model: same scores; the others are close to it
    assert records["onnx-fp32"]["results"][sts]["spearman"] == pytest.approx(results[sts]["spearman"], abs=0.5)
    assert records["onnx-fp32"]["results"][ret]["ndcg@10"] == pytest.approx(results[ret]["ndcg@10"], abs=1.0)
    # every artifact after the PyTorch model carries its paired nDCG@10 difference to it; the mean of the
    # per-query differences is the difference of the means (the same queries are judged for both)
    assert "vs_pytorch" not in records["pytorch"]["results"][ret]
    for name, r in records.items():
        m = r["results"][ret]
        assert "ndcg@10_per_query" not in m and "vs_pytorch" not in r["results"][sts]
        if name != "pytorch":
            paired = m["vs_pytorch"]
            assert paired["delta"] == pytest.approx(m["ndcg@10"] - results[ret]["ndcg@10"], abs=0.006)
            assert paired["ci95_low"] <= paired["delta"] <= paired["ci95_high"]
            assert paired["queries"] == results[ret]["queries"]
    assert records["binary-rescore"]["results"][ret]["rescore_depth"] == 20
    assert "recall@20" in records["binary-rescore"]["results"][ret]
    report = (out / "report.md").read_text()
    assert "## Every artifact" in report and "binary-rescore@16" in report
    assert f"| {ret} vs pytorch (95% CI) |" in report


def _reference_binary_rescore(q: np.ndarray, d: np.ndarray, depth: int) -> np.ndarray:
    """Hamming top-``depth`` on sign bits, then float query . int8 document (min/max ranges of ``d``)."""
    qb, db = q > 0, d > 0
    ham = (qb[:, None, :] != db[None, :, :]).sum(axis=2)
    lo, hi = d.min(axis=0), d.max(axis=0)
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    deq = lo + (np.clip(np.floor((d - lo) / step), 0, 255) + 0.5) * step
    scores = np.full((len(q), len(d)), -np.inf)
    for i in range(len(q)):
        cand = np.argsort(ham[i], kind="stable")[:depth]
        scores[i, cand] = deq[cand] @ q[i]
    return scores


def test_binary_rescore_ranks_like_a_hamming_then_int8_search() -> None:
    from embedforge.data import BeirData
    from embedforge.evaluation import Task, l2_normalize, retrieval_metrics, score_task_vectors

    rng = np.random.default_rng(1)
    d = rng.normal(size=(200, 64)).astype(np.float32)
    q = (d[:20] + 0.8 * rng.normal(size=(20, 64))).astype(np.float32)
    doc_ids, query_ids = [f"d{i}" for i in range(200)], [f"q{i}" for i in range(20)]
    qrels = {f"q{i}": {f"d{i}": 1, f"d{(i * 7 + 3) % 200}": 1} for i in range(20)}
    data = BeirData(corpus=dict(zip(doc_ids, doc_ids)), queries=dict(zip(query_ids, query_ids)), qrels=qrels)
    vectors = {"q": q, "d": d, "doc_ids": doc_ids, "query_ids": query_ids}
    task = Task("retrieval", "toy")
    got = score_task_vectors(task, data, vectors, binary=True, rescore_depth=10)
    ref = retrieval_metrics(_reference_binary_rescore(l2_normalize(q), l2_normalize(d), 10), doc_ids, query_ids,
                            qrels, k_recall=10)
    assert got["ndcg@10"] == pytest.approx(ref["ndcg@10"], abs=1e-6)
    assert got["recall@10"] == pytest.approx(ref["recall@10"], abs=1e-6)
    # a shallow candidate list loses documents that full float search finds: the binary stage really filters
    flat = score_task_vectors(task, data, vectors)
    assert got["recall@10"] < flat["recall@100"]
    # a Matryoshka prefix is the first dims renormalized
    cut = score_task_vectors(task, data, vectors, dim=16)
    ref16 = retrieval_metrics(l2_normalize(q[:, :16]) @ l2_normalize(d[:, :16]).T, doc_ids, query_ids, qrels)
    assert cut["ndcg@10"] == pytest.approx(ref16["ndcg@10"], abs=1e-6)


def _recipe(tmp_path: Path, model: Path, tasks: list[str], extra: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstages:\n  - stage: eval\n    model: {model}\n    out: {tmp_path / 'eval'}\n"
                    f"    tasks: [{', '.join(tasks)}]\n{extra}")
    return path


@pytest.mark.parametrize(("extra", "message"), [
    ("    export: {export}\n    int8_graph: onnx/model_qint8_arm64.onnx\n",
     "int8_graph: {export}/onnx/model_qint8_arm64.onnx does not exist; name a graph of the export"),
    ("    export: {model}\n",
     "export: {model} is not an export directory (no manifest.json); run the export stage first"),
    ("    truncate_dims: [64]\n", "truncate_dims: 64 is larger than the model's 32 dimensions; use at most 32"),
])
def test_bad_artifact_settings_stop_before_any_output(tiny_st_dir: Path, export_dir: Path, tasks: list[str],
                                                      tmp_path: Path, extra: str, message: str) -> None:
    from embedforge.cli import main

    fill = {"export": export_dir, "model": tiny_st_dir}
    recipe = _recipe(tmp_path, tiny_st_dir, tasks, extra.format(**fill))
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and message.format(**fill) in lines[0], res.output
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_config_refuses_mixed_truncation() -> None:
    with pytest.raises(ConfigError, match="truncate_dim: evaluates one prefix of one model"):
        EvalConfig(model="m", truncate_dim=8, truncate_dims=[16])
    with pytest.raises(ConfigError, match="int8_graph: names a graph of `export`"):
        EvalConfig(model="m", int8_graph="onnx/model_qint8_avx2.onnx")
    with pytest.raises(ConfigError, match="truncate_dims: lists a size twice"):
        EvalConfig(model="m", truncate_dims=[16, 16])
