"""Two CPU processes (torchrun, gloo) run the distill stage: one teacher cache, disjoint batches, one published
model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from transformers import TrainerCallback

    from embedforge.configs import StageContext
    from embedforge.distill import matryoshka, pipeline, teacher
    from embedforge.distill.config import DistillConfig
    from embedforge.typed_config import build_config

    rows, shard_writes = [], []
    forward = matryoshka.DistillObjective.forward

    def spy(self, sentence_features, labels):  # labels: the batch's rows in the teacher matrix
        rows.append(sorted(int(i) for i in labels.tolist()))
        return forward(self, sentence_features, labels)

    matryoshka.DistillObjective.forward = spy
    write = teacher.write_npy_atomic

    def counted(path, array):
        shard_writes.append(path.name)
        write(path, array)

    teacher.write_npy_atomic = counted

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start = [round(float(p.detach().double().sum()), 10) for p in model.parameters()]

        def on_train_end(self, args, state, control, **kwargs):
            self.steps = state.global_step

    teacher_dir, texts, out, cache, batching = sys.argv[1:6]
    cfg = build_config(DistillConfig, {
        "model": teacher_dir, "texts": [texts], "layers": 1, "max_seq_length": 32, "shard_size": 32,
        "batching": batching, "train": {"batch_size": 8, "max_steps": 3, "save_steps": 100, "logging_steps": 1},
    })
    probe = Probe()
    pipeline.run(cfg, Path(out), StageContext(cache_dir=Path(cache), extra={"train_callbacks": [probe]}))
    report = {"rows": rows, "steps": probe.steps, "start": probe.start, "shard_writes": shard_writes,
              "world": int(os.environ["WORLD_SIZE"])}
    Path(f"{out}.rank{os.environ['RANK']}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batching", ["length", "random"])
def test_two_process_gloo_distill(bert_teacher: Path, texts_file: Path, tmp_path: Path, batching: str) -> None:
    from sentence_transformers import SentenceTransformer

    from embedforge.model import read_lineage

    (tmp_path / "worker.py").write_text(WORKER)
    out, cache = tmp_path / "student", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(bert_teacher), str(texts_file),
           str(out), str(cache), batching]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # both processes ran the same 3 steps of 8 texts, each on its own batches, from the same starting weights
    assert [r["steps"] for r in ranks] == [3, 3]
    assert [len(r["rows"]) for r in ranks] == [3, 3] and all(len(b) == 8 for r in ranks for b in r["rows"])
    seen = [{i for batch in r["rows"] for i in batch} for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1]
    assert ranks[0]["start"] == ranks[1]["start"]
    # the teacher cache was written once, by the first process: 96 texts in 3 shards of 32
    assert sorted(ranks[0]["shard_writes"]) == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    assert ranks[1]["shard_writes"] == []
    assert len(list((cache / "teacher-vectors").glob("*/shard-*.npy"))) == 3
    # the first process published a loadable model and removed its checkpoints
    assert read_lineage(out)["metrics"]["distill"]["steps"] == 3
    assert SentenceTransformer(str(out), device="cpu").encode(["a man is playing a guitar"]).shape == (1, 32)
    assert not (tmp_path / "student.ckpt").exists()
