"""Data loading and validation.

Every loader returns a ``datasets.Dataset`` with canonical column names, so the trainers and evaluators never
care where the data came from:

=============  ==========================================
kind           columns
=============  ==========================================
texts          text
pairs          anchor, positive
triplets       anchor, positive, negative (, negative_2, ...)
scored         sentence1, sentence2, score
labeled        text, label
=============  ==========================================

Files may be JSONL, CSV/TSV, Parquet, a directory written by ``Dataset.save_to_disk``, or (online only) a hub
dataset name. ``columns`` maps canonical names to the file's own column names (or, for header-less CSV/TSV, to
0-based field indexes). Problems raise :class:`DataError` naming the file, the line or row and the column, and they
are found before any long job starts. BEIR retrieval folders load with :func:`load_beir`.

The public data sets used for development live in ``../shared/data`` (or ``$EMBEDFORGE_DATA``); :func:`builtin`
knows them by short names such as ``stsb-dev`` or ``snli-triplets``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

from embedforge.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)


class DataError(UsageError, ValueError):
    """Bad input data; the message names file, line/row and column."""


class DataKind(str, Enum):
    TEXTS = "texts"
    PAIRS = "pairs"
    TRIPLETS = "triplets"
    SCORED = "scored"
    LABELED = "labeled"


COLUMNS: dict[DataKind, tuple[str, ...]] = {
    DataKind.TEXTS: ("text",),
    DataKind.PAIRS: ("anchor", "positive"),
    DataKind.TRIPLETS: ("anchor", "positive", "negative"),
    DataKind.SCORED: ("sentence1", "sentence2", "score"),
    DataKind.LABELED: ("text", "label"),
}
NUMERIC = {"score"}


@dataclass
class DataSpec:
    """Where a data set comes from and how its columns map to the canonical ones."""

    path: str
    kind: DataKind | str = DataKind.PAIRS
    format: str = "auto"
    columns: dict[str, str | int] = field(default_factory=dict)
    header: bool = True
    limit: int | None = None
    split: str = "train"
    min_score: float | None = None  # for scored -> pairs: keep rows scoring at least this
    extra_negatives: int = 0  # triplets: how many additional negative_N columns to expect

    def __post_init__(self) -> None:
        if isinstance(self.kind, str) and not isinstance(self.kind, DataKind):
            try:
                self.kind = DataKind(self.kind)
            except ValueError:
                valid = ", ".join(k.value for k in DataKind)
                raise DataError(f"data kind {self.kind!r} is not one of {valid}") from None


def _detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf-disk"
        raise DataError(f"{path}: a directory but not a saved datasets directory (no dataset_info.json)")
    suffixes = "".join(path.suffixes[-2:]).lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".tsv", "tsv"), (".csv", "csv"),
                     (".parquet", "parquet"), (".txt", "tsv")):
        if suffixes.endswith(ext):
            return fmt
    raise DataError(f"{path}: cannot tell the format from the suffix; set format: jsonl|csv|tsv|parquet|hf-disk")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = "; the file looks like one JSON array: write one object per line (JSONL)" if (
                    lineno == 1 and line.lstrip().startswith("[")) else ""
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}){hint}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _read_delimited(path: Path, delimiter: str, header: bool) -> Iterator[tuple[int, dict[str | int, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # Long texts are cut after reading (cut_texts); the csv module's 128 KiB field limit must not refuse them.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # newline="" lets csv see the file's own line ends (str.splitlines would also split on U+2028 and friends).
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    names: list[str] | None = None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: unreadable {'TSV' if delimiter == chr(9) else 'CSV'} "
                            f"row ({exc})") from None
        lineno = reader.line_num
        if not fields:
            continue
        if header and names is None:
            names = [f.strip() for f in fields]
            continue
        if names is not None:
            if len(fields) > len(names):
                raise DataError(f"{path}:{lineno}: {len(fields)} fields but the header has {len(names)}; "
                                f"quote values that contain the delimiter {delimiter!r}")
            yield lineno, {n: (fields[i] if i < len(fields) else None) for i, n in enumerate(names)}
        else:
            yield lineno, dict(enumerate(fields))


def _read_rows(spec: DataSpec) -> Iterator[tuple[int, dict[Any, Any]]]:
    """Yield (line-or-row number, row) pairs from any supported source."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        if spec.format == "hub" or (spec.format == "auto" and _may_be_hub_name(spec.path)):
            yield from _read_hub(spec)
            return
        raise DataError(f"{path}: file not found")
    fmt = _detect_format(path, spec.format)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt in ("csv", "tsv"):
        yield from _read_delimited(path, "\t" if fmt == "tsv" else ",", spec.header)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = _read_parquet(path, pq)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
    elif fmt == "hf-disk":
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
            reason = " ".join(str(exc).split())[:200]
            raise DataError(f"{path}: not a readable saved dataset ({type(exc).__name__}: {reason})") from None
        if isinstance(ds, DatasetDict):
            if spec.split not in ds:
                raise DataError(f"{path}: no split {spec.split!r} (has {', '.join(ds)})")
            ds = ds[spec.split]
        for i, row in enumerate(ds, start=1):
            yield i, row
    else:
        raise DataError(f"{path}: unknown format {fmt!r}")


LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz")


def _may_be_hub_name(value: str) -> bool:
    """Whether a path that does not exist could still be a dataset hub name (``org/name``).

    A value with a data file suffix, a leading ``.``/``/``/``~``, more than one slash, a backslash, or whose
    parent folder exists on this machine is a local file that is missing: no hub round trip is made for it.
    """
    if value.startswith((".", "/", "~")) or "\\" in value or value.count("/") != 1:
        return False
    if value.lower().endswith(LOCAL_SUFFIXES):
        return False
    return not Path(value).parent.is_dir()


def _read_parquet(path: Path, pq: Any) -> Any:
    import pyarrow as pa

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: not a Parquet file ({reason})") from None


def _read_hub(spec: DataSpec) -> Iterator[tuple[int, dict[Any, Any]]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.path, split=spec.split)
    except Exception as exc:  # network errors, unknown names
        raise DataError(f"{spec.path}: not a local file, and loading it from the dataset hub failed: {exc}") from exc
    for i, row in enumerate(ds, start=1):
        yield i, row


def expected_columns(spec: DataSpec) -> tuple[str, ...]:
    cols = COLUMNS[DataKind(spec.kind)]
    if spec.kind == DataKind.TRIPLETS and spec.extra_negatives:
        cols = cols + tuple(f"negative_{i + 2}" for i in range(spec.extra_negatives))
    return cols


def _convert(value: Any, column: str, where: str) -> Any:
    if column in NUMERIC:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: column {column!r}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise DataError(f"{where}: column {column!r}: expected a finite number, got {value!r}")
        return number
    if column == "label":
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: column {column!r} is empty")
        return value if isinstance(value, (int, str)) else str(value)
    if not isinstance(value, str):
        if value is None:
            raise DataError(f"{where}: column {column!r} is missing or null")
        raise DataError(f"{where}: column {column!r}: expected text, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty")
    return value


CHARS_PER_TOKEN = 16  # no tokenizer turns more than this many characters into one token in practice


def max_chars_for(max_seq_length: int | None) -> int | None:
    """The longest text worth keeping for a model that reads ``max_seq_length`` tokens.

    None (no bound) when the length is unknown or unbounded: a static token table reports ``math.inf``.
    """
    if not isinstance(max_seq_length, (int, float)) or not math.isfinite(max_seq_length) or max_seq_length <= 0:
        return None
    return int(max_seq_length) * CHARS_PER_TOKEN


