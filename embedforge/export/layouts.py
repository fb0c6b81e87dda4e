"""Files that make an export directory usable by inference servers and vector stores.

- text-embeddings-inference: ``config.json`` (the backbone's), ``tokenizer.json``, ``1_Pooling/config.json`` and
  ``onnx/model.onnx``; because the graph's output is named ``sentence_embedding`` TEI takes it as already pooled.
- Infinity: ``onnx/model_last_hidden_state.onnx`` with the pooling named in the manifest.
- Vespa (hugging-face-embedder), FAISS and Qdrant: settings in ``manifest.json`` under ``servers`` and spelled out
  in ``SERVING.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

_ST_POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def describe_pooling(model: SentenceTransformer) -> dict[str, Any]:
    """The pooling of a model: ``{"module": class name, "mode": ..., "server_poolable": bool}``.

    ``server_poolable`` is True when a server that pools ``last_hidden_state`` itself (Infinity, TEI with a
    token output) can reproduce it: a single sentence-transformers pooling mode with nothing trainable after it.
    """
    names = [type(m).__name__ for m in model]
    for module in list(model)[1:]:
        if type(module).__name__ == "Pooling":
            modes = getattr(module, "pooling_mode", None)
            if modes is None:
                modes = [m for m, flag in _ST_POOLING_FLAGS.items() if getattr(module, flag, False)]
            modes = [modes] if isinstance(modes, str) else list(modes)
            later = [n for n in names[names.index("Pooling") + 1:] if n not in ("Normalize",)]
            return {"module": "Pooling", "mode": "+".join(modes), "modules": names,
                    "server_poolable": len(modes) == 1 and not later}
    head = names[1] if len(names) > 1 else names[0]
    return {"module": head, "mode": head, "modules": names, "server_poolable": False}


def write_tei_files(model: SentenceTransformer, out: Path, *, pooling: dict[str, Any], dim: int,
                    max_seq_length: int) -> list[str]:
    """Write the backbone ``config.json``, tokenizer files and ``1_Pooling/config.json``; return written names."""
    from embedforge.modules.compat import legacy_pooling_config, rewrite_tokenizer_config

    written: list[str] = []
    first = model[0]
    hf_model = getattr(first, "model", None) or getattr(first, "auto_model", None)
    if hf_model is not None and hasattr(hf_model, "config"):
        hf_model.config.to_json_file(str(out / "config.json"))
        written.append("config.json")
    tokenizer = getattr(first, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"the first module ({type(first).__name__}) has no tokenizer to export")
    if hasattr(tokenizer, "save_pretrained"):
        saved = tokenizer.save_pretrained(str(out))
        written += [Path(p).name for p in saved]
    else:  # a tokenizers.Tokenizer (static token table): it encodes without special tokens, so drop them
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(tokenizer.to_str())
        plain.post_processor = None
        plain.save(str(out / "tokenizer.json"))
        written.append("tokenizer.json")
    if not (out / "tokenizer.json").is_file():
        raise ValueError("the model's tokenizer is not a fast tokenizer: servers need tokenizer.json")
    (out / "1_Pooling").mkdir(exist_ok=True)
    mode = pooling["mode"] if pooling["mode"] in _ST_POOLING_FLAGS else "mean"
    # Only the keys sentence-transformers 5.x Pooling(**config) accepts. A head that pools inside the graph gets a
    # placeholder mean here; the manifest records that the graph's sentence_embedding output is already pooled.
    pool_cfg = legacy_pooling_config(dim, mode)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2) + "\n")
    rewrite_tokenizer_config(out)  # a tokenizer_class transformers 4.x knows
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}, indent=2) + "\n")
    written += ["1_Pooling/config.json", "sentence_bert_config.json"]
    return written


def server_settings(*, dim: int, normalized: bool, max_seq_length: int, pooling: dict[str, Any],
                    binary: bool, files: dict[str, str], binary_bytes: int | None = None) -> dict[str, Any]:
    """Per-server settings recorded in ``manifest.json`` (``binary_bytes``: width of the packed codes when a
    binarizer module writes more than one bit per dimension; default ``ceil(dim / 8)``)."""
    bytes_ = binary_bytes or (dim + 7) // 8
    int8_file = files.get("int8_avx512_vnni") or next((v for k, v in files.items() if k.startswith("int8")), None)
    settings: dict[str, Any] = {
        "onnxruntime": {
            "file": files["fp32"], "cpu_int8": int8_file, "gpu_fp16": files.get("fp16"),
            "inputs": "int64 input_ids / attention_mask (/ token_type_ids), shape [batch, sequence]",
            "output": "sentence_embedding float32 [batch, %d]" % dim,
        },
        "text-embeddings-inference": {
            "model_dir": ".", "onnx": "onnx/model.onnx", "pooled_output": "sentence_embedding",
            "max_input_length": max_seq_length, "note": "TEI's ONNX backend serves the fp32 graph only",
        },
        "infinity": {
            "onnx": files.get("last_hidden_state"), "pooling": pooling["mode"] if pooling["server_poolable"] else None,
            "note": None if pooling["server_poolable"] else "this head cannot be re-created by the server: use the "
            "pooled graph",
        },
        "vespa": {
            "component": "hugging-face-embedder",
            "transformer-model": files["fp32"], "tokenizer-model": "tokenizer.json",
            "transformer-output": "sentence_embedding", "pooling-strategy": "none",
            "normalize": False, "max-tokens": max_seq_length,
            "tensor": f"tensor<float>(x[{dim}])",
            "distance-metric": "prenormalized-angular" if normalized else "angular",
            "binary_tensor": f"tensor<int8>(x[{bytes_}])", "binary_distance-metric": "hamming",
            "binary_note": "pack sign bits like numpy packbits(x > 0) and view the bytes as int8",
        },
        "faiss": {
            "float_index": "IndexFlatIP" if normalized else "IndexFlatL2",
            "binary_index": f"IndexBinaryFlat({bytes_ * 8}) or IndexBinaryHNSW({bytes_ * 8}, 32)",
            "binary_rows": f"uint8 [n, {bytes_}] = np.packbits(x > 0, axis=-1)",
            "rescoring": "take top k*4 by hamming, rescore with float (or int8) query . document",
        },
        "qdrant": {
            "vectors": {"size": dim, "distance": "Dot" if normalized else "Cosine"},
            "quantization_config": {"binary": {"always_ram": True}},
            "search_params": {"quantization": {"rescore": True, "oversampling": 4.0}},
        },
    }
    if binary:
        settings["onnxruntime"]["binary_output"] = f"binary_embedding uint8 [batch, {bytes_}] (numpy packbits order)"
    return settings


def serving_markdown(manifest: dict[str, Any]) -> str:
    """A short SERVING.md for humans, generated from the manifest."""
    s = manifest["servers"]
    dim = manifest["dims"]["sentence_embedding"]
    lines = [
        f"# Serving this export ({manifest['source']})",
        "",
        f"Output `sentence_embedding`: float32, {dim} dims, "
        f"{'L2-normalized' if manifest['normalized'] else 'not normalized'}; pooling `{manifest['pooling']['mode']}`"
        f" inside the graph; max {manifest['tokenizer']['max_length']} tokens.",
        "",
        "| file | precision | min cosine vs PyTorch | size MB |",
        "|---|---|---|---|",
    ]
    for name, info in manifest["graphs"].items():
        parity = info.get("parity") or {}
        lines.append(f"| `{info['file']}` | {name} | {parity.get('min_cosine', '-')} | {info.get('size_mb', '-')} |")
    v = s["vespa"]
    lines += [
        "",
        "## text-embeddings-inference",
        "Point TEI at this directory: it reads `config.json`, `tokenizer.json`, `1_Pooling/config.json` and "
        "`onnx/model.onnx`, and takes the `sentence_embedding` output as pooled.",
        "",
        "## Vespa",
        "```xml",
        '<component id="embedder" type="hugging-face-embedder">',
        f'  <transformer-model path="{v["transformer-model"]}"/>',
        '  <tokenizer-model path="tokenizer.json"/>',
        "  <transformer-output>sentence_embedding</transformer-output>",
        "  <pooling-strategy>none</pooling-strategy>",
        f"  <max-tokens>{v['max-tokens']}</max-tokens>",
        "</component>",
        "```",
        f"Field: `{v['tensor']}` with distance-metric `{v['distance-metric']}`; binary: `{v['binary_tensor']}` with "
        f"`hamming` ({v['binary_note']}).",
        "",
        "## FAISS",
        f"Float: `{s['faiss']['float_index']}`. Binary: `{s['faiss']['binary_index']}` over "
        f"{s['faiss']['binary_rows']}; {s['faiss']['rescoring']}.",
        "",
        "## Qdrant",
        "```json",
        json.dumps({"vectors": s["qdrant"]["vectors"], "quantization_config": s["qdrant"]["quantization_config"]}),
        "```",
        f"Search with `{json.dumps(s['qdrant']['search_params'])}`.",
        "",
        "## Infinity",
        f"Graph `{s['infinity']['onnx']}` (output `last_hidden_state`), pooling `{s['infinity']['pooling']}`.",
        "",
    ]
    return "\n".join(lines)


def copy_readme(model_dir: Path | None, out: Path) -> None:
    """Keep the source model's README (model card) next to the export, if there is one."""
    if model_dir is not None and (model_dir / "README.md").is_file():
        shutil.copy2(model_dir / "README.md", out / "README.md")
