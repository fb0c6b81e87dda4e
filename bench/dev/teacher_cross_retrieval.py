"""Where a distilled student's retrieval falls short of its teacher: SciFact dev nDCG@10 with the query side and the
document side encoded by different models.

    python -m bench.dev.teacher_cross_retrieval runs/bench-convert7/models/causal-distill-mean-scifact-corpus

A student trained on a teacher's vectors (with a head into the teacher's space) can be scored against the teacher's
own vectors: student claims against teacher abstracts (``sq_td``) and teacher claims against student abstracts
(``tq_sd``), beside student against student (``ss``). If the student had learned the teacher's space, the crossed
scores would sit between the two models' own; far below both, the student has built a geometry of its own. Also
writes the mean cosine to the teacher on claims and abstracts, and the teacher's score with abstracts cut to 128 and
256 tokens. Writes ``runs/diag/cross/results.json`` (``--out DIR`` to change).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import write_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+")
    parser.add_argument("--teacher", default="minilm-l6")
    parser.add_argument("--out", default="runs/diag/cross", help="folder for results.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from embedforge.data import builtin_beir
    from embedforge.evaluation import retrieval_metrics
    from embedforge.modules import load_embedder
    from embedforge.sources import resolve_source

    beir = builtin_beir("scifact-dev")
    doc_ids = list(beir.corpus)
    qids = list(beir.queries)
    docs = [beir.corpus[i] for i in doc_ids]
    qs = [beir.queries[i] for i in qids]
    ndcg = lambda q, d: retrieval_metrics(q @ d.T, doc_ids, qids, beir.qrels)["ndcg@10"]  # noqa: E731

    def enc(m, texts, length):
        m.max_seq_length = length
        return m.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    t0 = time.time()
    out = {}
    teacher = load_embedder(os.fspath(resolve_source(args.teacher)))
    tdocs = {length: enc(teacher, docs, length) for length in (128, 256)}
    tq = enc(teacher, qs, 128)
    out["teacher_d128"] = ndcg(tq, tdocs[128])
    out["teacher_d256"] = ndcg(tq, tdocs[256])
    print(out, round(time.time() - t0), flush=True)
    for name in args.students:
        s = load_embedder(name)
        sd, sq = enc(s, docs, 128), enc(s, qs, 128)
        out[name] = {"ss": ndcg(sq, sd), "sq_td": ndcg(sq, tdocs[128]), "tq_sd": ndcg(tq, sd),
                     "agree_q": float(np.mean(np.sum(sq * tq, 1))), "agree_d": float(np.mean(np.sum(sd * tdocs[128], 1)))}
        print(name, out[name], round(time.time() - t0), flush=True)
    write_results(Path(args.out), out)


if __name__ == "__main__":
    sys.exit(main())
