"""Length-grouped batches: every text once per epoch, similar lengths together, reproducible per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from embedforge.distill.batching import LengthGroupedBatchSampler


def _sampler(lengths, batch_size=8, drop_last=False, window=4, seed=3):
    return LengthGroupedBatchSampler(list(range(len(lengths))), batch_size, drop_last, seed=seed, lengths=lengths,
                                     window=window)


def test_every_text_once_and_lengths_grouped():
    rng = np.random.default_rng(0)
    lengths = rng.choice([10, 500], size=203).tolist()  # short sentences and long documents, mixed
    sampler = _sampler(lengths, window=30)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 26
    assert sorted(i for b in batches for i in b) == list(range(203))
    # One window holds every text here, so only the batch at the short/long boundary can mix lengths.
    mixed = sum(len({lengths[i] for i in b}) > 1 for b in batches)
    assert mixed <= 1
    # Random batches of 8 from this mix would almost all contain both lengths.
    assert mixed < 0.2 * len(batches)


def test_drop_last_epochs_and_errors():
    lengths = list(range(50))
    sampler = _sampler(lengths, drop_last=True)
    assert len(sampler) == 6 and all(len(b) == 8 for b in sampler)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same batches (a resumed run skips the same ones)
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="lengths"):
        LengthGroupedBatchSampler(list(range(5)), 2, False, lengths=[1, 2])
