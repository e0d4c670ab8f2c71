"""Sinusoid regression (Finn, Abbeel & Levine, ICML 2017, section 5.1): each task is ``y = A sin(x - phase)`` with
the amplitude A drawn from U[0.1, 5.0], the phase from U[0, pi], and its K support and Q query points from
U[-5, 5]; a learner regresses y from x and is judged by the query MSE.

Tasks are drawn, not stored: training tasks from the run's generator, validation and test tasks fixed by their
seeds (a split name is mixed into the seed, so the test tasks are never the validation ones).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch

from metacli.data.episodes import Episode, EpisodeBatch
from metacli.errors import ConfigError, DataError
from metacli.tasks import REGRESSION

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def _curve(amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A task's targets: ``A sin(x - phase)``."""
    return amplitude * torch.sin(x - phase)


class SinusoidTasks:
    """Draws batches of sinusoid tasks with the sampler interface of :class:`~metacli.data.episodes.EpisodeSampler`:
    ``sample`` for training, ``fixed`` for the pinned validation and test tasks."""

    def __init__(self, dataset: "Sinusoid", split: str, k_shot: int, n_query: int,
                 device: torch.device | str = "cpu") -> None:
        self.dataset, self.split, self.k_shot, self.n_query = dataset, split, k_shot, n_query
        self.device = torch.device(device)

    def draw(self, tasks: int, generator: torch.Generator, points: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Amplitudes and phases ``[tasks, 1, 1]``, and inputs ``[tasks, points, 1]``."""
        low, high = self.dataset.amplitude
        amplitude = low + (high - low) * torch.rand(tasks, 1, 1, generator=generator)
        low, high = self.dataset.phase
        phase = low + (high - low) * torch.rand(tasks, 1, 1, generator=generator)
        low, high = self.dataset.x_range
        x = low + (high - low) * torch.rand(tasks, points, 1, generator=generator)
        return amplitude, phase, x

    def _batch(self, amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> EpisodeBatch:
        x, y = x.to(self.device), _curve(amplitude, phase, x).to(self.device)
        k = self.k_shot
        return EpisodeBatch(support_x=x[:, :k], support_y=y[:, :k], query_x=x[:, k:], query_y=y[:, k:], n_way=1)

    def sample(self, batch_size: int, generator: torch.Generator) -> EpisodeBatch:
        return self._batch(*self.draw(batch_size, generator, self.k_shot + self.n_query))

    def fixed(self, episodes: int, seed: int, batch_size: int) -> Iterator[EpisodeBatch]:
        """The same ``episodes`` tasks for every caller with the same seed and split; chunking never changes them."""
        amplitude, phase, x = self.draw(episodes, self._generator(seed), self.k_shot + self.n_query)
        for start in range(0, episodes, batch_size):
            end = start + batch_size
            yield self._batch(amplitude[start:end], phase[start:end], x[start:end])

    def curve(self, seed: int, points: int = 200) -> tuple[Episode, torch.Tensor, torch.Tensor]:
        """The first of the fixed tasks, its queries replaced by a dense grid over the input range: the episode,
        and the grid and true curve as 1-d tensors (for pictures)."""
        amplitude, phase, x = self.draw(1, self._generator(seed), self.k_shot + self.n_query)
        support_x = x[:, :self.k_shot]
        grid = torch.linspace(*self.dataset.x_range, points).view(1, points, 1)
        truth = _curve(amplitude, phase, grid)
        episode = Episode(support_x[0].to(self.device), _curve(amplitude, phase, support_x)[0].to(self.device),
                          grid[0].to(self.device), truth[0].to(self.device), 1)
        return episode, grid[0, :, 0], truth[0, :, 0]

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * len(SPLIT_STREAMS) + SPLIT_STREAMS[self.split])


class Sinusoid:
    """The sinusoid task family of MAML's regression experiment. Inputs are 1-dimensional (``channels=1``, no image
    size); the backbone is an MLP (``backbone=mlp``)."""

    name = "sinusoid"
    family = REGRESSION
    has_alphabets = False
    channels = 1
    image_size = None

    def __init__(self, amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        for key, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low < high:
                raise ConfigError(f"dataset.{key}=[{low}, {high}] is empty: give [low, high] with low < high")
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def episodes(self, split: str, n_way: int, k_shot: int, n_query: int, device: torch.device | str = "cpu",
                 where: str = "") -> SinusoidTasks:
        if k_shot < 1 or n_query < 1:
            raise DataError(f"{where or split}: k_shot={k_shot}, n_query={n_query} is impossible; a sinusoid task "
                            "needs at least one support and one query point")
        return SinusoidTasks(self, split, k_shot, n_query, device)

    def describe(self) -> dict:
        return {"name": self.name, "amplitude": list(self.amplitude), "phase": list(self.phase),
                "x_range": list(self.x_range)}

    def content_sha256(self, split: str) -> str:
        """What the fixed tasks of ``split`` are drawn from: the task distribution and the split's stream."""
        return hashlib.sha256(repr((self.describe(), split, SPLIT_STREAMS[split])).encode()).hexdigest()