def cut_texts(records: dict[str, list[Any]], max_chars: int | None, source: str) -> dict[str, list[Any]]:
    """Cut every text value (not labels) to ``max_chars`` characters, in place; one warning counts the cuts.

    A model never reads past its token limit, so text beyond ``max_chars`` only costs memory and time (a single
    50 MB line made tokenization take minutes and gigabytes).
    """
    if max_chars is None:
        return records
    cut = 0
    for column, values in records.items():
        if column in NUMERIC or column == "label":
            continue
        for i, value in enumerate(values):
            if isinstance(value, str) and len(value) > max_chars:
                values[i] = value[:max_chars]
                cut += 1
    if cut:
        logger.warning("%s: %d text(s) longer than %d characters were cut to that length (the model reads no "
                       "further)", source, cut, max_chars)
    return records


def load_records(spec: DataSpec, *, max_chars: int | None = None) -> dict[str, list[Any]]:
    """Read and validate a data set into canonical columns (plain lists; no ``datasets`` import).

    ``max_chars`` cuts longer texts to that many characters (see :func:`max_chars_for`).
    """
    wanted = expected_columns(spec)
    mapping = {c: spec.columns.get(c, c) for c in wanted}
    if spec.min_score is not None and spec.kind == DataKind.PAIRS:
        mapping.setdefault("score", spec.columns.get("score", "score"))
    out: dict[str, list[Any]] = {c: [] for c in wanted}
    checked_header = False
    n = 0
    for lineno, row in _read_rows(spec):
        where = f"{spec.path}:{lineno}"
        if not checked_header:
            missing = [f"{canon} (as {src!r})" if canon != src else repr(canon)
                       for canon, src in mapping.items() if src not in row]
            if missing:
                have = ", ".join(repr(k) for k in row)
                raise DataError(f"{spec.path}: missing column(s) {', '.join(missing)}; the file has {have}. "
                                f"Map them with columns: {{canonical: source}}")
            checked_header = True
        if spec.min_score is not None and "score" in mapping:
            score = _convert(row.get(mapping["score"]), "score", where)
            if score < spec.min_score:
                continue
        for canon in wanted:
            if mapping[canon] not in row:
                raise DataError(f"{where}: row has no column {mapping[canon]!r}")
            out[canon].append(_convert(row[mapping[canon]], canon, where))
        n += 1
        if spec.limit is not None and n >= spec.limit:
            break
    if n == 0:
        raise DataError(f"{spec.path}: no rows" + (" after filtering" if spec.min_score is not None else ""))
    return cut_texts(out, max_chars, spec.path)


def load_data(spec: DataSpec | dict[str, Any] | str, kind: DataKind | str | None = None, *,
              max_chars: int | None = None) -> Dataset:
    """Load a data set described by ``spec`` (a :class:`DataSpec`, a dict of its fields, or a path / builtin name).

    ``max_chars`` cuts longer texts (pass ``max_chars_for(model max_seq_length)``): no model reads them whole.
    """
    from datasets import Dataset

    if isinstance(spec, str):
        if spec in BUILTINS:
            return builtin(spec, max_chars=max_chars)
        spec = DataSpec(path=spec, kind=kind or DataKind.PAIRS)
    elif isinstance(spec, dict):
        fields = dict(spec)
        if kind is not None:
            fields.setdefault("kind", kind)
        if fields.get("path") in BUILTINS and set(fields) <= {"path", "kind", "limit"}:
            ds = builtin(fields["path"], max_chars=max_chars)
            return ds.select(range(min(len(ds), fields["limit"]))) if fields.get("limit") else ds
        spec = DataSpec(**fields)
    elif kind is not None:
        spec.kind = DataKind(kind)
    return Dataset.from_dict(load_records(spec, max_chars=max_chars))


# ---------------------------------------------------------------------------------------------- texts

TextSource = Union[str, dict[str, Any]]
"""Where :func:`load_texts` reads: a built-in name, a data file, a data spec mapping or ``beir:FOLDER[:split]``."""


