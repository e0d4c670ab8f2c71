"""torchmeta's dataset helpers: a dataset ready for ``BatchMetaDataLoader`` in one call."""
from __future__ import annotations

from torchvision.transforms import Compose, Resize, ToTensor

from metacli.torchmeta.datasets import Omniglot
from metacli.torchmeta.transforms import Categorical, ClassSplitter, Rotation


def omniglot(folder: str, shots: int, ways: int, shuffle: bool = True, test_shots: int | None = None,
             seed: int | None = None, **kwargs) -> Omniglot:
    """``ways``-way ``shots``-shot Omniglot tasks with ``test_shots`` test images a class (default: ``shots``), at
    28x28 with the three rotations as extra classes, as torchmeta's ``omniglot`` helper; ``kwargs`` go to
    :class:`Omniglot` (``meta_train=True`` and so on) and may replace any default."""
    options = {"transform": Compose([Resize(28), ToTensor()]), "target_transform": Categorical(ways),
               "class_augmentations": [Rotation([90, 180, 270])], **kwargs}
    options.setdefault("dataset_transform", ClassSplitter(shuffle=shuffle, num_train_per_class=shots,
                                                          num_test_per_class=test_shots or shots))
    dataset = Omniglot(folder, num_classes_per_task=ways, **options)
    dataset.seed(seed)
    return dataset
