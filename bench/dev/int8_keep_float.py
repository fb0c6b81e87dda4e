"""Which MatMuls a decoder student's dynamic int8 graph keeps in float: what each choice keeps and costs.

    python -m bench.dev.int8_keep_float --model runs/quickstart/distilled --out runs/bench/int8_keep_float

The model (an embedforge / sentence-transformers directory of a decoder, e.g. the quickstart's distilled SmolLM2
student) is exported once to an fp32 ONNX graph; every variant is a dynamic int8 graph derived from that same file
with :func:`embedforge.export.precision.quantize_int8_dynamic`, differing only in what stays float. Each graph
encodes the SciFact dev queries and the whole corpus (5,183 abstracts) in the same run, and is scored against the
fp32 graph on those vectors:

* mean and minimum cosine of the document vectors to fp32's;
* nDCG@10 of float search, its per-query difference to fp32 (mean and a 95% bootstrap interval over queries);
* nDCG@10 of sign-binary search with int8 rescoring at 100 and 200 candidates (the quickstart's binary artifact);
* texts/s while encoding, and its ratio to the fp32 graph's; graph size.

Writes ``results.json`` (after every variant) and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import write_results

logger = logging.getLogger("bench.int8_keep_float")

#: name -> (int8_keep_float patterns, quantize the token table); "default" and "default_float_table" take the
#: export's decoder default (precision.DECODER_KEEP_FLOAT) when the script runs
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "all_int8": ([], True),  # every MatMul int8, the Dense head included
    "down": (["down_proj"], True),  # the decoder default before the Gemm fix (the head was quantized regardless)
    "down_head": (["down_proj", "head"], True),
    "default": ([], True),  # down_proj + v_proj + head
    "default_float_table": ([], False),
}
DEPTHS = (100, 200)


def run(model: str, out: Path) -> dict[str, Any]:
    from embedforge.evaluation import (PER_QUERY, encode_task_vectors, l2_normalize, load_task_data,
                                       paired_difference, retrieval_metrics, score_task_vectors)
    from embedforge.evaluation_config import parse_task
    from embedforge.export.config import ExportConfig
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.export.pipeline import export_model
    from embedforge.export.precision import DECODER_KEEP_FLOAT, quantize_int8_dynamic

    variants = dict(VARIANTS)
    variants["default"] = (list(DECODER_KEEP_FLOAT), True)
    variants["default_float_table"] = (list(DECODER_KEEP_FLOAT), False)
    task = parse_task("scifact-dev")
    data = load_task_data(task)
    export_dir = out / "export"
    if not (export_dir / "manifest.json").is_file():
        export_model(ExportConfig(model=model, fp16=False, int8=[], binary=True, last_hidden_state=False,
                                  probe_max_tokens=128), export_dir)
    onnx_dir = export_dir / "onnx"
    result: dict[str, Any] = {"model": model, "task": "scifact-dev", "variants": []}
    reference: dict[str, Any] = {}
    for name, (keep, token_table) in [("fp32", ([], False)), *variants.items()]:
        file = "model.onnx"
        if name != "fp32":
            file = f"int8_{len(result['variants'])}.onnx"
            kept = quantize_int8_dynamic(onnx_dir / "model.onnx", onnx_dir / file, keep_float=keep,
                                         quantize_embeddings=token_table)
        encoder = OnnxEncoder(export_dir, f"onnx/{file}")
        start = time.perf_counter()
        vectors = encode_task_vectors(encoder, task, data, batch_size=32, query_prompt=None, doc_prompt=None)
        seconds = time.perf_counter() - start
        q, d = l2_normalize(vectors["q"]), l2_normalize(vectors["d"])
        metrics = retrieval_metrics(q @ d.T, vectors["doc_ids"], vectors["query_ids"], data.qrels, per_query=True)
        row: dict[str, Any] = {
            "name": name, "keep_float": keep if name != "fp32" else None,
            "token_table": "float" if name == "fp32" or not token_table else "int8",
            "float_matmuls": len(kept) if name != "fp32" else None,
            "size_mib": round((onnx_dir / file).stat().st_size / 2**20, 1),
            "texts_per_s": round(vectors["texts"] / seconds, 1), "ndcg@10": round(metrics["ndcg@10"], 2),
        }
        for depth in DEPTHS:
            binary = score_task_vectors(task, data, vectors, binary=True, rescore_depth=depth)
            row[f"binary_rescore@{depth}"] = round(binary["ndcg@10"], 2)
        if name == "fp32":
            reference = {"d": d, "per_query": metrics[PER_QUERY], "speed": row["texts_per_s"]}
        else:
            cos = np.sum(d * reference["d"], axis=1)
            row.update(cosine_mean=round(float(cos.mean()), 4), cosine_min=round(float(cos.min()), 4),
                       speed_vs_fp32=round(row["texts_per_s"] / reference["speed"], 2),
                       vs_fp32=paired_difference(reference["per_query"], metrics[PER_QUERY]))
            (onnx_dir / file).unlink()
        result["variants"].append(row)
        logger.info("%s: %s", name, {k: v for k, v in row.items() if k != "keep_float"})
        write_results(out, result)
    _write_md(out, result)
    return result


def _four(x: float | None) -> str | None:
    return None if x is None else f"{x:.4f}"


def _write_md(out: Path, result: dict[str, Any]) -> None:
    from embedforge.report import format_paired, table

    rows = []
    for r in result["variants"]:
        rows.append({"graph": r["name"], "float MatMuls": ", ".join(r["keep_float"] or []) or None,
                     "token table": r["token_table"], "MiB": r["size_mib"],
                     "texts/s": r["texts_per_s"], "x fp32": r.get("speed_vs_fp32"),
                     "cos mean": _four(r.get("cosine_mean")), "cos min": _four(r.get("cosine_min")),
                     "nDCG@10": r["ndcg@10"],
                     "vs fp32 (95% CI)": format_paired(r.get("vs_fp32")),
                     **{f"binary@{k}": r[f"binary_rescore@{k}"] for k in DEPTHS}})
    text = (f"# Dynamic int8: what a decoder keeps in float ({result['model']}, SciFact dev, whole corpus)\n\n"
            + table(rows) + "\n")
    (out / "results.md").write_text(text)
    sys.stdout.write(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quickstart/distilled",
                        help="decoder embedder directory to export (default: the quickstart's student)")
    parser.add_argument("--out", default="runs/bench/int8_keep_float", help="work folder for graphs and results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not Path(args.model).is_dir():
        sys.stderr.write(f"--model {args.model}: no such directory; run `make quickstart` first or name a model\n")
        return 2
    run(args.model, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
