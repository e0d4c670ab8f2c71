"""The contract every dataset fulfils: class-indexed uint8 images per split, plus the preprocessing that made them."""
from __future__ import annotations

import io
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from metacli.tasks import CLASSIFICATION

SPLITS = ("train", "val", "test")


@dataclass
class ClassImages:
    """All images of one split: ``images[c, i]`` is image ``i`` of class ``c`` (uint8, ``C x H x W``).

    Every class holds the same number of images, which is what makes batched episode gathering a single index.
    """

    images: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError(f"images must be uint8 [classes, per_class, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.images.shape[0]} classes")

    @property
    def n_classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]


def default_root() -> Path:
    """Where datasets are looked for when ``dataset.root`` is unset: ``$METACLI_DATA``, then ``~/.cache/metacli``."""
    return Path(os.environ.get("METACLI_DATA") or Path.home() / ".cache" / "metacli").expanduser()


def default_cache_dir() -> Path:
    """Where decoded tensors are written: ``$METACLI_CACHE``, then ``~/.cache/metacli/tensors``.

    Kept apart from the data root because the root may be read-only (a shared data folder).
    """
    return Path(os.environ.get("METACLI_CACHE") or Path.home() / ".cache" / "metacli" / "tensors").expanduser()


def open_bounded(source: bytes | Path, max_side: int) -> Image.Image:
    """Open an image from a dataset's archive or folder, refusing (``ValueError``) one whose header declares more
    than ``max_side`` pixels a side: decoding allocates what the header declares, so a few hundred bytes could
    otherwise claim gigabytes. Nothing is decoded here; the caller's ``convert`` does it."""
    with warnings.catch_warnings():
        # PIL's own bound warns first, and a warning would break a one-line error: make it an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ValueError(f"its header declares a decompression bomb ({exc})") from None
    if max(image.size) > max_side:
        image.close()
        raise ValueError(f"it declares {image.size[0]}x{image.size[1]} pixels, more than {max_side} a side allowed "
                         "for this dataset")
    return image


def check_member_size(size: int, max_bytes: int) -> None:
    """Refuse (``ValueError``) a member whose declared or stored size exceeds ``max_bytes``, before it is read."""
    if size > max_bytes:
        raise ValueError(f"it is {size} bytes, more than the {max_bytes} allowed for one image of this dataset")


def pil_to_uint8(image: Image.Image, mode: str, size: int, invert: bool = False) -> torch.Tensor:
    """Convert ``image`` to colour ``mode`` ("L" or "RGB"), resize to ``size x size`` (Lanczos) and return uint8 CxHxW."""
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    channels = len(image.getbands())
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, channels)
    pixels = pixels.permute(2, 0, 1).contiguous()
    return 255 - pixels if invert else pixels


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as floats in [0, 1]: what a generator learns and draws."""
    return images.float() / 255.0


class FewShotDataset(ABC):
    """A dataset split into disjoint train/val/test class sets.

    Subclasses set ``name``, ``channels``, ``image_size``, ``mean`` and ``std`` and implement :meth:`load_split`
    and :meth:`encode_image`. ``encode_image`` is the one preprocessing path shared by the cache builder and by
    :func:`metacli.load_learner`'s ``predict``, so user images are treated exactly like training images.
    """

    name: str
    family = CLASSIFICATION
    has_alphabets = False  # classes are characters of alphabets: Lake's within-alphabet episodes can be drawn
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self) -> None:
        self._splits: dict[str, ClassImages] = {}

    def split(self, name: str) -> ClassImages:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        if name not in self._splits:
            self._splits[name] = self.load_split(name)
        return self._splits[name]

    @abstractmethod
    def split_shape(self, name: str) -> tuple[int, int]:
        """``(classes, images per class)`` of split ``name``, known before anything is decoded."""

    def decoded_bytes(self) -> int:
        """Host memory the decoded splits take, known before decoding (what a memory check weighs)."""
        images = sum(classes * per_class for classes, per_class in map(self.split_shape, SPLITS))
        return images * self.channels * self.image_size ** 2

    @abstractmethod
    def load_split(self, name: str) -> ClassImages:
        """Return the uint8 images of split ``name`` (decoding and caching them on first use)."""

    @abstractmethod
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """Turn a PIL image into this dataset's uint8 ``C x H x W`` tensor (resize, colour mode, inversion)."""

    def episodes(self, split: str, n_way: int, k_shot: int, n_query: int, device: torch.device | str = "cpu",
                 where: str = "") -> "EpisodeSampler":
        """N-way K-shot episodes of ``split``: ``sample`` draws training meta-batches, ``fixed`` the pinned ones."""
        from metacli.data.episodes import EpisodeSampler  # episodes.py builds on this module

        return EpisodeSampler(self.split(split), n_way, k_shot, n_query, self.normalize, device, where=where)

    def content_sha256(self, split: str) -> str:
        """A digest of ``split``'s decoded images and class names: what its fixed episodes are drawn from."""
        from metacli.data.cache import content_digest  # cache.py builds on this module

        data = self.split(split)
        return content_digest(data.images, data.class_names)

    def describe(self) -> dict:
        """What a result must record about the data (used in results.json)."""
        return {"name": self.name, "image_size": self.image_size, "channels": self.channels}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., C, H, W]`` to the float input of the backbone."""
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (images.float() / 255.0 - mean) / std
