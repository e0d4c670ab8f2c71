"""torchmeta's task transforms: ``Categorical`` labels, ``Rotation`` class augmentations and the ``ClassSplitter``."""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Sequence

import torch
from PIL import Image


class Categorical:
    """Targets as ``0..num_classes-1``: a class's label is its position in the task."""

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    def __repr__(self) -> str:
        return f"Categorical(num_classes={self.num_classes})"


class Rotation:
    """A class augmentation: each class rotated by each of ``angles`` (multiples of 90 degrees, counter-clockwise)
    is one more class, as torchmeta's ``class_augmentations=[Rotation([90, 180, 270])]``."""

    def __init__(self, angles: Sequence[int]) -> None:
        if any(angle % 90 for angle in angles) or any(angle % 360 == 0 for angle in angles):
            raise ValueError(f"Rotation angles must be multiples of 90 degrees other than 0 (a class of its own), "
                             f"got {list(angles)}")
        self.angles = list(angles)

    def quarter_turns(self) -> list[int]:
        return [(angle // 90) % 4 for angle in self.angles]

    @staticmethod
    def rotate(image: Image.Image, quarter_turns: int) -> Image.Image:
        return image.rotate(90 * quarter_turns) if quarter_turns else image

    def __repr__(self) -> str:
        return f"Rotation({self.angles})"


class ClassSplitter:
    """Splits a task into ``"train"`` and ``"test"`` parts of ``num_train_per_class`` and ``num_test_per_class``
    images of each class. With ``shuffle`` the images are drawn at random, from a generator seeded by the task's
    classes and the dataset's seed (``dataset.seed(s)``), so a task always splits the same way; else in file order.
    """

    def __init__(self, shuffle: bool = True, num_train_per_class: int | None = None,
                 num_test_per_class: int | None = None, random_state_seed: int = 0) -> None:
        if num_train_per_class is None or num_test_per_class is None:
            raise ValueError("ClassSplitter needs num_train_per_class and num_test_per_class")
        if num_train_per_class < 1 or num_test_per_class < 1:
            raise ValueError(f"ClassSplitter: num_train_per_class and num_test_per_class must be at least 1, got "
                             f"{num_train_per_class} and {num_test_per_class}")
        self.shuffle, self.seed = shuffle, random_state_seed
        self.splits = OrderedDict(train=num_train_per_class, test=num_test_per_class)

    def picks(self, classes: Sequence[int], per_class: int) -> torch.Tensor:
        """The image indices ``[len(classes), train + test]`` of a task: the train part first."""
        needed = sum(self.splits.values())
        if needed > per_class:
            raise ValueError(f"ClassSplitter: {needed} images a class requested, but a class has {per_class}")
        if not self.shuffle:
            return torch.arange(needed).expand(len(classes), -1)
        key = zlib.crc32(",".join(map(str, (self.seed, *classes))).encode())
        generator = torch.Generator().manual_seed(key)
        return torch.rand(len(classes), per_class, generator=generator).argsort(dim=1)[:, :needed]

    def __repr__(self) -> str:
        return (f"ClassSplitter(shuffle={self.shuffle}, num_train_per_class={self.splits['train']}, "
                f"num_test_per_class={self.splits['test']})")
