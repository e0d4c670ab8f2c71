"""Every option of every config group composes and instantiates; range checks; the CLI's preflight errors."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import hydra
import pytest
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

import metacli.cli
from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.maml import MAML
from metacli.algorithms.meta_rl import MetaRLLearner
from metacli.build import build, build_dataset, build_learner, build_partial, resolve_device
from metacli.config_schema import check_ranges, register
from metacli.data.base import FewShotDataset
from metacli.data.episodes import Episode
from metacli.data.mini_imagenet import MiniImageNet
from metacli.data.omniglot import Omniglot
from metacli.data.synthetic import SyntheticGlyphs
from metacli.errors import ConfigError, DataError

CONF = metacli.cli.config_dir()
GROUPS = ("algo", "dataset", "backbone", "device", "logger", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def hydra_context():
    register()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose(*overrides: str, config: str = "train") -> DictConfig:
    with hydra_context():
        return hydra.compose(config_name=config, overrides=list(overrides))


# Small image backbones, so that instantiating a learner costs milliseconds (mlp, for vectors: test_sinusoid.py).
SMALL = {"conv4": ["backbone.hidden=8"], "conv4_stride": ["backbone.hidden=8"], "resnet12": ["backbone.widths=[4,4,8,8]"]}


def test_every_learner_has_its_yaml():
    """Every concrete learner class in metacli/algorithms/ is the target of one conf/algo/ option."""
    import importlib
    import inspect
    import pkgutil

    import metacli.algorithms

    learners = set()
    for module in pkgutil.iter_modules(metacli.algorithms.__path__):
        loaded = importlib.import_module(f"metacli.algorithms.{module.name}")
        learners |= {f"{cls.__module__}.{cls.__name__}" for _, cls in inspect.getmembers(loaded, inspect.isclass)
                     if issubclass(cls, (FewShotLearner, MetaRLLearner)) and not inspect.isabstract(cls)
                     and cls.__module__ == loaded.__name__}
    targets = {compose(f"algo={name}").algo._target_ for name in options("algo")}
    assert learners == targets


def test_the_algorithms_page_names_every_algo_option():
    page = (Path(__file__).resolve().parents[1] / "docs" / "algorithms.md").read_text()
    assert [name for name in options("algo") if f"`{name}`" not in page] == []


def test_the_groups_hold_the_expected_options():
    assert CONF.is_dir() and (CONF / "train.yaml").is_file() and (CONF / "eval.yaml").is_file()
    assert "maml" in options("algo") and "protonet" in options("algo")
    assert options("dataset") == ["mini_imagenet", "omniglot", "sinusoid", "synthetic"]
    assert options("backbone") == ["conv4", "conv4_stride", "mlp", "resnet12"]
    assert options("device") == ["auto", "cpu", "cuda"]
    assert {"jsonl", "none", "wandb"} <= set(options("logger"))
    assert {"smoke", "maml_omniglot_5w1s", "protonet_omniglot_5w1s"} <= set(options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose(f"{group}={option}")
    check_ranges(cfg)  # every shipped option is within range
    assert cfg.task.n_way >= 2 and cfg.trainer.steps >= 0
    if group in ("algo", "dataset", "backbone"):
        target = get_class(cfg[group]._target_)
        assert target.__module__.startswith("metacli.")
    elif group == "device":
        assert cfg.device.type == option
    elif group == "logger":
        assert isinstance(cfg.logger, DictConfig)
    else:
        algo, _, rest = option.partition("_")
        if algo in ("maml", "protonet") and not rest.startswith("rl_"):  # the name says the algorithm and dataset
            assert cfg.algo._target_ == {"maml": "metacli.algorithms.maml.MAML",
                                         "protonet": "metacli.algorithms.protonet.ProtoNet"}[algo]
            dataset = {"omniglot": "Omniglot", "miniimagenet": "MiniImageNet", "sinusoid": "Sinusoid"}[rest.split("_")[0]]
            assert cfg.dataset._target_.endswith("." + dataset)
        # The optimiser and scheduler of an experiment build.
        params = [torch.nn.Parameter(torch.zeros(2))]
        optimizer = build_partial(cfg.trainer.optimizer, "trainer.optimizer", params)
        assert isinstance(optimizer, torch.optim.Optimizer)
        if cfg.trainer.scheduler:
            assert isinstance(build_partial(cfg.trainer.scheduler, "trainer.scheduler", optimizer), torch.optim.lr_scheduler.LRScheduler)


def test_experiments_override_the_defaults():
    smoke = compose("experiment=smoke")
    assert smoke.dataset._target_ == "metacli.data.synthetic.SyntheticGlyphs" and smoke.device.type == "cpu"
    assert smoke.trainer.steps == 20 and smoke.task.n_query == 5
    maml = compose("experiment=maml_omniglot_5w1s")
    assert maml.backbone.pool == "stride" and maml.algo.test_inner_steps == 3 and maml.trainer.meta_batch == 32
    # An override on the command line still wins over the experiment.
    assert compose("experiment=smoke", "trainer.steps=3").trainer.steps == 3


@pytest.mark.parametrize("option", sorted(SMALL))
@pytest.mark.parametrize("in_channels,image_size", [(1, 28), (3, 84)])
def test_every_backbone_instantiates(option, in_channels, image_size):
    cfg = compose(f"backbone={option}")
    backbone = build(cfg.backbone, "backbone", in_channels=in_channels, image_size=image_size)
    assert isinstance(backbone, torch.nn.Module) and isinstance(backbone.out_dim, int) and backbone.out_dim > 0
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, backbone.out_dim)


def classifiers() -> list[str]:
    """The ``algo=`` options that learn classification tasks (the meta-RL learners act in environments; FIGR learns
    on classification datasets but generates images: tests/test_generative.py)."""
    learners = {name: get_class(compose(f"algo={name}").algo._target_) for name in options("algo")}
    return [name for name, learner in learners.items()
            if "classification" in learner.families and not getattr(learner, "generates", False)]


@pytest.mark.parametrize("backbone", sorted(SMALL))
@pytest.mark.parametrize("algo", classifiers())
def test_every_algo_builds_a_working_learner(algo, backbone):
    cfg = compose(f"algo={algo}", f"backbone={backbone}", *SMALL[backbone], "dataset=synthetic", "task.n_way=4")
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset)
    # One algorithm is one file, named as its YAML.
    assert isinstance(learner, FewShotLearner) and type(learner).__module__ == f"metacli.algorithms.{algo}"
    assert learner.n_way == 4 and learner.bn_mode == cfg.eval.bn_mode == "transductive"
    assert learner.backbone.out_dim > 0
    if isinstance(learner, MAML) and "inner_lr" in cfg.algo and algo != "meta_sgd":
        assert (learner.train_loop.lr, learner.train_loop.steps) == (cfg.algo.inner_lr, cfg.algo.inner_steps)
        assert (learner.test_loop.lr, learner.test_loop.steps) == (cfg.algo.inner_lr, cfg.algo.test_inner_steps)
        assert learner.head.out_features == 4
    elif algo == "protonet":
        assert learner.distance == cfg.algo.distance
    generator = torch.Generator().manual_seed(0)
    episode = Episode(support_x=torch.randn(4, 1, 28, 28, generator=generator), support_y=torch.arange(4),
                      query_x=torch.randn(8, 1, 28, 28, generator=generator), query_y=torch.arange(4).repeat(2), n_way=4)
    accuracy = learner.evaluate_episode(episode)
    assert 0.0 <= accuracy <= 1.0


def test_algo_settings_reach_the_learner():
    cfg = compose("algo=maml", "algo.inner_lr=0.1", "algo.first_order=true", "backbone.hidden=8", "dataset=synthetic",
                  "eval.bn_mode=running")
    learner = build_learner(cfg, build_dataset(cfg))
    # test_inner_lr follows inner_lr through the interpolation in conf/algo/maml.yaml.
    assert (learner.train_loop.lr, learner.test_loop.lr, learner.train_loop.second_order, learner.bn_mode) == (
        0.1, 0.1, False, "running")
    cfg = compose("algo=protonet", "algo.distance=cosine", "algo.temperature=5", "backbone.hidden=8", "dataset=synthetic")
    learner = build_learner(cfg, build_dataset(cfg))
    assert (learner.distance, learner.temperature) == ("cosine", 5)


@pytest.mark.parametrize("overrides,needle", [
    (["algo=protonet", "algo.distance=manhattan"], "algo"),
    (["algo=maml", "algo.inner_steps=0"], "algo"),
    (["backbone=conv4", "backbone.pool=avg"], "backbone"),
])
def test_a_constructor_complaint_becomes_one_config_error(overrides, needle):
    cfg = compose(*overrides, "backbone.hidden=8", "dataset=synthetic")
    with pytest.raises(ConfigError) as info:
        build_learner(cfg, build_dataset(cfg))
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("option", options("dataset"))
def test_every_dataset_constructs_without_reading_files(option, tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    overrides = [f"dataset={option}"]
    if option in ("omniglot", "mini_imagenet"):
        overrides += [f"dataset.root={root}", f"dataset.cache_dir={cache}"]
    dataset = build_dataset(compose(*overrides))
    if option == "sinusoid":  # tasks drawn, not read: tests/test_sinusoid.py
        assert dataset.image_size is None and dataset.family.name == "regression"
        return
    assert isinstance(dataset, FewShotDataset)
    assert isinstance(dataset, {"omniglot": Omniglot, "mini_imagenet": MiniImageNet, "synthetic": SyntheticGlyphs}[option])
    expected = {"omniglot": (1, 28), "mini_imagenet": (3, 84), "synthetic": (1, 28)}[option]
    assert (dataset.channels, dataset.image_size) == expected
    assert len(dataset.mean) == len(dataset.std) == dataset.channels
    assert list(root.iterdir()) == [] and not cache.exists(), "constructing a dataset must not touch the disk"
    if option == "synthetic":
        assert dict(dataset.classes) == {"train": 200, "val": 40, "test": 40}
        return
    assert dataset.root == root
    # Only asking for a split looks for the files, and their absence is one clear DataError.
    with pytest.raises(DataError) as info:
        dataset.split("test")
    assert str(root) in str(info.value) and "\n" not in str(info.value)


def test_omniglot_constructor_checks_its_settings(tmp_path):
    with pytest.raises(ConfigError):
        build_dataset(compose("dataset=omniglot", f"dataset.root={tmp_path}", "dataset.split=lake"))
    with pytest.raises(ConfigError):
        build_dataset(compose("dataset=omniglot", f"dataset.root={tmp_path}", "dataset.rotations=5"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", options("logger"))
def test_every_logger_target_is_importable(option):
    cfg = compose(f"logger={option}")
    loggers = cfg.logger or {}
    if option == "none":
        assert len(loggers) == 0
    else:
        assert len(loggers) >= 1
    for name, node in loggers.items():
        cls = get_class(node._target_)
        assert all(callable(getattr(cls, method, None)) for method in ("log", "log_results", "log_images", "close")), name
    if option == "wandb":
        assert {"jsonl", "wandb"} <= set(loggers)


@pytest.mark.parametrize("option", options("device"))
def test_every_device_option_resolves(option):
    cfg = compose(f"device={option}")
    if option == "cuda" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cpu"):
            resolve_device(cfg.device)
        return
    device = resolve_device(cfg.device)
    expected = {"cpu": "cpu", "cuda": "cuda", "auto": "cuda" if torch.cuda.is_available() else "cpu"}[option]
    assert device.type == expected


def test_eval_config_composes_with_a_checkpoint():
    cfg = compose("checkpoint=x", config="eval")
    assert cfg.checkpoint == "x" and cfg.which == "best" and cfg.device.type == "auto"
    assert OmegaConf.is_missing(compose(config="eval"), "checkpoint")
    with pytest.raises(MissingMandatoryValue):
        compose(config="eval").checkpoint  # noqa: B018
    cfg = compose("checkpoint=runs/a", "eval.episodes=50", "eval.bn_mode=running", "device=cpu", config="eval")
    assert (cfg.eval.episodes, cfg.eval.bn_mode, cfg.device.type) == (50, "running", "cpu")


# ---------------------------------------------------------------- range checks


def test_defaults_pass_the_range_checks():
    check_ranges(compose())
    check_ranges(compose("task.n_way=2", "task.k_shot=1", "trainer.steps=0", "eval.bn_mode=running", "task.train_way=20"))


@pytest.mark.parametrize("override,key", [
    ("task.n_way=-5", "task.n_way"),
    ("task.n_way=1", "task.n_way"),
    ("task.k_shot=0", "task.k_shot"),
    ("task.n_query=0", "task.n_query"),
    ("task.train_way=1", "task.train_way"),
    ("eval.bn_mode=bad", "eval.bn_mode"),
    ("trainer.steps=-1", "trainer.steps"),
    ("trainer.meta_batch=0", "trainer.meta_batch"),
    ("eval.episodes=0", "eval.episodes"),
])
def test_out_of_range_values_raise_config_error(override, key):
    cfg = compose(override)  # the types are right, so composition succeeds ...
    with pytest.raises(ConfigError) as info:
        check_ranges(cfg)  # ... and the range check names the key
    assert str(info.value).startswith(key + "=") and "\n" not in str(info.value)


# ---------------------------------------------------------------- preflight


@pytest.mark.parametrize("args,needle", [
    (["algo=nope"], "nope"),
    (["dataset=nope"], "nope"),
    (["dataset=synthetic", "backbone=conv5"], "conv5"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["task.n_way=five"], "task.n_way"),
    (["trainer.nope=1"], "trainer.nope"),
    (["nope=1"], "nope"),
    (["algo=maml,nope"], "nope"),
    (["-m", "algo=maml,protonet", "dataset=omniglot,nope"], "nope"),
])
def test_preflight_rejects_bad_overrides_in_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as info:
        metacli.cli.preflight("train", args)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("metacli: error:") and needle in lines[0]
    assert out == ""


@pytest.mark.parametrize("args", [
    [],
    ["algo=maml", "dataset=synthetic"],
    ["algo=maml,protonet"],
    ["-m", "algo=maml,protonet", "trainer.steps=5"],
    ["--multirun", "backbone=conv4,conv4_stride,resnet12", "device=cpu"],
    ["experiment=smoke", "trainer.steps=3", "logger=none"],
    ["task.n_way=10", "task.train_way=20", "eval.bn_mode=running", "backbone.hidden=32"],
])
def test_preflight_accepts_valid_overrides(args, capsys):
    sweep_dir = metacli.cli.preflight("train", args)  # returns (a multirun's sweep dir), having written nothing
    assert (sweep_dir is not None) == bool({"-m", "--multirun"} & set(args))
    out, err = capsys.readouterr()
    assert err == "" and out == ""


def test_preflight_checks_the_eval_command_too(capsys):
    metacli.cli.preflight("eval", ["checkpoint=x", "eval.episodes=10"])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as info:
        metacli.cli.preflight("eval", ["checkpoint=x", "eval.nope=1"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("metacli: error:") and "eval.nope" in lines[0]


def test_an_env_option_needs_no_dataset_null(tmp_path):
    """Task families without a dataset (reinforcement learning) come through the env group: an option of it drops
    the dataset by itself, so ``metacli train algo=NAME env=NAME`` needs no ``dataset=null``."""
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "toy_env.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: null\nenv:\n  name: toy\n")
    cfg = compose("env=toy_env", f"hydra.searchpath=[file://{tmp_path}]")
    assert cfg.dataset is None and cfg.env.name == "toy"
    default = compose()
    assert default.env is None and default.dataset is not None
    with pytest.raises(ConfigError, match="no dataset to train on"):
        build_dataset(compose("~dataset"))
    shipped = compose("env=point_nav")
    assert shipped.dataset is None and shipped.algo._target_ == "metacli.algorithms.maml_rl.MAMLRL"
    assert compose("env=point_nav", "algo=rl2").algo._target_ == "metacli.algorithms.rl2.RL2"  # the command line wins



@pytest.mark.parametrize("overrides, family", [((), "omniglot"), (("dataset=sinusoid",), "sinusoid"),
                                               (("env=point_nav",), "point_nav")])
def test_a_run_dir_is_named_after_its_dataset_or_environment(overrides, family):
    with hydra_context():
        cfg = hydra.compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        assert Path(cfg.hydra.run.dir).name.endswith(f"-{cfg.hydra.runtime.choices.algo}-{family}")


def written_keys(name: str) -> set[str]:
    """The keys that conf/algo_on_dataset/<name>.yaml sets, itself or through the files its defaults list takes in."""
    written = OmegaConf.load(CONF / "algo_on_dataset" / f"{name}.yaml")
    return set(written) - {"defaults"} | {key for parent in written.get("defaults", []) for key in written_keys(parent)}


@pytest.mark.parametrize("name", options("algo_on_dataset"))
def test_each_algo_on_dataset_file_adjusts_one_algo_on_one_dataset(name):
    """conf/algo_on_dataset/<algo>_<dataset>.yaml changes only keys the algorithm has, only on that dataset."""
    (algo, dataset), = [(a, name[len(a) + 1:]) for a in options("algo")
                        if name.startswith(a + "_") and name[len(a) + 1:] in options("dataset")]
    there, elsewhere = compose(f"algo={algo}", f"dataset={dataset}").algo, compose(f"algo={algo}").algo
    changed = {key for key in there if there[key] != elsewhere[key]}
    assert changed and set(there) == set(elsewhere)
    written = written_keys(name)
    assert written <= changed <= written | {"test_inner_lr"}  # test_inner_lr follows inner_lr unless set
