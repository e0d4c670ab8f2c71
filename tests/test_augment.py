"""Random affine distortions of the training images (augment=affine)."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from metacli.data.augment import RandomAffine, augmented
from metacli.data.episodes import EpisodeSampler
from metacli.data.synthetic import SyntheticGlyphs
from metacli.errors import ConfigError


@pytest.fixture(scope="module")
def draw():
    data = SyntheticGlyphs()
    sampler = EpisodeSampler(data.split("train"), 5, 1, 3, data.normalize)
    return lambda generator: sampler.sample(2, generator)


def test_no_distortion_is_the_identity(draw):
    batch = draw(torch.Generator().manual_seed(0))
    same = RandomAffine(degrees=0, shear=0, scale=(1, 1), translate=0)(batch, torch.Generator().manual_seed(1))
    torch.testing.assert_close(same.support_x, batch.support_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(same.query_x, batch.query_x, atol=1e-5, rtol=0)


def test_distortions_are_per_image_fixed_by_the_generator_and_keep_labels_and_layout(draw):
    step = augmented(draw, RandomAffine())
    first, again = step(torch.Generator().manual_seed(3)), step(torch.Generator().manual_seed(3))
    plain = draw(torch.Generator().manual_seed(3))
    assert torch.equal(first.query_x, again.query_x) and torch.equal(first.support_x, again.support_x)
    assert torch.equal(first.query_y, plain.query_y) and first.query_x.shape == plain.query_x.shape
    assert first.query_x.stride() == plain.query_x.stride()  # the sampler's channels-last layout
    change = (first.query_x - plain.query_x).abs().flatten(2).amax(-1)  # [tasks, images]
    assert (change > 0.1).all()  # every image moved
    # and no two by the same map: the differences between images' changes are not all alike
    assert len({round(v, 4) for v in (first.query_x - plain.query_x).abs().mean((2, 3, 4)).flatten().tolist()}) > 5


def test_a_bad_range_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="scale a \\[low, high\\] range"):
        RandomAffine(scale=(1.2, 0.8))
    done = run_cli("train", "experiment=smoke", "augment=affine", "augment.degrees=-5", f"hydra.run.dir={tmp_path}/r",
                   cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "augment: degrees, shear and translate must be >= 0" in done.stderr
