"""torchmeta's data API (metacli.torchmeta) on the real Omniglot: torchmeta's README example, the split mapping,
seeds, rotations as class augmentations, and one data path with metacli's own sampler."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import Compose, Normalize, Resize, ToTensor

from metacli.data.omniglot import Omniglot as OmniglotData
from metacli.data.mini_imagenet import pinned_wnids
from metacli.data.omniglot import pinned_characters
from metacli.errors import DataError
from metacli.torchmeta.datasets import Omniglot
from metacli.torchmeta.datasets.helpers import miniimagenet, omniglot
from metacli.torchmeta.transforms import Categorical, ClassSplitter, Rotation
from metacli.torchmeta.utils.data import BatchMetaDataLoader, collate_tasks


def first_batch(dataset, seed: int = 0, batch_size: int = 16):
    return next(iter(BatchMetaDataLoader(dataset, batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))))


def test_torchmetas_readme_example_gives_its_shapes(omniglot_root):
    dataset = omniglot(str(omniglot_root), ways=5, shots=5, test_shots=15, meta_train=True, download=True)
    batch = first_batch(dataset)
    train_inputs, train_targets = batch["train"]
    test_inputs, test_targets = batch["test"]
    assert train_inputs.shape == (16, 25, 1, 28, 28) and train_targets.shape == (16, 25)
    assert test_inputs.shape == (16, 75, 1, 28, 28) and test_targets.shape == (16, 75)
    assert torch.equal(train_targets[0], torch.arange(5).repeat_interleave(5)) and train_targets.dtype == torch.int64
    # Dark strokes on white, as torchmeta gives the drawings: mostly background at 1.
    assert 0.85 < train_inputs.mean() < 0.97 and train_inputs.min() == 0 and train_inputs.max() == 1


def test_the_split_mapping_is_metaclis_pinned_vinyals_split(omniglot_root):
    sizes = {}
    for flag in ("meta_train", "meta_val", "meta_test"):
        dataset = omniglot(str(omniglot_root), ways=5, shots=1, **{flag: True})
        sizes[flag] = dataset.num_classes
        split = flag.removeprefix("meta_")
        assert dataset.base_names == pinned_characters("vinyals", split)
    assert sizes == {"meta_train": 1028 * 4, "meta_val": 172 * 4, "meta_test": 423 * 4}
    background = Omniglot(str(omniglot_root), 5, meta_test=True, use_vinyals_split=False)
    assert background.base_names == pinned_characters("background_evaluation", "test")
    with pytest.raises(ValueError, match="exactly one of meta_train"):
        Omniglot(str(omniglot_root), 5, meta_train=True, meta_test=True)


def test_one_gather_gives_what_the_per_image_path_gives(omniglot_root):
    """A batch fetched in one gather equals the one built image by image through the PIL transforms, rotated
    classes included, and its pixels are metacli's own cached images."""
    dataset = omniglot(str(omniglot_root), ways=5, shots=2, test_shots=3, meta_val=True, seed=4)
    base = len(dataset.base_names)
    tasks = [(0, base + 1, 2 * base + 2, 3 * base + 3, 7), (5, 6, 3 * base + 9, 10, base)]
    gathered = dataset.__getitems__(tasks)
    assert dataset._gathers()
    one_by_one = collate_tasks([dataset[task] for task in tasks])
    for name in ("train", "test"):
        assert torch.equal(gathered[name][0], one_by_one[name][0])
        assert torch.equal(gathered[name][1], one_by_one[name][1])
    cached = OmniglotData(root=str(omniglot_root), split="vinyals", rotations=4).split("val")
    picks = dataset.dataset_transform.picks(tasks[0], 20)
    # rotations=4 interleaves a character's rotations: class 4c + r is character c turned r times.
    assert torch.equal(gathered["train"][0][0, 2], (255 - cached.images[4 * 1 + 1, picks[1, 0]]).float() / 255)


def test_episodes_are_fixed_by_the_seeds(omniglot_root):
    dataset = omniglot(str(omniglot_root), ways=5, shots=1, test_shots=2, meta_train=True, seed=1)
    first, again = first_batch(dataset, 0, 4), first_batch(dataset, 0, 4)
    assert torch.equal(first["train"][0], again["train"][0]) and torch.equal(first["test"][0], again["test"][0])
    assert not torch.equal(first["test"][0], first_batch(dataset, 1, 4)["test"][0])  # another loader seed
    workers = next(iter(BatchMetaDataLoader(dataset, batch_size=4, num_workers=2,
                                            generator=torch.Generator().manual_seed(0))))
    assert torch.equal(workers["test"][0], first["test"][0])  # worker processes draw the same episodes
    dataset.seed(2)  # the same tasks, their images drawn otherwise
    assert not torch.equal(first["test"][0], first_batch(dataset, 0, 4)["test"][0])


def test_other_transforms_go_image_by_image(omniglot_root):
    """A transform beyond ToTensor after a Resize runs on each PIL image; a leading Resize picks the cached size."""
    def dataset(*steps):
        return Omniglot(str(omniglot_root), num_classes_per_task=3, meta_test=True,
                        transform=Compose([Resize(28), ToTensor(), *steps]), target_transform=Categorical(3),
                        class_augmentations=[Rotation([180])],
                        dataset_transform=ClassSplitter(num_train_per_class=1, num_test_per_class=1))

    plain, normalised = dataset(), dataset(Normalize((0.5,), (0.5,)))
    assert plain._gathers() and not normalised._gathers() and plain.images.shape[-1] == 28
    batch, each = first_batch(plain, 0, 2), first_batch(normalised, 0, 2)
    assert batch["train"][0].shape == (2, 3, 1, 28, 28) and batch["test"][1].shape == (2, 3)
    torch.testing.assert_close(each["train"][0], batch["train"][0] * 2 - 1)
    with pytest.raises(ValueError, match="multiples of 90"):
        Rotation([45])


def test_miniimagenet_on_the_ravi_split(mini_imagenet_root, tmp_path):
    dataset = miniimagenet(str(mini_imagenet_root), ways=5, shots=1, test_shots=15, meta_val=True, download=True)
    assert dataset.base_names == pinned_wnids("val") and dataset.num_classes == 16
    batch = first_batch(dataset, 0, 2)
    assert batch["train"][0].shape == (2, 5, 3, 84, 84) and batch["test"][0].shape == (2, 75, 3, 84, 84)
    with pytest.raises(DataError, match="no official download exists") as missing:
        miniimagenet(str(tmp_path), ways=5, shots=1, meta_test=True, download=True)
    assert str(tmp_path / "mini-imagenet") in str(missing.value) and "\n" not in str(missing.value)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "torchmeta"


def test_the_readme_example_script_prints_torchmetas_shapes(omniglot_root):
    done = subprocess.run([sys.executable, str(EXAMPLES / "omniglot_loader.py"), str(omniglot_root)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Train inputs shape: torch.Size([16, 25, 1, 28, 28])",
                                        "Train targets shape: torch.Size([16, 25])",
                                        "Test inputs shape: torch.Size([16, 75, 1, 28, 28])",
                                        "Test targets shape: torch.Size([16, 75])"]


def test_a_torchmeta_style_maml_loop_learns_omniglot(omniglot_root):
    """The example MAML loop, 60 batches of 4 tasks: the held-out characters' 5-way 1-shot tasks well above the
    20 % of chance."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "maml.py"), str(omniglot_root), "--num-batches", "60",
                           "--batch-size", "4", "--hidden-size", "32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accuracy = float(done.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert accuracy > 0.4, done.stdout
