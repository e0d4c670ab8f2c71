"""Episode sampling (shapes, labels, disjointness, determinism, impossible shapes), synthetic glyphs, and the class
disjointness of the real Omniglot splits."""
from __future__ import annotations

import re

import pytest
import torch

from metacli.data.base import SPLITS, ClassImages
from metacli.data.episodes import Episode, EpisodeBatch, EpisodeSampler, check_episode_shape
from metacli.data.omniglot import Omniglot
from metacli.data.synthetic import SyntheticGlyphs
from metacli.errors import DataError


def identity(images: torch.Tensor) -> torch.Tensor:
    """Keep the uint8 codes readable after sampling (the sampler always applies ``normalize``)."""
    return images.float()


def coded_images(n_classes: int, per_class: int, size: int = 3) -> ClassImages:
    """Channel 0 holds the class, channel 1 the image index: every sampled image names its (class, index)."""
    classes = torch.arange(n_classes).view(-1, 1, 1, 1).expand(n_classes, per_class, size, size)
    index = torch.arange(per_class).view(1, -1, 1, 1).expand(n_classes, per_class, size, size)
    images = torch.stack([classes, index], dim=2).to(torch.uint8)  # [C, P, 2, size, size]
    return ClassImages(images=images.contiguous(), class_names=[f"class{c}" for c in range(n_classes)])


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, index) of each image of ``x [..., 2, H, W]``, checking that each image is one uniform code."""
    assert torch.equal(x, x[..., :1, :1].expand_as(x)), "an image is not one uniform code: the gather mixed pixels"
    return x[..., 0, 0, 0].long(), x[..., 1, 0, 0].long()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- shapes and labels


def test_batch_shapes_and_remapped_labels():
    data = coded_images(n_classes=12, per_class=10, size=4)
    n, k, q, b = 4, 2, 3, 6
    batch = EpisodeSampler(data, n, k, q, identity).sample(b, generator(0))
    assert isinstance(batch, EpisodeBatch) and len(batch) == b and batch.n_way == n
    assert batch.support_x.shape == (b, n * k, 2, 4, 4)
    assert batch.query_x.shape == (b, n * q, 2, 4, 4)
    assert batch.support_y.shape == (b, n * k) and batch.query_y.shape == (b, n * q)
    assert batch.support_x.dtype == torch.float32
    assert batch.support_y.dtype == torch.long and batch.query_y.dtype == torch.long
    for y, per_label in ((batch.support_y, k), (batch.query_y, q)):
        for row in y:
            assert row.min() == 0 and row.max() == n - 1
            assert torch.bincount(row, minlength=n).tolist() == [per_label] * n


def test_labels_name_one_class_each():
    """Every image of label j in a task comes from the same source class, in support and query alike."""
    data = coded_images(n_classes=9, per_class=8)
    n, k, q = 3, 2, 4
    batch = EpisodeSampler(data, n, k, q, identity).sample(50, generator(1))
    s_class, _ = decode(batch.support_x)
    q_class, _ = decode(batch.query_x)
    for t in range(len(batch)):
        for label in range(n):
            source = s_class[t][batch.support_y[t] == label]
            assert source.unique().numel() == 1
            assert q_class[t][batch.query_y[t] == label].unique().tolist() == source.unique().tolist()


def test_sampled_images_are_the_source_images():
    data = SyntheticGlyphs(classes={"train": 6, "val": 2, "test": 2}, per_class=7, image_size=12).split("train")
    # Tag each image in a spare corner pixel so that its (class, index) can be read back from the real pixels.
    images = data.images.clone()
    for c in range(6):
        for i in range(7):
            images[c, i, 0, 0, 0] = 10 * c + i
    data = ClassImages(images=images, class_names=data.class_names)
    batch = EpisodeSampler(data, 3, 2, 3, identity).sample(4, generator(2))
    for x in (batch.support_x, batch.query_x):
        for image in x.flatten(0, 1):
            tag = int(image[0, 0, 0])
            assert torch.equal(image.to(torch.uint8), images[tag // 10, tag % 10])


def test_iterating_a_batch_gives_its_episodes():
    batch = EpisodeSampler(coded_images(8, 6), 4, 1, 2, identity).sample(3, generator(3))
    episodes = list(batch)
    assert len(episodes) == 3 and all(isinstance(e, Episode) for e in episodes)
    for b, episode in enumerate(episodes):
        assert episode.n_way == 4
        assert torch.equal(episode.support_x, batch.support_x[b]) and torch.equal(episode.query_y, batch.query_y[b])


# ---------------------------------------------------------------- disjointness


@pytest.mark.parametrize("k_shot,n_query", [(1, 1), (2, 3), (3, 2)])
def test_support_and_query_never_share_an_image(k_shot, n_query):
    per_class = 5  # (3, 2) and (2, 3) use every image of each class: the tightest case
    data = coded_images(n_classes=7, per_class=per_class)
    batch = EpisodeSampler(data, 5, k_shot, n_query, identity).sample(200, generator(4))
    s_class, s_index = decode(batch.support_x)
    q_class, q_index = decode(batch.query_x)
    for t in range(len(batch)):
        support = list(zip(s_class[t].tolist(), s_index[t].tolist()))
        query = list(zip(q_class[t].tolist(), q_index[t].tolist()))
        assert len(set(support)) == len(support), "an image is repeated inside the support set"
        assert len(set(query)) == len(query), "an image is repeated inside the query set"
        assert not set(support) & set(query), f"task {t}: support and query share {set(support) & set(query)}"


def test_classes_of_a_task_are_distinct():
    data = coded_images(n_classes=6, per_class=4)
    batch = EpisodeSampler(data, 5, 1, 1, identity).sample(300, generator(5))
    s_class, _ = decode(batch.support_x)
    for row in s_class:
        assert row.unique().numel() == 5
    # n_way equal to the number of classes: every task holds every class exactly once.
    full = EpisodeSampler(data, 6, 2, 1, identity).sample(20, generator(6))
    for row in decode(full.support_x)[0]:
        assert sorted(row.unique().tolist()) == list(range(6)) and row.numel() == 12


def test_sampling_covers_every_class_and_image():
    """Guards against a sampler that always takes the first classes or images."""
    data = coded_images(n_classes=10, per_class=8)
    batch = EpisodeSampler(data, 3, 1, 2, identity).sample(400, generator(7))
    classes, index = decode(torch.cat([batch.support_x, batch.query_x], dim=1))
    assert set(classes.flatten().tolist()) == set(range(10))
    assert set(index.flatten().tolist()) == set(range(8))
    # Class order within a task is random too: label 0 is not always the smallest class.
    assert (classes[:, 0] != classes.min(dim=1).values).any()


# ---------------------------------------------------------------- determinism


def _same(a: EpisodeBatch, b: EpisodeBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))


def test_same_seed_same_batches_different_seed_different():
    sampler = EpisodeSampler(coded_images(20, 10), 5, 2, 3, identity)
    g1, g2, g3 = generator(11), generator(11), generator(12)
    first = [sampler.sample(4, g1) for _ in range(3)]
    again = [sampler.sample(4, g2) for _ in range(3)]
    other = [sampler.sample(4, g3) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not any(_same(a, b) for a, b in zip(first, other))
    assert not _same(first[0], first[1]), "successive draws from one generator must differ"


def _fixed(sampler: EpisodeSampler, episodes: int, seed: int, batch_size: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    batches = list(sampler.fixed(episodes, seed, batch_size))
    sizes = [len(b) for b in batches]
    return sizes, torch.cat([b.support_x for b in batches]), torch.cat([b.query_x for b in batches])


@pytest.mark.parametrize("episodes,batch_size", [(10, 1), (10, 3), (10, 10), (10, 25), (7, 7), (1, 5)])
def test_fixed_yields_exactly_the_requested_episodes(episodes, batch_size):
    sampler = EpisodeSampler(coded_images(12, 6), 5, 1, 2, identity)
    sizes, support, query = _fixed(sampler, episodes, seed=0, batch_size=batch_size)
    assert sum(sizes) == episodes and support.shape[0] == episodes and query.shape[0] == episodes
    assert all(1 <= s <= batch_size for s in sizes)
    assert sizes == [batch_size] * (episodes // batch_size) + ([episodes % batch_size] if episodes % batch_size else [])


def test_fixed_is_reproducible_and_seeded():
    sampler = EpisodeSampler(coded_images(12, 6), 5, 1, 2, identity)
    _, a, qa = _fixed(sampler, 12, seed=3, batch_size=5)
    _, b, qb = _fixed(sampler, 12, seed=3, batch_size=5)
    _, c, _ = _fixed(sampler, 12, seed=4, batch_size=5)
    assert torch.equal(a, b) and torch.equal(qa, qb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 25])
def test_fixed_episodes_do_not_depend_on_batch_size(batch_size):
    """The test episodes are pinned by eval.seed alone: eval.batch_size only chunks them.

    ``metacli eval checkpoint=... eval.batch_size=...`` must score the same tasks as the run did.
    """
    sampler = EpisodeSampler(coded_images(12, 6), 5, 1, 2, identity)
    _, reference, reference_q = _fixed(sampler, 10, seed=0, batch_size=10)
    sizes, support, query = _fixed(sampler, 10, seed=0, batch_size=batch_size)
    assert sum(sizes) == 10
    assert torch.equal(support, reference) and torch.equal(query, reference_q), (
        f"fixed(10, seed=0, batch_size={batch_size}) gives other episodes than batch_size=10")


# ---------------------------------------------------------------- impossible shapes


@pytest.mark.parametrize("n_way,k_shot,n_query,needle", [
    (9, 1, 1, "n_way=9"),      # more ways than classes
    (3, 4, 3, "k_shot + n_query = 7"),  # more images than each class has
    (1, 1, 1, "n_way=1"),      # one way is no classification
    (0, 1, 1, "n_way=0"),
    (3, 0, 1, "k_shot=0"),     # no support
    (3, 1, 0, "n_query=0"),    # no query
    (-2, 1, 1, "n_way=-2"),
])
def test_impossible_shapes_raise_data_error(n_way, k_shot, n_query, needle):
    data = coded_images(n_classes=8, per_class=6)
    with pytest.raises(DataError) as info:
        EpisodeSampler(data, n_way, k_shot, n_query, identity, where="test split")
    message = str(info.value)
    assert needle in message and "test split" in message and "\n" not in message
    with pytest.raises(DataError):
        check_episode_shape(data, n_way, k_shot, n_query, "x")


def test_largest_possible_shape_is_accepted():
    data = coded_images(n_classes=8, per_class=6)
    check_episode_shape(data, 8, 4, 2, "x")  # all classes, all images: allowed
    batch = EpisodeSampler(data, 8, 4, 2, identity).sample(2, generator(0))
    assert batch.support_x.shape[1] == 32 and batch.query_x.shape[1] == 16


# ---------------------------------------------------------------- synthetic glyphs


def test_synthetic_glyphs_are_deterministic_in_the_seed():
    config = dict(classes={"train": 6, "val": 3, "test": 4}, per_class=5, image_size=16)
    a, b, other = SyntheticGlyphs(seed=7, **config), SyntheticGlyphs(seed=7, **config), SyntheticGlyphs(seed=8, **config)
    for split in SPLITS:
        assert torch.equal(a.split(split).images, b.split(split).images)
        assert a.split(split).class_names == b.split(split).class_names
        assert not torch.equal(a.split(split).images, other.split(split).images)
    # Splits are drawn independently: no class of one split reappears in another.
    train, test = a.split("train").images.float(), a.split("test").images.float()
    assert not torch.equal(train[:4], test[:4])


def test_synthetic_glyph_shapes_follow_the_config():
    glyphs = SyntheticGlyphs(classes={"train": 7, "val": 3, "test": 4}, per_class=6, image_size=16, seed=1)
    for split, n in (("train", 7), ("val", 3), ("test", 4)):
        data = glyphs.split(split)
        assert data.images.shape == (n, 6, 1, 16, 16)
        assert data.images.dtype == torch.uint8
        assert data.n_classes == n and data.per_class == 6 and len(set(data.class_names)) == n
        assert data.images.max() > 128, "glyphs must have ink"
        assert data.images.float().std() > 10, "glyphs must not be flat"
    assert glyphs.channels == 1 and glyphs.image_size == 16
    normalized = glyphs.normalize(glyphs.split("train").images)
    assert normalized.dtype == torch.float32 and torch.isfinite(normalized).all()


# ---------------------------------------------------------------- real Omniglot splits


@pytest.fixture(scope="module")
def omniglot_splits(omniglot_root, tmp_path_factory):
    """Class names of train/val/test for both split definitions (archives decoded once into a tmp cache)."""
    cache = tmp_path_factory.mktemp("episode-tests-cache")
    names = {}
    for split_name in ("vinyals", "background_evaluation"):
        dataset = Omniglot(root=str(omniglot_root), split=split_name, rotations=4, cache_dir=str(cache))
        names[split_name] = {split: dataset.split(split).class_names for split in SPLITS}
    return names


def _character(class_name: str) -> str:
    return re.sub(r"/rot\d{3}$", "", class_name)


@pytest.mark.parametrize("split_name", ["vinyals", "background_evaluation"])
def test_omniglot_splits_share_no_character(omniglot_splits, split_name):
    names = omniglot_splits[split_name]
    characters = {split: {_character(c) for c in names[split]} for split in SPLITS}
    for split in SPLITS:
        assert characters[split], f"{split_name}/{split} is empty"
        assert len(names[split]) == 4 * len(characters[split]), "each character gives 4 rotation classes"
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = characters[a] & characters[b]
        assert not shared, f"{split_name}: {a} and {b} share {sorted(shared)[:5]}"
