"""The ``export`` stage: a model directory in, an export directory out.

Layout of the result::

    onnx/model.onnx                      fp32, pooling + truncation + normalization inside (TEI serves this one)
    onnx/model_last_hidden_state.onnx    token vectors for servers that pool themselves (Infinity)
    onnx/model_O2.onnx                   fp32 with fused attention / layer norms (BERT-like models only)
    onnx/model_fp16.onnx                 fp16 compute, fp32 in/out (GPU)
    onnx/model_qint8_<target>.onnx       dynamic per-channel int8 for avx512_vnni / avx2 / arm64 CPUs
    onnx/model_q8_blockwise.onnx         8-bit blockwise weights and activations (MatMulNBits; optional)
    onnx/model_qdq_int8.onnx             static QDQ int8 calibrated on texts (optional)
    config.json tokenizer.json 1_Pooling/config.json sentence_bert_config.json   (text-embeddings-inference)
    manifest.json  SERVING.md  embedforge.json   (SERVING.md: per-consumer settings and runnable snippets)
    tokenizer_text.json                  echo exports only: the plain tokenizer (tokenizer.json applies the template)

Every graph is compared with the PyTorch model on probe texts before the directory is published; one past its
tolerance stops the export with :class:`~embedforge.export.parity.ParityError` and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge.export.config import ExportConfig

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

    from embedforge.configs import StageContext
    from embedforge.export.encoder import TokenizerSpec

logger = logging.getLogger(__name__)

_TRACE_TEXTS = ["a", "the quick brown fox jumps over the lazy dog and runs far away"]


def _load(config: ExportConfig) -> tuple[SentenceTransformer, Path | None, dict[str, Any]]:
    """Resolve the model spec and load it as the model its stage produced (:func:`embedforge.model.load_model`).

    A kept LoRA adapter is merged into the weights the graph is traced from; a quanto weight plan is not applied
    (the graph is traced from the float weights on disk; the int8 graphs quantize on their own). The third value
    says what was done, for the manifest.
    """
    from embedforge.model import load_model
    from embedforge.modules.loading import saved_extras
    from embedforge.sources import resolve_source

    resolved = resolve_source(config.model)
    local = Path(resolved) if Path(resolved).is_dir() else None
    extras = saved_extras(local) if local is not None else None
    model = load_model(resolved, trust_remote_code=config.trust_remote_code, merge_adapter=True,
                       weight_quantization=False)
    model.eval()
    notes: dict[str, Any] = {}
    if extras is not None and extras.adapter is not None:
        notes["adapter"] = f"the LoRA adapter in {extras.adapter.name}/ is merged into the exported weights"
    if extras is not None and extras.weight_quantization is not None:
        notes["weight_quantization"] = (f"{extras.weight_quantization.get('method')} weight quantization not applied: "
                                        "the graphs are traced from the float weights on disk")
    return model, local, notes


def tokenizer_spec(model: SentenceTransformer, max_length: int, input_names: list[str]) -> TokenizerSpec:
    """Describe how the model tokenizes, so :class:`OnnxEncoder` (and servers) can do the same from files."""
    from embedforge.export.encoder import TokenizerSpec

    first = model[0]
    tok = first.tokenizer
    pad_id = getattr(tok, "pad_token_id", None)  # a static model's tokenizers.Tokenizer has none: padding is masked
    pad = pad_id if pad_id is not None else (getattr(tok, "eos_token_id", None) or 0)
    echo = None
    if hasattr(first, "echo_ids") and hasattr(first, "_pieces"):
        pieces = first._pieces()
        echo = {k: list(pieces[k]) for k in ("bos", "prefix", "middle", "suffix", "eos")}
        echo["lead_space"] = bool(pieces["lead_space"])
    return TokenizerSpec(
        file="tokenizer.json", max_length=int(max_length), pad_token_id=int(pad),
        padding_side=str(getattr(tok, "padding_side", "right")),
        lowercase=bool(getattr(first, "do_lower_case", False)), echo=echo, inputs=list(input_names),
    )


def _prompt_pooling(model: SentenceTransformer) -> bool:
    """False when a module pools differently with a prompt (the graph cannot know the prompt's length)."""
    for module in model:
        if getattr(module, "include_prompt", True) is False or type(module).__name__ == "EchoPooling":
            return False
    return True


def _binary_layout(model: SentenceTransformer) -> str:
    """How the ``binary_embedding`` bytes are laid out (a learned binarizer writes several bits per dimension)."""
    from embedforge.modules.binarizer import find_binarizer

    module = find_binarizer(model)
    bits = int(getattr(module, "bits", 1))
    if bits > 1:
        return (f"{bits} levels of {module.dim} sign bits, level 0 first, each in numpy packbits order "
                "(most significant bit first); score with the levels' scales, see embedforge.modules.binarizer")
    return "numpy packbits(x > 0), most significant bit first"


def _size_mb(path: Path) -> float:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return round(total / 2**20, 2)


def _calibration_texts(config: ExportConfig, probes: list[str], max_chars: int | None = None) -> list[str]:
    if config.calibration_data is None:
        return probes
    from embedforge.data import load_texts

    return load_texts(config.calibration_data, limit=config.calibration_size, max_chars=max_chars,
                      purpose="static int8 calibration")


def _read_probe_file(path: str | None) -> list[str]:
    if path is None:
        return []
    return [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]


def export_model(config: ExportConfig, out_dir: str | os.PathLike[str], *, recipe_hash: str | None = None) -> Path:
    """Export ``config.model`` into ``out_dir`` (atomically) and return the directory. See the module docstring."""
    import numpy as np

    from embedforge.export import graph as G
    from embedforge.export import layouts, parity, precision, serving
    from embedforge.export.encoder import OnnxEncoder
    from embedforge.model import atomic_dir, write_lineage

    start = time.perf_counter()
    # 1. load and describe the model
    model, model_dir, loading_notes = _load(config)
    G.check_exportable(model, truncate_dim=config.truncate_dim, source=config.model)
    max_len = G.token_limit(model, config.max_seq_length, config.model)
    pooling = layouts.describe_pooling(model)
    extra_probes = _read_probe_file(config.probe_texts)
    probes = parity.probe_texts(min(config.probe_max_tokens, max_len), extra_probes)
    input_names = list(G.graph_inputs(model, _TRACE_TEXTS))
    spec = tokenizer_spec(model, max_len, input_names)
    prompt_pooling = _prompt_pooling(model)
    has_binary_output = config.binary or G.has_binarizer(model)
    graphs: dict[str, dict[str, Any]] = {}
    common = dict(truncate_dim=config.truncate_dim, normalize=config.normalize, binary=config.binary,
                  exporter=config.exporter, opset=config.opset, attn_implementation=config.attn_implementation)

    from tqdm.auto import tqdm

    # one bar step per graph written and checked (the ETA of a long export); a skipped graph shortens the total
    planned = (1 + int(config.last_hidden_state and not G.is_static(model)) + int(config.optimize != "none")
               + int(config.fp16) + len(config.int8) + int(config.blockwise_int8) + int(config.static_int8))
    bar = tqdm(total=planned, desc="export graphs", unit="graph")
    with atomic_dir(out_dir) as tmp:
        onnx_dir = tmp / "onnx"
        onnx_dir.mkdir()
        # 2. reference vectors from PyTorch (one text at a time: no padding)
        reference = parity.reference_embeddings(model, probes, truncate_dim=config.truncate_dim,
                                                normalize=config.normalize)
        reference_codes = parity.reference_binary(model, probes)  # a binarizer module's own codes, if any
        float_output = np.issubdtype(reference.dtype, np.floating)
        dim = int(reference.shape[1])
        layouts.write_tei_files(model, tmp, pooling=pooling, dim=dim, max_seq_length=max_len)
        if spec.echo is not None:  # tokenizer.json applies the echo template; the encoder reads the plain copy
            spec.file = layouts.write_echo_tokenizer(tmp, spec.echo, max_len)

        def check(name: str, file: str, spec_: G.GraphSpec | None, min_cos: float, max_abs: float | None,
                  min_bits: float = 0.99) -> None:
            enc = OnnxEncoder(tmp, f"onnx/{file}", tokenizer=spec, prompts={})
            result = parity.check_sentence_graph(enc, reference, probes, min_cosine=min_cos, max_abs=max_abs,
                                                 min_bit_agreement=min_bits, reference_codes=reference_codes)
            entry = graphs.setdefault(name, {"file": f"onnx/{file}"})
            if spec_ is not None:
                entry.update(inputs=spec_.inputs, outputs=spec_.outputs)
            entry.update(parity=result.to_json(), size_mb=_size_mb(onnx_dir / file))
            bar.update(1)

        # 3. fp32 sentence-embedding graph (the one every other graph derives from)
        fp32 = G.export_graph(model, onnx_dir / "model.onnx", example_texts=_TRACE_TEXTS, **common)
        check("fp32", "model.onnx", fp32, config.fp32_min_cosine, config.fp32_max_abs)
        graphs["fp32"]["precision"] = "fp32"

        # 4. token-vector graph for servers that pool themselves
        if config.last_hidden_state and G.is_static(model):
            logger.info("a static token table has no token-vector graph to export; skipping last_hidden_state")
        elif config.last_hidden_state:
            tokens_file = onnx_dir / "model_last_hidden_state.onnx"
            tok_spec = G.export_graph(model, tokens_file, example_texts=_TRACE_TEXTS, kind=G.TOKENS_OUTPUT,
                                      **{**common, "binary": False})
            ref_tokens = parity.reference_tokens(model, probes)
            enc = OnnxEncoder(tmp, f"onnx/{tokens_file.name}", tokenizer=spec, prompts={})
            result = parity.check_token_graph(enc, ref_tokens, probes, min_cosine=config.fp32_min_cosine,
                                              max_abs=config.fp32_max_abs)
            graphs["last_hidden_state"] = {"file": f"onnx/{tokens_file.name}", "inputs": tok_spec.inputs,
                                           "outputs": tok_spec.outputs, "precision": "fp32",
                                           "parity": result.to_json(), "size_mb": _size_mb(tokens_file)}
            bar.update(1)

        # 5. fused fp32 graph (BERT-like encoders): the base of the quantized graphs
        base = onnx_dir / "model.onnx"
        hf_config = getattr(getattr(model[0], "model", None), "config", None)
        model_type = getattr(hf_config, "model_type", "")
        fuse_info: dict[str, Any] = {"applied": False}
        if config.optimize != "none" and hf_config is not None and not fp32.external_data:
            kind = model_type if config.optimize == "auto" else "bert"
            try:
                stats = precision.fuse_transformer(
                    base, onnx_dir / "model_O2.onnx", model_type=kind,
                    num_heads=int(getattr(hf_config, "num_attention_heads", 0)),
                    hidden_size=int(getattr(hf_config, "hidden_size", 0)),
                )
            except Exception as err:  # the optimizer is best-effort: a failure keeps the plain graph
                logger.warning("transformer optimizer failed (%s); quantizing the plain graph", err)
                stats = None
            if stats is not None:
                try:
                    check("fp32_fused", "model_O2.onnx", fp32, config.fp32_min_cosine, config.fp32_max_abs)
                    graphs["fp32_fused"].update(precision="fp32", fused_ops=stats)
                    base = onnx_dir / "model_O2.onnx"
                    fuse_info = {"applied": True, "ops": stats}
                except parity.ParityError as err:
                    logger.warning("fused graph rejected: %s", err)
                    graphs.pop("fp32_fused", None)
                    (onnx_dir / "model_O2.onnx").unlink(missing_ok=True)

        # 6. fp16 (checked on the CPU provider here; meant for the CUDA provider)
        if config.fp16 and float_output:
            precision.to_fp16(base, onnx_dir / "model_fp16.onnx")
            check("fp16", "model_fp16.onnx", fp32, config.fp16_min_cosine, None, min_bits=0.97)
            graphs["fp16"]["precision"] = "fp16"

        # 7. dynamic int8 per CPU family
        encoder_like = fuse_info["applied"] or model_type in precision.BERT_LIKE  # the auto defaults differ
        keep_float = config.int8_keep_float
        if keep_float is None:
            keep_float = [] if encoder_like else list(precision.DECODER_KEEP_FLOAT)
        split_wanted = encoder_like if config.int8_split_first_token is None else config.int8_split_first_token
        int8_base, split = base, []
        if config.int8 and split_wanted and spec.padding_side == "right":
            int8_base = onnx_dir / "model_split.tmp.onnx"
            split = precision.split_first_token(base, int8_base, precision.matmul_nodes(base, ["ffn_down:all"]))
        for target in config.int8:
            settings = precision.INT8_TARGETS[target]
            file = f"model_qint8_{target}.onnx"
            kept = precision.quantize_int8_dynamic(int8_base, onnx_dir / file, keep_float=keep_float,
                                                   quantize_embeddings=config.int8_embeddings, **settings)
            check(f"int8_{target}", file, fp32, config.int8_min_cosine, None, min_bits=0.85)
            graphs[f"int8_{target}"].update(precision="int8-dynamic", quantization={
                "weights": "int8 symmetric", "activations": "uint8 dynamic", **settings,
                "kept_float": {"patterns": keep_float, "matmuls": len(kept), "nodes": kept},
                "embeddings": "int8" if config.int8_embeddings else "float", "from": base.name,
                "first_token_split": {"mlp_blocks": len(split), "down_projections": split},
            })
        if int8_base != base:
            int8_base.unlink(missing_ok=True)
        if config.blockwise_int8:
            precision.quantize_int8_blockwise(base, onnx_dir / "model_q8_blockwise.onnx")
            check("int8_blockwise", "model_q8_blockwise.onnx", fp32, config.int8_min_cosine, None, min_bits=0.85)
            graphs["int8_blockwise"].update(precision="int8-blockwise", quantization={
                "op": "MatMulNBits", "bits": 8, "block_size": 32, "accuracy_level": 4, "from": base.name,
            })

        # 8. static QDQ int8 calibrated on texts
        if config.static_int8:
            from embedforge.export.encoder import Tokenize

            from embedforge.data import max_chars_for

            texts = _calibration_texts(config, probes, max_chars_for(max_len))
            reader = precision.TextCalibrationReader(Tokenize(spec, tmp), texts, input_names)
            precision.quantize_int8_static(base, onnx_dir / "model_qdq_int8.onnx", reader)
            check("int8_static", "model_qdq_int8.onnx", fp32, config.int8_min_cosine, None, min_bits=0.85)
            graphs["int8_static"].update(precision="int8-static-qdq", quantization={
                "format": "QDQ", "calibration_texts": len(texts), "method": "minmax", "from": base.name,
            })

        bar.total = bar.n  # graphs planned but not made (no fused graph, fp16 of binary codes) are not pending
        bar.close()
        # 9. manifest, server notes, lineage
        normalized = bool(config.normalize or (pooling["modules"][-1] == "Normalize" and not config.truncate_dim))
        files = {name: info["file"] for name, info in graphs.items()}
        dims = {"sentence_embedding": dim}
        if has_binary_output:
            dims["binary_embedding"] = int(fp32.outputs.get(G.BINARY_OUTPUT, {}).get("shape", [0, 0])[-1])
        manifest_prompts = dict(getattr(model, "prompts", {}) or {})
        decoder = hf_config is not None and model_type not in precision.BERT_LIKE
        manifest: dict[str, Any] = {
            "format": "embedforge-export/1",
            "source": config.model,
            "source_model": loading_notes,
            "inputs": input_names,
            "outputs": list(fp32.outputs),
            "dims": dims,
            "pooling": pooling,
            "normalized": normalized,
            "truncate_dim": config.truncate_dim,
            "binary": {"output": G.BINARY_OUTPUT, "layout": _binary_layout(model)} if has_binary_output else None,
            "tokenizer": spec.to_json(),
            "prompts": manifest_prompts,
            "prompt_pooling": prompt_pooling,
            "graphs": graphs,
            "fusion": fuse_info,
            "exporter": {"name": config.exporter, "opset": config.opset,
                         "attn_implementation": config.attn_implementation},
            "decoder": decoder,
            "servers": layouts.server_settings(
                dim=dim, normalized=normalized, max_seq_length=max_len, pooling=pooling, binary=has_binary_output,
                files=files, inputs=input_names, prompts=manifest_prompts, prompt_pooling=prompt_pooling,
                echo=spec.echo is not None, decoder=decoder,
                binary_bytes=dims.get("binary_embedding"),
            ),
        }
        if spec.echo is not None:
            manifest["echo"] = {"template": getattr(model[0], "echo_template", None),
                                "rule": layouts.echo_rule(spec.echo, max_len)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "SERVING.md").write_text(serving.serving_markdown(manifest), encoding="utf-8")
        layouts.copy_readme(model_dir, tmp)
        write_lineage(
            tmp, stage="export", source=config.model, config=config, parent=model_dir, recipe_hash=recipe_hash,
            metrics={name: info["parity"] for name, info in graphs.items()},
            extra={"files": files, "seconds": round(time.perf_counter() - start, 1)},
        )
    logger.info("export of %s written to %s in %.0f s", config.model, out_dir, time.perf_counter() - start)
    return Path(out_dir)


def run(config: ExportConfig, out_dir: Path, ctx: StageContext) -> None:
    """Recipe / CLI runner of the ``export`` stage."""
    export_model(config, out_dir, recipe_hash=ctx.recipe_hash)
