"""Bad data in every loader is refused with one line naming file and line, before any model is loaded."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from embedforge.cli import main
from embedforge.data import DataError, load_beir, load_data

Writer = Callable[[Path], Path]


def _write(name: str, content: bytes | str) -> Writer:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


def _beir(corpus: str, queries: str | bytes, qrels: str | None) -> Writer:
    def make(tmp: Path) -> Path:
        root = tmp / "beir"
        root.mkdir()
        (root / "corpus.jsonl").write_text(corpus)
        (root / "queries.jsonl").write_bytes(queries if isinstance(queries, bytes) else queries.encode())
        if qrels is not None:
            (root / "qrels").mkdir()
            (root / "qrels" / "test.tsv").write_text(qrels)
        return root
    return make


GOOD_CORPUS = '{"_id": "d1", "text": "a document"}\n'
GOOD_QUERIES = '{"_id": "q1", "text": "a query"}\n'
GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\n"

# (id, writer, kind, expected one-line message as a regex matched against the end of the path onwards)
FAULTS = [
    ("jsonl-bad-line", _write("p.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": \n'), "pairs",
     r"p\.jsonl:2: invalid JSON"),
    ("json-array-file", _write("p.json", '[\n  {"anchor": "a", "positive": "b"}\n]\n'), "pairs",
     r"p\.json:1: invalid JSON \(.*\); the file looks like one JSON array: write one object per line \(JSONL\)$"),
    ("jsonl-not-object", _write("p.jsonl", '["a", "b"]\n'), "pairs", r"p\.jsonl:1: expected a JSON object, got list"),
    ("jsonl-undecodable", _write("t.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'), "texts",
     r"t\.jsonl:2: not valid UTF-8"),
    ("jsonl-empty-value", _write("t.jsonl", '{"text": "ok"}\n{"text": ""}\n'), "texts",
     r"t\.jsonl:2: column 'text' is empty"),
    ("jsonl-null-value", _write("t.jsonl", '{"text": null}\n'), "texts", r"t\.jsonl:1: column 'text' is missing"),
    ("jsonl-empty-file", _write("t.jsonl", ""), "texts", r"t\.jsonl: no rows"),
    ("csv-missing-columns", _write("s.csv", "a,b\nx,y\n"), "scored",
     r"s\.csv: missing column\(s\) 'sentence1', 'sentence2', 'score'"),
    ("csv-non-numeric-score", _write("s.csv", "sentence1,sentence2,score\nx,y,high\n"), "scored",
     r"s\.csv:2: column 'score': expected a number, got 'high'"),
    ("csv-nan-score", _write("s.csv", "sentence1,sentence2,score\nx,y,1\nu,v,nan\n"), "scored",
     r"s\.csv:3: column 'score': expected a finite number, got 'nan'"),
    ("tsv-inf-score", _write("s.tsv", "sentence1\tsentence2\tscore\nx\ty\tinf\n"), "scored",
     r"s\.tsv:2: column 'score': expected a finite number, got 'inf'"),
    ("csv-extra-field", _write("p.csv", "anchor,positive\na,b\nc,d,e\n"), "pairs",
     r"p\.csv:3: 3 fields but the header has 2; quote values that contain the delimiter ','"),
    ("tsv-extra-field", _write("p.tsv", "anchor\tpositive\na\tb\tc\n"), "pairs",
     r"p\.tsv:2: 3 fields but the header has 2"),
    ("csv-short-row", _write("p.csv", "anchor,positive\na,b\nc\n"), "pairs", r"p\.csv:3: column 'positive' is missing"),
    ("csv-empty-value", _write("p.csv", "anchor,positive\na,\n"), "pairs", r"p\.csv:2: column 'positive' is empty"),
    ("csv-undecodable", _write("p.csv", b"anchor,positive\na,b\n\xfe,c\n"), "pairs", r"p\.csv:3: not valid UTF-8"),
    ("csv-empty-file", _write("p.csv", ""), "pairs", r"p\.csv: no rows"),
    ("parquet-not-parquet", _write("p.parquet", "anchor,positive\na,b\n"), "pairs",
     r"p\.parquet: not a Parquet file \("),
    ("unknown-suffix", _write("p.xyz", "a"), "pairs", r"p\.xyz: cannot tell the format"),
    ("missing-local-file", lambda tmp: tmp / "data" / "pairs.jsonl", "pairs", r"pairs\.jsonl: file not found"),
    ("labeled-empty-label", _write("l.jsonl", '{"text": "a", "label": " "}\n'), "labeled",
     r"l\.jsonl:1: column 'label' is empty"),
]

BEIR_FAULTS = [
    ("beir-no-qrels", _beir(GOOD_CORPUS, GOOD_QUERIES, None), r"qrels/test\.tsv: file not found"),
    ("beir-bad-corpus-line", _beir(GOOD_CORPUS + "{oops\n", GOOD_QUERIES, GOOD_QRELS), r"corpus\.jsonl:2: invalid JSON"),
    ("beir-corpus-no-id", _beir('{"text": "x"}\n', GOOD_QUERIES, GOOD_QRELS), r"corpus\.jsonl:1: missing column '_id'"),
    ("beir-corpus-text-not-str", _beir('{"_id": "d1", "text": 5}\n', GOOD_QUERIES, GOOD_QRELS),
     r"corpus\.jsonl:1: column 'text': expected text, got int 5"),
    ("beir-query-empty", _beir(GOOD_CORPUS, '{"_id": "q1", "text": " "}\n', GOOD_QRELS),
     r"queries\.jsonl:1: column 'text' is empty"),
    ("beir-qrels-bad-score", _beir(GOOD_CORPUS, GOOD_QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\tyes\n"),
     r"test\.tsv:2: column 'score': expected a number, got 'yes'"),
    ("beir-qrels-short-row", _beir(GOOD_CORPUS, GOOD_QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\n"),
     r"test\.tsv:2: missing column 'score'"),
    ("beir-qrels-extra-field", _beir(GOOD_CORPUS, GOOD_QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\t1\t9\n"),
     r"test\.tsv:2: 4 fields but the header has 3"),
    ("beir-queries-undecodable", _beir(GOOD_CORPUS, b'{"_id": "q1", "text": "\xff"}\n', GOOD_QRELS),
     r"queries\.jsonl:1: not valid UTF-8"),
]


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("writer, kind, pattern", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_loader_fault_is_one_line_data_error(tmp_path: Path, writer: Writer, kind: str, pattern: str) -> None:
    path = writer(tmp_path)
    with pytest.raises(DataError) as info:
        load_data(str(path), kind)
    assert re.search(pattern, _one_line(info.value)), str(info.value)
    assert str(info.value).startswith(str(path)), "the message starts with the file it is about"


@pytest.mark.parametrize("writer, pattern", [f[1:] for f in BEIR_FAULTS], ids=[f[0] for f in BEIR_FAULTS])
def test_beir_fault_is_one_line_data_error(tmp_path: Path, writer: Writer, pattern: str) -> None:
    root = writer(tmp_path)
    with pytest.raises(DataError) as info:
        load_beir(root, "test")
    assert re.search(pattern, _one_line(info.value)), str(info.value)


# ------------------------------------------------------------------------------- missing files and the hub


@pytest.mark.parametrize("value", ["data/pairs.jsonl", "pairs.csv", "data/sub/pairs", "existing/pairs"])
def test_missing_local_looking_path_never_asks_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       value: str) -> None:
    import embedforge.data as D

    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    monkeypatch.setattr(D, "_read_hub", lambda spec: pytest.fail(f"asked the hub for {spec.path}"))
    with pytest.raises(DataError) as info:
        load_data(value, "pairs")
    assert _one_line(info.value) == f"{value}: file not found"


def test_hub_name_still_goes_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import embedforge.data as D

    monkeypatch.chdir(tmp_path)
    asked: list[str] = []

    def fake_hub(spec: D.DataSpec):  # type: ignore[no-untyped-def]
        asked.append(spec.path)
        yield 1, {"anchor": "a", "positive": "b"}

    monkeypatch.setattr(D, "_read_hub", fake_hub)
    assert load_data("some-org/some-set", "pairs")["anchor"] == ["a"] and asked == ["some-org/some-set"]


# ---------------------------------------------------------------------------------------- huge texts


def test_long_texts_are_cut_while_loading_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from embedforge.data import max_chars_for

    huge = "word " * 200_000  # one 1 MB line
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"anchor": huge, "positive": "short"}) + "\n"
                 + json.dumps({"anchor": "fine", "positive": huge}) + "\n")
    limit = max_chars_for(32)
    assert limit == 32 * 16
    assert max_chars_for(float("inf")) is None and max_chars_for(None) is None  # static tables read any length
    with caplog.at_level(logging.WARNING, logger="embedforge.data"):
        ds = load_data(str(f), "pairs", max_chars=limit)
    assert ds["anchor"] == [huge[:limit], "fine"] and ds["positive"] == ["short", huge[:limit]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{f}: 2 text(s) longer than {limit} characters were cut to that length "
                        "(the model reads no further)"]
    assert load_data(str(f), "pairs")["anchor"][0] == huge  # no bound given: nothing is cut
    # csv has a 128 KiB field limit of its own; a long field is read, then cut
    c = tmp_path / "t.csv"
    c.write_text("text\n" + "x" * 300_000 + "\n")
    assert load_data(str(c), "texts", max_chars=100)["text"] == ["x" * 100]


def test_long_beir_documents_are_cut(tmp_path: Path) -> None:
    root = _beir(json.dumps({"_id": "d1", "title": "T", "text": "y" * 5000}) + "\n", GOOD_QUERIES, GOOD_QRELS)(tmp_path)
    assert load_beir(root, "test", max_chars=64).corpus["d1"] == ("T " + "y" * 5000)[:64]


def test_unicode_line_separator_inside_a_field_stays_one_row(tmp_path: Path) -> None:
    f = tmp_path / "t.tsv"
    f.write_text("text\tlabel\nfirst\u2028part\ta\nsecond\tb\n")
    ds = load_data(str(f), "labeled")
    assert ds["text"] == ["first\u2028part", "second"] and ds["label"] == ["a", "b"]


# ------------------------------------------------------------------------------ evaluation data (CLI)


def _eval(tmp_path: Path, task: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "no-such-model"), "--task", task])
    return res.exit_code, res.output


@pytest.mark.parametrize("scores, message", [
    (["1", "nan", "3"], "sts.tsv:3: column 'score': expected a finite number, got 'nan'"),
    (["1", "-inf", "3"], "sts.tsv:3: column 'score': expected a finite number, got '-inf'"),
    (["2", "2", "2"], "sts.tsv: every gold score is 2; a correlation needs scores that differ"),
    (["2"], "sts.tsv: STS needs at least 2 scored pairs, found 1"),
])
def test_eval_refuses_sts_scores_without_a_correlation(tmp_path: Path, scores: list[str], message: str) -> None:
    data = tmp_path / "sts.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t{s}\n" for i, s in enumerate(scores)))
    code, output = _eval(tmp_path, f"sts:{data}")
    assert code == 2, output  # refused before the (missing) model is loaded
    assert message in output and "Traceback" not in output


@pytest.mark.parametrize("labels, message", [
    (["a"] * 6, "classification needs at least 2 different labels, found 1 (only 'a')"),
    (["a"] * 5 + ["b"], "classification needs at least 2 rows per label for the train/dev split; label 'b' has 1"),
])
def test_eval_refuses_labeled_data_that_cannot_be_split(tmp_path: Path, labels: list[str], message: str) -> None:
    data = tmp_path / "clf.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": lab}) + "\n" for i, lab in enumerate(labels)))
    code, output = _eval(tmp_path, f"classification:{data}")
    assert code == 2, output
    assert message in output and "Traceback" not in output


def test_evaluate_sts_refuses_constant_scores_before_encoding() -> None:
    from embedforge.evaluation import evaluate_sts

    class NeverEncode:
        def encode(self, texts: list[str], batch_size: int, prompt: str | None):  # type: ignore[no-untyped-def]
            pytest.fail("encoded before checking the scores")

    with pytest.raises(DataError, match="every gold score is 1; a correlation needs scores that differ"):
        evaluate_sts(NeverEncode(), {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [1.0, 1.0]})


def test_evaluate_sts_refuses_a_model_with_constant_similarities() -> None:
    import numpy as np

    from embedforge.errors import RunError
    from embedforge.evaluation import evaluate_sts

    class Constant:
        def encode(self, texts: list[str], batch_size: int, prompt: str | None):  # type: ignore[no-untyped-def]
            return np.ones((len(texts), 4), dtype=np.float32)

    with pytest.raises(RunError, match="identical cosine similarities for every pair"):
        evaluate_sts(Constant(), {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [1.0, 2.0]},
                     show_progress=False)


# --------------------------------------------------------------- every stage passes the model's bound


class _Stop(Exception):
    pass


def test_stages_pass_the_text_bound_to_their_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """distill, contrastive, simcse and mntp load their data with max_chars from the token limit."""
    import embedforge.convert.train_model as TM
    import embedforge.convert.training as T
    import embedforge.data as D
    import embedforge.distill.pipeline as DP
    from embedforge.configs import StageContext
    from embedforge.convert.train_config import ContrastiveConfig, MntpConfig, SimcseConfig
    from embedforge.distill.config import DistillConfig

    seen: dict[str, int | None] = {}

    def stop(name: str):  # type: ignore[no-untyped-def]
        def record(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen[name] = kwargs.get("max_chars", args[-1])
            raise _Stop
        return record

    class FakeModel:
        max_seq_length = 40
        tokenizer = None

    monkeypatch.setattr(D, "load_texts", stop("distill"))  # distill imports it when it runs
    with pytest.raises(_Stop):
        DP.run(DistillConfig(model="t", texts=["x.jsonl"], layers=1, max_seq_length=24), tmp_path / "d", StageContext())
    monkeypatch.setattr(TM, "load_start_model", lambda config: (FakeModel(), None))
    monkeypatch.setattr(T, "load_pairs", stop("contrastive"))
    with pytest.raises(_Stop):
        T.run_contrastive(ContrastiveConfig(model="m", data=["p.jsonl"], max_seq_length=None), tmp_path / "c",
                          StageContext())
    monkeypatch.setattr(T, "load_texts", stop("simcse"))
    with pytest.raises(_Stop):
        T.run_simcse(SimcseConfig(model="m", max_seq_length=8), tmp_path / "s", StageContext())
    monkeypatch.setattr(T, "load_texts", stop("mntp"))
    with pytest.raises(_Stop):
        T.run_mntp(MntpConfig(model="m", max_seq_length=None), tmp_path / "n", StageContext())
    assert seen == {"distill": 24 * 16, "contrastive": 40 * 16, "simcse": 8 * 16, "mntp": 40 * 16}


def test_stage_loaders_cut_long_texts(tmp_path: Path) -> None:
    from embedforge.convert.training import load_pairs
    from embedforge.data import load_texts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"anchor": "a" * 50, "positive": "b" * 50}) + "\n"
                 + json.dumps({"anchor": "c" * 50, "positive": "d"}) + "\n")
    assert load_texts([str(f)], max_chars=5) == ["aaaaa", "ccccc", "bbbbb", "d"]
    assert load_pairs(str(f), None, False, max_chars=5)["anchor"] == ["aaaaa", "ccccc"]
    assert load_texts([{"path": str(f), "kind": "pairs"}], max_chars=5) == ["aaaaa", "ccccc", "bbbbb", "d"]
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"text": "e" * 50}) + "\n")
    assert load_texts(str(t), max_chars=7) == ["eeeeeee"]


def test_evaluate_refuses_truncate_dim_beyond_the_model(tiny_st_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import embedforge.evaluation as E
    from embedforge.configs import ConfigError

    data = tmp_path / "sts.tsv"
    data.write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\n")
    monkeypatch.setattr(E, "run_task", lambda *a, **k: pytest.fail("encoded before checking truncate_dim"))
    with pytest.raises(ConfigError, match=r"^truncate_dim: 4096 is larger than the model's 32 dimensions; use at "
                                          r"most 32$"):
        E.evaluate(str(tiny_st_dir), [f"sts:{data}"], truncate_dim=4096, show_progress=False)
    with pytest.raises(ConfigError, match="truncate_dim: 64 is larger than the model's 32 dimensions"):
        E.encode(str(tiny_st_dir), ["a", "b"], truncate_dim=64, show_progress=False)


def test_damaged_saved_dataset_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        load_data(str(folder), "texts")
    assert _one_line(info.value).startswith(f"{folder}: not a readable saved dataset (")
