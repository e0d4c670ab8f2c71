"""The meta-training data of continual meta-learning (OML, Javed & White 2019; ANML, Beaulieu et al. 2020): a short
class-incremental trajectory to learn online, then images of its classes and of other classes to judge it by.

Labels are class indices in the split, as a head over all its classes needs them; the images are gathered on the
device from one draw on the CPU generator, as the episode samplers do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from metacli.data.base import ClassImages
from metacli.data.episodes import channels_last_images
from metacli.errors import DataError


@dataclass
class Trajectory:
    """One meta-training task: ``stream`` images learned one at a time, class by class; ``query`` images (unseen
    images of the stream's classes, then a remember set of other classes) that the learned head is judged on."""

    stream_x: torch.Tensor  # [k*s, C, H, W]
    stream_y: torch.Tensor  # [k*s], class indices in the split
    query_x: torch.Tensor  # [k*q + r, C, H, W]
    query_y: torch.Tensor  # [k*q + r]
    classes: torch.Tensor  # [k] the stream's classes


@dataclass
class TrajectoryBatch:
    """Trajectories of equal shapes, each tensor with a leading task dimension."""

    stream_x: torch.Tensor
    stream_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return self.stream_x.shape[0]

    def __iter__(self) -> Iterator[Trajectory]:
        for b in range(len(self)):
            yield Trajectory(self.stream_x[b], self.stream_y[b], self.query_x[b], self.query_y[b], self.classes[b])


class TrajectorySampler:
    """Draws trajectories of ``classes`` classes with ``shots`` images each, judged on ``queries`` other images of
    each and ``remember`` images of random other classes.

    Args:
        data: the split's images.
        classes, shots, queries, remember: the trajectory's shape (OML's Omniglot setting: 3, 5, 5, 15).
        normalize: the dataset's uint8-to-float input transform.
    """

    def __init__(self, data: ClassImages, classes: int, shots: int, queries: int, remember: int,
                 normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                 where: str = "trajectories") -> None:
        if classes < 1 or shots < 1 or queries < 0 or remember < 0:
            raise DataError(f"{where}: a trajectory of {classes} classes x {shots} images, {queries} queries a class "
                            f"and {remember} to remember is impossible; use classes>=1, shots>=1, queries>=0, "
                            "remember>=0")
        if classes >= data.n_classes and remember > 0:
            raise DataError(f"{where}: {classes} trajectory classes leave none of the split's {data.n_classes} to "
                            f"remember; lower algo.trajectory_classes below {data.n_classes}")
        if shots + queries > data.per_class:
            raise DataError(f"{where}: {shots} images learned + {queries} queried a class, but each class has "
                            f"{data.per_class}; lower algo.trajectory_shots or algo.trajectory_queries")
        self.images = data.images.to(device)
        self.shape = classes, shots, queries, remember
        self.normalize = normalize
        self.device = torch.device(device)

    def sample(self, batch_size: int, generator: torch.Generator) -> TrajectoryBatch:
        k, s, q, r = self.shape
        n_classes, per_class = self.images.shape[:2]
        order = torch.rand(batch_size, n_classes, generator=generator).argsort(dim=1)
        classes = order[:, :k]
        picks = torch.rand(batch_size, k, per_class, generator=generator).argsort(dim=2)[:, :, :s + q]
        # The remember set: classes other than the trajectory's, any image of each.
        others = order.gather(1, torch.randint(k, n_classes, (batch_size, r), generator=generator)) if r else \
            order[:, :0]
        other_images = torch.randint(per_class, (batch_size, r), generator=generator)
        classes, picks = classes.to(self.device), picks.to(self.device)
        others, other_images = others.to(self.device), other_images.to(self.device)
        seen = self.normalize(self.images[classes.unsqueeze(-1), picks])  # [B, k, s+q, C, H, W]
        shape = seen.shape[3:]
        labels = classes.unsqueeze(-1).expand(-1, -1, s + q)
        query_x = torch.cat([seen[:, :, s:].reshape(batch_size, k * q, *shape),
                             self.normalize(self.images[others, other_images])], dim=1)
        return TrajectoryBatch(
            stream_x=channels_last_images(seen[:, :, :s].reshape(batch_size, k * s, *shape)),
            stream_y=labels[:, :, :s].reshape(batch_size, k * s),
            query_x=channels_last_images(query_x),
            query_y=torch.cat([labels[:, :, s:].reshape(batch_size, k * q), others], dim=1),
            classes=classes,
        )
