"""docs/adding-an-algorithm.md's example, exactly as the page shows it: the module imports, its YAML names it where
the page puts it, the builder's arguments reach it, a bad value is refused, and it learns on synthetic glyphs."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

from learning import assert_learned, meta_train
from metacli.algorithms.base import FewShotLearner
from metacli.models.conv4 import Conv4

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding-an-algorithm.md"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    text = PAGE.read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [config] = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    module_file = tmp_path_factory.mktemp("example") / "soft_nearest_neighbour.py"
    module_file.write_text(code)
    spec = importlib.util.spec_from_file_location("soft_nearest_neighbour", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, yaml.safe_load(config)


def test_the_yaml_names_the_module_the_page_creates(example):
    module, config = example
    path, _, name = config.pop("_target_").rpartition(".")
    assert path == "metacli.algorithms.soft_nearest_neighbour" and issubclass(getattr(module, name), FewShotLearner)
    assert "metacli/algorithms/soft_nearest_neighbour.py" in PAGE.read_text()


@pytest.mark.usefixtures("one_thread")  # with the seed, the same numbers on any machine
def test_the_example_refuses_a_bad_value_and_learns(example, glyphs):
    module, config = example
    arguments = {key: value for key, value in config.items() if key != "_target_"}
    with pytest.raises(ValueError, match="algo.temperature"):
        module.SoftNearestNeighbour(Conv4(hidden=16), 5, **{**arguments, "temperature": 0})
    torch.manual_seed(0)  # the initial weights: unseeded, they followed whatever the tests before had drawn
    learner = module.SoftNearestNeighbour(Conv4(hidden=16), 5, **arguments)
    before, after = meta_train(learner, glyphs, steps=60, meta_batch=4, lr=1e-3)
    assert_learned("soft nearest neighbour", before, after, at_least=0.55, gain=0.2)
