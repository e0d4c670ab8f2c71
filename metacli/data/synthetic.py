"""A procedurally drawn stroke-glyph dataset: no files, deterministic in its seed, and learnable.

Each class is a glyph of a few random line strokes; each image of it redraws the glyph with jittered stroke ends,
a random shift and thickness, and pixel noise. Classes are drawn independently per split, so the splits are
disjoint by construction. Meant for smoke tests and offline demos, never for reported results.
"""
from __future__ import annotations

import torch
from PIL import Image

from metacli.data.base import ClassImages, FewShotDataset, pil_to_uint8


def _draw_strokes(ends: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Render segments ``ends [..., S, 2, 2]`` (in [0,1] coordinates) as soft lines on a ``size x size`` canvas."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)  # [P, 2]
    a, b = ends[..., 0, :].unsqueeze(-2), ends[..., 1, :].unsqueeze(-2)  # [..., S, 1, 2]
    ab = b - a
    t = ((grid - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)
    closest = a + t.clamp(0, 1).unsqueeze(-1) * ab
    dist = (grid - closest).norm(dim=-1)  # [..., S, P]
    ink = (1 - dist / width.unsqueeze(-1).unsqueeze(-1)).clamp(0, 1).amax(dim=-2)
    return ink.reshape(*ink.shape[:-1], size, size)


class SyntheticGlyphs(FewShotDataset):
    """Random stroke glyphs: ``classes`` per split (train/val/test), ``per_class`` images each, 1 x size x size."""

    name = "synthetic"
    channels = 1
    mean = (0.1,)
    std = (0.25,)

    def __init__(self, classes: dict | None = None, per_class: int = 20, image_size: int = 28,
                 strokes: int = 4, jitter: float = 0.04, seed: int = 0) -> None:
        super().__init__()
        self.classes = dict(classes or {"train": 200, "val": 40, "test": 40})
        self.per_class, self.image_size, self.strokes, self.jitter, self.seed = per_class, image_size, strokes, jitter, seed

    def split_shape(self, name: str) -> tuple[int, int]:
        return int(self.classes[name]), self.per_class

    def load_split(self, name: str) -> ClassImages:
        offset = {"train": 0, "val": 1, "test": 2}[name]
        g = torch.Generator().manual_seed(self.seed * 3 + offset)
        n = int(self.classes[name])
        glyphs = 0.15 + 0.7 * torch.rand(n, 1, self.strokes, 2, 2, generator=g)
        ends = glyphs + self.jitter * torch.randn(n, self.per_class, self.strokes, 2, 2, generator=g)
        ends = ends + 0.08 * torch.randn(n, self.per_class, 1, 1, 2, generator=g)  # shift the whole glyph
        width = 0.05 + 0.03 * torch.rand(n, self.per_class, generator=g)
        ink = _draw_strokes(ends, width, self.image_size)
        ink = (ink + 0.1 * torch.randn(ink.shape, generator=g)).clamp(0, 1)
        images = (ink * 255).round().to(torch.uint8).unsqueeze(2)
        return ClassImages(images=images, class_names=[f"{name}-glyph{c:04d}" for c in range(n)])

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(image, "L", self.image_size)

    def describe(self) -> dict:
        return {**super().describe(), "split": "synthetic", "seed": self.seed}
