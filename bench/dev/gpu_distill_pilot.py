"""GPU pilot (device side): which distillation settings move SciFact for the SmolLM2 student.

Runs from the folder that ``bench/dev/gpu_pack_smollm2.py`` packed (plus ``data.tar.xz`` holding the scifact and
stsb data folders): rebuilds the 8-layer start model exactly from its Q4_1 / Q8_0 values, reads the int8 teacher
vectors, and for each variant named on the command line (default: all) distills 1,000 steps of 64 texts under bf16
autocast with the library's own ``build_student`` / ``train_student``, then scores STS-B dev and SciFact dev (whole
corpus, 128 tokens) and, unless ``--no-sup``, the bench's supervised pass on the SciFact train pairs.
``OUT/results.json`` is rewritten after every variant. ``--smoke`` runs 2 steps (a CPU dry run).

    python3 PACK/pilot.py --work /tmp/g --out $OUT len mix4     # on the device, with PYTHONPATH at the repository

The pack carries this file as ``pilot.py`` and runs it as a plain script (it imports nothing from ``bench``).
"""
import argparse
import json
import lzma
import os
import shutil
import tarfile
import time
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = "/tmp/g"  # set from --work by main()
OUT = "/tmp/out"  # set from --out by main()
T0 = time.time()
SMOKE = False  # set from --smoke by main()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def unxz(name, dst):
    if not os.path.exists(dst):
        with lzma.open(os.path.join(HERE, name)) as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo)
    return dst


def setup():
    import torch
    from safetensors.torch import save_file

    if not os.path.isdir(WORK + "/data"):
        with tarfile.open(os.path.join(HERE, "data.tar.xz")) as t:
            t.extractall(WORK)
    start = WORK + "/start-causal"
    if not os.path.isfile(start + "/model.safetensors"):
        shutil.copytree(os.path.join(HERE, "start"), start, dirs_exist_ok=True)
        unxz("start/tokenizer.json.xz", start + "/tokenizer.json")
        os.remove(start + "/tokenizer.json.xz")
        pack = np.load(unxz("student_pack.npz.xz", WORK + "/pack.npz"))
        keys = sorted({k.rsplit(".", 1)[0] for k in pack.files})
        sd = {}
        for k in keys:
            if k + ".raw" in pack.files:
                sd[k] = torch.from_numpy(pack[k + ".raw"].copy())
                continue
            shape = tuple(int(x) for x in pack[k + ".shape"])
            if k + ".rows" in pack.files:
                rows = torch.from_numpy(pack[k + ".rows"])
                q = torch.from_numpy(pack[k + ".q"].astype(np.float32)).reshape(-1, 32)
                d = torch.from_numpy(pack[k + ".d"].astype(np.float32))
                full = torch.zeros(shape)
                full[rows] = (d[:, None] * q).reshape(len(rows), shape[1])
                sd[k] = full
            else:
                b = pack[k + ".q4"]
                q = np.empty(b.size * 2, dtype=np.float32)
                q[0::2], q[1::2] = b & 15, b >> 4
                d = torch.from_numpy(pack[k + ".d"].astype(np.float32))
                m = torch.from_numpy(pack[k + ".m"].astype(np.float32))
                sd[k] = (d[:, None] * torch.from_numpy(q).reshape(-1, 32) + m[:, None]).reshape(shape)
        save_file(sd, start + "/model.safetensors", metadata={"format": "pt"})
    bi = WORK + "/start-bi"
    if not os.path.isdir(bi):
        shutil.copytree(start, bi)
        cfg = json.load(open(bi + "/config.json"))
        cfg["is_causal"] = False
        json.dump(cfg, open(bi + "/config.json", "w"), indent=1)
    texts = [json.loads(line)["text"] for line in lzma.open(os.path.join(HERE, "kd_texts.jsonl.xz"), "rt")]
    q = np.load(unxz("teacher_q.npy.xz", WORK + "/teacher_q.npy")).astype(np.float32)
    targets = q * np.load(os.path.join(HERE, "teacher_s.npy"))
    return start, bi, texts, targets


