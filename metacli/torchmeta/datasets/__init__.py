"""torchmeta's ``Omniglot``, served from metacli's pinned splits and verified data (``metacli.data``)."""
from __future__ import annotations

from typing import Callable

from metacli.data.omniglot import Omniglot as OmniglotData
from metacli.torchmeta.meta_dataset import CombinationMetaDataset, resize_size, resolve_split
from metacli.torchmeta.transforms import Rotation

#: The side Omniglot is decoded at when the transform does not begin with a Resize: the drawings' own.
OMNIGLOT_SIDE = 105


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


__all__ = ["Omniglot"]
