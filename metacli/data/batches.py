"""Plain mini-batches of labelled images from all classes of a split: the data of non-episodic training
(the pre-training stage of fine-tuning baselines), gathered on the device like the episodes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from metacli.data.base import ClassImages
from metacli.data.episodes import EpisodeBatch
from metacli.errors import DataError


@dataclass
class LabelledBatch:
    """Images with their class index in the split (``0..n_classes-1``)."""

    x: torch.Tensor  # [B, C, H, W]
    y: torch.Tensor  # [B]
    n_classes: int

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class CoTrainingBatch:
    """A meta-batch of episodes and a mini-batch of labelled images of the same split, for a learner that trains on
    both at once (TADAM's auxiliary task)."""

    episodes: EpisodeBatch
    labelled: LabelledBatch


class ImageBatchSampler:
    """Draws ``batch_size`` images uniformly from the whole split, with replacement across batches.

    Drawing from the CPU generator alone (no epoch cursor) keeps the sampler stateless, so the run's generator
    state is all a checkpoint needs to continue the same sequence of batches.
    """

    def __init__(self, data: ClassImages, normalize: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu", where: str = "batches") -> None:
        if data.n_classes < 2:
            raise DataError(f"{where}: {data.n_classes} class, so there is nothing to classify; use a split with "
                            "at least 2 classes")
        self.images = data.images.to(device)
        self.normalize = normalize
        self.device = torch.device(device)

    def sample(self, batch_size: int, generator: torch.Generator) -> LabelledBatch:
        n_classes, per_class = self.images.shape[:2]
        flat = torch.randperm(n_classes * per_class, generator=generator)[:batch_size].to(self.device)
        classes = flat // per_class
        images = self.normalize(self.images[classes, flat % per_class])
        return LabelledBatch(images.contiguous(memory_format=torch.channels_last), classes, n_classes)
