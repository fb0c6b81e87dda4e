"""Files that make an export directory usable by inference servers and vector stores.

- text-embeddings-inference: ``config.json`` (the backbone's), ``tokenizer.json``, ``1_Pooling/config.json`` and
  ``onnx/model.onnx``; because the graph's output is named ``sentence_embedding`` TEI takes it as already pooled.
- Infinity: ``onnx/model_last_hidden_state.onnx`` with the pooling named in the manifest (mean / cls only).
- fastembed, Vespa (hugging-face-embedder), FAISS and Qdrant: settings in ``manifest.json`` under ``servers``;
  :mod:`embedforge.export.serving` turns them into ``SERVING.md``.
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
    align_tokenizer_limits(out, max_seq_length)
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


def align_tokenizer_limits(out: Path, max_seq_length: int) -> None:
    """Make every token limit in the saved tokenizer files equal the graph's ``max_seq_length``.

    A tokenizer saved by transformers keeps whatever its source carried: all-MiniLM-L6-v2 has ``max_length: 128``
    in ``tokenizer_config.json`` and ``tokenizer.json`` truncates (and pads to a fixed) 128, beside a model that
    reads 256 tokens. Consumers that tokenize from these files (fastembed takes the smaller of ``max_length`` and
    ``model_max_length``) would then cut texts short. Padding becomes batch-longest: consumers pad per batch.
    """
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        cfg["model_max_length"] = int(max_seq_length)
        if "max_length" in cfg:
            cfg["max_length"] = int(max_seq_length)
        config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tok_path = out / "tokenizer.json"
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    truncation = data.get("truncation") or {"strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    truncation["max_length"] = int(max_seq_length)
    data["truncation"] = truncation
    padding = data.get("padding")
    if padding is not None and isinstance(padding.get("strategy"), dict):  # {"Fixed": n}
        padding["strategy"] = "BatchLongest"
    tok_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


#: for echo exports: the model's own tokenizer (text in, text ids out), which embedforge's encoder reads
ECHO_TEXT_TOKENIZER = "tokenizer_text.json"
_ECHO_PIECES = ("bos", "prefix", "middle", "suffix", "eos")


def echo_truncation(echo: dict[str, Any], max_length: int) -> int:
    """The truncation length of the echo ``tokenizer.json``: the template's tokens count once in a tokenizer's
    budget but the text twice, so ``(max_length + fixed) // 2`` leaves the text ``(max_length - fixed) // 2``."""
    fixed = sum(len(echo[k]) for k in _ECHO_PIECES)
    return (int(max_length) + fixed) // 2


def write_echo_tokenizer(out: Path, echo: dict[str, Any], max_seq_length: int) -> str:
    """Make ``tokenizer.json`` lay a text out in the echo template by itself; return the plain copy's name.

    The post-processor writes ``bos prefix TEXT middle TEXT suffix eos`` (the template pieces as special-token
    runs), a normalizer puts the leading space in front of the text where the template wants one, and truncation
    (also in ``tokenizer_config.json``) keeps both copies within ``max_seq_length``. Consumers that tokenize with
    ``tokenizer.json`` and special tokens on (fastembed) then feed the graph what it expects.
    """
    from tokenizers import Tokenizer, normalizers, processors

    path = out / "tokenizer.json"
    shutil.copy2(path, out / ECHO_TEXT_TOKENIZER)
    tok = Tokenizer.from_file(str(path))
    special: list[dict[str, Any]] = []
    template: list[str] = []
    for key in _ECHO_PIECES:  # bos prefix $A middle $A suffix eos
        if echo[key]:
            name = f"<echo-{key}>"
            tokens = [tok.id_to_token(i) or "" for i in echo[key]]
            special.append({"id": name, "ids": list(echo[key]), "tokens": tokens})
            template.append(name)
        if key in ("prefix", "middle"):
            template.append("$A")
    tok.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=special)
    if echo.get("lead_space"):
        steps = [normalizers.Prepend(" ")] + ([tok.normalizer] if tok.normalizer is not None else [])
        tok.normalizer = normalizers.Sequence(steps)
    limit = echo_truncation(echo, max_seq_length)
    tok.enable_truncation(limit)
    tok.no_padding()
    tok.save(str(path))
    config_path = out / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    cfg.update(model_max_length=limit, max_length=limit)
    config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ECHO_TEXT_TOKENIZER


