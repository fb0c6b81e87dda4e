"""Export benchmark: PyTorch fp32 vs ONNX fp32 vs ONNX int8 on real models, in the same run.

    nice -n 5 python -m bench.dev.export --out runs/bench-export

For each model (all-MiniLM-L6-v2 and a SmolLM2-135M embedder; a zero-shot causal mean-pooled one is built when
no tuned directory is given with ``--smollm2``):

1. export with :func:`embedforge.export.pipeline.export_model` into ``OUT/exports/<model>/`` (parity-checked);
2. throughput (sentences/s, batch 32, STS-B dev sentences sorted by length) of sentence-transformers
   ``encode`` (PyTorch fp32) and of the ONNX graphs through :class:`OnnxEncoder`, measured in interleaved rounds
   so that load from other processes hits every variant alike (the median round is reported), plus the
   ablations that explain the int8 speed: int8 made from the plain vs the fused graph, reduce_range, threads,
   onnxruntime thread spinning, and the share of time spent tokenizing;
3. quality retention: STS-B dev Spearman and SciFact dev nDCG@10 of PyTorch fp32 vs ONNX int8 (and ONNX fp32
   for STS-B) through :mod:`embedforge.evaluation`;
4. file sizes and peak resident memory of each runtime (each measured in a fresh subprocess);
5. optionally (``--binary``) the binary-retrieval benchmark of ``bench/dev/binary_retrieval.py`` on the ONNX vectors.

Writes ``OUT/results.json`` after every step and ``OUT/results.md`` at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench._common import write_results

logger = logging.getLogger("bench.export")

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def _sts_sentences(limit: int) -> list[str]:
    from embedforge.data import builtin

    ds = builtin("stsb-dev")
    seen = dict.fromkeys(list(ds["sentence1"]) + list(ds["sentence2"]))
    return list(seen)[:limit]


def _smollm2_dir(out: Path, given: str | None) -> str:
    """A SmolLM2-135M embedder dir: ``given``, else a zero-shot causal mean-pooled one built once."""
    if given:
        return given
    from embedforge.convert.embedder import build_embedder
    from embedforge.model import is_complete, save_model

    path = out / "models" / "smollm2-135m-mean"
    if not is_complete(path):
        model = build_embedder("smollm2-135m", pooling="mean", bidirectional=False, max_seq_length=256)
        save_model(model, path, stage="convert", source="smollm2-135m",
                   config={"pooling": "mean", "bidirectional": False, "max_seq_length": 256, "zero_shot": True})
    return str(path)


def _export(model_dir: str, dest: Path, args: argparse.Namespace) -> dict[str, Any]:
    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import export_model

    if not (dest / "manifest.json").is_file():
        light = args.llm_light and "smollm2" in dest.name
        cfg = ExportConfig(model=model_dir, binary=True, last_hidden_state=not light, static_int8=args.static_int8,
                           blockwise_int8=True, int8=["avx512_vnni"] if light else ["avx512_vnni", "avx2", "arm64"],
                           calibration_data="texts" if args.static_int8 else None, calibration_size=128,
                           probe_max_tokens=256)
        start = time.perf_counter()
        export_model(cfg, dest)
        logger.info("exported %s in %.0f s", model_dir, time.perf_counter() - start)
    return json.loads((dest / "manifest.json").read_text())


def _all_int8_graph(dest: Path, manifest: dict[str, Any]) -> Path:
    """The int8 graph of the previous default recipe (every MatMul and the embeddings in int8, no first-token
    split), made once."""
    from embedforge.export import precision

    folder = dest.parent.parent / "ablation" / dest.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model_qint8_every_matmul.onnx"
    base = dest / ("onnx/model_O2.onnx" if manifest["fusion"]["applied"] else "onnx/model.onnx")
    if not path.is_file():
        precision.quantize_int8_dynamic(base, path, per_channel=True, keep_float=[], quantize_embeddings=True)
    return path


PLAIN_RECIPE = "onnx int8 from the unfused graph (default keep-float recipe)"
#: the int8 graph of the previous default: every MatMul in int8, no first-token split of the MLP blocks
PREVIOUS = "onnx int8 every MatMul without first-token split (previous default)"


def _plain_recipe_graph(dest: Path, manifest: dict[str, Any]) -> Path | None:
    """The keep-float recipe (``SENSITIVE_MATMULS``, float embeddings) on the unfused fp32 graph, made once."""
    from embedforge.export import precision

    if not manifest["fusion"]["applied"]:
        return None
    path = dest.parent.parent / "ablation" / dest.name / "model_qint8_plain_recipe.onnx"
    if not path.is_file():
        precision.quantize_int8_dynamic(dest / "onnx/model.onnx", path, per_channel=True,
                                        keep_float=list(precision.SENSITIVE_MATMULS), quantize_embeddings=False)
    return path


def _ablation_graphs(dest: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Extra int8 graphs for the ablation (in ``OUT/ablation/<model>/``), made once; the previous default's graph
    (:func:`_all_int8_graph`) is timed in every ablating run, so it is not among them."""
    from embedforge.export import precision

    folder = dest.parent.parent / "ablation" / dest.name
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    if manifest["fusion"]["applied"]:
        plain = folder / "model_qint8_plain.onnx"
        if not plain.is_file():
            precision.quantize_int8_dynamic(dest / "onnx" / "model.onnx", plain, per_channel=True)
        made["int8 (plain graph)"] = str(plain)
    per_tensor = folder / "model_qint8_per_tensor.onnx"
    base = dest / ("onnx/model_O2.onnx" if manifest["fusion"]["applied"] else "onnx/model.onnx")
    if not per_tensor.is_file():
        precision.quantize_int8_dynamic(base, per_tensor, per_channel=False)
    made["int8 per-tensor"] = str(per_tensor)
    return made


