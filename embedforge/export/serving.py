"""``SERVING.md``: how to serve one export, generated from its ``manifest.json`` (the graph actually written).

Every Python block in the file is meant to run as written, from inside the export directory, in an environment
with only ``onnxruntime``, ``tokenizers``, ``numpy`` (and ``fastembed``, ``faiss-cpu`` or ``qdrant-client`` for
their sections): no torch, no embedforge. ``tests/consumers`` runs them. Blocks after the first reuse the
``embed`` function the first (onnxruntime) block defines; the fastembed block stands alone.
"""

from __future__ import annotations

import json
from typing import Any

#: the text the snippets are demonstrated on
_DEMO_DOCS = ["the cat sits on the mat", "stock markets fell sharply today", "a dog runs in the park"]


def _py(code: str) -> list[str]:
    return ["```python", code.strip("\n"), "```"]


def _ort_snippet(manifest: dict[str, Any]) -> str:
    """onnxruntime + tokenizers + numpy: tokenize exactly as the graph expects, run it, return the vectors."""
    tok = manifest["tokenizer"]
    echo = tok.get("echo")
    max_len = int(tok["max_length"])
    prompts = {k: v for k, v in (manifest.get("prompts") or {}).items() if v}
    use_prompts = bool(prompts) and manifest.get("prompt_pooling", True) and echo is None
    lines = [
        "import numpy as np",
        "import onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "",
        f"MAX_TOKENS = {max_len}",
        f"INPUTS = {list(tok['inputs'])!r}",
        f"PAD_ID, LEFT_PADDING = {int(tok['pad_token_id'])}, {tok['padding_side'] == 'left'}",
    ]
    if use_prompts:
        lines.append(f"PROMPTS = {json.dumps(prompts, ensure_ascii=False)}")
    lines += [
        'tokenizer = Tokenizer.from_file("tokenizer.json")',
        "tokenizer.no_padding()",
    ]
    if echo is not None:
        fixed = sum(len(echo[k]) for k in ("bos", "prefix", "middle", "suffix", "eos"))
        lines += [
            "# Echo embedding: tokenizer.json writes each text twice in the template",
            f"# (bos prefix TEXT middle TEXT suffix eos, the template's {fixed} tokens counted once), so truncating at",
            f"# (MAX_TOKENS + {fixed}) // 2 leaves (MAX_TOKENS - {fixed}) // 2 tokens per copy.",
            f"tokenizer.enable_truncation((MAX_TOKENS + {fixed}) // 2)",
        ]
    else:
        lines.append("tokenizer.enable_truncation(MAX_TOKENS)")
    lines += [
        "",
        "",
        "def token_rows(texts):",
        "    return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(texts)]",
    ]
    lines += [
        "",
        "",
        f'session = ort.InferenceSession("{manifest["servers"]["onnxruntime"]["file"]}", '
        'providers=["CPUExecutionProvider"])',
        "",
        "",
        "def run(texts, output):",
        "    rows = token_rows(texts)",
        "    width = max(len(ids) for ids, _ in rows)",
        "    feeds = {name: np.zeros((len(rows), width), dtype=np.int64) for name in INPUTS}",
        "    feeds[\"input_ids\"][:] = PAD_ID",
        "    for i, (ids, types) in enumerate(rows):",
        "        span = slice(width - len(ids), width) if LEFT_PADDING else slice(0, len(ids))",
        "        feeds[\"input_ids\"][i, span] = ids",
        "        feeds[\"attention_mask\"][i, span] = 1",
        "        if \"token_type_ids\" in feeds:",
        "            feeds[\"token_type_ids\"][i, span] = types",
        "    return session.run([output], feeds)[0]",
        "",
        "",
    ]
    lower = ".lower()" if tok.get("lowercase") else ""
    if use_prompts:
        lines += [
            "def embed(texts, prompt=None):",
            "    \"\"\"float32 [len(texts), dim]; prompt: None or one of PROMPTS' names\"\"\"",
            "    texts = [(PROMPTS[prompt] if prompt else \"\") + t for t in texts]",
        ]
    else:
        lines += ["def embed(texts):", "    \"\"\"float32 [len(texts), dim]\"\"\""]
    if lower:
        lines.append("    texts = [t.lower() for t in texts]")
    lines.append("    return run(texts, \"sentence_embedding\")")
    if manifest.get("binary"):
        lines += [
            "",
            "",
            "def embed_binary(texts):",
            "    \"\"\"uint8 [len(texts), dim / 8]: numpy packbits(x > 0) rows, computed inside the graph\"\"\"",
        ]
        if lower:
            lines.append("    texts = [t.lower() for t in texts]")
        lines.append("    return run(texts, \"binary_embedding\")")
    lines += ["", "", f"print(embed({_DEMO_DOCS[:2]!r}).shape)"]
    return "\n".join(lines)


