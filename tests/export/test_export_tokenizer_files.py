"""The tokenizer files written into an export carry the graph's token limit, whatever the source's files said."""

from __future__ import annotations

import json
from pathlib import Path

from embedforge.export.config import ExportConfig

FAST = dict(fp16=False, int8=[], last_hidden_state=False, optimize="none")


def test_tokenizer_files_carry_the_graphs_max_seq_length(tiny_st_dir: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 ships max_length 128 (tokenizer_config.json) and a 128-token truncation / fixed padding
    (tokenizer.json) beside max_seq_length 256; fastembed truncated exports at 128 because of them."""
    import shutil

    from embedforge.export.pipeline import export_model

    model_dir = Path(shutil.copytree(tiny_st_dir, tmp_path / "model"))
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "max_length": 16}))
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "[PAD]"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))

    out = export_model(ExportConfig(model=str(model_dir), max_seq_length=96, **FAST), tmp_path / "export")
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["model_max_length"] == 96 and written.get("max_length", 96) == 96
    tok_out = json.loads((out / "tokenizer.json").read_text())
    assert tok_out["truncation"]["max_length"] == 96
    assert tok_out["padding"] is None or tok_out["padding"]["strategy"] == "BatchLongest"
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 96
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["max_length"] == 96

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode("word " * 300).ids
    assert len(ids) == 96


def test_export_readme_points_at_serving_not_at_the_model_card(tmp_path: Path) -> None:
    """The model card tells how to load the PyTorch directory; an export's README must send readers to SERVING.md."""
    from embedforge.export.layouts import copy_readme

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "README.md").write_text("SentenceTransformer(dir, trust_remote_code=True)\n")
    out = tmp_path / "export"
    out.mkdir()
    copy_readme(model_dir, out)
    readme = (out / "README.md").read_text()
    assert "SERVING.md" in readme and "trust_remote_code" not in readme
    assert (out / "SOURCE_MODEL_CARD.md").read_text() == (model_dir / "README.md").read_text()
