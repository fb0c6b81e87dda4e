"""GPU check: bidirectional attention on CUDA, fp32/bf16/fp16 encode throughput and parity, and a LoRA vs QLoRA
contrastive run, on random models of realistic shape (no weights need to travel to the GPU machine).

    python -m bench.dev.gpu_check --out DIR --shape SHAPE_DIR [--device cuda] [--quick]

``SHAPE_DIR`` holds a model's ``config.json`` and tokenizer files (e.g. those of SmolLM2-135M); the weights are drawn
at random from that config, so the timings and memory are those of the real shape, while the parity figures are
those of random weights. STS-B dev sentences and SNLI triplets come from the shared data folder (``$EMBEDFORGE_DATA``).

Sections, each written to ``DIR/results.json`` as soon as it ends (a failed section records its error and the
others still run):

* ``bidirectional``: every tiny architecture x attention kernel, in bf16 on the device: the first token's state
  changes with a later token under bidirectional attention and not under causal; the mean-pooled vector of a text
  is the same alone, right-padded and left-padded in a batch; the device's bf16 states against fp32 eager on CPU.
* ``encode``: the realistic-shape bidirectional mean embedder encodes STS-B sentences in fp32, bf16 and fp16
  (sdpa); texts/s, ratios to fp32 in the same run, and cosine of each vector to the fp32 one. The fp32 sdpa
  vectors are also checked against fp32 eager (an independent attention path).
* ``train``: the ``contrastive`` stage on SNLI triplets with bf16 LoRA and with 4-bit NF4 QLoRA (same data, steps
  and seed): steps/s, peak GPU memory, whether the result loads with plain ``SentenceTransformer`` and is still
  bidirectional, and how far its vectors moved from the start model's. Repeated at a Llama-1B-like shape to show
  what 4-bit weights save.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench._common import write_results

logger = logging.getLogger("bench.gpu_check")

# Llama-3.2-1B's layer shape, with the shape directory's vocabulary (its tokenizer is what travels).
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ bidirectional


def _padding_gap(model: Any, ids: list[list[int]], pad: int, device: str) -> float:
    """Largest cosine distance between a text's mean-pooled state alone and inside a right/left-padded batch."""
    import torch

    from embedforge.modules.common import masked_mean

    longest = max(len(x) for x in ids)
    worst = 0.0
    with torch.no_grad():
        alone = []
        for seq in ids:
            t = torch.tensor([seq], device=device)
            alone.append(masked_mean(model(input_ids=t).last_hidden_state, torch.ones_like(t)).float())
        for side in ("right", "left"):
            rows, masks = [], []
            for seq in ids:
                fill = [pad] * (longest - len(seq))
                rows.append(seq + fill if side == "right" else fill + seq)
                ones = [1] * len(seq)
                zeros = [0] * len(fill)
                masks.append(ones + zeros if side == "right" else zeros + ones)
            t, m = torch.tensor(rows, device=device), torch.tensor(masks, device=device)
            batch = masked_mean(model(input_ids=t, attention_mask=m).last_hidden_state, m).float()
            for i, vec in enumerate(alone):
                cos = torch.nn.functional.cosine_similarity(vec[0], batch[i], dim=0).item()
                worst = max(worst, 1.0 - cos)
    return worst