def _fastembed_snippet(manifest: dict[str, Any]) -> str:
    fe = manifest["servers"]["fastembed"]
    return "\n".join([
        "import numpy as np",
        "from fastembed import TextEmbedding",
        "from fastembed.common.model_description import ModelSource, PoolingType",
        "",
        'NAME = "local/embedforge-export"  # any name fastembed does not know yet',
        "TextEmbedding.add_custom_model(",
        f"    model=NAME, pooling=PoolingType.{fe['pooling']}, normalization={fe['normalization']}, dim={fe['dim']},",
        f'    sources=ModelSource(hf=NAME), model_file="{fe["model_file"]}", output_name="{fe["output_name"]}",',
        ")",
        'model = TextEmbedding(NAME, specific_model_path=".")  # this directory; nothing is downloaded',
        "",
        "",
        "def embed_fastembed(texts):",
        "    return np.stack(list(model.embed(texts)))",
        "",
        "",
        f"print(embed_fastembed({_DEMO_DOCS[:2]!r}).shape)",
    ])


def _infinity_snippet(manifest: dict[str, Any]) -> str:
    inf = manifest["servers"]["infinity"]
    return "\n".join([
        "import json",
        "import shutil",
        "from pathlib import Path",
        "",
        'folder = Path("infinity")  # serve this folder: its only .onnx file is the token-vector graph',
        '(folder / "onnx").mkdir(parents=True, exist_ok=True)',
        f'shutil.copy2("{inf["onnx"]}", folder / "onnx" / "model.onnx")',
        'for name in Path(".").iterdir():',
        '    if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and name.is_file():',
        "        shutil.copy2(name, folder / name.name)",
        'config = json.loads(Path("config.json").read_text())',
        f'config["max_position_embeddings"] = {inf["max_position_embeddings"]}  # Infinity truncates here',
        '(folder / "config.json").write_text(json.dumps(config, indent=2))',
        "print(sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file()))",
    ])