def echo_rule(echo: dict[str, Any], max_length: int) -> str:
    """The echo layout of a :class:`~embedforge.export.encoder.TokenizerSpec` in plain words."""
    fixed = sum(len(echo[k]) for k in ("bos", "prefix", "middle", "suffix", "eos"))
    space = "with a space put in front of it, " if echo.get("lead_space") else ""
    return (
        f"tokenize the text {space}without special tokens; keep its first (max_length - {fixed}) // 2 = "
        f"{max(0, (max_length - fixed) // 2)} tokens; feed the ids bos + prefix + text + middle + text + suffix + "
        "eos (the id lists under tokenizer.echo) with attention_mask 1 everywhere; the graph pools the second copy "
        f"only. This export's tokenizer.json does all of that itself (special tokens on, truncation at "
        f"{echo_truncation(echo, max_length)}); a consumer that tokenizes the text once with its own template gets "
        "wrong vectors."
    )


#: Pooling modes each server can apply itself to ``last_hidden_state``.
_SERVER_POOLINGS = {"fastembed": {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST_TOKEN"},
                    "infinity": {"mean": "mean", "cls": "cls"}}


def server_settings(*, dim: int, normalized: bool, max_seq_length: int, pooling: dict[str, Any],
                    binary: bool, files: dict[str, str], inputs: list[str] | None = None,
                    prompts: dict[str, str] | None = None, prompt_pooling: bool = True, echo: bool = False,
                    decoder: bool = False, binary_bytes: int | None = None) -> dict[str, Any]:
    """Per-consumer settings recorded in ``manifest.json``; each says whether it ``serves`` this export and why.

    ``binary_bytes`` is the width of the packed codes when a binarizer module writes more than one bit per
    dimension (default ``ceil(dim / 8)``).
    """
    inputs = list(inputs or ["input_ids", "attention_mask"])
    prompts = {k: v for k, v in (prompts or {}).items() if v}
    bytes_ = binary_bytes or (dim + 7) // 8
    int8_file = files.get("int8_avx512_vnni") or next((v for k, v in files.items() if k.startswith("int8")), None)
    tokens_file = files.get("last_hidden_state")
    mode = pooling["mode"] if pooling["server_poolable"] else None
    no_echo = ("the graph needs the echo layout (text written twice, see manifest echo.rule); tokenizer.json "
               "applies it, but how this consumer truncates such a tokenizer is not verified")
    prompt_note = ("prepend the prompt text to each text yourself" if prompts and prompt_pooling else
                   "encode without prompts: the head pools without knowing a prompt's length" if prompts else None)

    def token_pooling(server: str) -> str | None:
        return _SERVER_POOLINGS[server].get(mode or "") if tokens_file and not echo else None

    infinity_pool = token_pooling("infinity")
    if echo:
        infinity_why = no_echo
    elif tokens_file is None:
        infinity_why = "the export has no last_hidden_state graph (last_hidden_state: false)"
    elif infinity_pool is None:
        infinity_why = ("its ONNX engine pools last_hidden_state with mean or cls only; this model pools with "
                        + (pooling["mode"] if pooling["server_poolable"] else f"the {pooling['module']} head"))
    else:
        infinity_why = None
    settings: dict[str, Any] = {
        "onnxruntime": {
            "serves": True,
            "file": files["fp32"], "cpu_int8": int8_file, "gpu_fp16": files.get("fp16"),
            "inputs": f"int64 {' / '.join(inputs)}, shape [batch, sequence]",
            "output": "sentence_embedding float32 [batch, %d]" % dim,
            "prompts": prompt_note,
        },
        "fastembed": {
            "serves": True,
            "echo": "tokenizer.json and tokenizer_config.json apply the echo layout and its truncation" if echo
            else None,
            "model_file": files["fp32"], "pooling": "DISABLED", "normalization": False,
            "output_name": "sentence_embedding", "dim": dim, "int8_model_file": int8_file,
            "token_graph": {"model_file": tokens_file, "pooling": token_pooling("fastembed"),
                            "normalization": True} if token_pooling("fastembed") else None,
            "prompts": prompt_note,
        },
        "text-embeddings-inference": {
            "serves": not echo, "why_not": no_echo if echo else None,
            "model_dir": ".", "onnx": "onnx/model.onnx", "pooled_output": "sentence_embedding",
            "max_input_length": max_seq_length, "token_limit_from": "sentence_bert_config.json max_seq_length",
            "flags": "--auto-truncate", "note": "TEI's ONNX backend serves the fp32 graph only",
        },
        "infinity": {
            "serves": infinity_why is None, "why_not": infinity_why,
            "engine": "optimum", "onnx": tokens_file, "pooling_method": infinity_pool,
            "max_position_embeddings": max_seq_length,
            "note": "give Infinity a folder whose only .onnx file is the last_hidden_state graph, saved as "
            "onnx/model.onnx, and whose config.json says max_position_embeddings = max_seq_length (it truncates "
            "there); its torch engine needs transformers < 5, which ignores is_causal: false"
            + (", so it would run this decoder causally" if decoder else ""),
        },
        "vespa": {
            "serves": not echo, "why_not": no_echo if echo else None,
            "component": "hugging-face-embedder",
            "transformer-model": files["fp32"], "tokenizer-model": "tokenizer.json",
            "transformer-output": "sentence_embedding", "pooling-strategy": "none",
            "transformer-token-type-ids": "token_type_ids" if "token_type_ids" in inputs else None,
            "prepend": prompts if prompt_pooling else {},
            "normalize": False, "max-tokens": max_seq_length,
            "tensor": f"tensor<float>(x[{dim}])",
            "distance-metric": "prenormalized-angular" if normalized else "angular",
            "binary_tensor": f"tensor<int8>(x[{bytes_}])", "binary_distance-metric": "hamming",
            "binary_note": "pack sign bits like numpy packbits(x > 0) and view the bytes as int8",
        },
        "faiss": {
            "serves": True,
            "float_index": "IndexFlatIP" if normalized else "IndexFlatL2",
            "binary_index": f"IndexBinaryFlat({bytes_ * 8}) or IndexBinaryHNSW({bytes_ * 8}, 32)",
            "binary_rows": f"uint8 [n, {bytes_}] = np.packbits(x > 0, axis=-1)"
            + (" (the graph's binary_embedding output)" if binary else ""),
            "rescoring": "take top k*4 by hamming, rescore with float (or int8) query . document",
        },
        "qdrant": {
            "serves": True,
            "vectors": {"size": dim, "distance": "Dot" if normalized else "Cosine"},
            "quantization_config": {"binary": {"always_ram": True}},
            "search_params": {"quantization": {"rescore": True, "oversampling": 4.0}},
            "note": "Store the float sentence_embedding; Qdrant binarizes on the server (it has no hamming "
            "distance for user-supplied packed bits)",
        },
    }
    if binary:
        settings["onnxruntime"]["binary_output"] = f"binary_embedding uint8 [batch, {bytes_}] (numpy packbits order)"
    return settings


def copy_readme(model_dir: Path | None, out: Path) -> None:
    """Write the export's README: it points at SERVING.md, since the source model's card tells how to load the
    PyTorch model directory, not this export; that card is kept beside it as ``SOURCE_MODEL_CARD.md``."""
    lines = ["# ONNX export", "", "An export written by `embedforge export`. How to serve it, with runnable code for "
             "onnxruntime, fastembed and the other consumers: [SERVING.md](SERVING.md). What the graphs contain: "
             "`manifest.json`.", ""]
    if model_dir is not None and (model_dir / "README.md").is_file():
        shutil.copy2(model_dir / "README.md", out / "SOURCE_MODEL_CARD.md")
        lines += ["The card of the model this export was made from (it describes loading that PyTorch model "
                  "directory, not this export): [SOURCE_MODEL_CARD.md](SOURCE_MODEL_CARD.md).", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
