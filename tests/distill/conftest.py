"""Shared fixtures for the distill tests: tiny teachers and a small text corpus (built once per session)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from embedforge.testing import sample_texts


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct short texts made of the sample sentences' words."""
    words = " ".join(sample_texts()).split()
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out.setdefault(" ".join(rng.sample(words, rng.randint(3, 9))), None)
    return list(out)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts(96)


@pytest.fixture(scope="session")
def bert_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedforge.testing import tiny_bert_st

    return tiny_bert_st(tmp_path_factory.mktemp("teachers") / "bert3", layers=3, seed=1)


@pytest.fixture(scope="session")
def bert_teacher_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedforge.testing import tiny_bert_st

    return tiny_bert_st(tmp_path_factory.mktemp("teachers") / "bert2", layers=2, seed=7, pooling="cls")


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    import json

    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
