"""torchmeta's dataset helpers: a dataset ready for ``BatchMetaDataLoader`` in one call."""
from __future__ import annotations

from torchvision.transforms import Compose, Resize, ToTensor

from metacli.torchmeta.datasets import MiniImagenet, Omniglot
from metacli.torchmeta.transforms import Categorical, ClassSplitter, Rotation


def omniglot(folder: str, shots: int, ways: int, shuffle: bool = True, test_shots: int | None = None,
             seed: int | None = None, **kwargs) -> Omniglot:
    """``ways``-way ``shots``-shot Omniglot tasks with ``test_shots`` test images a class (default: ``shots``), at
    28x28 with the three rotations as extra classes, as torchmeta's ``omniglot`` helper; ``kwargs`` go to
    :class:`Omniglot` (``meta_train=True`` and so on) and may replace any default."""
    defaults = {"transform": Compose([Resize(28), ToTensor()]), "class_augmentations": [Rotation([90, 180, 270])]}
    return _helper(Omniglot, folder, shots, ways, shuffle, test_shots, seed, defaults, kwargs)


def miniimagenet(folder: str, shots: int, ways: int, shuffle: bool = True, test_shots: int | None = None,
                 seed: int | None = None, **kwargs) -> MiniImagenet:
    """``ways``-way ``shots``-shot mini-ImageNet tasks at 84x84, as torchmeta's ``miniimagenet`` helper."""
    defaults = {"transform": Compose([Resize(84), ToTensor()])}
    return _helper(MiniImagenet, folder, shots, ways, shuffle, test_shots, seed, defaults, kwargs)


def _helper(dataset_class, folder, shots, ways, shuffle, test_shots, seed, defaults, kwargs):
    """The helpers' common part: Categorical targets and a ClassSplitter unless ``kwargs`` give their own."""
    options = {"target_transform": Categorical(ways), **defaults, **kwargs}
    options.setdefault("dataset_transform", ClassSplitter(shuffle=shuffle, num_train_per_class=shots,
                                                          num_test_per_class=test_shots or shots))
    dataset = dataset_class(folder, num_classes_per_task=ways, **options)
    dataset.seed(seed)
    return dataset
