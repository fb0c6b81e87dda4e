"""Runs inside the consumer environment (no torch, no embedforge): execute SERVING.md's python blocks.

Usage: python consumer_driver.py JOB.json -- JOB holds ``blocks`` (code strings), ``texts`` and ``out`` (a folder).
The first block (onnxruntime) runs in its own namespace; a later block that calls ``embed(`` runs in a copy of
it, the others alone. After each block, every function named in ``FUNCTIONS`` that the block defined is called on
``texts`` and its result saved as ``<out>/<block index>_<name>.npy``; ``hits`` (Qdrant) and ``ranked`` (FAISS)
are saved as JSON.
"""

import json
import sys
from pathlib import Path

import numpy as np

FUNCTIONS = ("embed", "embed_binary", "embed_fastembed", "embed_query")


def main() -> None:
    import importlib.util

    assert importlib.util.find_spec("torch") is None, "the consumer environment must not have torch"
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    first: dict = {}
    for i, code in enumerate(job["blocks"]):
        ns: dict = dict(first) if i > 0 and "embed(" in code and "def embed(" not in code else {}
        before = set(ns)
        exec(compile(code, f"SERVING.md block {i}", "exec"), ns)
        if i == 0:
            first = ns
        for name in FUNCTIONS:
            if name in ns and name not in before:
                np.save(out / f"{i}_{name}.npy", np.asarray(ns[name](job["texts"])))
        extra = {}
        if "hits" in ns and "hits" not in before:
            extra["hits"] = [[h.id, h.score] for h in ns["hits"]]
        if "ranked" in ns and "ranked" not in before:
            extra["ranked"] = [int(r) for r in ns["ranked"]]
        if extra:
            (out / f"{i}_results.json").write_text(json.dumps(extra))


if __name__ == "__main__":
    main()
