"""Every Python block of a generated SERVING.md runs in the consumer environment (no torch) and reproduces
embedforge's PyTorch vectors, on short texts and on a text longer than the model's limit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumer_helpers import HEADS, TEXTS, cosines, reference, run_blocks, run_consumer


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


@pytest.mark.parametrize("head", list(HEADS))
def test_serving_snippets_reproduce_pytorch_vectors(head: str, consumer_python: Path, consumer_export,
                                                    tmp_path: Path) -> None:
    from embedforge.export.serving import _DEMO_DOCS, python_blocks

    model_dir, export = consumer_export(head)
    markdown = (export / "SERVING.md").read_text()
    manifest = json.loads((export / "manifest.json").read_text())
    blocks = python_blocks(markdown)
    found = run_blocks(consumer_python, export, blocks, tmp_path / "out", TEXTS)
    ref = reference(model_dir, TEXTS)

    functions = {key.split("_", 1)[1] for key in found if not key.endswith("_results")}
    expected = {"embed", "embed_fastembed"} | ({"embed_binary"} if head == "bert" else set())
    assert functions == expected
    for key, value in found.items():
        if key.endswith("_embed") or key.endswith("_embed_fastembed"):
            assert value.shape == ref.shape, key
            cos = cosines(value, ref)
            assert cos.min() >= 0.9999, f"{key}: cosines {np.round(cos, 5)}"
        elif key.endswith("_embed_binary"):
            clear = np.abs(ref) > 1e-4  # sign bits of values this close to 0 may flip between runtimes
            bits = np.unpackbits(value, axis=-1)[:, : ref.shape[1]]
            assert value.dtype == np.uint8
            np.testing.assert_array_equal(bits[clear], (ref > 0)[clear])

    # FAISS: hamming candidates rescored with float vectors, as PyTorch's vectors rank them
    docs_ref = reference(model_dir, _DEMO_DOCS)
    query_ref = reference(model_dir, ["a cat on a mat"])[0]
    faiss_result = next(v for k, v in found.items() if k.endswith("_results") and "ranked" in v)
    scores = docs_ref[faiss_result["ranked"]] @ query_ref
    assert list(scores) == sorted(scores, reverse=True)
    # Qdrant (local mode, the manifest's settings): the scores are PyTorch's dot products, best first
    hits = next(v for k, v in found.items() if k.endswith("_results") and "hits" in v)["hits"]
    all_scores = docs_ref @ query_ref
    assert [h[0] for h in hits] == list(np.argsort(-all_scores)[:2])
    np.testing.assert_allclose([h[1] for h in hits], np.sort(all_scores)[::-1][:2], atol=1e-4)

    # what the text says matches the graph that was written
    assert "`None`" not in markdown and "pooling `None`" not in markdown
    vespa = _section(markdown, "Vespa")
    if head == "echo":
        for title in ("text-embeddings-inference", "Infinity", "Vespa"):
            assert _section(markdown, title).startswith("Not servable"), title
        assert manifest["echo"]["rule"] in markdown and "(max_length - " in manifest["echo"]["rule"]
        # tokenizer.json lays the text out in the template itself: fastembed serves the export (checked above)
        assert manifest["servers"]["fastembed"]["serves"] is True
        assert manifest["tokenizer"]["file"] == "tokenizer_text.json"
    else:
        has_types = "token_type_ids" in manifest["inputs"]
        assert ("<transformer-token-type-ids/>" in vespa) is (not has_types)
    if head == "bert":
        assert "binary_embedding" in markdown and "embed_binary" in markdown
    infinity = _section(markdown, "Infinity")
    assert infinity.startswith("Not servable") is (head not in ("bert", "mean"))


def test_infinity_folder_snippet(consumer_python: Path, consumer_export, tmp_path: Path) -> None:
    """The Infinity block builds a folder whose only graph is the token graph, truncating where the model does,
    and Infinity's own recipe on it (tokenize to max_position_embeddings, mean-pool last_hidden_state, normalize)
    gives the PyTorch vectors; the pooled graph given to it instead would have no last_hidden_state output."""
    from embedforge.export.serving import python_blocks

    model_dir, export = consumer_export("mean")
    blocks = python_blocks((export / "SERVING.md").read_text())
    block = next(b for b in blocks if "infinity" in b)
    run_blocks(consumer_python, export, [block], tmp_path / "out", TEXTS)
    folder = export / "infinity"
    assert sorted(p.name for p in folder.rglob("*.onnx")) == ["model.onnx"]
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    code = """
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
cfg = json.load(open("infinity/config.json"))
tok = Tokenizer.from_file("infinity/tokenizer.json")
tok.enable_truncation(cfg["max_position_embeddings"])
tok.enable_padding(pad_id=0, direction=json.load(open("infinity/tokenizer_config.json")).get("padding_side", "right"))
enc = tok.encode_batch(json.loads(sys.argv[1]))
ids = np.array([e.ids for e in enc], dtype=np.int64)
mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
sess = ort.InferenceSession("infinity/onnx/model.onnx", providers=["CPUExecutionProvider"])
assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
h = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
v /= np.linalg.norm(v, axis=1, keepdims=True)
np.save(sys.argv[2], v)
"""


    run_consumer(consumer_python, code, export, json.dumps(TEXTS), str(tmp_path / "inf.npy"))
    cos = cosines(np.load(tmp_path / "inf.npy"), reference(model_dir, TEXTS))
    assert cos.min() >= 0.9999, cos


def test_prompts_in_snippet_and_vespa(consumer_python: Path, tiny_st_dir: Path, tmp_path: Path) -> None:
    """A model with prompts that pool with the text: the snippet prepends them as sentence-transformers does, and
    the Vespa block carries them as <prepend>."""
    from sentence_transformers import SentenceTransformer

    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import export_model
    from embedforge.export.serving import python_blocks
    from embedforge.model import save_model

    st = SentenceTransformer(str(tiny_st_dir), device="cpu")
    st.prompts = {"query": "query: ", "document": "passage: "}
    model_dir = save_model(st, tmp_path / "model", stage="convert", source=str(tiny_st_dir))
    export = export_model(ExportConfig(model=str(model_dir), fp16=False, int8=[], optimize="none",
                                       last_hidden_state=False), tmp_path / "export")
    markdown = (export / "SERVING.md").read_text()
    vespa = _section(markdown, "Vespa")
    assert "<prepend>" in vespa and "<query>query: </query>" in vespa and "<document>passage: </document>" in vespa
    block = python_blocks(markdown)[0]
    found = run_blocks(consumer_python, export, [block, "embed_query = lambda t: embed(t, prompt='query')\n"],
                       tmp_path / "out", TEXTS)
    ref = np.stack([st.encode([t], prompt_name="query", convert_to_numpy=True)[0] for t in TEXTS])
    assert cosines(found["1_embed_query"], ref).min() >= 0.9999
    plain = np.stack([st.encode([t], convert_to_numpy=True)[0] for t in TEXTS])
    assert cosines(found["0_embed"], plain).min() >= 0.9999
    assert cosines(found["1_embed_query"], plain).min() < 0.9999  # the prompt changed the vectors