def bidirectional_section(out: Path, device: str, impls: list[str], flex_archs: list[str]) -> dict[str, Any]:
    import torch
    from transformers import AutoModel

    from embedforge.convert.bidirectional import set_bidirectional
    from embedforge.testing import ARCHS, tiny_decoder

    rows = []
    ids = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37], [1, 6, 10, 14], [1, 7, 11, 15, 19, 23]]
    for arch in ARCHS:
        # head dimension 16: flex attention's GPU kernels need at least that (real models have 64 or more)
        src = tiny_decoder(arch, out / "tiny" / arch, hidden_size=64, intermediate_size=128,
                           **({"head_dim": 16} if arch in ("qwen3", "gemma2", "gemma3") else {}))
        ref = AutoModel.from_pretrained(src, attn_implementation="eager", dtype=torch.float32)
        set_bidirectional(ref, True)
        with torch.no_grad():
            ref_state = ref(input_ids=torch.tensor([ids[0]])).last_hidden_state[0].float()
        for impl in impls + (["flex_attention"] if arch in flex_archs else []):
            row: dict[str, Any] = {"arch": arch, "attn": impl}
            try:
                model = AutoModel.from_pretrained(src, attn_implementation=impl, dtype=torch.bfloat16).to(device)
                model.eval()
                a, b = torch.tensor([[1, 2, 3, 4]], device=device), torch.tensor([[1, 2, 3, 5]], device=device)
                with torch.no_grad():
                    for label, flag in (("causal", True), ("bidirectional", False)):
                        set_bidirectional(model, not flag)
                        ha = model(input_ids=a).last_hidden_state[0, 0].float()
                        hb = model(input_ids=b).last_hidden_state[0, 0].float()
                        row[f"{label}_first_token_changes"] = bool(not torch.equal(ha, hb))
                    set_bidirectional(model, True)
                    state = model(input_ids=torch.tensor([ids[0]], device=device)).last_hidden_state[0].float().cpu()
                row["padding_max_cos_gap"] = _padding_gap(model, ids, 0, device)
                cos = torch.nn.functional.cosine_similarity(state, ref_state, dim=-1)
                row["vs_cpu_fp32_eager_min_cos"] = round(cos.min().item(), 6)
                row["ok"] = (row["bidirectional_first_token_changes"] and not row["causal_first_token_changes"]
                             and row["padding_max_cos_gap"] < 1e-2 and row["vs_cpu_fp32_eager_min_cos"] > 0.99)
            except Exception as exc:  # noqa: BLE001 - one kernel's failure is a result, not the end of the run
                if "does not support an attention implementation" in str(exc):
                    row.update(ok=None, error="transformers offers no such kernel for this architecture")
                    rows.append(row)
                    continue
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            rows.append(row)
            logger.info("bidirectional %s", row)
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows if r["ok"] is not None), "dtype": "bfloat16",
            "note": "padding gap: 1 - cos between a text alone and in a padded batch (bf16 rounding only)"}


# ------------------------------------------------------------------------------------------ realistic shape


