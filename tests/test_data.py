"""Data loading: formats, column mapping, and errors that name file, line and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedforge.data import DataError, DataKind, DataSpec, load_beir, load_data, load_records


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_pairs_with_column_mapping(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "p.jsonl", [{"q": "a cat", "d": "a small cat"}, {"q": "a dog", "d": "a puppy"}])
    ds = load_data({"path": str(f), "kind": "pairs", "columns": {"anchor": "q", "positive": "d"}})
    assert ds.column_names == ["anchor", "positive"] and ds["positive"] == ["a small cat", "a puppy"]


def test_csv_tsv_parquet_and_saved_dataset(tmp_path: Path) -> None:
    from datasets import Dataset

    (tmp_path / "s.csv").write_text('sentence1,sentence2,score\n"a, b",c,4.5\nd,e,1\n')
    ds = load_data(str(tmp_path / "s.csv"), DataKind.SCORED)
    assert ds["sentence1"] == ["a, b", "d"] and ds["score"] == [4.5, 1.0]
    (tmp_path / "t.tsv").write_text("x\t0\ty\n")
    recs = load_records(DataSpec(str(tmp_path / "t.tsv"), kind="texts", header=False, columns={"text": 2}))
    assert recs == {"text": ["y"]}
    Dataset.from_dict({"text": ["u", "v"], "label": [1, 0]}).to_parquet(str(tmp_path / "l.parquet"))
    assert load_data(str(tmp_path / "l.parquet"), "labeled")["label"] == [1, 0]
    Dataset.from_dict({"anchor": ["a"], "positive": ["b"], "negative": ["c"]}).save_to_disk(str(tmp_path / "hf"))
    assert load_data(str(tmp_path / "hf"), "triplets")["negative"] == ["c"]


def test_missing_column_names_file_and_columns(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "bad.jsonl", [{"query": "a", "doc": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: missing column\(s\) 'anchor', 'positive'; the file has 'query', 'doc'"):
        load_data(str(f), "pairs")


def test_wrong_type_and_empty_value_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "s.tsv"
    f.write_text("sentence1\tsentence2\tscore\na\tb\t3\nc\td\tlots\n")
    with pytest.raises(DataError, match=r"s\.tsv:3: column 'score': expected a number, got 'lots'"):
        load_data(str(f), "scored")
    g = _jsonl(tmp_path / "e.jsonl", [{"text": "fine"}, {"text": "  "}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: column 'text' is empty"):
        load_data(str(g), "texts")
    h = _jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"n\.jsonl:1: column 'text': expected text, got int"):
        load_data(str(h), "texts")


def test_undecodable_bytes_empty_file_bad_json(tmp_path: Path) -> None:
    f = tmp_path / "u.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
        load_data(str(f), "texts")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_data(str(tmp_path / "empty.jsonl"), "texts")
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON"):
        load_data(str(tmp_path / "j.jsonl"), "texts")
    with pytest.raises(DataError, match="file not found"):
        load_data(str(tmp_path / "missing.jsonl"), "texts")


def test_min_score_turns_scored_rows_into_pairs_and_limit(tmp_path: Path) -> None:
    f = tmp_path / "s.csv"
    f.write_text("a,b,score\nx,y,4.5\np,q,2\nm,n,5\n")
    spec = DataSpec(str(f), kind="pairs", columns={"anchor": "a", "positive": "b"}, min_score=4.0)
    assert load_records(spec) == {"anchor": ["x", "m"], "positive": ["y", "n"]}
    spec.limit = 1
    assert load_records(spec) == {"anchor": ["x"], "positive": ["y"]}


def test_beir_folder(tmp_path: Path) -> None:
    _jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "body one"}, {"_id": "d2", "text": "two"}])
    _jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "unused"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    beir = load_beir(tmp_path, "dev")
    assert beir.corpus == {"d1": "T body one", "d2": "two"}
    assert beir.queries == {"q1": "first?"} and beir.qrels == {"q1": {"d2": 1}}
    with pytest.raises(DataError, match="qrels/test.tsv: file not found"):
        load_beir(tmp_path, "test")


# ----------------------------------------------------------------------------- load_texts, the one gatherer


def test_load_texts_reads_every_layout_strips_and_deduplicates(tmp_path: Path) -> None:
    from embedforge.data import load_texts

    texts = _jsonl(tmp_path / "t.jsonl", [{"text": " one "}, {"text": "two"}, {"text": "one"}])
    pairs = _jsonl(tmp_path / "p.jsonl", [{"anchor": "two", "positive": "three"}])
    triplets = _jsonl(tmp_path / "tr.jsonl", [{"anchor": "four", "positive": "five", "negative": "six"}])
    scored = _jsonl(tmp_path / "s.jsonl", [{"sentence1": "seven", "sentence2": "eight", "score": 1.0}])
    got = load_texts([str(texts), str(pairs), str(triplets), str(scored)])
    assert got == ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    assert load_texts({"path": str(pairs), "kind": "pairs", "name": "ignored"}) == ["two", "three"]


def test_load_texts_limit_counts_unique_texts_over_all_sources(tmp_path: Path) -> None:
    """One meaning of a text limit: at most N texts in all, after de-duplication (not N rows per data set)."""
    from embedforge.data import load_texts

    a = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in ["x", "x", "y"]])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": t} for t in ["z", "w"]])
    assert load_texts([str(a), str(b)], limit=3) == ["x", "y", "z"]
    assert load_texts([str(a), str(b)], limit=1) == ["x"]
    assert load_texts([str(a), str(b)]) == ["x", "y", "z", "w"]


def test_load_texts_reads_a_beir_folder_and_builtins(tmp_path: Path) -> None:
    from embedforge.data import load_texts

    _jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "body one"}, {"_id": "d2", "text": "two"}])
    _jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first?"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    assert load_texts(f"beir:{tmp_path}:dev") == ["T body one", "two", "first?"]


def test_load_texts_refusals_name_the_sources(tmp_path: Path) -> None:
    from embedforge.data import load_texts

    one = _jsonl(tmp_path / "one.jsonl", [{"text": "a"}, {"text": " a"}])
    with pytest.raises(DataError) as err:
        load_texts([str(one)], min_texts=2, purpose="distillation")
    assert str(err.value) == (f"{one}: 1 non-empty text(s) found and distillation needs at least 2; name data "
                              "with a 'text' column, or pairs / triplets")
    other = _jsonl(tmp_path / "other.jsonl", [{"query": "a", "doc": "b"}])
    with pytest.raises(DataError, match=r"other.jsonl: missing column\(s\) 'text'; the file has 'query', 'doc'"):
        load_texts(str(other))


def test_export_calibration_texts_come_from_load_texts(tmp_path: Path) -> None:
    """Static int8 calibration reads its texts like every other stage: a pairs file gives its sentences."""
    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import _calibration_texts

    pairs = _jsonl(tmp_path / "p.jsonl", [{"anchor": "a cat", "positive": "a small cat"},
                                          {"anchor": "a dog", "positive": "a cat"}])
    config = ExportConfig(model="m", calibration_data=str(pairs), calibration_size=3)
    assert _calibration_texts(config, ["probe"]) == ["a cat", "a dog", "a small cat"]
    assert _calibration_texts(ExportConfig(model="m"), ["probe"]) == ["probe"]
