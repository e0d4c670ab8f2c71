"""torchmeta's ``Omniglot`` and ``MiniImagenet``, served from metacli's pinned splits and verified data
(``metacli.data``)."""
from __future__ import annotations

from typing import Callable

from pathlib import Path

from metacli.data.mini_imagenet import MiniImageNet, find_source, not_found_message
from metacli.data.omniglot import Omniglot as OmniglotData
from metacli.errors import DataError
from metacli.torchmeta.meta_dataset import CombinationMetaDataset, resize_size, resolve_split
from metacli.torchmeta.transforms import Rotation

#: The sides images are decoded at when the transform does not begin with a Resize: Omniglot's drawings' own, and
#: mini-ImageNet's.
OMNIGLOT_SIDE, MINI_IMAGENET_SIDE = 105, 84


class Omniglot(CombinationMetaDataset):
    """Omniglot (Lake et al. 2015) with torchmeta's arguments.

    ``meta_train``/``meta_val``/``meta_test`` pick metacli's pinned ``vinyals`` split (1,028 / 172 / 423
    characters) when ``use_vinyals_split`` (the default), else ``background_evaluation`` (792 background characters
    for training, the 172 others of the background set for validation, the 659 evaluation characters for test).
    Images are the drawings as torchmeta gives them (dark strokes on white, mode ``L``). A transform that begins with
    ``Resize(s)`` is served from metacli's cache decoded at ``s`` pixels (Lanczos), so that resize costs nothing;
    otherwise the drawings come at their 105 pixels. ``download=True`` fetches the official archives and checks
    them by md5 where they are missing (archives already present are checked by content).
    """

    def __init__(self, root: str, num_classes_per_task: int | None = None, meta_train: bool = False,
                 meta_val: bool = False, meta_test: bool = False, meta_split: str | None = None,
                 use_vinyals_split: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, dataset_transform: Callable | None = None,
                 class_augmentations: list[Rotation] | None = None, download: bool = False) -> None:
        source = OmniglotData(root=root, split="vinyals" if use_vinyals_split else "background_evaluation",
                              image_size=resize_size(transform) or OMNIGLOT_SIDE, rotations=1, download=download)
        split = resolve_split(meta_train, meta_val, meta_test, meta_split)
        super().__init__(source, root, num_classes_per_task, split, transform, target_transform, dataset_transform,
                         class_augmentations, invert=True)


class MiniImagenet(CombinationMetaDataset):
    """mini-ImageNet (Vinyals et al. 2016) with torchmeta's arguments, on metacli's pinned Ravi & Larochelle split
    (64 / 16 / 20 classes of 600 images for ``meta_train`` / ``meta_val`` / ``meta_test``), decoded at 84 pixels
    or at the side of a leading ``Resize``. There is no official download: ``download=True`` is a no-op where the
    data is in ``<root>/mini-imagenet``, and says where to put it where it is not."""

    def __init__(self, root: str, num_classes_per_task: int | None = None, meta_train: bool = False,
                 meta_val: bool = False, meta_test: bool = False, meta_split: str | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 dataset_transform: Callable | None = None, class_augmentations: list[Rotation] | None = None,
                 download: bool = False) -> None:
        split = resolve_split(meta_train, meta_val, meta_test, meta_split)
        source = MiniImageNet(root=root, image_size=resize_size(transform) or MINI_IMAGENET_SIDE)
        if download and find_source(source.base, split) is None:
            raise DataError(not_found_message(Path(source.base)))
        super().__init__(source, root, num_classes_per_task, split, transform, target_transform, dataset_transform,
                         class_augmentations)


__all__ = ["MiniImagenet", "Omniglot"]
