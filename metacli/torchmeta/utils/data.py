"""torchmeta's ``BatchMetaDataLoader``: batches of tasks as dicts of ``"train"`` and ``"test"`` pairs of
``(inputs [batch, ways * shots, C, H, W], targets [batch, ways * shots])``."""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from metacli.torchmeta.meta_dataset import CombinationMetaDataset


class CombinationRandomSampler(Sampler):
    """Random tasks: ``num_classes_per_task`` distinct classes each, from ``generator`` (seed it for fixed tasks)."""

    def __init__(self, data_source: CombinationMetaDataset, generator: torch.Generator | None = None) -> None:
        self.data_source, self.generator = data_source, generator

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        classes, ways = self.data_source.num_classes, self.data_source.num_classes_per_task
        for _ in range(len(self)):
            yield tuple(torch.randperm(classes, generator=self.generator)[:ways].tolist())


class CombinationSequentialSampler(Sampler):
    """Every task once, in lexicographic order of its classes."""

    def __init__(self, data_source: CombinationMetaDataset) -> None:
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return itertools.combinations(range(self.data_source.num_classes), self.data_source.num_classes_per_task)


def collate_tasks(batch):
    """A batch fetched in one gather passes as it is; tasks fetched one by one are stacked split by split."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch[0], dict):
        return {name: collate_tasks([task[name] for task in batch]) for name in batch[0]}
    return default_collate([default_collate([task[i] for i in range(len(task))]) for task in batch])


class BatchMetaDataLoader(DataLoader):
    """A ``DataLoader`` of ``batch_size`` tasks a batch, random (``shuffle``, drawn from ``generator``) or in order."""

    def __init__(self, dataset: CombinationMetaDataset, batch_size: int = 1, shuffle: bool = True,
                 sampler: Sampler | None = None, num_workers: int = 0, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn=None,
                 generator: torch.Generator | None = None) -> None:
        if sampler is None:
            sampler = (CombinationRandomSampler(dataset, generator) if shuffle
                       else CombinationSequentialSampler(dataset))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                         collate_fn=collate_tasks, pin_memory=pin_memory, drop_last=drop_last, timeout=timeout,
                         worker_init_fn=worker_init_fn)
