"""Two CPU processes (torchrun, gloo) run the binarizer and the healing compress stage: both train the same
steps on their own share of the data, and only the first process writes anything."""

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

    import numpy as np

    import embedforge.model
    from embedforge.compress import binarizer, pruning
    from embedforge.configs import StageContext
    from embedforge.recipe import build_config
    from embedforge.stages import config_class, runner

    stage, model, data, out = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    report = {"world": int(os.environ["WORLD_SIZE"]), "batches": [], "saves": 0, "npy_writes": 0}
    real_loss, real_save, real_np_save = binarizer.binarizer_loss, embedforge.model.save_model, np.save

    def loss_spy(recon, x, weights):
        report["batches"].append([int(x.shape[0]), round(float(x[:, 0].sum()), 5)])
        return real_loss(recon, x, weights)

    def save_spy(*args, **kwargs):
        report["saves"] += 1
        return real_save(*args, **kwargs)

    def np_save_spy(*args, **kwargs):
        report["npy_writes"] += 1
        return real_np_save(*args, **kwargs)

    def healing_loss_spy(student, teacher):
        module = real_healing_loss(student, teacher)
        forward = module.forward

        def counted(features, labels):
            report["batches"].append([int(labels.shape[0]), sorted(int(i) for i in labels)])
            return forward(features, labels)

        module.forward = counted
        return module

    real_healing_loss = pruning.healing_loss
    binarizer.binarizer_loss, embedforge.model.save_model, np.save = loss_spy, save_spy, np_save_spy
    pruning.healing_loss = healing_loss_spy
    if stage == "binarizer":
        values = {"model": model, "data": data, "train": {"max_steps": 4, "batch_size": 8, "save_steps": 2}}
    else:
        values = {"model": model, "layers": [0], "heal": True, "heal_data": data, "max_seq_length": 32,
                  "train": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1}}
    config = build_config(config_class(stage), values)
    runner(stage)(config, Path(out), StageContext())
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, stage: str, model: Path, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "worker.py"), stage, str(model), str(data), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    from embedforge.testing import sample_texts, tiny_bert_st

    t = sample_texts()
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"{t[i % 10]} and {t[(i + 3) % 10]} {i}"}) + "\n" for i in range(40)))
    return tiny_bert_st(tmp_path / "bert", layers=2), data


def _two_process_reports(tmp_path: Path, stage: str, inputs: tuple[Path, Path], out: Path, *,
                         batch: int) -> list[dict]:
    """Run ``stage`` under torchrun on two processes; each process's report, after checking that both ran in a
    world of 2 and took the same 4 steps of ``batch`` rows."""
    model, data = inputs
    proc = _torchrun(tmp_path, stage, model, data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        assert [size for size, _ in report["batches"]] == [batch] * 4
    return reports


def test_two_process_binarizer_trains_on_both_and_writes_once(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    from embedforge.model import read_lineage
    from embedforge.modules import load_embedder
    from embedforge.modules.binarizer import LearnedBinarizer

    out = tmp_path / "bin"
    reports = _two_process_reports(tmp_path, "binarizer", inputs, out, batch=8)  # 4 steps of 8 vectors each
    # each process trained on its own share: their first batches differ
    assert reports[0]["batches"][0][1] != reports[1]["batches"][0][1]
    assert (reports[0]["saves"], reports[1]["saves"]) == (1, 0)  # only the first process saved the model
    assert (reports[0]["npy_writes"], reports[1]["npy_writes"]) == (1, 0)  # ... and the vector cache
    lineage = read_lineage(out)
    assert lineage["stage"] == "binarizer" and lineage["metrics"]["train_steps"] == 4
    assert isinstance(load_embedder(out)[-1], LearnedBinarizer)
    assert not Path(f"{out}.ckpt").exists()


def test_two_process_healing_trains_on_both_and_writes_once(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    from embedforge.backbone import count_layers
    from embedforge.model import read_lineage
    from embedforge.modules import load_embedder

    out = tmp_path / "small"
    reports = _two_process_reports(tmp_path, "compress", inputs, out, batch=4)  # 4 steps of 4 texts each
    # each process trained on its own share: no text in both first batches
    assert not set(reports[0]["batches"][0][1]) & set(reports[1]["batches"][0][1])
    assert (reports[0]["saves"], reports[1]["saves"]) == (1, 0)  # only the first process saved the model
    lineage = read_lineage(out)
    assert lineage["metrics"]["heal_steps"] == 4
    assert [step for step, _ in lineage["extra"]["train"]["loss_history"]] == [1, 2, 3, 4]
    assert count_layers(load_embedder(out)) == 1
    assert not Path(f"{out}.ckpt").exists()
