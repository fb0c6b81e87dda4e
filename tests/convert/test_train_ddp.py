"""Two CPU processes (torchrun, gloo) run the contrastive stage; each sees the other's batch as negatives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from embedforge.configs import StageContext
    from embedforge.convert import losses
    from embedforge.convert.train_config import ContrastiveConfig
    from embedforge.convert.training import run_contrastive
    from embedforge.training.options import TrainOptions

    seen = []
    original = losses.FilteredInfoNCELoss.compute_loss_from_embeddings

    def spy(self, embeddings, labels=None):
        loss = original(self, embeddings, labels)
        seen.append([self.last_stats["candidates"], int(embeddings[0].shape[0])])
        return loss

    losses.FilteredInfoNCELoss.compute_loss_from_embeddings = spy
    model, data, out = sys.argv[1:4]
    cfg = ContrastiveConfig(model=model, data=[data], lora_r=4, lora_alpha=8, max_seq_length=32,
                            gather_across_devices=True,
                            train=TrainOptions(batch_size=4, max_steps=2, save_steps=100, logging_steps=1))
    run_contrastive(cfg, Path(out), StageContext())
    report = {"seen": seen, "world": int(os.environ["WORLD_SIZE"])}
    Path(f"{out}.rank{os.environ['RANK']}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_gathers_negatives(tmp_path: Path) -> None:
    from embedforge.convert.embedder import build_embedder
    from embedforge.testing import sample_texts, tiny_decoder

    llm = tiny_decoder("llama", tmp_path / "llm")
    build_embedder(llm, pooling="mean", max_seq_length=32).save(str(tmp_path / "embedder"))
    data = tmp_path / "triplets.jsonl"
    t = sample_texts()
    data.write_text("".join(json.dumps({"anchor": f"{t[i % 10]} {i}", "positive": t[(i + 1) % 10],
                                        "negative": t[(i + 4) % 10]}) + "\n" for i in range(32)))
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path / "embedder"), str(data),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert report["world"] == 2
        assert len(report["seen"]) == 2  # two steps
        for candidates, local_batch in report["seen"]:
            # positives and hard negatives of both processes: 2 columns x local batch x 2 processes
            assert candidates == 2 * local_batch * 2
    assert (out / "embedforge.json").is_file()  # rank 0 saved the merged model


def test_single_process_sees_only_its_batch() -> None:
    import torch

    from embedforge.convert.losses import FilteredInfoNCELoss

    loss = FilteredInfoNCELoss(model=None, gather_across_devices=True)
    cols = [torch.randn(3, 8) for _ in range(3)]
    loss.compute_loss_from_embeddings(cols)
    assert loss.last_stats["candidates"] == 6
