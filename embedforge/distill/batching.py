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