def load_texts(sources: TextSource | Sequence[TextSource], *, limit: int | None = None, max_chars: int | None = None,
               min_texts: int = 1, purpose: str = "this stage") -> list[str]:
    """The one text gatherer: every non-blank text of ``sources``, stripped, de-duplicated in first-seen order.

    A source is a built-in data set name, a data file, a data spec mapping (``{path, kind, columns, ...}``; kind
    ``texts`` unless given) or ``beir:FOLDER[:split]`` (its corpus, then its queries). Every text column is read:
    a file with a ``text`` column gives that, a pairs / triplets / scored file its sentences, column by column.
    ``limit`` caps the number of texts in all, counted after de-duplication. Texts longer than ``max_chars``
    characters are cut while loading (see :func:`max_chars_for`). Fewer than ``min_texts`` texts is a
    :class:`DataError` naming the sources.
    """
    listed: list[TextSource] = [sources] if isinstance(sources, (str, dict)) else list(sources)
    seen: dict[str, None] = {}
    for source in listed:
        if limit is not None and len(seen) >= limit:
            break
        for text in _source_texts(source, max_chars):
            text = text.strip()
            if text:
                seen.setdefault(text, None)
                if limit is not None and len(seen) >= limit:
                    break
    texts = list(seen)
    names = ", ".join(_source_name(s) for s in listed) or "(no sources)"
    if len(texts) < min_texts:
        raise DataError(f"{names}: {len(texts)} non-empty text(s) found and {purpose} needs at least {min_texts}; "
                        "name data with a 'text' column, or pairs / triplets")
    logger.info("%d unique texts from %s", len(texts), names)
    return texts


def _source_name(source: TextSource) -> str:
    if isinstance(source, dict):
        return str(source.get("name") or source.get("path", "data"))
    return source


def _source_texts(source: TextSource, max_chars: int | None) -> Iterator[str]:
    """The texts of one source, column by column (no de-duplication)."""
    if isinstance(source, str) and source.startswith("beir:"):
        folder, _, split = source[len("beir:"):].partition(":")
        beir = load_beir(folder, split or "test", max_chars=max_chars)
        yield from beir.corpus.values()
        yield from beir.queries.values()
        return
    if isinstance(source, dict):
        fields = {k: v for k, v in source.items() if k != "name"}
        fields.setdefault("kind", DataKind.TEXTS)
        records = load_data(fields, max_chars=max_chars).to_dict()
    elif source in BUILTINS:
        records = cut_texts(BUILTINS[source][1](), max_chars, source)
    else:
        records = _any_text_columns(source, max_chars)
    for values in records.values():
        if values and isinstance(values[0], str):
            yield from (v for v in values if isinstance(v, str))


def _any_text_columns(path: str, max_chars: int | None) -> dict[str, list[Any]]:
    """A file's ``text`` column, else its triplet, pair or scored-pair sentences (the first layout it has)."""
    try:
        return load_records(DataSpec(path=path, kind=DataKind.TEXTS), max_chars=max_chars)
    except DataError as exc:
        if "missing column" not in str(exc):
            raise
        no_text = exc
    for kind in (DataKind.TRIPLETS, DataKind.PAIRS, DataKind.SCORED):
        try:
            return load_records(DataSpec(path=path, kind=kind), max_chars=max_chars)
        except DataError as exc:
            if "missing column" not in str(exc):
                raise
    raise no_text


# --------------------------------------------------------------------------------------------------- BEIR


