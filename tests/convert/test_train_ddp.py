"""Two CPU processes (torchrun, gloo) run the contrastive stage, each seeing the other's batch as negatives, and the
MNTP stage, whose gradients are averaged over both (the two processes end with the same weights)."""

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


MNTP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from transformers import TrainerCallback

    from embedforge.configs import StageContext
    from embedforge.convert.train_config import MntpConfig
    from embedforge.convert.training import run_mntp
    from embedforge.training.options import TrainOptions


    class Weights(TrainerCallback):
        \"\"\"At the end of training: the sum of every trainable tensor, by name, on this process.\"\"\"

        def on_train_end(self, args, state, control, model=None, **kwargs):
            inner = getattr(model, "module", model)
            sums = {n: float(p.detach().double().sum()) for n, p in inner.named_parameters() if p.requires_grad}
            Path(f"{out}.rank{os.environ['RANK']}.json").write_text(json.dumps(sums))


    model, data, out = sys.argv[1:4]
    cfg = MntpConfig(model=model, data=[data], lora_r=4, lora_alpha=8, max_seq_length=32,
                     train=TrainOptions(batch_size=4, max_steps=3, save_steps=100, logging_steps=1,
                                        learning_rate=1e-2))
    run_mntp(cfg, Path(out), StageContext(extra={"train_callbacks": [Weights()]}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(worker: Path, *argv: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(worker), *map(str, argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


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
    _torchrun(tmp_path / "worker.py", tmp_path / "embedder", data, out)
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert report["world"] == 2
        assert len(report["seen"]) == 2  # two steps
        for candidates, local_batch in report["seen"]:
            # positives and hard negatives of both processes: 2 columns x local batch x 2 processes
            assert candidates == 2 * local_batch * 2
    assert (out / "embedforge.json").is_file()  # rank 0 saved the merged model


def test_two_process_mntp_averages_gradients(tmp_path: Path) -> None:
    """Each process trains on its own batches; the weights stay equal only if the gradients are averaged, which
    needs the loss to run through the distributed wrapper (not a closure over the backbone)."""
    from embedforge.convert.embedder import build_embedder
    from embedforge.testing import sample_texts, tiny_decoder

    llm = tiny_decoder("llama", tmp_path / "llm")
    build_embedder(llm, pooling="mean", bidirectional=True, max_seq_length=32).save(str(tmp_path / "embedder"))
    data = tmp_path / "texts.jsonl"
    t = sample_texts()
    data.write_text("".join(json.dumps({"text": f"{t[i % 10]} and then {t[(i + 3) % 10]} {i}"}) + "\n"
                            for i in range(32)))
    (tmp_path / "worker.py").write_text(MNTP_WORKER)
    out = tmp_path / "out"
    _torchrun(tmp_path / "worker.py", tmp_path / "embedder", data, out)
    rank0, rank1 = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) > 0 and set(rank0) == set(rank1)
    lora_b = [n for n in rank0 if "lora_B" in n]
    assert lora_b and all(rank0[n] != 0.0 for n in lora_b)  # trained: LoRA B starts at zero
    differ = [n for n in rank0 if abs(rank0[n] - rank1[n]) > 1e-9 * max(1.0, abs(rank0[n]))]
    assert differ == [], f"the processes trained apart: {differ[:3]}"
    assert (out / "embedforge.json").is_file()  # rank 0 saved the merged model


def test_single_process_sees_only_its_batch() -> None:
    import torch

    from embedforge.convert.losses import FilteredInfoNCELoss

    loss = FilteredInfoNCELoss(model=None, gather_across_devices=True)
    cols = [torch.randn(3, 8) for _ in range(3)]
    loss.compute_loss_from_embeddings(cols)
    assert loss.last_stats["candidates"] == 6