def evaluate(model):
    from embedforge.data import builtin, builtin_beir
    from embedforge.evaluation import evaluate_retrieval, evaluate_sts

    keep = model.max_seq_length
    sts = evaluate_sts(model, builtin("stsb-dev"), batch_size=128)["spearman"]
    if SMOKE:
        return {"stsb": round(sts, 2)}
    model.max_seq_length = 128
    r = evaluate_retrieval(model, builtin_beir("scifact-dev"), batch_size=128, show_progress=False)
    model.max_seq_length = keep
    return {"stsb": round(sts, 2), "scifact": round(r["ndcg@10"], 2), "recall100": round(r["recall@100"], 2)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GPU distillation pilot for the SmolLM2 student")
    parser.add_argument("variants", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--pack", default=HERE, help="the folder bench/dev/gpu_pack_smollm2.py packed")
    parser.add_argument("--work", default="/tmp/g", help="scratch folder: data, start models, checkpoints")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"), help="folder for results.json")
    parser.add_argument("--smoke", action="store_true", help="2 steps per variant (a CPU dry run)")
    parser.add_argument("--no-sup", action="store_true", help="skip the supervised pass after distillation")
    return parser.parse_args(argv)


def main(argv=None):
    global HERE, WORK, OUT, SMOKE
    import torch

    args = parse_args(argv)
    HERE, WORK, OUT, SMOKE = args.pack, args.work, args.out, args.smoke
    os.makedirs(WORK, exist_ok=True)
    os.environ["EMBEDFORGE_DATA"] = WORK + "/data"  # the data sets unpacked from data.tar.xz

    from embedforge.distill import pipeline
    from embedforge.distill.config import DistillConfig
    from embedforge.typed_config import build_config

    start, bi, texts, targets = setup()
    log("setup done", len(texts), targets.shape, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    V = [
        ("len", dict()),
        ("mix4", dict(batching="random", batch_pieces=4)),
        ("mix4-bi", dict(batching="random", batch_pieces=4), "bi"),
        ("mix4-lr3", dict(batching="random", batch_pieces=4, train={"learning_rate": 3e-4})),
        ("mix4-cos40", dict(batching="random", batch_pieces=4, cosine_weight=40.0)),
        ("mix4-3000", dict(batching="random", batch_pieces=4, train={"max_steps": 3000})),
        ("len-3000", dict(train={"max_steps": 3000})),
        ("len-1800", dict(train={"max_steps": 1800})),
    ]
    only = args.variants
    results = {}
    for item in V:
        name, over = item[0], item[1]
        if only and name not in only:
            continue
        base = dict(model="minilm-l6", student="model", student_model=bi if len(item) > 2 else start,
                    texts=["unused"], max_seq_length=128, batching="length", matryoshka_dims=[])
        # the step budget alone ends the run (epochs off), as max_steps always meant here
        train = dict(batch_size=64, max_steps=1000, epochs=None, learning_rate=1e-4, save_steps=100000,
                     precision="bf16")
        base.update({k: v for k, v in over.items() if k != "train"})
        train.update(over.get("train", {}))
        if SMOKE:
            train["max_steps"] = 2
        cfg = build_config(DistillConfig, {**base, "train": train})
        t = time.time()
        torch.manual_seed(0)
        student = pipeline.build_student(cfg, targets.shape[1], texts, targets)
        stats = pipeline.train_student(student, cfg, texts, targets, __import__("pathlib").Path(WORK) / f"ckpt-{name}")
        train_s = time.time() - t
        student.eval()
        res = {"train_s": round(train_s, 1), "steps": stats["steps"], "loss": round(stats["train_loss"], 4),
               "terms": stats["last_terms"], **evaluate(student)}
        log(name, "distilled", res)
        # the bench's supervised pass: one epoch of LoRA InfoNCE on the SciFact train pairs
        try:
            if args.no_sup:
                raise RuntimeError("skipped (--no-sup)")
            from embedforge.configs import StageContext
            from embedforge.convert.train_config import ContrastiveConfig
            from embedforge.convert.training import run_contrastive
            from embedforge.model import save_model
            from embedforge.modules import load_embedder
            from embedforge.typed_config import build_config

            d = f"{WORK}/distilled-{name}"
            save_model(student, d, stage="distill", source="smollm2-pilot")
            sup = f"{WORK}/sup-{name}"
            sup_cfg = build_config(ContrastiveConfig, dict(
                model=d, data=["scifact-train-pairs"], max_seq_length=128, lora_r=16, lora_alpha=32,
                temperature=0.05, data_limit=4000, hard_negatives=False,
                train=dict(max_steps=2 if SMOKE else 80, epochs=1.0, batch_size=32, learning_rate=1e-4,
                           precision="fp32", save_steps=1000, logging_steps=5)))
            run_contrastive(sup_cfg, sup, StageContext(stage_name="contrastive"))
            res["sup"] = evaluate(load_embedder(sup))
            log(name, "sup", res["sup"])
        except Exception as e:  # keep the distill numbers
            res["sup_error"] = repr(e)[:300]
            log(name, "sup failed", repr(e)[:300])
        results[name] = res
        os.makedirs(OUT, exist_ok=True)
        json.dump(results, open(os.path.join(OUT, "results.json"), "w"), indent=1)
        del student
        import gc
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
