"""Binary retrieval benchmark: SciFact dev queries over the whole corpus, float vs binary indexes.

    python -m bench.dev.binary_retrieval --model minilm-l6 --out runs/bench-binary

Compares, in one run and on the same vectors:

* exact float search (FAISS ``IndexFlatIP``) — the reference nDCG@10, search time and index memory;
* sign binarization in a FAISS ``IndexBinaryFlat``: hamming only, and top-``k`` by hamming rescored with the float
  query against int8 document vectors (calibrated ranges) or float document vectors;
* the learned multi-bit binarizer (BEBR-style, :mod:`embedforge.compress.binarizer`) trained on vectors of texts
  that are NOT dev queries (SciFact corpus, SciFact train queries, generic sentences), scored with bit operations
  only, and as a candidate generator with rescoring;
* an equal-bit baseline for the learned 2-bit code: sign of a random 2x rotation (LSH with ``2 * D`` bits).

Search times are single-threaded medians over repeats, for the 200 queries as one batch and one query at a time.

SciFact alone has 5,183 documents: a float index of 7.6 MB that sits in cache, where fixed per-call costs decide
the search time. ``--distractors-from`` / ``--distractor-onnx`` enlarge the corpus with REAL distractor texts
(STS-B train, SICK train, SNLI triplets, 20 Newsgroups subjects and bodies; nothing from SciFact), encoded by the
same model; the SciFact qrels stay valid, so nDCG@10 is reported on the enlarged corpus for float and binary
search alike, next to per-query latency and batch throughput of both sides (single-threaded, interleaved rounds).

Writes ``results.json`` (partial after every step) and ``results.md`` under ``--out``; ``run()`` returns the dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench._common import write_results

logger = logging.getLogger("bench.binary_retrieval")

RESCORE_K = 100  # binary candidates kept for the hamming-only ranking (recall@100 needs 100)
RESCORE_DEPTHS = (20, 40, 100)  # candidates per query handed to rescoring (2x, 4x, 10x the evaluated depth)
HEADLINE_DEPTH = 40  # sentence-transformers' default rescore multiplier (4) x top-10


def _texts_for_training(beir_train_queries: dict[str, str], dev_queries: dict[str, str], n_generic: int
                        ) -> list[str]:
    """Extra training texts for the binarizer (besides the corpus): non-dev SciFact queries + generic sentences."""
    from embedforge.data import builtin

    dev = set(dev_queries.values())
    texts = [t for t in beir_train_queries.values() if t not in dev]
    if n_generic:
        generic = builtin("texts")["text"][:n_generic]
        texts += [t for t in generic if t not in dev]
    return texts


def _encode_cached(encoder: Any, texts: list[str], cache: Path, desc: str) -> np.ndarray:
    from embedforge.evaluation import encode

    if cache.is_file():
        arr = np.load(cache)
        if arr.shape[0] == len(texts):
            return arr
    emb = encode(encoder, texts, batch_size=32, normalize=True, desc=desc)
    np.save(cache, emb)
    return emb


def _time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _scores_from_topk(ids: np.ndarray, scores: np.ndarray, n_docs: int) -> np.ndarray:
    """Dense query x doc matrix holding the given top-k scores and -inf elsewhere (for the metric code)."""
    out = np.full((ids.shape[0], n_docs), -np.inf, dtype=np.float32)
    for i in range(ids.shape[0]):
        keep = ids[i] >= 0
        out[i, ids[i][keep]] = scores[i][keep]
    return out


def _rank_ids(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _markdown(result: dict[str, Any]) -> str:
    rows = ["| method | bits/doc | nDCG@10 | % of float | index bytes | memory ratio | search ms (batch) | "
            "speed-up (batch) | search ms (1 query) | speed-up (1 query) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result.get("methods", {}).items():
        rows.append(
            f"| {name} | {m.get('bits', '')} | {m['ndcg@10']:.2f} | {m.get('retention', 0) * 100:.1f} | "
            f"{m.get('index_bytes', '')} | {m.get('memory_ratio', 0):.1f}x | {m.get('search_ms_batch', float('nan')):.2f} | "
            f"{m.get('speedup_batch', float('nan')):.1f}x | {m.get('search_ms_single', float('nan')):.3f} | "
            f"{m.get('speedup_single', float('nan')):.1f}x |")
    head = [f"# Binary retrieval on SciFact dev ({result.get('model')})", "",
            f"queries {result.get('n_queries')}, documents {result.get('n_docs')}, dim {result.get('dim')}, "
            f"rescoring depths {list(RESCORE_DEPTHS)} (headline {HEADLINE_DEPTH}); times: single-threaded FAISS, "
            "median of repeats", ""]
    tail = ["", "Comparisons:", ""] + [f"- {k}: {v}" for k, v in result.get("comparisons", {}).items()]
    enl = result.get("enlarged")
    if enl:
        tail += ["", f"## Enlarged corpus: {enl['n_scifact_docs']} SciFact + {enl['n_distractors']} real distractors "
                 f"= {enl['n_docs']} documents", "", enl["note"], "",
                 "| method | nDCG@10 | % of float | index bytes | memory ratio | latency ms (mean / p50 / p95) | "
                 "speed-up (1 query) | batch ms (200 q) | queries/s (batch) | speed-up (batch) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in enl["methods"].items():
            tail.append(f"| {name} | {m['ndcg@10']:.2f} | {m['retention'] * 100:.1f} | {m['index_bytes']} | "
                        f"{m['memory_ratio']:.1f}x | {m['latency_ms_mean']:.3f} / {m['latency_ms_p50']:.3f} / "
                        f"{m['latency_ms_p95']:.3f} | {m['speedup_latency']:.1f}x | {m['batch_ms']:.1f} | "
                        f"{m['batch_queries_per_s']:.0f} | {m['speedup_batch']:.1f}x |")
        tail += ["", f"Distractors: {json.dumps(enl.get('distractors', {}))}"]
    return "\n".join(head + rows + tail) + "\n"


def _scaled_timing(docs: np.ndarray, queries: np.ndarray, calib: Any, n_docs: int, n_queries: int, repeats: int,
                   seed: int) -> dict[str, Any]:
    """Per-query search latency on a larger synthetic corpus (real vectors resampled with noise): timing only.

    The SciFact corpus (5k docs, 7.6 MB of floats) fits in cache, which flatters float search; here the float
    index no longer does, as in production-size collections.
    """
    import faiss

    from embedforge.compress.quantization import binary_search, faiss_binary_index, pack_binary, rescore

    rng = np.random.default_rng(seed)
    big = docs[rng.integers(0, len(docs), n_docs)]
    big = big + np.float32(0.3 / np.sqrt(docs.shape[1])) * rng.standard_normal(big.shape, dtype=np.float32)
    big = (big / np.linalg.norm(big, axis=1, keepdims=True)).astype(np.float32)
    flat = faiss.IndexFlatIP(big.shape[1])
    flat.add(big)
    codes = pack_binary(big)
    index = faiss_binary_index(codes)
    big8 = calib.quantize(big)
    q, qc = queries[:n_queries], pack_binary(queries[:n_queries])
    t_float = _time(lambda: [flat.search(q[i:i + 1], 10) for i in range(n_queries)], repeats) / n_queries
    t_ham = _time(lambda: [binary_search(index, qc[i:i + 1], 10) for i in range(n_queries)], repeats) / n_queries
    t_res = _time(lambda: [rescore(q[i:i + 1], binary_search(index, qc[i:i + 1], HEADLINE_DEPTH)[1], big8, 10,
                                   calibration=calib) for i in range(n_queries)], repeats) / n_queries
    return {"n_docs": n_docs, "n_queries": n_queries, "float_ms": t_float * 1000, "hamming_ms": t_ham * 1000,
            "binary_int8_rescore_ms": t_res * 1000, "speedup_hamming": t_float / t_ham,
            "speedup_rescore": t_float / t_res, "float_index_bytes": int(big.nbytes),
            "binary_index_bytes": int(codes.nbytes)}


DISTRACTOR_SOURCES = ("stsb-train", "sick-train", "snli-triplets", "newsgroups-pairs")


def _norm_text(text: str) -> str:
    """Whitespace-normalized, cut at 1,000 characters (the distill benchmark's text normalization)."""
    return " ".join(text.split())[:1000]


def _distractor_texts(scifact_root: Path, limit: int | None) -> list[str]:
    """Real non-SciFact texts from the shared data, de-duplicated, in a fixed shuffled order.

    Every SciFact text (corpus documents and queries of all splits) is excluded, so no distractor can be a
    relevant document in disguise and the dev qrels stay valid.
    """
    import random

    from embedforge.data import builtin, load_beir

    scifact: set[str] = set()
    for split in ("train", "dev"):
        beir = load_beir(scifact_root, split)
        scifact.update(_norm_text(t) for t in list(beir.corpus.values()) + list(beir.queries.values()))
    seen: dict[str, None] = {}
    for name in DISTRACTOR_SOURCES:
        ds = builtin(name)
        for column in ds.column_names:
            values = ds[column]
            if values and isinstance(values[0], str):
                for text in values:
                    t = _norm_text(text)
                    if len(t) > 3 and t not in scifact:
                        seen.setdefault(t, None)
    texts = list(seen)
    random.Random(0).shuffle(texts)
    return texts[:limit] if limit else texts


def _vectors_from_cache(folder: Path) -> tuple[dict[str, int], np.ndarray, dict[str, Any]]:
    """Read a distill benchmark's teacher-vector cache: ``texts.jsonl`` + ``cache/teacher-vectors/*/shard-*.npy``."""
    texts = [json.loads(line)["text"].strip() for line in (folder / "texts.jsonl").read_text().splitlines()]
    metas = sorted((folder / "cache").glob("teacher-vectors/*/meta.json"))
    if not metas:
        raise FileNotFoundError(f"no teacher-vector cache under {folder / 'cache'}")
    meta = json.loads(metas[0].read_text())
    shards = sorted(metas[0].parent.glob("shard-*.npy"))
    vecs = np.concatenate([np.load(f) for f in shards]).astype(np.float32)
    if len(vecs) != len(texts) or meta.get("n_texts") != len(texts):
        raise ValueError(f"{folder}: {len(vecs)} cached vectors for {len(texts)} texts (meta {meta.get('n_texts')})")
    return {t: i for i, t in enumerate(texts)}, vecs, meta


def _distractor_vectors(encoder: Any, texts: list[str], out: Path, cache_from: str | None,
                        onnx_encoder: Any | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Unit vectors for ``texts``: from a distill teacher cache where it has them, else encoded (and cached)."""
    from embedforge.evaluation import encode, l2_normalize

    info: dict[str, Any] = {"n": len(texts), "sources": list(DISTRACTOR_SOURCES)}
    vecs = np.zeros((len(texts), 0), dtype=np.float32)
    missing = list(range(len(texts)))
    if cache_from:
        index, cached, meta = _vectors_from_cache(Path(cache_from))
        rows = [index.get(t, -1) for t in texts]
        hit = [i for i, r in enumerate(rows) if r >= 0]
        vecs = np.zeros((len(texts), cached.shape[1]), dtype=np.float32)
        vecs[hit] = cached[[rows[i] for i in hit]]
        missing = [i for i, r in enumerate(rows) if r < 0]
        # check: the cache holds this model's vectors -- re-encode short texts (no truncation either way)
        rng = np.random.default_rng(0)
        short = [i for i in hit if len(texts[i]) < 300]
        probe = [int(i) for i in rng.choice(short, size=min(64, len(short)), replace=False)]
        fresh = encode(encoder, [texts[i] for i in probe], batch_size=32, normalize=True, desc="cache check")
        cos = (fresh * l2_normalize(vecs[probe])).sum(1)
        info.update(cache={"from": str(cache_from), "teacher": meta.get("teacher"), "settings": meta.get("settings"),
                           "hits": len(hit), "check_texts": len(probe), "check_min_cosine": float(cos.min())})
        if cos.min() < 0.999:
            raise ValueError(f"cached vectors in {cache_from} are not this model's (min cosine {cos.min():.4f})")
    if missing and cache_from and onnx_encoder is None:  # only what the cache holds: drop the rest
        keep = np.setdiff1d(np.arange(len(texts)), missing)
        info.update(n=len(keep), dropped_not_in_cache=len(missing))
        return l2_normalize(vecs[keep]).astype(np.float32), info
    if missing:
        enc = onnx_encoder or encoder
        cache = out / f"distractors_{len(texts)}_{type(enc).__name__}.npy"
        fresh = _encode_cached(enc, [texts[i] for i in missing], cache, "distractors")
        if vecs.shape[1] == 0:
            vecs = np.zeros((len(texts), fresh.shape[1]), dtype=np.float32)
        vecs[missing] = fresh
        info["encoded"] = {"n": len(missing), "encoder": type(enc).__name__,
                           "file": getattr(enc, "file", None)}
    return l2_normalize(vecs).astype(np.float32), info


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median wall seconds per function over ``rounds``, the functions interleaved within each round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _per_query(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> Callable[[], list[float]]:
    def loop() -> list[float]:
        lat = []
        for i in range(len(queries)):
            t0 = time.perf_counter()
            search(queries[i:i + 1])
            lat.append(time.perf_counter() - t0)
        return lat
    return loop


def _enlarged(result: dict[str, Any], docs: np.ndarray, queries: np.ndarray, doc_ids: list[str],
              query_ids: list[str], qrels: dict[str, dict[str, int]], distractors: np.ndarray, calib: Any,
              rounds: int) -> dict[str, Any]:
    """Quality and speed of float vs binary search on SciFact + real distractors (same vectors, same run)."""
    import faiss

    from embedforge.compress.quantization import BinaryRescoreIndex, binary_search, faiss_binary_index, pack_binary
    from embedforge.evaluation import retrieval_metrics

    big = np.ascontiguousarray(np.concatenate([docs, distractors]), dtype=np.float32)
    ids = doc_ids + [f"distractor-{i}" for i in range(len(distractors))]
    n = len(ids)
    metric = lambda s: retrieval_metrics(s, ids, query_ids, qrels)  # noqa: E731
    flat = faiss.IndexFlatIP(big.shape[1])
    flat.add(big)
    two_stage = BinaryRescoreIndex.build(big, calib)
    ham = faiss_binary_index(pack_binary(big))
    qc = pack_binary(queries)
    searches: dict[str, Callable[[np.ndarray], Any]] = {
        "float32 exact (IndexFlatIP)": lambda q: flat.search(q, 10),
        "sign binary (hamming)": lambda q: ham.search(np.packbits(q > 0, axis=1), 10),
    }
    for depth in RESCORE_DEPTHS:
        searches[f"sign binary + int8 rescore @{depth}"] = (lambda d: lambda q: two_stage.search(q, 10, d))(depth)
    methods: dict[str, Any] = {}
    hd, hi = binary_search(ham, qc, RESCORE_K)
    for name in searches:
        if name.startswith("float"):
            m = metric(queries @ big.T)
            bytes_ = big.nbytes
        elif name == "sign binary (hamming)":
            m = metric(_scores_from_topk(hi, -hd.astype(np.float32) + 1e-3 * np.linspace(1, 0, RESCORE_K)[None], n))
            bytes_ = two_stage.binary_bytes
        else:
            depth = int(name.rsplit("@", 1)[1])
            s, top = two_stage.search(queries, 10, depth)
            m = metric(_scores_from_topk(top, s, n))
            bytes_ = two_stage.binary_bytes
        methods[name] = {"ndcg@10": m["ndcg@10"], "mrr@10": m["mrr@10"], "index_bytes": int(bytes_)}
    # timing: every method in every round, one query at a time (latency) and all queries in one call (batch)
    per_query = {k: _per_query(f, queries) for k, f in searches.items()}
    lat: dict[str, list[float]] = {k: [] for k in searches}
    for fn in per_query.values():
        fn()
    for _ in range(rounds):
        for k, fn in per_query.items():
            lat[k].append(fn())
    batch = _interleaved({k: (lambda f: lambda: f(queries))(f) for k, f in searches.items()}, rounds)
    ref = methods["float32 exact (IndexFlatIP)"]
    ref_lat = float(np.median([np.mean(r) for r in lat["float32 exact (IndexFlatIP)"]]))
    for k, m in methods.items():
        per_round = [np.mean(r) for r in lat[k]]
        all_q = np.concatenate([np.asarray(r) for r in lat[k]])
        m.update(retention=m["ndcg@10"] / ref["ndcg@10"], memory_ratio=ref["index_bytes"] / m["index_bytes"],
                 latency_ms_mean=1000 * float(np.median(per_round)), latency_ms_p50=1000 * float(np.median(all_q)),
                 latency_ms_p95=1000 * float(np.percentile(all_q, 95)),
                 batch_ms=1000 * batch[k], batch_queries_per_s=len(queries) / batch[k])
        m["speedup_latency"] = ref_lat / float(np.median(per_round))
        m["speedup_batch"] = batch["float32 exact (IndexFlatIP)"] / batch[k]
    return {"n_docs": n, "n_scifact_docs": len(doc_ids), "n_distractors": len(distractors),
            "n_queries": len(queries), "rounds": rounds, "methods": methods,
            "note": "single-threaded FAISS / numpy, methods interleaved in every round; latency = one query per "
                    "call (mean over the queries, median over rounds; p50/p95 over all single calls); batch = all "
                    "queries in one call (median over rounds). int8 rows for rescoring are in memory; the memory "
                    "ratio counts the in-memory index only (float vectors vs packed sign bits)."}


def run(model_dir_or_encoder: Any, out_dir: str | os.PathLike[str], *, bits: int = 2, train_steps: int = 600,
        train_batch: int = 512,
        n_generic: int = 5000, repeats: int = 20, seed: int = 0, scifact_dir: str | None = None,
        scale_docs: int = 200_000, distractors_from: str | None = None, distractor_onnx: str | None = None,
        n_distractors: int | None = None, enlarged_rounds: int = 5) -> dict[str, Any]:
    """Run the whole benchmark for one model (a model dir / alias, a SentenceTransformer or an Encoder)."""
    import faiss
    import torch

    from embedforge.compress.binarizer import binarize, level_scores, train_binarizer
    from embedforge.compress.config import BinarizerConfig
    from embedforge.recipe import build_config
    from embedforge.compress.quantization import (
        BinaryRescoreIndex, Int8Calibration, binary_search, faiss_binary_index, pack_binary, rescore,
    )
    from embedforge.data import load_beir, shared_data_dir
    from embedforge.evaluation import as_encoder, retrieval_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    root = Path(scifact_dir) if scifact_dir else shared_data_dir() / "scifact"
    dev = load_beir(root, "dev")
    train = load_beir(root, "train")
    name = str(model_dir_or_encoder) if isinstance(model_dir_or_encoder, (str, os.PathLike)) else type(
        model_dir_or_encoder).__name__
    encoder = as_encoder(model_dir_or_encoder)
    result: dict[str, Any] = {"model": name, "bits_learned": bits, "rescore_k": RESCORE_K, "methods": {},
                              "comparisons": {}, "notes": {}}

    # 1. vectors (cached in out_dir so reruns only redo the search part)
    doc_ids = list(dev.corpus)
    query_ids = list(dev.queries)
    docs = _encode_cached(encoder, [dev.corpus[i] for i in doc_ids], out / "docs.npy", "corpus")
    queries = _encode_cached(encoder, [dev.queries[i] for i in query_ids], out / "queries.npy", "queries")
    extra_texts = _texts_for_training(train.queries, dev.queries, n_generic)
    train_vecs = np.concatenate([docs, _encode_cached(encoder, extra_texts, out / "train_extra.npy", "extra texts")])
    train_texts = [dev.corpus[i] for i in doc_ids] + extra_texts
    assert not set(train_texts) & set(dev.queries.values()), "a dev query leaked into the binarizer's training texts"
    n, dim = docs.shape
    result.update(n_docs=n, n_queries=len(query_ids), dim=dim, n_train_vectors=len(train_texts))
    metric = lambda s: retrieval_metrics(s, doc_ids, query_ids, dev.qrels)  # noqa: E731

    def add(method: str, scores: np.ndarray, bits_per_doc: int, index_bytes: int, t_batch: float | None,
            t_single: float | None, **extra: Any) -> None:
        m = metric(scores)
        entry = {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"], "mrr@10": m["mrr@10"],
                 "bits": bits_per_doc, "index_bytes": index_bytes, **extra}
        if t_batch is not None:
            entry["search_ms_batch"] = t_batch * 1000
        if t_single is not None:
            entry["search_ms_single"] = t_single * 1000
        ref = result["methods"].get("float32 exact")
        if ref is not None:
            entry["retention"] = entry["ndcg@10"] / ref["ndcg@10"]
            entry["memory_ratio"] = ref["index_bytes"] / index_bytes
            if t_batch is not None:
                entry["speedup_batch"] = ref["search_ms_batch"] / entry["search_ms_batch"]
            if t_single is not None:
                entry["speedup_single"] = ref["search_ms_single"] / entry["search_ms_single"]
        else:
            entry.update(retention=1.0, memory_ratio=1.0, speedup_batch=1.0, speedup_single=1.0)
        result["methods"][method] = entry
        logger.info("%s: nDCG@10 %.2f", method, entry["ndcg@10"])
        write_results(out, result)
        (out / "results.md").write_text(_markdown(result))

    # 2. exact float search
    flat = faiss.IndexFlatIP(dim)
    flat.add(docs)
    t_b = _time(lambda: flat.search(queries, 10), repeats)
    t_s = _time(lambda: [flat.search(queries[i:i + 1], 10) for i in range(len(queries))], max(3, repeats // 4))
    t_s /= len(queries)
    add("float32 exact", queries @ docs.T, 32 * dim, docs.nbytes, t_b, t_s)

    # 3. sign binarization: hamming only, then rescoring of the top-`depth` candidates with int8 / float documents
    codes = pack_binary(docs)
    qcodes = pack_binary(queries)
    index = faiss_binary_index(codes)
    calib = Int8Calibration.fit(train_vecs)
    docs_int8 = calib.quantize(docs)
    hd, hi = binary_search(index, qcodes, RESCORE_K)
    t_b = _time(lambda: binary_search(index, qcodes, 10), repeats)
    t_s = _time(lambda: [binary_search(index, qcodes[i:i + 1], 10) for i in range(len(queries))],
                max(3, repeats // 4)) / len(queries)
    ham_scores = _scores_from_topk(hi, -hd.astype(np.float32) + 1e-3 * np.linspace(1, 0, RESCORE_K)[None], n)
    add("sign binary (hamming)", ham_scores, dim, codes.nbytes, t_b, t_s)

    two_stage = BinaryRescoreIndex(codes, docs_int8, calib)  # packs the query itself, int8 rows in memory
    for depth in RESCORE_DEPTHS:
        for label, vecs, cal in (("int8", docs_int8, calib), ("float", docs, None)):
            def search(qs: np.ndarray, qc: np.ndarray, k: int = 10, depth: int = depth, vecs: np.ndarray = vecs,
                       cal: Any = cal) -> tuple[np.ndarray, np.ndarray]:
                if cal is not None:
                    return two_stage.search(qs, k, depth)
                return rescore(qs, binary_search(index, qc, depth)[1], vecs, k, calibration=cal)

            s_all, ids_all = search(queries, qcodes, depth)
            t_b = _time(lambda: search(queries, qcodes), repeats)
            t_s = _time(lambda: [search(queries[i:i + 1], qcodes[i:i + 1]) for i in range(len(queries))],
                        max(3, repeats // 4)) / len(queries)
            add(f"sign binary + {label} rescore @{depth}", _scores_from_topk(ids_all, s_all, n), dim, codes.nbytes,
                t_b, t_s, rescore_depth=depth, rescore_vectors_bytes=int(vecs.nbytes),
                note=f"in-memory index = packed bits; {label} document vectors are read only for the {depth} "
                     "candidates (they may live on disk / mmap, as in sentence-transformers' rescoring recipe; "
                     "timed here from memory)")

    # 4. equal-bit baseline: sign of a random rotation to bits * dim
    rng = np.random.default_rng(seed)
    proj = np.linalg.qr(rng.standard_normal((bits * dim, dim)))[0].astype(np.float32)  # orthonormal columns
    lsh_d, lsh_q = pack_binary(docs @ proj.T), pack_binary(queries @ proj.T)
    lsh_index = faiss_binary_index(lsh_d)
    hd2, hi2 = binary_search(lsh_index, lsh_q, RESCORE_K)
    add(f"random-projection sign, {bits * dim} bits (hamming)",
        _scores_from_topk(hi2, -hd2.astype(np.float32) + 1e-3 * np.linspace(1, 0, RESCORE_K)[None], n),
        bits * dim, lsh_d.nbytes, None, None)

    # 5. learned binarizer (k = bits); its level 0 alone is a 1-bit code, compared with sign at equal bits
    hp = build_config(BinarizerConfig, {"model": "bench", "bits": bits,
                                        "train": {"max_steps": train_steps, "batch_size": train_batch, "seed": seed}})
    t0 = time.perf_counter()
    ckpt = out / "binarizer.ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)  # a fresh run: no resume from an earlier benchmark
    binarizer, stats = train_binarizer(train_vecs, hp, ckpt)
    shutil.rmtree(ckpt, ignore_errors=True)
    hist = {"first": stats["loss_first"], "last": stats["loss_last"], "loss_history": stats["loss_history"]}
    train_s = time.perf_counter() - t0
    d_codes, d_rec = binarize(binarizer, docs)
    q_codes, q_rec = binarize(binarizer, queries)
    scales = binarizer.scales.detach().numpy().astype(np.float64)
    sym = level_scores(q_codes, d_codes, scales, dim)
    check = float(np.abs(sym - q_rec @ d_rec.T).max())
    add(f"learned {bits}-bit (bit ops, symmetric)", sym, bits * dim, d_codes.nbytes, None, None,
        train_seconds=train_s, train_steps=train_steps, train_batch=train_batch, loss=hist,
        bitop_vs_float_max_abs=check)
    add(f"learned {bits}-bit (float query x codes)", queries @ d_rec.T, bits * dim, d_codes.nbytes, None, None)
    width = dim // 8
    lvl0_d, lvl0_q = np.ascontiguousarray(d_codes[:, :width]), np.ascontiguousarray(q_codes[:, :width])
    lvl0 = faiss_binary_index(lvl0_d)
    hd1, hi1 = binary_search(lvl0, lvl0_q, RESCORE_K)
    add("learned level 0 alone, 1 bit/dim (hamming)",
        _scores_from_topk(hi1, -hd1.astype(np.float32) + 1e-3 * np.linspace(1, 0, RESCORE_K)[None], n),
        dim, lvl0_d.nbytes, None, None)
    l_index = faiss_binary_index(d_codes)
    _, lc = binary_search(l_index, q_codes, HEADLINE_DEPTH)
    s_l, ids_l = rescore(queries, lc, docs_int8, HEADLINE_DEPTH, calibration=calib)
    add(f"learned {bits}-bit hamming + int8 rescore @{HEADLINE_DEPTH}", _scores_from_topk(ids_l, s_l, n), bits * dim,
        d_codes.nbytes, None, None)

    # 6. headline comparisons
    m = result["methods"]
    best = m[f"sign binary + int8 rescore @{HEADLINE_DEPTH}"]
    result["comparisons"] = {
        f"binary+int8 rescore @{HEADLINE_DEPTH} retention (target >= 0.96)": round(best["retention"], 4),
        "index memory ratio, float / packed bits (target >= 32)": round(best["memory_ratio"], 2),
        f"search speed-up, 1 query at a time, binary+int8 rescore @{HEADLINE_DEPTH} (target >= 15)": round(
            best["speedup_single"], 2),
        f"search speed-up, 200-query batch, binary+int8 rescore @{HEADLINE_DEPTH}": round(best["speedup_batch"], 2),
        "search speed-up, 1 query, hamming only": round(m["sign binary (hamming)"]["speedup_single"], 2),
        f"learned {bits}-bit (bit ops) minus sign 1-bit (hamming), nDCG points (target >= 2)": round(
            m[f"learned {bits}-bit (bit ops, symmetric)"]["ndcg@10"] - m["sign binary (hamming)"]["ndcg@10"], 2),
        f"learned {bits}-bit (bit ops) minus random-projection sign at equal bits, nDCG points": round(
            m[f"learned {bits}-bit (bit ops, symmetric)"]["ndcg@10"]
            - m[f"random-projection sign, {bits * dim} bits (hamming)"]["ndcg@10"], 2),
        "learned level-0 code (1 bit/dim, hamming) minus sign 1-bit, nDCG points (equal bits)": round(
            m["learned level 0 alone, 1 bit/dim (hamming)"]["ndcg@10"] - m["sign binary (hamming)"]["ndcg@10"], 2),
    }
    if scale_docs:
        result["scaled_timing"] = _scaled_timing(docs, queries, calib, scale_docs, min(50, len(queries)),
                                                 max(3, repeats // 4), seed)
        result["comparisons"][f"search speed-up at {scale_docs} synthetic docs, 1 query, binary+int8 rescore "
                              f"@{HEADLINE_DEPTH}"] = round(result["scaled_timing"]["speedup_rescore"], 2)
    if distractors_from or distractor_onnx:
        from embedforge.export.encoder import OnnxEncoder

        onnx_enc = None
        if distractor_onnx:
            graph = Path(distractor_onnx).resolve()
            onnx_enc = OnnxEncoder(graph.parent.parent, os.path.relpath(graph, graph.parent.parent), threads=1)
        texts = _distractor_texts(root, n_distractors)
        dvecs, dinfo = _distractor_vectors(encoder, texts, out, distractors_from, onnx_enc)
        enl = _enlarged(result, docs, queries, doc_ids, query_ids, dev.qrels, dvecs, calib, enlarged_rounds)
        enl["distractors"] = dinfo
        result["enlarged"] = enl
        em = enl["methods"]
        head = em[f"sign binary + int8 rescore @{HEADLINE_DEPTH}"]
        where = f"at {enl['n_docs']} docs (SciFact + real distractors)"
        result["comparisons"].update({
            f"float nDCG@10 {where}": round(em["float32 exact (IndexFlatIP)"]["ndcg@10"], 2),
            f"binary+int8 rescore @{HEADLINE_DEPTH} retention {where}": round(head["retention"], 4),
            f"search speed-up {where}, 1 query, binary+int8 rescore @{HEADLINE_DEPTH} (target >= 15)": round(
                head["speedup_latency"], 2),
            f"search speed-up {where}, 200-query batch, binary+int8 rescore @{HEADLINE_DEPTH}": round(
                head["speedup_batch"], 2),
            f"search speed-up {where}, 1 query, binary+int8 rescore @20": round(
                em["sign binary + int8 rescore @20"]["speedup_latency"], 2),
        })
    result["notes"]["timing"] = ("single-threaded FAISS, median of repeats, top-10; 'batch' = all queries in one "
                                 "search call, '1 query' = per-query latency averaged over the queries")
    write_results(out, result)
    (out / "results.md").write_text(_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="model dir or alias (default: minilm-l6)")
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, cached vectors)")
    parser.add_argument("--bits", type=int, default=2, help="levels of the learned binarizer (default 2)")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--train-batch", type=int, default=512)
    parser.add_argument("--generic-texts", type=int, default=5000, help="generic sentences added to training")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scale-docs", type=int, default=200_000,
                        help="also time search on this many synthetic docs (0: skip)")
    parser.add_argument("--distractors-from", default=None,
                        help="a distill benchmark out dir (texts.jsonl + cache/teacher-vectors) holding this model's "
                        "vectors of the distractor texts")
    parser.add_argument("--distractor-onnx", default=None,
                        help="an exported graph (EXPORT_DIR/onnx/FILE.onnx) that encodes distractors not in the cache")
    parser.add_argument("--distractors", type=int, default=0, help="at most this many distractors (0: all)")
    parser.add_argument("--enlarged-rounds", type=int, default=5, help="timing rounds on the enlarged corpus")
    parser.add_argument("--copy-json", default=None, help="also copy results.json to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args.model, args.out, bits=args.bits, train_steps=args.train_steps,
                 train_batch=args.train_batch, n_generic=args.generic_texts,
                 repeats=args.repeats, scale_docs=args.scale_docs, distractors_from=args.distractors_from,
                 distractor_onnx=args.distractor_onnx, n_distractors=args.distractors or None,
                 enlarged_rounds=args.enlarged_rounds)
    if args.copy_json:
        Path(args.copy_json).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
