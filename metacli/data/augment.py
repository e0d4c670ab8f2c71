"""Random affine distortions of the training images (``augment=affine``).

Koch, Zemel & Salakhutdinov ("Siamese Neural Networks for One-shot Image Recognition", ICML Deep Learning Workshop
2015) distorted Omniglot's training pairs with small random rotations, shears, scalings and shifts, each drawn per
image: a drawer's hand varies in just these ways, and a network that has seen only 964 characters otherwise learns
their exact strokes. Validation and test images are never distorted.

Each image's distortion is drawn from the training step's generator, after the step's episodes: a resumed run draws
the same distortions, step for step.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from metacli.data.batches import CoTrainingBatch, LabelledBatch
from metacli.data.episodes import EpisodeBatch, channels_last_images
from metacli.data.trajectories import TrajectoryBatch
from metacli.errors import ConfigError

Batch = TypeVar("Batch", EpisodeBatch, LabelledBatch, TrajectoryBatch, CoTrainingBatch)


class RandomAffine:
    """Each image rotated by up to ``degrees``, sheared by up to ``shear`` (horizontally and vertically), scaled by a
    factor in ``scale`` (each axis apart) and shifted by up to ``translate`` of its side, all uniform; the corners
    that the distortion uncovers repeat the border (the background for Omniglot's centred characters)."""

    def __init__(self, degrees: float = 10.0, shear: float = 0.3, scale: tuple[float, float] = (0.8, 1.2),
                 translate: float = 0.1) -> None:
        if degrees < 0 or shear < 0 or translate < 0 or len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"augment: degrees, shear and translate must be >= 0 and scale a [low, high] range "
                              f"with 0 < low <= high; got degrees={degrees}, shear={shear}, scale={list(scale)}, "
                              f"translate={translate}")
        self.degrees, self.shear, self.scale, self.translate = degrees, shear, tuple(scale), translate

    def matrices(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` random ``[2, 3]`` maps from output to input coordinates (``affine_grid``'s convention)."""
        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(count, *shape, generator=generator, dtype=torch.float64)

        angle = uniform(-self.degrees, self.degrees) * math.pi / 180
        shear = uniform(-self.shear, self.shear, 2)
        scale = uniform(*self.scale, 2)
        shift = uniform(-2 * self.translate, 2 * self.translate, 2)  # the grid spans [-1, 1]: a side is 2
        cos, sin = angle.cos(), angle.sin()
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shearing = torch.eye(2, dtype=torch.float64).repeat(count, 1, 1)
        shearing[:, 0, 1], shearing[:, 1, 0] = shear[:, 0], shear[:, 1]
        forward = rotation @ shearing @ torch.diag_embed(scale)
        # The grid asks, for each output pixel, where it comes from: the inverse map.
        inverse = torch.linalg.inv(forward)
        return torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=-1)

    def images(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` ``[..., C, H, W]`` with each image distorted, in the channels-last layout the backbones want."""
        flat = x.reshape(-1, *x.shape[-3:])
        theta = self.matrices(flat.shape[0], generator).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return channels_last_images(out.reshape(x.shape))

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        if isinstance(batch, CoTrainingBatch):
            return replace(batch, episodes=self(batch.episodes, generator), labelled=self(batch.labelled, generator))
        if isinstance(batch, LabelledBatch):
            return replace(batch, x=self.images(batch.x, generator))
        if isinstance(batch, TrajectoryBatch):
            return replace(batch, stream_x=self.images(batch.stream_x, generator),
                           query_x=self.images(batch.query_x, generator))
        return replace(batch, support_x=self.images(batch.support_x, generator),
                       query_x=self.images(batch.query_x, generator))


def augmented(draw: Callable[[torch.Generator], Batch],
              augment: Callable[[Batch, torch.Generator], Batch]) -> Callable[[torch.Generator], Batch]:
    """``draw``, its batches distorted by ``augment`` with the same generator."""
    return lambda generator: augment(draw(generator), generator)
