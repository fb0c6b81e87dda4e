"""Where does a distilled student follow its teacher? Mean cosine between student and teacher vectors per text domain.

    python -m bench.dev.teacher_agreement --student runs/bench-convert/models/causal-distill-mean --out DIR

A student trained on a teacher's vectors is only as good as its agreement with the teacher on the texts it is
evaluated on. This compares, on samples of STS-B dev sentences, SciFact dev claims and SciFact abstracts (none of
them trained on), the mean cosine of the student's vector to the teacher's. Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from bench._common import write_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, type=Path)
    parser.add_argument("--teacher", default="minilm-l6")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=300, help="texts per domain")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per text, both models")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from embedforge.data import builtin, builtin_beir
    from embedforge.modules import load_embedder
    from embedforge.sources import resolve_source

    torch.set_num_threads(args.threads)
    student = load_embedder(args.student)
    teacher = load_embedder(os.fspath(resolve_source(args.teacher)))
    beir = builtin_beir("scifact-dev")
    rng = random.Random(0)
    domains = {
        "stsb-dev sentences": rng.sample(list(builtin("stsb-dev")["sentence1"]), args.n),
        "scifact dev claims": [beir.queries[q] for q in sorted(beir.qrels)][: args.n],
        "scifact abstracts": rng.sample(list(beir.corpus.values()), args.n),
    }
    result = {"student": str(args.student), "teacher": args.teacher, "max_len": args.max_len, "mean_cosine": {}}
    for model in (student, teacher):
        model.max_seq_length = args.max_len
    for name, texts in domains.items():
        s = student.encode(texts, batch_size=32, normalize_embeddings=True)
        t = teacher.encode(texts, batch_size=32, normalize_embeddings=True)
        result["mean_cosine"][name] = round(float(np.mean(np.sum(s * t, axis=1))), 4)
        print(f"{name}: {result['mean_cosine'][name]}", flush=True)
    write_results(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