def _faiss_snippet(manifest: dict[str, Any]) -> str:
    binary = bool(manifest.get("binary"))
    dim = manifest["dims"]["sentence_embedding"]
    bits = ((dim + 7) // 8) * 8
    codes = "embed_binary({0})" if binary else "np.packbits(embed({0}) > 0, axis=-1)"
    return "\n".join([
        "import faiss",
        "",
        f"docs = {_DEMO_DOCS!r}",
        'queries = ["a cat on a mat"]',
        f"index = faiss.IndexBinaryFlat({bits})  # hamming distance over packed sign bits",
        f"index.add({codes.format('docs')})",
        f"_, candidates = index.search({codes.format('queries')}, 2)  # in practice: k * 4 candidates",
        "# rescore the candidates with float vectors",
        "doc_vectors, query_vectors = embed(docs), embed(queries)",
        "scores = (doc_vectors[candidates[0]] @ query_vectors[0])",
        "ranked = candidates[0][np.argsort(-scores)]",
        "print([docs[i] for i in ranked])",
    ])


def _qdrant_snippet(manifest: dict[str, Any]) -> str:
    q = manifest["servers"]["qdrant"]
    distance = {"Dot": "DOT", "Cosine": "COSINE"}[q["vectors"]["distance"]]
    sp = q["search_params"]["quantization"]
    return "\n".join([
        "from qdrant_client import QdrantClient, models",
        "",
        'client = QdrantClient(":memory:")  # or QdrantClient(url="http://localhost:6333")',
        "client.create_collection(",
        '    "docs",',
        f"    vectors_config=models.VectorParams(size={q['vectors']['size']}, distance=models.Distance.{distance}),",
        "    quantization_config=models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True)),",
        ")",
        f"docs = {_DEMO_DOCS!r}",
        'client.upsert("docs", points=[models.PointStruct(id=i, vector=v.tolist(), payload={"text": t})',
        "                              for i, (v, t) in enumerate(zip(embed(docs), docs))])",
        "hits = client.query_points(",
        '    "docs", query=embed(["a cat on a mat"])[0].tolist(), limit=2,',
        "    search_params=models.SearchParams(quantization=models.QuantizationSearchParams(",
        f"        rescore={sp['rescore']}, oversampling={sp['oversampling']})),",
        ").points",
        'print([(hit.payload["text"], round(hit.score, 4)) for hit in hits])',
    ])


def _vespa_block(manifest: dict[str, Any]) -> list[str]:
    v = manifest["servers"]["vespa"]
    lines = [
        "```xml",
        '<component id="embedder" type="hugging-face-embedder">',
        f'  <transformer-model path="{v["transformer-model"]}"/>',
        '  <tokenizer-model path="tokenizer.json"/>',
        "  <transformer-output>sentence_embedding</transformer-output>",
    ]
    if v.get("transformer-token-type-ids") is None:
        lines.append("  <transformer-token-type-ids/>  <!-- the graph has no token_type_ids input -->")
    lines += ["  <pooling-strategy>none</pooling-strategy>", f"  <max-tokens>{v['max-tokens']}</max-tokens>"]
    if v.get("prepend"):
        lines.append("  <prepend>")
        for role, text in v["prepend"].items():
            tag = {"query": "query", "document": "document", "doc": "document"}.get(role)
            if tag is not None:
                lines.append(f"    <{tag}>{_xml(text)}</{tag}>")
        lines.append("  </prepend>")
    lines += ["</component>", "```"]
    return lines


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _describe_pooling(manifest: dict[str, Any]) -> str:
    p = manifest["pooling"]
    if p.get("module") == "Pooling":
        return f"sentence-transformers Pooling `{p['mode']}`"
    return f"embedforge head `{p.get('module')}` (trainable; servers cannot re-create it from token vectors)"


def serving_markdown(manifest: dict[str, Any]) -> str:
    """``SERVING.md`` for one export: what the graph takes and returns, then one section per consumer."""
    s = manifest["servers"]
    dim = manifest["dims"]["sentence_embedding"]
    tok = manifest["tokenizer"]
    echo = tok.get("echo")
    prompts = {k: v for k, v in (manifest.get("prompts") or {}).items() if v}
    lines = [
        f"# Serving this export ({manifest['source']})",
        "",
        f"- Inputs: {', '.join(f'`{i}`' for i in manifest['inputs'])} (int64, [batch, sequence]); "
        f"{tok['padding_side']} padding with id {tok['pad_token_id']}; at most {tok['max_length']} tokens "
        f"(longer texts are cut).",
        f"- Output `sentence_embedding`: float32 [batch, {dim}], "
        f"{'L2-normalized' if manifest['normalized'] else 'not normalized'}; pooling inside the graph: "
        f"{_describe_pooling(manifest)}.",
    ]
    if manifest.get("binary"):
        lines.append(f"- Output `binary_embedding`: uint8 [batch, {manifest['dims']['binary_embedding']}], sign bits "
                     f"packed like `numpy.packbits(x > 0, axis=-1)` (first dimension = most significant bit).")
    if prompts:
        how = ("prepend the prompt text to the text before tokenizing" if manifest.get("prompt_pooling", True)
               else "the head pools without knowing a prompt's length: encode without prompts")
        lines.append(f"- Prompts: {json.dumps(prompts, ensure_ascii=False)}; {how}.")
    if echo is not None:
        template = (manifest.get("echo") or {}).get("template")
        lines += [
            "- **Echo embedding**: the text must be written twice"
            + (f" in the template {json.dumps(template, ensure_ascii=False)}" if template else "") + ": "
            + (manifest.get("echo") or {}).get("rule", "see tokenizer.echo in manifest.json") + " The onnxruntime "
            "snippet and fastembed get it from tokenizer.json; text-embeddings-inference, Infinity and Vespa are "
            "not supported for echo exports.",
        ]
    lines += ["", "| file | precision | min cosine vs PyTorch | size MB |", "|---|---|---|---|"]
    for name, info in manifest["graphs"].items():
        parity = info.get("parity") or {}
        lines.append(f"| `{info['file']}` | {name} | {parity.get('min_cosine', '-')} | {info.get('size_mb', '-')} |")
    lines += ["", "## onnxruntime (no torch)", "",
              "`pip install onnxruntime tokenizers numpy`; run from this directory.", ""]
    lines += _py(_ort_snippet(manifest))
    if s["onnxruntime"].get("cpu_int8"):
        lines.append(f"On CPUs, `{s['onnxruntime']['cpu_int8']}` is the int8 graph (same inputs and outputs).")

    fe = s["fastembed"]
    lines += ["", "## fastembed", ""]
    if fe["serves"]:
        lines += _py(_fastembed_snippet(manifest))
        extra = [f"int8: `model_file=\"{fe['int8_model_file']}\"`"] if fe.get("int8_model_file") else []
        if fe.get("token_graph"):
            tg = fe["token_graph"]
            extra.append(f"token graph: `model_file=\"{tg['model_file']}\", pooling=PoolingType.{tg['pooling']}, "
                         "normalization=True, output_name=None`")
        if extra:
            lines.append("Also: " + "; ".join(extra) + ".")
        if fe.get("echo"):
            lines.append(f"Echo: {fe['echo']}.")
        if fe.get("prompts"):
            lines.append(f"Prompts: {fe['prompts']}.")
    else:
        lines.append(f"Not servable by fastembed: {fe['why_not']}.")

    tei = s["text-embeddings-inference"]
    lines += ["", "## text-embeddings-inference", ""]
    if tei["serves"]:
        lines.append("Point TEI at this directory: it reads `config.json`, `tokenizer.json`, `1_Pooling/config.json` "
                     "and `onnx/model.onnx`, and takes the `sentence_embedding` output as pooled. Its token limit "
                     f"({tei['max_input_length']}) comes from `sentence_bert_config.json`; start it with "
                     f"`{tei['flags']}` so longer texts are cut instead of refused. {tei['note']}.")
    else:
        lines.append(f"Not servable by text-embeddings-inference: {tei['why_not']}.")

    inf = s["infinity"]
    lines += ["", "## Infinity", ""]
    if inf["serves"]:
        lines += [
            "Infinity's ONNX engine (`--engine optimum`) reads only a `last_hidden_state` output, pools it with "
            "`mean` or `cls` (default `auto` = cls), always L2-normalizes, takes the last `.onnx` file it finds "
            "and truncates at `config.json`'s `max_position_embeddings`. Build a folder it reads correctly:",
            "",
        ]
        lines += _py(_infinity_snippet(manifest))
        lines += [
            "```bash",
            f"infinity_emb v2 --model-id ./infinity --engine optimum --pooling-method {inf['pooling_method']} "
            "--device cpu",
            "```",
            "Its torch engine (`--engine torch`) needs sentence-transformers < 4 and transformers < 5"
            + (", which ignore `is_causal: false`: it would run this converted decoder causally. Use the optimum "
               "engine." if manifest.get("decoder") else "."),
        ]
    else:
        lines.append(f"Not servable by Infinity: {inf['why_not']}."
                     + ("" if echo else " Use onnxruntime, fastembed or TEI with `onnx/model.onnx` instead."))

    v = s["vespa"]
    lines += ["", "## Vespa", ""]
    if v["serves"]:
        lines += _vespa_block(manifest)
        lines.append(f"Field: `{v['tensor']}` with distance-metric `{v['distance-metric']}`; binary: "
                     f"`{v['binary_tensor']}` with `hamming` ({v['binary_note']}).")
    else:
        lines.append(f"Not servable by Vespa's hugging-face-embedder: {v['why_not']}.")

    lines += ["", "## FAISS", "",
              f"Float: `{s['faiss']['float_index']}`. Binary: `{s['faiss']['binary_index']}` over "
              f"{s['faiss']['binary_rows']}; {s['faiss']['rescoring']}. Continuing from the onnxruntime snippet:", ""]
    lines += _py(_faiss_snippet(manifest))
    lines += ["", "## Qdrant", "",
              f"{s['qdrant']['note']}. Continuing from the onnxruntime snippet (local mode; the same calls work "
              "against a server):", ""]
    lines += _py(_qdrant_snippet(manifest))
    lines.append("")
    return "\n".join(lines)


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a markdown text, in order (what the consumer tests execute)."""
    blocks, current = [], None
    for line in markdown.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks
