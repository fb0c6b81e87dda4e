"""Shared fixtures: tiny random models written once per session, and small data files the tests make."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class StopBeforeTraining(Exception):
    """Raised in place of the training loop by :func:`trainer_args`."""


@pytest.fixture
def trainer_args(monkeypatch: pytest.MonkeyPatch):
    """``trainer_args(start)`` calls ``start()`` with the engine's ``run_training`` replaced by a stop, and returns
    the ``TrainingArguments`` of the trainer the stage built (nothing is trained)."""
    from embedforge.training import engine

    def run(start) -> object:
        seen = {}

        def stop(trainer, *args, **kwargs):
            seen["args"] = trainer.args
            raise StopBeforeTraining

        monkeypatch.setattr(engine, "run_training", stop)
        with pytest.raises(StopBeforeTraining):
            start()
        return seen["args"]

    return run


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-transformers BERT directory (random weights)."""
    from embedforge.testing import tiny_bert_st

    return tiny_bert_st(tmp_path_factory.mktemp("st") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama causal LM with tokenizer."""
    from embedforge.testing import tiny_decoder

    return tiny_decoder("llama", tmp_path_factory.mktemp("llm") / "tiny-llama")


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBEDFORGE_CACHE", str(cache))
    return cache
