"""Pack the SmolLM2 distill pilot for the GPU machine, under its 64 MiB transfer limit.

    python -m bench.dev.gpu_pack_smollm2 --start runs/bench-convert7/work/start-mean-causal-L8-noinstruction \
        --texts runs/bench-convert7/work/kd-texts-2000-scifact5000.jsonl \
        --cache runs/bench-convert7/work/cache/teacher-vectors --out .gpu2/c

SmolLM2's weights come from a Q4_1 GGUF, so every dequantized value is ``d * q + m`` (Q4_1 linear layers: 4-bit q,
fp16 d and m per block of 32) or ``d * q`` (the Q8_0 token table: int8 q, fp16 d). This recovers q, d and m from the
start model's fp32 safetensors and checks that they rebuild every value exactly, so the device trains the very same
weights at a quarter of the bytes. Only the token rows that the pilot's texts use are kept (the rest are never
looked up, and Adam leaves rows without gradient unchanged). The teacher vectors travel as int8 with a per-row scale
(cos >= 0.9999 to the fp32 ones). ``bench/dev/gpu_distill_pilot.py`` (copied beside the pack) rebuilds and runs it.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np


def _xz(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, lzma.open(dst, "wb", preset=6) as fo:
        shutil.copyfileobj(fi, fo)


def _blocks_q4_1(w):
    """4-bit codes, fp16 d and m per block of 32, and the largest error of ``d * q + m`` against ``w``."""
    import torch

    b = w.reshape(-1, 32).double()
    low, high = b.min(1).values, b.max(1).values
    d = ((high - low) / 15).float().half().double()
    m = low.float().half().double()
    q = torch.where(d[:, None] > 0, torch.round((b - m[:, None]) / d[:, None].clamp_min(1e-30)), torch.zeros_like(b))
    err = (d.float()[:, None] * q.float() + m.float()[:, None] - b.float()).abs().max().item()
    return q.to(torch.uint8).numpy().reshape(-1), d.half().numpy(), m.half().numpy(), err


def _blocks_q8_0(w):
    """int8 codes and fp16 d per block of 32, and the largest error of ``d * q`` against ``w``."""
    import torch

    b = w.reshape(-1, 32).double()
    d = (b.abs().max(1).values / 127).float().half().double()
    q = torch.round(b / d[:, None].clamp_min(1e-30))
    err = (d.float()[:, None] * q.float() - b.float()).abs().max().item()
    return q.to(torch.int8).numpy(), d.half().numpy(), err


def used_tokens(tokenizer_dir: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    used: set[int] = set(tok.all_special_ids)
    for i in range(0, len(texts), 2000):
        for ids in tok(texts[i:i + 2000], add_special_tokens=True)["input_ids"]:
            used.update(ids)
    return np.array(sorted(used), dtype=np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", required=True, type=Path, help="the student's start model directory")
    parser.add_argument("--texts", required=True, type=Path, help="the distill texts (JSONL, column text)")
    parser.add_argument("--cache", required=True, type=Path, help="the teacher-vectors cache folder of those texts")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    import torch
    from safetensors.torch import load_file

    from embedforge.data import builtin, builtin_beir

    out: Path = args.out
    (out / "start").mkdir(parents=True, exist_ok=True)
    for item in args.start.iterdir():
        if item.name == "model.safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, out / "start" / item.name, dirs_exist_ok=True)
        elif item.name == "tokenizer.json":
            _xz(item, out / "start" / "tokenizer.json.xz")
        else:
            shutil.copy(item, out / "start" / item.name)
    texts = [json.loads(line)["text"] for line in args.texts.open()]
    beir = builtin_beir("scifact-dev")
    stsb = builtin("stsb-dev")
    rows = used_tokens(args.start, texts + list(beir.corpus.values()) + list(beir.queries.values())
                       + list(stsb["sentence1"]) + list(stsb["sentence2"]))
    pack: dict[str, np.ndarray] = {}
    worst = 0.0
    for key, w in load_file(args.start / "model.safetensors").items():
        if key.endswith("embed_tokens.weight"):
            q, d, err = _blocks_q8_0(w[torch.from_numpy(rows)])
            pack.update({key + ".q": q, key + ".d": d, key + ".rows": rows, key + ".shape": np.array(w.shape)})
        elif w.ndim == 2:
            q, d, m, err = _blocks_q4_1(w)
            pack.update({key + ".q4": (q[0::2] | (q[1::2] << 4)).astype(np.uint8), key + ".d": d, key + ".m": m,
                         key + ".shape": np.array(w.shape)})
        else:
            pack[key + ".raw"], err = w.numpy(), 0.0
        worst = max(worst, err)
    if worst > 0:
        raise SystemExit(f"the start model is not exactly Q4_1 / Q8_0 (largest rebuild error {worst:g})")
    np.savez(out / "student_pack.npz", **pack)
    _xz(out / "student_pack.npz", out / "student_pack.npz.xz")
    (out / "student_pack.npz").unlink()
    shard_dirs = [p for p in args.cache.iterdir() if (p / "meta.json").is_file()]
    if len(shard_dirs) != 1:
        raise SystemExit(f"expected one teacher cache under {args.cache}, found {len(shard_dirs)}")
    meta = json.loads((shard_dirs[0] / "meta.json").read_text())
    vectors = np.concatenate([np.load(shard_dirs[0] / f"shard-{i:05d}.npy") for i in range(meta["n_shards"])])
    if len(vectors) != len(texts):
        raise SystemExit(f"{len(vectors)} teacher vectors for {len(texts)} texts")
    scale = np.abs(vectors).max(1, keepdims=True) / 127
    codes = np.round(vectors / scale).astype(np.int8)
    np.save(out / "teacher_q.npy", codes)
    _xz(out / "teacher_q.npy", out / "teacher_q.npy.xz")
    (out / "teacher_q.npy").unlink()
    np.save(out / "teacher_s.npy", scale.astype(np.float32))
    _xz(args.texts, out / "kd_texts.jsonl.xz")
    root = Path(__file__).resolve().parent
    shutil.copy(root / "gpu_distill_pilot.py", out / "pilot.py")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(rows)} token rows kept; packed {size / 2**20:.1f} MiB into {out} (add the data sets the pilot "
          f"reads as data.tar.xz: scifact and stsb)")


if __name__ == "__main__":
    sys.exit(main())