def _timed_rounds(fns: dict[str, Callable[[], Any]], rounds: int,
                  pause: float = 1.0) -> dict[str, dict[str, float]]:
    """Run every function once per round, interleaved; return per-variant median wall and CPU seconds.

    CPU seconds (this process, all threads) are less sensitive to other processes on the machine; with one
    thread they are close to the work itself, with several they include onnxruntime / OpenMP spinning.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            # let the previous variant's spinning worker threads (OpenMP for PyTorch, onnxruntime's pool) go idle
            # first: in one process they would otherwise compete with this variant's threads for the cores
            time.sleep(pause)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            logger.info("round %d %s: %.2f s (cpu %.2f s)", r, name, times[name][-1], cpu[name][-1])
    return {k: {"median_s": statistics.median(v), "rounds_s": [round(x, 3) for x in v],
                "median_cpu_s": statistics.median(cpu[k])} for k, v in times.items()}


def _encoder_for(dest: Path, file: str, threads: int, spin: bool = True) -> Any:
    from embedforge.export.encoder import OnnxEncoder

    return OnnxEncoder(dest, file, threads=threads, spin=spin)


def _throughput(model_dir: str, dest: Path, manifest: dict[str, Any], texts: list[str], args: argparse.Namespace,
                ablate: bool = True) -> dict[str, Any]:
    import torch

    from embedforge.model import load_model
    from embedforge.modules import load_embedder

    torch.set_num_threads(args.threads)
    st = load_embedder(model_dir)
    st.eval()
    st.max_seq_length = manifest["tokenizer"]["max_length"]
    # length-sorted order for everyone: ST sorts internally too; the ONNX encoder sorts by token count
    texts = sorted(texts, key=len)
    graphs = manifest["graphs"]
    int8_file = graphs["int8_avx512_vnni"]["file"]
    variants: dict[str, Callable[[], Any]] = {}

    def st_encode() -> Any:
        with torch.inference_mode():
            return st.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)

    variants["pytorch fp32 (sentence-transformers)"] = st_encode
    encoders = {
        "onnx fp32": _encoder_for(dest, "onnx/model.onnx", args.threads),
        "onnx int8": _encoder_for(dest, int8_file, args.threads),
    }
    if "fp32_fused" in graphs:
        encoders["onnx fp32 fused"] = _encoder_for(dest, graphs["fp32_fused"]["file"], args.threads)
    if ablate:
        encoders[PREVIOUS] = _encoder_for(
            dest, os.path.relpath(_all_int8_graph(dest, manifest), dest), args.threads)
        plain = _plain_recipe_graph(dest, manifest)
        if plain is not None:
            encoders[PLAIN_RECIPE] = _encoder_for(dest, os.path.relpath(plain, dest), args.threads)
    if "int8_blockwise" in graphs:
        encoders["onnx int8 blockwise"] = _encoder_for(dest, graphs["int8_blockwise"]["file"], args.threads)
    if ablate and not args.quick:
        encoders["onnx int8 avx2 (reduce_range)"] = _encoder_for(dest, graphs["int8_avx2"]["file"], args.threads)
        encoders["onnx int8 no spinning"] = _encoder_for(dest, int8_file, args.threads, spin=False)
        encoders["onnx int8 1 thread"] = _encoder_for(dest, int8_file, 1)
        for label, path in _ablation_graphs(dest, manifest).items():
            encoders[f"onnx {label}"] = _encoder_for(dest, os.path.relpath(path, dest), args.threads)
    for name, enc in encoders.items():
        variants[name] = (lambda e: (lambda: e.encode(texts, batch_size=32)))(enc)
    warm = texts[-64:]  # warm-up on the longest texts (first-run allocations, thread pools)
    with torch.inference_mode():
        st.encode(warm, batch_size=32, show_progress_bar=False)
    for enc in encoders.values():
        enc.encode(warm, batch_size=32)
    timing = _timed_rounds(variants, args.rounds, pause=args.pause)
    base = timing["pytorch fp32 (sentence-transformers)"]["median_s"]
    base_cpu = timing["pytorch fp32 (sentence-transformers)"]["median_cpu_s"]
    result: dict[str, Any] = {}
    for name, t in timing.items():
        result[name] = {"sentences_per_s": round(len(texts) / t["median_s"], 1),
                        "speedup_vs_pytorch": round(base / t["median_s"], 2), "rounds_s": t["rounds_s"],
                        "cpu_s_per_1k_sentences": round(1000 * t["median_cpu_s"] / len(texts), 2),
                        "cpu_speedup_vs_pytorch": round(base_cpu / t["median_cpu_s"], 2)}
    # tokenization share of the int8 run
    enc = encoders["onnx int8"]
    start = time.perf_counter()
    for _ in range(3):
        enc.tokenize(texts)
    tok_s = (time.perf_counter() - start) / 3
    result["tokenization"] = {"seconds_per_pass": round(tok_s, 4),
                              "share_of_int8_time": round(tok_s / timing["onnx int8"]["median_s"], 4)}
    # sanity: the int8 vectors are still close to PyTorch on these texts
    ref = st_encode()
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    got = enc.encode(texts)
    cos = (ref * got).sum(1)
    result["int8_cosine_to_pytorch"] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}
    del load_model
    return result


def _quality(model_dir: str, dest: Path, manifest: dict[str, Any], args: argparse.Namespace,
             limits: dict[str, int], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from embedforge.data import builtin, builtin_beir
    from embedforge.evaluation import evaluate_sts
    from embedforge.modules import load_embedder

    torch.set_num_threads(args.threads)
    st = load_embedder(model_dir)
    st.eval()
    st.max_seq_length = manifest["tokenizer"]["max_length"]
    int8_file = manifest["graphs"]["int8_avx512_vnni"]["file"]
    encoders: dict[str, Any] = {"pytorch fp32": st}
    keys = {"pytorch fp32": "pytorch-fp32"}

    def add(label: str, graph: Path) -> None:  # an ONNX encoder and its vector-cache key
        encoders[label] = _encoder_for(dest, os.path.relpath(graph, dest), args.threads)
        keys[label] = _file_key(graph)

    add("onnx fp32", dest / "onnx/model.onnx")
    add("onnx int8", dest / int8_file)
    add(PREVIOUS, _all_int8_graph(dest, manifest))  # the same-run comparison with the previous int8 recipe
    plain = _plain_recipe_graph(dest, manifest)
    if plain is not None:
        add(PLAIN_RECIPE, plain)
    if "int8_blockwise" in manifest["graphs"]:
        add("onnx int8 blockwise", dest / manifest["graphs"]["int8_blockwise"]["file"])
    cache_dir = Path(args.out) / "vectors"
    cache_dir.mkdir(parents=True, exist_ok=True)
    sts = builtin("stsb-dev")
    out: dict[str, Any] = {"stsb-dev": {}, "scifact-dev": {}}
    if previous:  # a resumed run only adds the evaluations the earlier one skipped
        out = {"stsb-dev": dict(previous.get("stsb-dev", {})), "scifact-dev": dict(previous.get("scifact-dev", {}))}
    if limits["sts_pairs"]:
        sts = sts.select(range(min(len(sts), limits["sts_pairs"])))
        out["stsb-dev"]["pairs"] = len(sts)
    for name, enc in encoders.items():
        if name in out["stsb-dev"]:
            continue
        out["stsb-dev"][name] = evaluate_sts(enc, sts, show_progress=False)
        logger.info("stsb-dev %s: %s", name, out["stsb-dev"][name])
    ref_sts = out["stsb-dev"]["pytorch fp32"]["spearman"]
    out["retention"] = {f"stsb {name}": round(out["stsb-dev"][name]["spearman"] / ref_sts, 4)
                        for name in encoders if name != "pytorch fp32"}
    if limits["scifact_docs"] < 0:
        out["scifact-dev"]["skipped"] = "time budget"
        return out
    beir = builtin_beir("scifact-dev")
    if limits["scifact_docs"]:
        beir = _subsample_corpus(beir, limits["scifact_docs"])
    out["scifact-dev"]["corpus_docs"] = len(beir.corpus)
    wanted = ("pytorch fp32", "onnx int8", PREVIOUS, PLAIN_RECIPE, "onnx int8 blockwise")
    for name in [n for n in wanted if n in encoders and (n == "pytorch fp32" or n in args.scifact_encoders)]:
        if name not in out["scifact-dev"]:
            out["scifact-dev"][name] = _retrieval_cached(encoders[name], keys[name], beir, cache_dir)
            logger.info("scifact-dev %s: %s", name, out["scifact-dev"][name])
        ref_ir = out["scifact-dev"]["pytorch fp32"]["ndcg@10"]
        if name != "pytorch fp32":
            out["retention"][f"scifact {name}"] = round(out["scifact-dev"][name]["ndcg@10"] / ref_ir, 4)
    return out


def _file_key(path: Path) -> str:
    """Cache key of an ONNX graph: its name and content hash (a re-quantized graph gets new vectors)."""
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
    return f"{Path(path).stem}-{digest}"


def _encode_cached(encoder: Any, texts: list[str], cache_dir: Path, key: str, prompt: str | None) -> np.ndarray:
    """``embedforge.evaluation.encode`` once per (encoder, texts); later runs read ``cache_dir/<key>-<hash>.npy``."""
    from embedforge.evaluation import encode

    path = cache_dir / f"{key}-{hashlib.sha1(chr(0).join(texts).encode()).hexdigest()[:12]}.npy"
    if path.is_file():
        logger.info("vectors from cache: %s", path.name)
        return np.load(path)
    emb = encode(encoder, texts, batch_size=32, prompt=prompt, show_progress=False)
    np.save(path, emb)
    return emb


def _retrieval_cached(model: Any, key: str, beir: Any, cache_dir: Path) -> dict[str, float]:
    """:func:`embedforge.evaluation.evaluate_retrieval` (same encode, prompts and metric) with cached vectors."""
    from embedforge.evaluation import _default_prompt, as_encoder, retrieval_metrics

    encoder = as_encoder(model)
    doc_ids, query_ids = list(beir.corpus), list(beir.queries)
    d = _encode_cached(encoder, [beir.corpus[i] for i in doc_ids], cache_dir, f"{key}-docs",
                       _default_prompt(encoder, "document", None))
    q = _encode_cached(encoder, [beir.queries[i] for i in query_ids], cache_dir, f"{key}-queries",
                       _default_prompt(encoder, "query", None))
    return retrieval_metrics(q @ d.T, doc_ids, query_ids, beir.qrels)


def _matmul_groups(base: Path) -> dict[tuple[int, str], str]:
    """(layer, group) -> node name of a fused BERT graph: qkv (fused Attention), attn_out, ffn_up, ffn_down."""
    import onnx

    groups = {}
    for node in onnx.load(str(base), load_external_data=False).graph.node:
        name = node.name
        if node.op_type == "Attention" and name.startswith("Attention_"):
            groups[(int(name.split("_")[1]), "qkv")] = name
        elif node.op_type == "MatMul" and "/layer." in name:
            layer = int(name.split("/layer.")[1].split("/")[0])
            kind = ("attn_out" if "/attention/output/" in name else "ffn_up" if "/intermediate/" in name
                    else "ffn_down" if "/output/dense" in name else None)
            if kind:
                groups[(layer, kind)] = name
    return groups


def _int8_sensitivity(model_dir: str, dest: Path, manifest: dict[str, Any], n_docs: int,
                      threads: int) -> dict[str, Any]:
    """Leave-one-group-out sensitivity of dynamic int8 on the ``n_docs`` longest SciFact documents.

    Each variant quantizes every MatMul except one group (per kind over all layers, per layer over all kinds,
    and each layer's FFN-down) and reports ``1 - cosine`` to the PyTorch fp32 vectors (mean over documents, and
    the worst document): the groups whose float copy removes most of the error are the ones to keep in float.
    """
    import torch

    from embedforge.data import builtin_beir
    from embedforge.evaluation import encode
    from embedforge.export import precision
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.modules import load_embedder

    torch.set_num_threads(threads)
    base = dest / ("onnx/model_O2.onnx" if manifest["fusion"]["applied"] else "onnx/model.onnx")
    groups = _matmul_groups(base)
    if not groups:
        return {"skipped": "no fused BERT-like graph"}
    beir = builtin_beir("scifact-dev")
    texts = sorted(beir.corpus.values(), key=len, reverse=True)[:n_docs]
    st = load_embedder(model_dir)
    st.eval()
    st.max_seq_length = manifest["tokenizer"]["max_length"]
    ref = encode(st, texts, batch_size=32, show_progress=False)
    layers = sorted({layer for layer, _ in groups})
    kinds = ("qkv", "attn_out", "ffn_up", "ffn_down")
    variants: dict[str, tuple[list[str], bool]] = {"every MatMul int8": ([], True)}
    for kind in kinds:
        variants[f"{kind} float (all layers)"] = ([groups[(la, kind)] for la in layers], True)
    for la in layers:
        variants[f"layer {la} float (all kinds)"] = ([groups[(la, k)] for k in kinds], True)
    for la in layers:
        variants[f"layer {la} ffn_down float"] = ([groups[(la, "ffn_down")]], True)
    variants["embeddings float"] = ([], False)
    default_nodes = precision.matmul_nodes(base, list(precision.SENSITIVE_MATMULS))
    variants[f"{list(precision.SENSITIVE_MATMULS)} float, embeddings int8"] = (default_nodes, True)
    variants[f"{list(precision.SENSITIVE_MATMULS)} float, embeddings float"] = (default_nodes, False)
    folder = dest.parent.parent / "ablation" / dest.name / "sensitivity"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"docs": len(texts), "reference": "PyTorch fp32 (sentence-transformers)",
                           "metric": "1 - cosine to PyTorch fp32, mean over documents (and the worst document)",
                           "variants": {}}
    for i, (label, (keep, quant_emb)) in enumerate(variants.items()):
        path = folder / f"variant_{i:02d}.onnx"
        if not path.is_file():
            precision.quantize_int8_dynamic(base, path, keep_float=keep, quantize_embeddings=quant_emb)
        enc = OnnxEncoder(dest, os.path.relpath(path, dest), threads=threads)
        start = time.perf_counter()
        got = encode(enc, texts, batch_size=32, show_progress=False)
        seconds = time.perf_counter() - start
        cos = (got * ref).sum(1)
        out["variants"][label] = {"float_nodes": len(keep), "mean_1_minus_cos": round(float((1 - cos).mean()), 6),
                                  "min_cos": round(float(cos.min()), 5), "encode_s": round(seconds, 2)}
        logger.info("sensitivity %s: %s", label, out["variants"][label])
    return out


def _subsample_corpus(beir: Any, n_docs: int) -> Any:
    """Keep every document a dev query cites plus random others, up to ``n_docs`` (same subset for all models)."""
    import dataclasses
    import random

    relevant = {d for rel in beir.qrels.values() for d in rel}
    others = sorted(set(beir.corpus) - relevant)
    random.Random(0).shuffle(others)
    keep = relevant | set(others[: max(0, n_docs - len(relevant))])
    corpus = {k: v for k, v in beir.corpus.items() if k in keep}
    return dataclasses.replace(beir, corpus=corpus)


_MEMORY_CHILD = r"""
import json, sys
kind, model_dir, export_dir, file, threads = sys.argv[1:6]
texts = json.loads(open(sys.argv[6]).read())
if kind == "pytorch":
    import torch
    torch.set_num_threads(int(threads))
    from embedforge.modules import load_embedder
    m = load_embedder(model_dir); m.eval()
    with torch.inference_mode():
        m.encode(texts, batch_size=32, show_progress_bar=False)
