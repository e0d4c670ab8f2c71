"""N-way K-shot episodes gathered in one batched index from a split held on the training device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from metacli.data.base import ClassImages
from metacli.errors import DataError


@dataclass
class Episode:
    """One task: support and query images with labels remapped to ``0..n_way-1``."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_way: int


@dataclass
class EpisodeBatch:
    """A meta-batch of tasks with equal shapes: every tensor has a leading task dimension."""

    support_x: torch.Tensor  # [B, N*K, C, H, W]
    support_y: torch.Tensor  # [B, N*K]
    query_x: torch.Tensor  # [B, N*Q, C, H, W]
    query_y: torch.Tensor  # [B, N*Q]
    n_way: int

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def split(self, parts: int) -> list["EpisodeBatch"]:
        """``parts`` contiguous meta-batches of near-equal size, in task order."""
        fields = (self.support_x, self.support_y, self.query_x, self.query_y)
        return [EpisodeBatch(*chunk, self.n_way) for chunk in zip(*(f.tensor_split(parts) for f in fields))]

    def __iter__(self) -> Iterator[Episode]:
        for b in range(len(self)):
            yield Episode(self.support_x[b], self.support_y[b], self.query_x[b], self.query_y[b], self.n_way)


def check_episode_shape(data: ClassImages, n_way: int, k_shot: int, n_query: int, where: str) -> None:
    """Raise a one-line DataError when ``data`` cannot give N-way K-shot episodes with Q queries."""
    if n_way < 2 or k_shot < 1 or n_query < 1:
        raise DataError(f"{where}: n_way={n_way}, k_shot={k_shot}, n_query={n_query} is impossible; "
                        "use n_way>=2, k_shot>=1, n_query>=1")
    if n_way > data.n_classes:
        raise DataError(f"{where}: n_way={n_way} but the split has only {data.n_classes} classes; "
                        f"lower the way to at most {data.n_classes}")
    if k_shot + n_query > data.per_class:
        raise DataError(f"{where}: k_shot + n_query = {k_shot + n_query} but each class has only {data.per_class} images; "
                        f"lower task.k_shot or task.n_query so that they sum to at most {data.per_class}")


def channels_last_images(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., C, H, W]`` with every image channels-last (NHWC strides; same values): the layout the backbones'
    fast kernels want, set where batches are made because a vmapped forward cannot change a layout."""
    return x.movedim(-3, -1).contiguous().movedim(-1, -3)


class EpisodeSampler:
    """Samples meta-batches of N-way K-shot tasks with Q queries per class.

    The split's uint8 tensor is moved to ``device`` once; a whole meta-batch is then one ``randperm``-like draw on
    the CPU generator (so the episodes depend on the seed, never on the device) and one gather on the device.
    Support and query images of a class are distinct draws without replacement, so they never overlap.
    """

    def __init__(self, data: ClassImages, n_way: int, k_shot: int, n_query: int,
                 normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                 where: str = "episodes") -> None:
        check_episode_shape(data, n_way, k_shot, n_query, where)
        self.images = data.images.to(device)
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.normalize = normalize
        self.device = torch.device(device)

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Class indices ``[B, N]`` and image indices ``[B, N, K+Q]`` of ``batch_size`` tasks (on the CPU generator)."""
        n_classes, per_class = self.images.shape[:2]
        classes = torch.rand(batch_size, n_classes, generator=generator).argsort(dim=1)[:, : self.n_way]
        picks = torch.rand(batch_size, self.n_way, per_class, generator=generator).argsort(dim=2)
        return classes, picks[:, :, : self.k_shot + self.n_query]

    def gather(self, classes: torch.Tensor, picks: torch.Tensor) -> EpisodeBatch:
        """The episodes that ``draw`` described, as one index into the device-resident images."""
        n, k, q = self.n_way, self.k_shot, self.n_query
        batch_size = classes.shape[0]
        classes, picks = classes.to(self.device), picks.to(self.device)
        # [B, N, K+Q, C, H, W]
        images = channels_last_images(self.normalize(self.images[classes.unsqueeze(-1), picks]))
        shape = images.shape[3:]
        labels = torch.arange(n, device=self.device)
        return EpisodeBatch(
            support_x=images[:, :, :k].reshape(batch_size, n * k, *shape),
            support_y=labels.repeat_interleave(k).expand(batch_size, -1),
            query_x=images[:, :, k:].reshape(batch_size, n * q, *shape),
            query_y=labels.repeat_interleave(q).expand(batch_size, -1),
            n_way=n,
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> EpisodeBatch:
        return self.gather(*self.draw(batch_size, generator))

    def fixed(self, episodes: int, seed: int, batch_size: int) -> Iterator[EpisodeBatch]:
        """The same ``episodes`` tasks for every caller with the same seed: how val and test sets are pinned.

        All tasks are drawn in one go, so the chunking (``batch_size``) never changes which tasks they are.
        """
        classes, picks = self.draw(episodes, torch.Generator().manual_seed(seed))
        for start in range(0, episodes, batch_size):
            yield self.gather(classes[start:start + batch_size], picks[start:start + batch_size])
