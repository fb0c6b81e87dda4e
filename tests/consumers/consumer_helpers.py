"""Helpers of the consumer contract tests: run code in the consumer environment, PyTorch reference vectors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embedforge.testing import sample_texts

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("consumer_driver.py")
#: short texts plus one far longer than any tiny model's limit (64 tokens for the decoders, 128 for BERT)
TEXTS = sample_texts()[:4] + ["a"] + [" ".join(sample_texts()) * 3]
FAST = dict(fp16=False, int8=[], optimize="none")


def run_consumer(python: Path, code: str, cwd: Path, *args: str, timeout: int = 600) -> str:
    """Run ``code`` with the consumer interpreter in ``cwd``; fail the test with its stderr if it fails."""
    result = subprocess.run([str(python), "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, f"consumer script failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout


def run_blocks(python: Path, export: Path, blocks: list[str], out: Path, texts: list[str]) -> dict[str, Any]:
    """Run SERVING.md blocks through ``consumer_driver.py``; return ``{"<i>_<name>": array or dict}``."""
    job = out / "job.json"
    out.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"blocks": blocks, "texts": texts, "out": str(out)}))
    result = subprocess.run([str(python), str(DRIVER), str(job)], cwd=export, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, f"SERVING.md snippet failed:\n{result.stderr[-3000:]}"
    found: dict[str, Any] = {}
    for path in sorted(out.iterdir()):
        if path.suffix == ".npy":
            found[path.stem] = np.load(path)
        elif path.name.endswith("_results.json"):
            found[path.stem] = json.loads(path.read_text())
    return found


def reference(model_dir: Path, texts: list[str], *, normalize: bool = True) -> np.ndarray:
    """embedforge's PyTorch vectors, one text at a time (no padding)."""
    from embedforge.modules import load_embedder

    model = load_embedder(str(model_dir))
    emb = np.stack([model.encode([t], convert_to_numpy=True, normalize_embeddings=False)[0] for t in texts])
    return emb / np.linalg.norm(emb, axis=1, keepdims=True) if normalize else emb


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


#: export options per head (the decoders are tiny Llamas converted with that pooling)
HEADS: dict[str, dict[str, Any]] = {
    "bert": {"binary": True, "int8": ["avx2"]},
    "mean": {"int8": ["avx2"]},
    "lasttoken": {},
    "weightedmean": {},
    "latent_attention": {},
    "multi_layer": {},
    "echo": {},
}
PADDING = {"lasttoken": "left", "multi_layer": "left"}


def consumer_python_path() -> Path:
    return Path(os.environ.get("EMBEDFORGE_CONSUMER_PYTHON", REPO / ".venv-consumers" / "bin" / "python"))


def require_consumer_python(python: Path, *, ci: bool) -> Path:
    """``python`` if it exists; otherwise skip the test, or fail it under CI (where setup.sh must have made it)."""
    if not python.is_file():
        message = f"consumer environment missing: {python} (run scripts/setup.sh to create .venv-consumers)"
        if ci:
            pytest.fail(message)
        pytest.skip(message)
    return python