else:
    from embedforge.export.encoder import OnnxEncoder
    OnnxEncoder(export_dir, file, threads=int(threads)).encode(texts, batch_size=32)
# VmHWM is this process image's own peak (ru_maxrss would carry the parent's peak across fork + exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_rss_mb": round(int(hwm) / 1024, 1)}))
"""


def _memory(model_dir: str, dest: Path, manifest: dict[str, Any], texts: list[str], out: Path,
            threads: int) -> dict[str, Any]:
    probe = out / "memory_texts.json"
    probe.write_text(json.dumps(texts))
    runs = {"pytorch fp32": ("pytorch", ""), "onnx fp32": ("onnx", "onnx/model.onnx"),
            "onnx int8": ("onnx", manifest["graphs"]["int8_avx512_vnni"]["file"])}
    result = {}
    for name, (kind, file) in runs.items():
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, kind, model_dir, str(dest), file, str(threads), str(probe)],
            capture_output=True, text=True, cwd=ROOT,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result[name] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]}
    return result


def _sizes(dest: Path, manifest: dict[str, Any]) -> dict[str, float]:
    return {name: info["size_mb"] for name, info in manifest["graphs"].items()}


def bench_model(name: str, model_dir: str, out: Path, result: dict[str, Any], args: argparse.Namespace) -> None:
    entry = result["models"].setdefault(name, {"model_dir": model_dir})
    dest = out / "exports" / name
    manifest = _export(model_dir, dest, args)
    entry["export"] = {"dir": str(dest), "parity": {k: v["parity"] for k, v in manifest["graphs"].items()},
                       "fusion": manifest["fusion"], "sizes_mb": _sizes(dest, manifest),
                       "max_seq_length": manifest["tokenizer"]["max_length"]}
    write_results(out, result)
    llm = name != "minilm-l6"
    limits = {"sentences": args.llm_sentences if llm else args.sentences,
              "sts_pairs": args.llm_sts_pairs if llm else 0,
              "scifact_docs": args.llm_scifact_docs if llm else args.scifact_docs}
    entry["limits"] = limits
    texts = _sts_sentences(limits["sentences"])
    if "throughput" not in entry and not args.skip_throughput:
        entry["throughput"] = _throughput(model_dir, dest, manifest, texts, args, ablate=not llm)
        entry["throughput"]["texts"] = {"n": len(texts), "source": "STS-B dev sentences", "batch_size": 32,
                                        "threads": args.threads, "rounds": args.rounds}
        write_results(out, result)
    if "memory" not in entry and not args.skip_throughput:
        entry["memory"] = _memory(model_dir, dest, manifest, texts[:128], out, args.threads)
        write_results(out, result)
    if args.int8_sensitivity and not llm and "int8_sensitivity" not in entry:
        entry["int8_sensitivity"] = _int8_sensitivity(model_dir, dest, manifest, args.int8_sensitivity,
                                                      args.threads)
        write_results(out, result)
    if not args.skip_quality:
        entry["quality"] = _quality(model_dir, dest, manifest, args, limits, previous=entry.get("quality"))
        write_results(out, result)


def _markdown(result: dict[str, Any]) -> str:
    runs = result.get("commands") or [result["command"]]
    lines = [f"# Export benchmark ({result['machine']})", "", "Command(s), in order (later ones resume the same "
             "output folder and add the steps the earlier ones skipped):", ""] + [f"- `{c}`" for c in runs] + [""]
    for name, entry in result["models"].items():
        lines += [f"## {name}", "", "| variant | sentences/s | x PyTorch (wall) | x PyTorch (CPU time) |",
                  "|---|---|---|---|"]
        for variant, t in entry.get("throughput", {}).items():
            if isinstance(t, dict) and "sentences_per_s" in t:
                lines.append(f"| {variant} | {t['sentences_per_s']} | {t['speedup_vs_pytorch']} | "
                             f"{t.get('cpu_speedup_vs_pytorch', '-')} |")
        tt = entry.get("throughput", {}).get("texts")
        if tt:
            lines.append(f"\nThroughput: {tt['n']} {tt['source']}, batch {tt['batch_size']}, {tt['threads']} thread(s) "
                         f"for PyTorch and onnxruntime alike, {tt['rounds']} interleaved rounds in one process "
                         "(median round).")
        q = entry.get("quality")
        if q:
            lines += ["", "| task | encoder | score |", "|---|---|---|"]
            for task, metric in (("stsb-dev", "spearman"), ("scifact-dev", "ndcg@10")):
                for enc_name, scores in q[task].items():
                    if isinstance(scores, dict):
                        lines.append(f"| {task} {metric} | {enc_name} | {scores[metric]:.2f} |")
            lines.append(f"\nRetention: {q['retention']}")
        sens = entry.get("int8_sensitivity", {})
        if sens.get("variants"):
            lines += ["", f"int8 sensitivity ({sens['docs']} longest SciFact docs; {sens['metric']}):", "",
                      "| variant | MatMuls in float | 1 - cos (mean) | min cos | encode s |", "|---|---|---|---|---|"]
            for label, v in sens["variants"].items():
                lines.append(f"| {label} | {v['float_nodes']} | {v['mean_1_minus_cos']:.5f} | {v['min_cos']:.4f} | "
                             f"{v['encode_s']} |")
        if "export" in entry:
            lines.append(f"\nSizes (MB): {entry['export']['sizes_mb']}")
        if "memory" in entry:
            lines.append(f"\nPeak RSS (MB): { {k: v.get('peak_rss_mb') for k, v in entry['memory'].items()} }")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (exports/, results.json, results.md)")
    parser.add_argument("--models", default="minilm-l6,smollm2-135m", help="comma list: minilm-l6, smollm2-135m")
    parser.add_argument("--smollm2", default=None, help="a tuned SmolLM2-135M embedder dir (default: zero-shot)")
    parser.add_argument("--sentences", type=int, default=1024, help="STS-B dev sentences for throughput")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds of rest before each timed variant (lets spinning thread pools go idle)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--scifact-docs", type=int, default=0, help="subsample the SciFact corpus (0: all)")
    parser.add_argument("--llm-sentences", type=int, default=256, help="throughput sentences for the LLM")
    parser.add_argument("--llm-light", action="store_true",
                        help="LLM export without the token graph and with one int8 target (saves time)")
    parser.add_argument("--llm-sts-pairs", type=int, default=400, help="STS-B dev pairs for the LLM (0: all)")
    parser.add_argument("--llm-scifact-docs", type=int, default=-1,
                        help="SciFact corpus size for the LLM (0: all, -1: skip)")
    parser.add_argument("--skip-quality", action="store_true", help="skip STS-B / SciFact evaluation")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the throughput rounds")
    parser.add_argument("--int8-sensitivity", type=int, default=0,
                        help="leave-one-group-out int8 sensitivity on this many long SciFact docs (0: skip)")
    parser.add_argument("--scifact-encoders", default=f"onnx int8,{PREVIOUS},onnx int8 blockwise",
                        help="comma list of ONNX encoders evaluated on SciFact (besides PyTorch); vectors are cached "
                        "under OUT/vectors/")
    parser.add_argument("--quick", action="store_true", help="no ablation variants")
    parser.add_argument("--static-int8", action="store_true", help="also export a static QDQ int8 graph")
    parser.add_argument("--binary", action="store_true", help="run bench/dev/binary_retrieval.py on ONNX vectors")
    args = parser.parse_args(argv)
    args.scifact_encoders = [e.strip() for e in args.scifact_encoders.split(",") if e.strip()]
    # the root logger stays at WARNING (onnxruntime's quantizers log every node through it at INFO)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", force=True)
    for ours in ("embedforge", "bench"):
        logging.getLogger(ours).setLevel(logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    command = "python -m bench.dev.export " + " ".join(argv or sys.argv[1:])
    result["commands"] = result.get("commands", [result["command"]] if "command" in result else []) + [command]
    result.update(command=command,
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    result.setdefault("models", {})
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        from embedforge.sources import resolve_source

        model_dir = str(resolve_source("minilm-l6")) if name == "minilm-l6" else _smollm2_dir(out, args.smollm2)
        bench_model(name, model_dir, out, result, args)
        if args.binary and name == "minilm-l6":
            from bench.dev import binary_retrieval

            enc = _encoder_for(out / "exports" / name, "onnx/model.onnx", args.threads)
            result["models"][name]["binary"] = binary_retrieval.run(enc, out / "binary" / name)
            write_results(out, result)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_results(out, result)
    (out / "results.md").write_text(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
