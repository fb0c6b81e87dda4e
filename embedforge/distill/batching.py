"""Length-grouped batches for distillation on a mix of short sentences and long documents.

A transformer student pads every batch to its longest text, so one abstract among 63 sentences makes the whole
batch cost as much as 64 abstracts. :class:`LengthGroupedBatchSampler` shuffles the texts, sorts them by length
inside windows of ``window`` batches, cuts batches, and shuffles the batch order (the idea of the
``LengthGroupedSampler`` of HF transformers). Every text is still seen once per epoch in a random batch order;
only the batch composition is biased towards similar lengths.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Batches of texts of similar length, in random order; reshuffled each epoch (``seed + epoch``).

    Args:
        dataset: the training data set (only its size is used).
        batch_size: texts per batch.
        drop_last: drop the one incomplete batch.
        lengths: one length per row (characters or tokens; only the order matters).
        window: batches per sorting window: larger windows give more uniform lengths, smaller ones more mixing.
    """

    def __init__(self, dataset: Any, batch_size: int, drop_last: bool, valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0, *, lengths: Sequence[int],
                 window: int = 64) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} rows")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.window = window

    def batches(self) -> list[list[int]]:
        """This epoch's batches (deterministic for a given seed and epoch, so a resumed run skips the same ones)."""
        g = torch.Generator().manual_seed(int(self.seed) + int(self.epoch))
        order = torch.randperm(len(self.lengths), generator=g)
        span = self.batch_size * self.window
        grouped: list[int] = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            chunk = chunk[torch.argsort(-self.lengths[chunk], stable=True)]
            grouped.extend(chunk.tolist())
        batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


# ------------------------------------------------------------------------- length-sorted pieces of one batch


def length_pieces(lengths: Sequence[int], max_pieces: int) -> list[list[int]]:
    """Row indices of one batch cut into at most ``max_pieces`` groups of similar length, chosen so that padding
    each group to its own longest row costs the fewest tokens (exact, by dynamic programming over the rows sorted
    longest first). Groups come longest first; every row is in exactly one group."""
    if max_pieces < 1:
        raise ValueError("max_pieces must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    n = len(order)
    k = min(max_pieces, n)
    if k <= 1:
        return [order] if order else []
    size = [int(lengths[i]) for i in order]
    inf = float("inf")
    # best[p][j]: fewest padded tokens for the first j sorted rows in p groups; a group [i, j) costs (j - i) * size[i]
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for p in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(p - 1, j):
                cost = best[p - 1][i] + (j - i) * size[i]
                if cost < best[p][j]:
                    best[p][j], cut[p][j] = cost, i
    p = min(range(1, k + 1), key=lambda q: (best[q][n], q))  # fewest groups among the cheapest
    groups: list[list[int]] = []
    j = n
    while p > 0:
        i = cut[p][j]
        groups.append(order[i:j])
        j, p = i, p - 1
    return groups[::-1]


def split_features(features: dict[str, Any], max_pieces: int, padding_side: str = "right"
                   ) -> list[tuple[torch.Tensor | None, dict[str, Any]]]:
    """One tokenized batch as up to ``max_pieces`` smaller batches of similar length, each cut to its own longest
    row: ``[(row indices, features), ...]``, or ``[(None, features)]`` when the batch stays whole. Per-token tensors
    (the shape of ``attention_mask``) lose the columns that are padding in every row of the piece (on
    ``padding_side``); other per-row tensors keep their rows; any other value is passed on unchanged. Without a 2-D
    ``attention_mask`` (e.g. a static-embedding student) the batch stays whole."""
    mask = features.get("attention_mask")
    if max_pieces <= 1 or not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] < 2:
        return [(None, features)]  # one piece: the batch itself, rows in their own order
    lengths = mask.sum(dim=1).tolist()
    pieces = []
    for group in length_pieces(lengths, max_pieces):
        rows = torch.tensor(group, dtype=torch.long, device=mask.device)
        width = max(1, int(max(lengths[i] for i in group)))
        cols = slice(mask.shape[1] - width, None) if padding_side == "left" else slice(0, width)
        sub: dict[str, Any] = {}
        for key, value in features.items():
            if isinstance(value, torch.Tensor) and value.shape[:2] == mask.shape:
                sub[key] = value[rows][:, cols]
            elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == mask.shape[0]:
                sub[key] = value[rows]
            else:
                sub[key] = value
        pieces.append((rows, sub))
    return pieces
