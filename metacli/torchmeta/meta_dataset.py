"""Tasks as torchmeta's ``CombinationMetaDataset`` gives them, served from metacli's own datasets and caches.

``dataset[(c1, ..., cN)]`` is the task of those classes: a ``Task`` dataset of ``(image, target)`` items, or, through
a ``ClassSplitter``, a dict of its ``"train"`` and ``"test"`` parts. Images come from the metacli dataset's
verified, decoded cache (one data path with ``metacli train``), as PIL images for the user's ``transform``.
``__getitems__`` lets PyTorch's ``DataLoader`` fetch a whole batch of tasks at once: where the transforms are
torchmeta's usual ones (``ToTensor``, after a ``Resize`` to the cached size), the batch is one gather from the cache,
the same values that the per-image path gives.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import VisionDataset

from metacli.data.base import FewShotDataset
from metacli.torchmeta.transforms import Categorical, ClassSplitter, Rotation


def resolve_split(meta_train: bool, meta_val: bool, meta_test: bool, meta_split: str | None) -> str:
    """metacli's split name for torchmeta's ``meta_train``/``meta_val``/``meta_test`` flags or ``meta_split``."""
    if meta_split is not None:
        if meta_split not in ("train", "val", "test"):
            raise ValueError(f"meta_split={meta_split!r}: use 'train', 'val' or 'test'")
        return meta_split
    chosen = [name for name, flag in (("train", meta_train), ("val", meta_val), ("test", meta_test)) if flag]
    if len(chosen) != 1:
        raise ValueError("set exactly one of meta_train, meta_val and meta_test (or meta_split)")
    return chosen[0]


def resize_size(transform: Callable | None) -> int | None:
    """The side of a leading square ``Resize`` in ``transform`` (a ``Compose`` or a lone ``Resize``), if any."""
    first = transform.transforms[0] if isinstance(transform, T.Compose) and transform.transforms else transform
    if isinstance(first, T.Resize):
        size = first.size
        if isinstance(size, int):
            return size
        if isinstance(size, (list, tuple)) and len(size) in (1, 2) and len(set(size)) == 1:
            return size[0]
    return None


class Task(Dataset):
    """The images of one task, class by class: item ``i`` is ``(transform(image), target)``."""

    def __init__(self, meta: "CombinationMetaDataset", classes: tuple[int, ...], picks: torch.Tensor) -> None:
        self.meta, self.classes, self.picks = meta, classes, picks  # picks: [classes, images a class]

    def __len__(self) -> int:
        return self.picks.numel()

    def __getitem__(self, index: int):
        position, which = divmod(index, self.picks.shape[1])
        image = self.meta.pil_image(self.classes[position], int(self.picks[position, which]))
        if self.meta.transform is not None:
            image = self.meta.transform(image)
        target_transform = self.meta.target_transform
        if isinstance(target_transform, Categorical):
            target = position
        else:
            target = self.classes[position]
            if target_transform is not None:
                target = target_transform(target)
        return image, target


class CombinationMetaDataset(VisionDataset):
    """The tasks of ``num_classes_per_task`` classes of one split of a metacli dataset (``source``).

    ``invert`` gives Omniglot's images as drawn, dark strokes on white (metacli caches them inverted).
    """

    def __init__(self, source: FewShotDataset, root: str, num_classes_per_task: int | None, split: str,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 dataset_transform: Callable | None = None, class_augmentations: list[Rotation] | None = None,
                 invert: bool = False) -> None:
        super().__init__(root, transform=transform, target_transform=target_transform)
        if num_classes_per_task is None or num_classes_per_task < 1:
            raise ValueError(f"num_classes_per_task must be a positive number of classes, got {num_classes_per_task}")
        self.num_classes_per_task = num_classes_per_task
        self.dataset_transform = dataset_transform
        self.split, self.invert = split, invert
        data = source.split(split)
        self.images = data.images  # uint8 [classes, images a class, C, H, W]
        self.base_names = data.class_names
        self.turns = [0] + [turns for augmentation in class_augmentations or []
                            for turns in augmentation.quarter_turns()]
        self.num_classes = data.n_classes * len(self.turns)
        if num_classes_per_task > self.num_classes:
            raise ValueError(f"num_classes_per_task={num_classes_per_task}, but the {split} split has only "
                             f"{self.num_classes} classes")

    def __len__(self) -> int:
        return math.comb(self.num_classes, self.num_classes_per_task)

    def seed(self, seed: int | None = None) -> None:
        """Fix how tasks split into train and test images (torchmeta's ``dataset.seed``)."""
        if isinstance(self.dataset_transform, ClassSplitter):
            self.dataset_transform.seed = 0 if seed is None else seed

    def pil_image(self, index: int, image: int) -> Image.Image:
        pixels = self.images[index % len(self.base_names), image]
        pixels = 255 - pixels if self.invert else pixels
        mode = "L" if pixels.shape[0] == 1 else "RGB"
        picture = Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy(), mode=mode)
        return Rotation.rotate(picture, self.turns[index // len(self.base_names)])

    def _check(self, index: tuple) -> tuple[int, ...]:
        classes = tuple(int(c) for c in index)
        if len(classes) != self.num_classes_per_task or not all(0 <= c < self.num_classes for c in classes):
            raise IndexError(f"a task is {self.num_classes_per_task} class indices in [0, {self.num_classes}), "
                             f"got {index}")
        return classes

    def __getitem__(self, index: tuple):
        classes = self._check(index)
        if isinstance(self.dataset_transform, ClassSplitter):
            picks = self.dataset_transform.picks(classes, self.images.shape[1])
            splits, start = {}, 0
            for name, count in self.dataset_transform.splits.items():
                splits[name] = Task(self, classes, picks[:, start:start + count])
                start += count
            return splits
        task = Task(self, classes, torch.arange(self.images.shape[1]).expand(len(classes), -1))
        return self.dataset_transform(task) if self.dataset_transform is not None else task

    def _gathers(self) -> bool:
        """Whether a batch can be one gather: split by a ClassSplitter, Categorical targets, and a transform that
        only turns the cached image into a tensor (``ToTensor``, after a ``Resize`` to the cached size)."""
        steps = self.transform.transforms if isinstance(self.transform, T.Compose) else [self.transform]
        side = self.images.shape[-1]
        plain = (len(steps) >= 1 and isinstance(steps[-1], T.ToTensor)
                 and all(isinstance(s, T.Resize) and resize_size(s) == side for s in steps[:-1]))
        return (plain and isinstance(self.dataset_transform, ClassSplitter)
                and isinstance(self.target_transform, Categorical))

    def __getitems__(self, indices: list[tuple]):
        """A batch of tasks for ``DataLoader``: one gather where :meth:`_gathers` allows, else task by task."""
        if not self._gathers():
            return [self[index] for index in indices]
        classes = torch.tensor([self._check(index) for index in indices])  # [B, N]
        picks = torch.stack([self.dataset_transform.picks(tuple(row), self.images.shape[1])
                             for row in classes.tolist()])  # [B, N, train + test]
        base_count = len(self.base_names)
        pixels = self.images[(classes % base_count).unsqueeze(-1), picks]  # [B, N, m, C, H, W]
        turns = torch.tensor(self.turns)[classes // base_count]
        for turn in turns.unique().tolist():
            if turn:
                pixels[turns == turn] = torch.rot90(pixels[turns == turn], turn, dims=(-2, -1))
        pixels = 255 - pixels if self.invert else pixels
        images = pixels.float().div_(255)
        batch, start = {}, 0
        for name, count in self.dataset_transform.splits.items():
            part = images[:, :, start:start + count]
            targets = torch.arange(classes.shape[1]).repeat_interleave(count).expand(classes.shape[0], -1)
            batch[name] = (part.flatten(1, 2), targets.clone())
            start += count
        return batch