def make_shape_model(shape: Path, dest: Path, layers: int | None = None, **overrides: Any) -> Path:
    """Save a random-weight causal LM of ``shape``'s config (plus its tokenizer files) to ``dest``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(shape)
    if layers:
        cfg.num_hidden_layers = layers
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.is_causal = True
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is much faster on the GPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(shape).save_pretrained(dest)
    del model
    return dest


def _embedder(src: Path, device: str, attn: str = "sdpa") -> Any:
    from embedforge.convert.embedder import build_embedder

    return build_embedder(src, pooling="mean", bidirectional=True, max_seq_length=128, device=device,
                          attn_implementation=attn)


def _timed(fn: Callable[[], Any], device: str, rounds: int) -> tuple[Any, float]:
    result = fn()  # warm-up (kernel selection, allocator)
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def encode_section(out: Path, src: Path, device: str, workloads: list[tuple[str, list[str], int, int]],
                   rounds: int) -> dict[str, Any]:
    """Each workload is (name, texts, max_seq_length, batch_size); dtypes are compared within a workload."""
    import torch

    from embedforge.convert.train_model import peak_gpu_mb
    from embedforge.export.parity import compare

    res: dict[str, Any] = {"rounds": rounds}
    for name, texts, max_len, batch in workloads:
        model = _embedder(src, device)
        model.max_seq_length = max_len
        lengths = [min(len(ids), max_len) for ids in model.tokenizer(texts)["input_ids"]]
        row: dict[str, Any] = {"texts": len(texts), "batch_size": batch, "max_seq_length": max_len,
                               "mean_tokens": round(float(np.mean(lengths)), 1),
                               "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}

        def enc() -> np.ndarray:  # a closure, not default arguments: `del model` below must free it
            return model.encode(texts, batch_size=batch, convert_to_numpy=True,  # noqa: F821 (deleted later)
                                show_progress_bar=False)

        ref, t32 = _timed(enc, device, rounds)
        row["fp32"] = {"texts_per_s": round(len(texts) / t32, 1),
                       "tokens_per_s": round(sum(lengths) / t32)}
        if name == "short":
            eager = _embedder(src, device, attn="eager")
            ev = eager.encode(texts[:512], batch_size=batch, convert_to_numpy=True, show_progress_bar=False)
            row["fp32_sdpa_vs_eager_min_cos"] = round(compare(ref[:512], ev).min_cosine, 6)
            del eager
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            model.to(dtype)
            vecs, t = _timed(enc, device, rounds)
            parity = compare(ref, vecs)
            row[label] = {"texts_per_s": round(len(texts) / t, 1), "tokens_per_s": round(sum(lengths) / t),
                          "speedup_vs_fp32": round(t32 / t, 2), "cos_to_fp32_min": round(parity.min_cosine, 5),
                          "cos_to_fp32_mean": round(parity.mean_cosine, 5), "finite": bool(np.isfinite(vecs).all())}
            model.to(torch.float32)
        res[name] = row
        logger.info("encode %s: %s", name, row)
        del model
    gpu_mb = peak_gpu_mb()
    if gpu_mb is not None:
        res["peak_gpu_mb"] = gpu_mb
    return res


#: (name, quantization, gradient checkpointing)
VARIANTS = {"lora": ("none", False), "lora-ckpt": ("none", True), "qlora-ckpt": ("4bit", True)}


def train_section(out: Path, src: Path, device: str, steps: int, batch: int, seq: int, label: str,
                  variants: list[str]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from embedforge.configs import StageContext
    from embedforge.convert.bidirectional import is_bidirectional, probe_bidirectional
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.train_model import release_memory
    from embedforge.convert.training import run_contrastive
    from embedforge.export.parity import compare
    from embedforge.model import read_lineage
    from embedforge.testing import sample_texts
    from embedforge.typed_config import build_config

    start = out / f"{label}-start"
    if not start.exists():
        _embedder(src, "cpu").save(os.fspath(start))
    texts = sample_texts()
    reference = SentenceTransformer(os.fspath(start), device=device)
    before = reference.encode(texts, convert_to_numpy=True)
    del reference
    release_memory()  # else the start model (4 GiB at the 1B shape) sits in the first variant's peak
    res: dict[str, Any] = {"steps": steps, "batch_size": batch, "max_seq_length": seq, "data": "snli-triplets"}
    for variant in variants:
        quant, ckpt = VARIANTS[variant]
        dest = out / f"{label}-{variant}"
        shutil.rmtree(dest, ignore_errors=True)
        cfg = build_config(ContrastiveConfig, dict(
            model=os.fspath(start), data=["snli-triplets"], quantization=quant, gradient_checkpointing=ckpt,
            max_seq_length=seq, lora_r=16, lora_alpha=32,
            train=dict(precision="bf16" if device.startswith("cuda") else "fp32", max_steps=steps, batch_size=batch,
                       save_steps=10 * steps, logging_steps=max(1, steps // 5), learning_rate=2e-4)))
        row: dict[str, Any] = {}
        try:
            run_contrastive(cfg, dest, StageContext())
            stats = read_lineage(dest)["extra"]["train"]
            row.update(steps=stats["steps"], wall_s=stats["wall_s"],
                       steps_per_s=round(stats["steps"] / max(stats["wall_s"], 1e-9), 2),
                       train_loss=stats.get("stages", {}).get("stage1", {}).get("train_loss"))
            if "peak_gpu_mb" in stats:
                row["peak_gpu_mb"] = stats["peak_gpu_mb"]
            loaded = SentenceTransformer(os.fspath(dest), device=device)
            backbone = loaded[0].auto_model
            row["loads_with_sentence_transformer"] = True
            row["bidirectional_flag"] = is_bidirectional(backbone)
            row["bidirectional_probe"] = probe_bidirectional(backbone)
            after = loaded.encode(texts, convert_to_numpy=True)
            row["moved_1_minus_cos_mean"] = round(1 - compare(before, after).mean_cosine, 5)
            row["ok"] = bool(row["bidirectional_flag"] and row["bidirectional_probe"] and np.isfinite(after).all()
                             and row["moved_1_minus_cos_mean"] > 1e-6)
            # drop every reference (the backbone too) and collect: a SentenceTransformer is freed only by the
            # cycle collector, and a model left on the GPU counts in the next variant's peak (it did in
            # gpu_check_h200_run2.json, see gpu_check_h200.md)
            del loaded, backbone
            release_memory()
        except Exception as exc:  # noqa: BLE001
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["trace"] = traceback.format_exc()[-1500:]
        res[variant] = row
        logger.info("train %s %s: %s", label, variant, {k: v for k, v in row.items() if k != "trace"})
    if all("peak_gpu_mb" in res.get(v, {}) for v in ("lora-ckpt", "qlora-ckpt")):
        res["qlora_vs_lora_ckpt_memory_ratio"] = round(
            res["qlora-ckpt"]["peak_gpu_mb"] / res["lora-ckpt"]["peak_gpu_mb"], 3)
        res["qlora_vs_lora_ckpt_speed_ratio"] = round(
            res["qlora-ckpt"]["steps_per_s"] / res["lora-ckpt"]["steps_per_s"], 3)
    return res


# ------------------------------------------------------------------------------------------ main


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "sentence-transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (results.json and the work models)")
    parser.add_argument("--shape", required=True, help="folder with config.json + tokenizer of the realistic shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default="bidirectional,encode,train,train1b")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of the script on CPU)")
    parser.add_argument("--sentences", type=int, default=4096, help="STS-B dev sentences for throughput")
    parser.add_argument("--documents", type=int, default=1024, help="SciFact abstracts for long-text throughput")
    parser.add_argument("--train-steps", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = Path(args.shape)
    sections = args.sections.split(",")
    q = args.quick
    result: dict[str, Any] = {"command": " ".join(["python", "-m", "bench.dev.gpu_check", *(argv or sys.argv[1:])]),
                              "device": args.device, "versions": _versions(), "shape": json.loads(
                                  (shape / "config.json").read_text()).get("_name_or_path", shape.name)}
    write_results(out, result)

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in sections:
            return
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - later sections still run
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:600], "trace": traceback.format_exc()[-2000:]}
            logger.exception("section %s failed", name)
        result[name]["section_s"] = round(time.perf_counter() - t0, 1)
        write_results(out, result)

    from embedforge.data import builtin, builtin_beir

    impls = ["eager", "sdpa"]
    run("bidirectional", lambda: bidirectional_section(out, args.device, impls, [] if q else ["llama", "qwen3", "gemma3"]))
    realistic = out / "shape-model"
    if any(s in sections for s in ("encode", "train")) and not realistic.exists():
        make_shape_model(shape, realistic, layers=2 if q else None)
    if "encode" in sections:
        dev = builtin("stsb-dev")
        sents = list(dict.fromkeys(list(dev["sentence1"]) + list(dev["sentence2"])))[: (64 if q else args.sentences)]
        docs = list(builtin_beir("scifact-dev").corpus.values())[: (16 if q else args.documents)]
        workloads = [("short", sents, 128, 16 if q else 128), ("long", docs, 64 if q else 512, 8 if q else 64)]
        run("encode", lambda: encode_section(out, realistic, args.device, workloads, 1 if q else 3))
    variants = ["lora"] if args.device == "cpu" else list(VARIANTS)
    if "train1b" in sections and not q:
        big = out / "llama1b-shape-model"
        if not big.exists():
            make_shape_model(shape, big, **ONE_B)
        run("train1b", lambda: train_section(out, big, args.device, 10, 32, 64, "llama1b-shape", variants))
    run("train", lambda: train_section(out, realistic, args.device, 2 if q else args.train_steps, 8 if q else 64,
                                       32 if q else 64, "smollm2-shape", variants))
    shutil.rmtree(out / "tiny", ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
