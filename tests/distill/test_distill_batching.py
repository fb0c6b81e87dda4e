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


# ------------------------------------------------------------------------- length-sorted pieces of one batch


def _padded_cost(groups, lengths):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def _brute_force_best(lengths, k):
    """Fewest padded tokens over every assignment of the rows to at most k groups (no sorting assumed)."""
    import itertools

    best = None
    for labels in itertools.product(range(k), repeat=len(lengths)):
        groups = [[i for i, g in enumerate(labels) if g == j] for j in range(k)]
        cost = _padded_cost([g for g in groups if g], lengths)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_pieces_pad_least_and_cover_every_row(seed):
    from embedforge.distill.batching import length_pieces

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 130, size=7).tolist()
    for k in (1, 2, 3):
        groups = length_pieces(lengths, k)
        assert sorted(i for g in groups for i in g) == list(range(7)) and len(groups) <= k
        assert _padded_cost(groups, lengths) == _brute_force_best(lengths, k)
    # a batch of 60 short sentences and 4 abstracts: two pieces cost little more than no padding at all
    lengths = [20] * 60 + [128] * 4
    groups = length_pieces(lengths, 2)
    assert _padded_cost(groups, lengths) == sum(lengths) < 0.25 * 64 * 128  # one padded batch: 64 * 128
    with pytest.raises(ValueError):
        length_pieces(lengths, 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_features_cuts_padding_and_keeps_rows(side):
    import torch

    from embedforge.distill.batching import split_features

    lengths = [3, 9, 2, 9, 4, 1]
    width = 10
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n:] = 1
    ids = torch.arange(len(lengths) * width).reshape(len(lengths), width) * mask
    features = {"input_ids": ids, "attention_mask": mask, "row_tag": torch.arange(len(lengths)), "note": "x"}
    pieces = split_features(features, 3, side)
    assert sorted(torch.cat([rows for rows, _ in pieces]).tolist()) == list(range(len(lengths)))
    for rows, sub in pieces:
        assert sub["note"] == "x" and sub["row_tag"].tolist() == rows.tolist()
        assert sub["attention_mask"].shape[1] == max(lengths[i] for i in rows.tolist()) < width
        # every real token is kept, in place
        assert sub["attention_mask"].sum(dim=1).tolist() == [lengths[i] for i in rows.tolist()]
        real = [row[m.bool()].tolist() for row, m in zip(sub["input_ids"], sub["attention_mask"])]
        assert real == [ids[i][mask[i].bool()].tolist() for i in rows.tolist()]
    # one piece, or no attention mask: the batch stays whole
    assert split_features(features, 1, side)[0][1] is features
    static = {"input_ids": torch.arange(12), "offsets": torch.tensor([0, 5, 9])}
    assert split_features(static, 4)[0][1] is static
