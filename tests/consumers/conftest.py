"""Consumer contract tests: exports read by real consumers (fastembed, onnxruntime, FAISS, Qdrant) in their own
environment, ``.venv-consumers`` (no torch, no embedforge; ``scripts/setup.sh`` creates it), via subprocess.

Each tiny export is built once per session. Without the consumer environment the tests skip, except under CI
(``CI=true``), where a missing environment is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from consumer_helpers import FAST, HEADS, PADDING, consumer_python_path, require_consumer_python


@pytest.fixture(scope="session")
def consumer_python() -> Path:
    """The consumer environment's interpreter (skip without it; fail without it under CI)."""
    return require_consumer_python(consumer_python_path(), ci=os.environ.get("CI", "").lower() == "true")


def _bert_with_short_tokenizer_files(path: Path) -> Path:
    """A tiny BERT whose saved tokenizer files carry a 16-token limit beside max_seq_length 128, as
    all-MiniLM-L6-v2's carry 128 beside 256 (the export must not pass those limits on)."""
    from embedforge.testing import tiny_bert_st

    model_dir = tiny_bert_st(path)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_length"] = 16
    cfg_path.write_text(json.dumps(cfg))
    tok_path = model_dir / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "[PAD]"}
    tok_path.write_text(json.dumps(tok))
    return model_dir


@pytest.fixture(scope="session")
def consumer_export(tmp_path_factory: pytest.TempPathFactory,
                    tiny_llama_dir: Path) -> Callable[[str], tuple[Path, Path]]:
    """``consumer_export(head) -> (model dir, export dir)``, each built once per session."""
    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import export_model

    built: dict[str, tuple[Path, Path]] = {}

    def build(head: str) -> tuple[Path, Path]:
        if head in built:
            return built[head]
        root = tmp_path_factory.mktemp(f"consumer-{head}")
        if head == "bert":
            model_dir = _bert_with_short_tokenizer_files(root / "model")
        else:
            from embedforge.convert.embedder import build_embedder
            from embedforge.model import save_model

            extra: dict[str, Any] = {"latent_count": 8, "latent_heads": 4} if head == "latent_attention" else {}
            if head == "multi_layer":
                extra = {"multilayer_heads": 4}
            model = build_embedder(str(tiny_llama_dir), pooling=head, padding_side=PADDING.get(head, "right"),
                                   max_seq_length=64, **extra)
            model_dir = save_model(model, root / "model", stage="convert", source=str(tiny_llama_dir))
        out = export_model(ExportConfig(model=str(model_dir), **{**FAST, **HEADS[head]}), root / "export")
        built[head] = (model_dir, out)
        return built[head]

    return build