@dataclass
class BeirData:
    """A retrieval task: corpus and queries by id, and graded relevance per query."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: str | os.PathLike[str], split: str = "test", *, query_limit: int | None = None,
              max_chars: int | None = None) -> BeirData:
    """Load a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).

    Only queries that appear in the split's qrels are kept. Documents are ``title + " " + text``, cut to
    ``max_chars`` characters when given.
    """
    root = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / name).is_file():
            raise DataError(f"{root / name}: file not found (BEIR layout needs corpus.jsonl, queries.jsonl, qrels/)")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, row in _read_delimited(root / "qrels" / f"{split}.tsv", "\t", header=True):
        where = f"{root / 'qrels' / (split + '.tsv')}:{lineno}"
        for column in ("query-id", "corpus-id", "score"):
            if row.get(column) is None:
                raise DataError(f"{where}: missing column {column!r} (expected query-id, corpus-id, score)")
        try:
            qid, did, score = str(row["query-id"]), str(row["corpus-id"]), int(float(row["score"]))
        except (TypeError, ValueError):
            raise DataError(f"{where}: column 'score': expected a number, got {row.get('score')!r}") from None
        qrels.setdefault(qid, {})[did] = score
    corpus: dict[str, str] = {}
    for lineno, row in _read_jsonl(root / "corpus.jsonl"):
        if "_id" not in row:
            raise DataError(f"{root / 'corpus.jsonl'}:{lineno}: missing column '_id'")
        title, text = (_beir_text(row, key, f"{root / 'corpus.jsonl'}:{lineno}") for key in ("title", "text"))
        corpus[str(row["_id"])] = f"{title} {text}".strip() if title else text
    queries: dict[str, str] = {}
    for lineno, row in _read_jsonl(root / "queries.jsonl"):
        if "_id" not in row or "text" not in row:
            raise DataError(f"{root / 'queries.jsonl'}:{lineno}: missing column '_id' or 'text'")
        if str(row["_id"]) in qrels:
            where = f"{root / 'queries.jsonl'}:{lineno}"
            if not _beir_text(row, "text", where):
                raise DataError(f"{where}: column 'text' is empty")
            queries[str(row["_id"])] = row["text"]
    qrels = {q: rel for q, rel in qrels.items() if q in queries}
    if query_limit is not None:
        keep = sorted(queries)[:query_limit]
        queries = {q: queries[q] for q in keep}
        qrels = {q: qrels[q] for q in keep}
    if not queries:
        raise DataError(f"{root}: no queries of split {split!r} found in queries.jsonl")
    if max_chars is not None:
        cut = cut_texts({"corpus": list(corpus.values()), "queries": list(queries.values())}, max_chars, str(root))
        corpus = dict(zip(corpus, cut["corpus"]))
        queries = dict(zip(queries, cut["queries"]))
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)


def _beir_text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {key!r}: expected text, got {type(value).__name__} {value!r}")
    return value.strip()


# ---------------------------------------------------------------------------------------- built-in data


def shared_data_dir() -> Path:
    """``$EMBEDFORGE_DATA``, else ``../shared/data`` next to the repository (where the dev machines keep it)."""
    env = os.environ.get("EMBEDFORGE_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise DataError("shared data not found: set EMBEDFORGE_DATA to the folder that holds stsb/, sick/, scifact/ ...")


def _stsb(split: str, min_score: float | None = None, kind: DataKind = DataKind.SCORED) -> dict[str, list[Any]]:
    path = shared_data_dir() / "stsb" / f"sts-{split}.csv"
    spec = DataSpec(str(path), kind=kind, format="tsv", header=False, min_score=min_score,
                    columns={"sentence1": 5, "sentence2": 6, "score": 4, "anchor": 5, "positive": 6})
    return load_records(spec)


def _sick(split: str) -> dict[str, list[Any]]:
    path = shared_data_dir() / "sick" / f"SICK_{split}.txt"
    spec = DataSpec(str(path), kind=DataKind.SCORED, format="tsv",
                    columns={"sentence1": "sentence_A", "sentence2": "sentence_B", "score": "relatedness_score"})
    return load_records(spec)


def _snli_triplets() -> dict[str, list[Any]]:
    path = shared_data_dir() / "snli" / "snli_triplets_devtest.jsonl"
    return load_records(DataSpec(str(path), kind=DataKind.TRIPLETS))


def _scifact_pairs() -> dict[str, list[Any]]:
    beir = load_beir(shared_data_dir() / "scifact", "train")
    anchors, positives = [], []
    for qid, rels in sorted(beir.qrels.items()):
        for did, score in sorted(rels.items()):
            if score > 0 and did in beir.corpus:
                anchors.append(beir.queries[qid])
                positives.append(beir.corpus[did])
    return {"anchor": anchors, "positive": positives}


def _scifact_corpus() -> dict[str, list[Any]]:
    """The SciFact corpus documents (title and abstract) as unlabeled texts: no query or relevance label is read."""
    return {"text": list(load_beir(shared_data_dir() / "scifact", "dev").corpus.values())}


def _newsgroups_pairs() -> dict[str, list[Any]]:
    path = shared_data_dir() / "20newsgroups_train.jsonl"
    anchors, positives = [], []
    for _, row in _read_jsonl(path):
        subject = (row.get("subject") or "").strip()
        body = (row.get("text") or "").strip()
        # The body repeats the headers; keep what follows the first blank line.
        body = body.split("\n\n", 1)[-1].strip()
        if len(subject) > 8 and len(body) > 40:
            anchors.append(subject)
            positives.append(body)
    return {"anchor": anchors, "positive": positives}


def _banking77() -> dict[str, list[Any]]:
    path = shared_data_dir() / "banking77" / "train.csv"
    return load_records(DataSpec(str(path), kind=DataKind.LABELED, format="csv", columns={"label": "category"}))


def _texts() -> dict[str, list[Any]]:
    """Unlabeled sentences from every built-in set (deduplicated, shuffled with a fixed seed)."""
    seen: dict[str, None] = {}
    for part in (_stsb("train"), _sick("train")):
        for s in part["sentence1"] + part["sentence2"]:
            seen.setdefault(s, None)
    trip = _snli_triplets()
    for col in ("anchor", "positive", "negative"):
        for s in trip[col]:
            seen.setdefault(s.strip(), None)
    for s in _banking77()["text"]:
        seen.setdefault(s, None)
    texts = list(seen)
    random.Random(0).shuffle(texts)
    return {"text": texts}


BUILTINS: dict[str, tuple[DataKind, Any]] = {
    "stsb-train": (DataKind.SCORED, lambda: _stsb("train")),
    "stsb-dev": (DataKind.SCORED, lambda: _stsb("dev")),
    "stsb-train-pairs": (DataKind.PAIRS, lambda: _stsb("train", min_score=4.0, kind=DataKind.PAIRS)),
    "sick-train": (DataKind.SCORED, lambda: _sick("train")),
    "sick-trial": (DataKind.SCORED, lambda: _sick("trial")),
    "snli-triplets": (DataKind.TRIPLETS, _snli_triplets),
    "scifact-train-pairs": (DataKind.PAIRS, _scifact_pairs),
    "scifact-corpus": (DataKind.TEXTS, _scifact_corpus),
    "newsgroups-pairs": (DataKind.PAIRS, _newsgroups_pairs),
    "banking77": (DataKind.LABELED, _banking77),
    "texts": (DataKind.TEXTS, _texts),
}


def builtin(name: str, *, max_chars: int | None = None) -> Dataset:
    """A built-in development data set from the shared data folder, as a ``datasets.Dataset``."""
    from datasets import Dataset

    if name not in BUILTINS:
        raise DataError(f"unknown built-in data set {name!r}; known: {', '.join(sorted(BUILTINS))}")
    return Dataset.from_dict(cut_texts(BUILTINS[name][1](), max_chars, name))


def builtin_beir(name: str = "scifact-dev", *, max_chars: int | None = None) -> BeirData:
    """Built-in retrieval tasks: ``scifact-dev`` (SciFact dev qrels over the whole corpus)."""
    if name != "scifact-dev":
        raise DataError(f"unknown built-in retrieval task {name!r}; known: scifact-dev")
    return load_beir(shared_data_dir() / "scifact", "dev", max_chars=max_chars)
