"""The consumer environment's own contract: no torch in it, and a missing one fails CI instead of skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer_helpers import require_consumer_python, run_consumer


def test_missing_environment_skips_locally_and_fails_in_ci(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(pytest.skip.Exception, match="run scripts/setup.sh"):
        require_consumer_python(missing, ci=False)
    with pytest.raises(pytest.fail.Exception, match="consumer environment missing"):
        require_consumer_python(missing, ci=True)


def test_consumer_environment_has_the_consumers_and_no_torch(consumer_python: Path, tmp_path: Path) -> None:
    code = """
import importlib.util
missing = [m for m in ("fastembed", "onnxruntime", "tokenizers", "numpy", "faiss", "qdrant_client")
           if importlib.util.find_spec(m) is None]
assert not missing, missing
assert importlib.util.find_spec("torch") is None, "torch"
assert importlib.util.find_spec("embedforge") is None, "embedforge"
print("ok")
"""
    assert run_consumer(consumer_python, code, tmp_path).strip() == "ok"
