"""Every bad input ends with one line naming the problem and the fix, exit code 2, and no traceback."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_cli, snapshot
from metacli.data.mini_imagenet import pinned_wnids
from test_security import png_bomb

FAST = ["trainer.steps=1", "trainer.val_every=1", "trainer.val_episodes=2", "eval.episodes=2", "dataset=synthetic",
        "device=cpu", "trainer.progress=false"]


def corrupt_omniglot_root(tmp_path: Path, omniglot_root: Path) -> Path:
    root = tmp_path / "corrupt"
    (root / "omniglot").mkdir(parents=True)
    shutil.copy(omniglot_root / "omniglot" / "images_evaluation.zip", root / "omniglot")
    data = (omniglot_root / "omniglot" / "images_background.zip").read_bytes()
    (root / "omniglot" / "images_background.zip").write_bytes(data[: len(data) // 3])
    return root


CASES = {
    "unknown algo": (["algo=reptil"], "unknown algo 'reptil'"),
    "a misspelt algo": (["algo=protonett"], "(did you mean algo=protonet?)"),
    "a misspelt dataset in a sweep": (["-m", "dataset=omniglott,synthetic"], "(did you mean dataset=omniglot?)"),
    "unknown dataset": (["dataset=imagenet"], "unknown dataset 'imagenet'"),
    "unknown backbone": (["backbone=vgg"], "unknown backbone 'vgg'"),
    "unknown device": (["device=tpu"], "unknown device 'tpu'"),
    "unknown key": (["trainer.stepz=3"], "trainer.stepz is not a key: did you mean trainer.steps?"),
    "a key of another algo": (["algo.first_order=true"], "algo=protonet has no first_order: choose one that has it "
                                                         "(algo=anil, algo=maml, algo=maml_rl, algo=meta_sgd)"),
    "a key of another dataset": (["dataset.amplitude=[1,2]"], "dataset=synthetic has no amplitude: choose one that has "
                                                              "it (dataset=sinusoid)"),
    "wrong type": (["trainer.steps=many"], "could not be converted to Integer"),
    "negative way": (["task.n_way=-5"], "task.n_way=-5 is out of range"),
    "zero shot": (["task.k_shot=0"], "task.k_shot=0 is out of range"),
    "more ways than classes": (["task.n_way=41"], "n_way=41 but the split has only 40 classes"),
    "more shots than images": (["task.k_shot=16"], "each class has only 20 images"),
    "maml with higher train way": (["algo=maml", "task.train_way=10"], "must equal task.n_way"),
    "bad bn mode": (["eval.bn_mode=batch"], "choose one of transductive, running"),
    "negative inner lr": (["algo=maml", "algo.inner_lr=-1"], "inner_lr>0"),
    "cuda without cuda": (["device=cuda"], "CUDA is not available"),
    "missing dataset": (["dataset=omniglot", "dataset.root=/nonexistent/data"], "dataset.download=true"),
    "missing mini-imagenet": (["dataset=mini_imagenet", "dataset.root=/nonexistent/data"], "<split>/<wnid>"),
    "unknown command sweep option": (["-m", "algo=maml,foo"], "unknown algo 'foo'"),
    "unknown logger": (["logger=foo"], "unknown logger 'foo'"),
    "unknown experiment": (["experiment=foo"], "unknown experiment 'foo'"),
    "unknown algo key": (["algo=maml", "algo.inner_lrr=0.1"], "algo.inner_lrr"),
    "wrong bool": (["trainer.resume=maybe"], "'maybe' is not a valid bool"),
    "way that is not a number": (["task.n_way=five"], "task.n_way"),
    "zero queries": (["task.n_query=0"], "task.n_query=0 is out of range"),
    "negative steps": (["trainer.steps=-3"], "trainer.steps=-3 is out of range"),
    "zero meta-batch": (["trainer.meta_batch=0"], "trainer.meta_batch=0 is out of range"),
    "negative outer lr": (["trainer.optimizer.lr=-1"], "Invalid learning rate: -1"),
    "bad nonfinite policy": (["trainer.on_nonfinite=ignore"], "choose one of stop, skip"),
    "bad precision": (["trainer.precision=fp16"], "choose one of fp32, bf16"),
    "more training ways than classes": (["task.train_way=300"], "n_way=300 but the split has only 200 classes"),
    "snail with higher train way": (["algo=snail", "task.train_way=10"], "must equal task.n_way"),
    "unknown protonet distance": (["algo=protonet", "algo.distance=manhattan"], "algo.distance"),
    "negative fine-tuning lr": (["algo=baseline", "algo.finetune_lr=-1"], "algo.finetune_lr"),
    "unknown pooling": (["backbone.pool=avg"], "backbone.pool"),
    "read-only output dir": (["hydra.run.dir=/sys/metacli-run"], "cannot write into /sys"),
    "a meta-batch that cannot fit": (["trainer.meta_batch=1000000000"], "trainer.meta_batch=1000000000 needs at least"),
    "a meta-batch written as a float": (["trainer.meta_batch=1e9"], "could not be converted to Integer"),
    "test episodes that cannot fit": (["eval.episodes=1000000000"], "eval.episodes=1000000000 needs at least"),
    "images that cannot fit": (["dataset=omniglot", "dataset.image_size=2000"], "dataset.image_size=2000 needs at least"),
    "a crop that is not a bool": (["dataset=omniglot", "dataset.crop_to_ink=maybe"],
                                  "dataset.crop_to_ink='maybe'; use true or false"),
    "an evaluation batch that cannot fit": (["eval.batch_size=1000000000"], "eval.batch_size=1000000000 needs at least"),
    "validation episodes that cannot fit": (["trainer.val_episodes=1000000000"],
                                            "trainer.val_episodes=1000000000 needs at least"),
    "a multirun that prints its config": (["-m", "seed=0,1", "--cfg", "job"], "only one of --run, --multirun"),
    "a read-only sweep dir": (["-m", "seed=0,1", "hydra.sweep.dir=/sys/metacli-sweep"], "cannot write into /sys"),
    "an earlier metacli's execution key": (["algo=maml", "algo.task_threads=2"],
                                           "algo.task_threads is now execution.task_threads"),
    "zero task threads": (["execution.task_threads=0"], "execution.task_threads must be auto or a positive integer"),
    "a capture of a step that is not vectorised": (["execution.capture=true"],
                                                   "execution.capture=true needs a vectorised meta-batch"),
    "an unknown vectorize value": (["execution.vectorize=sometimes"], "execution.vectorize must be true, false or auto"),
    "a classifier on an environment": (["env=point_nav", "algo=protonet"],
                                       "ProtoNet cannot learn reinforcement tasks (env=point_nav): use one of "
                                       "algo=maml_rl"),
    "a meta-RL learner on a dataset": (["algo=maml_rl"], "MAMLRL cannot learn classification tasks (dataset="),
    "an image backbone for a policy": (["env=point_nav", "backbone=conv4"], "use backbone=mlp"),
    "an unknown environment": (["env=cartpole"], "unknown env 'cartpole': choose one of"),
    "an empty episode": (["env=point_nav", "env.horizon=0"], "cannot build env: horizon=0"),
    "an unknown locomotion task": (["env=half_cheetah", "env.kind=sideways"], "choose velocity"),
    "an unknown activation": (["env=point_nav", "backbone.activation=sigmoid"], "choose one of relu, tanh"),
    "no dataset": (["~dataset"], "no dataset to train on"),
    "Lake's protocol on a dataset without alphabets": (["eval.protocol=within_alphabet", "task.n_query=1"],
                                                       "and SyntheticGlyphs has no alphabets: use dataset=omniglot"),
    "Lake's protocol on sinusoids": (["dataset=sinusoid", "algo=maml", "eval.protocol=within_alphabet"],
                                     "and Sinusoid has no alphabets: use dataset=omniglot, or eval.protocol=episodes"),
    "Lake's protocol on an environment": (["env=point_nav", "eval.protocol=within_alphabet"],
                                          "and PointNavigation has no alphabets"),
    "Lake's training episodes on an environment": (["env=point_nav", "task.train_protocol=within_alphabet"],
                                                   "task.train_protocol=within_alphabet draws each episode from one "
                                                   "alphabet, and PointNavigation has no alphabets"),
    "image distortions of sinusoids": (["dataset=sinusoid", "algo=maml", "augment=affine"],
                                       "augment distorts training images, and Sinusoid's inputs are not images"),
    "image distortions of an environment": (["env=point_nav", "augment=affine"],
                                            "augment distorts training images, and PointNavigation's inputs are not"),
    "Lake's training episodes without alphabets": (["task.train_protocol=within_alphabet"],
                                                   "and SyntheticGlyphs has no alphabets: use dataset=omniglot, or "
                                                   "task.train_protocol=episodes"),
    "continual streams of sinusoids": (["dataset=sinusoid", "algo=maml", "eval.protocol=continual"],
                                       "eval.protocol=continual learns class-incremental streams of images, and "
                                       "Sinusoid has no image classes: use dataset=omniglot"),
    "generated images of an environment": (["env=point_nav", "eval.protocol=generative"],
                                           "eval.protocol=generative draws images of unseen classes, and "
                                           "PointNavigation has no image classes"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_override_is_one_line(name, tmp_path):
    args, expected = CASES[name]
    run_dir = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_cli("train", *args, *[f for f in FAST if f.split("=")[0] not in {a.split("=")[0] for a in args}],
                   *run_dir, cwd=tmp_path)
    assert_one_line_error(done, expected)
    assert not (tmp_path / "run").exists(), "a failed start left a run dir behind"


def test_lakes_protocol_with_five_shots_is_one_line(tmp_path, omniglot_root):
    done = run_cli("train", "dataset=omniglot", f"dataset.root={omniglot_root}", "eval.protocol=within_alphabet",
                   "task.k_shot=5", *[f for f in FAST if not f.startswith("dataset=")],
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(done, "set task.k_shot=1 task.n_query=1 (not 5 and 15)")
    assert not (tmp_path / "run").exists()


def test_corrupt_archive_is_one_line(tmp_path, omniglot_root):
    root = corrupt_omniglot_root(tmp_path, omniglot_root)
    done = run_cli("train", "dataset=omniglot", f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}",
                   "trainer.steps=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "images_background.zip" in lines[0] and "Traceback" not in done.stderr


def test_unknown_command_and_bad_eval_dir(tmp_path):
    done = run_cli("trian", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == \
        "metacli: error: unknown command 'trian': use one of train, eval, compare, report, embed-tasks, list (see metacli --help)"
    done = run_cli("eval", f"checkpoint={tmp_path}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert done.returncode == 2 and "not a metacli run dir" in done.stderr and "Traceback" not in done.stderr


def test_not_a_checkpoint_keeps_the_run_dir(finished_run, tmp_path):
    run = finished_run
    (run / "best.pt").write_bytes(b"not a checkpoint")
    done = run_cli("eval", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert done.returncode == 2 and "not a readable metacli checkpoint" in done.stderr
    assert (run / "results.json").is_file() and (run / "last.pt").is_file()


def test_full_error_shows_the_traceback(tmp_path):
    done = run_cli("train", *FAST, "device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                   env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "CUDA is not available" in done.stderr


# ---------------------------------------------------------------- data


def write_jpeg(path: Path, mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (84, 84, 3 if mode == "RGB" else 1), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    Image.fromarray(pixels.squeeze(-1).numpy(), mode).save(path)


def mini_imagenet_train_tree(root: Path) -> Path:
    """``mini-imagenet/train/<wnid>/*.jpg`` for the 64 pinned train classes, 600 images each: hard links to one
    JPEG, so the tree costs a second. Returns the first file decoded (first class, first name)."""
    source = root / "source.jpg"
    write_jpeg(source)
    for wnid in pinned_wnids("train"):
        folder = root / "mini-imagenet" / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(600):
            os.link(source, folder / f"{wnid}{i:08d}.jpg")
    first = pinned_wnids("train")[0]
    bad = root / "mini-imagenet" / "train" / first / f"{first}00000000.jpg"
    bad.unlink()  # a link: writing through it would change every image
    return bad


def train_on_mini_imagenet(root: Path, tmp_path: Path):
    return run_cli("train", "dataset=mini_imagenet", f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}",
                   "trainer.steps=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)


@pytest.mark.parametrize("dataset,needle", [("omniglot", "Omniglot not found"), ("mini_imagenet", "mini-ImageNet not found")])
def test_an_empty_data_dir_is_one_line(tmp_path, dataset, needle):
    root = tmp_path / "data"
    (root / ("omniglot" if dataset == "omniglot" else "mini-imagenet")).mkdir(parents=True)
    done = run_cli("train", f"dataset={dataset}", f"dataset.root={root}", "trainer.steps=1",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(done, needle)


def test_a_non_image_file_is_one_line(tmp_path):
    bad = mini_imagenet_train_tree(tmp_path / "data")
    bad.write_text("this is not a JPEG")
    assert_one_line_error(train_on_mini_imagenet(tmp_path / "data", tmp_path), f"cannot decode {bad.parent.name}/{bad.name}")


def test_a_grayscale_image_in_an_rgb_dataset_is_one_line(tmp_path):
    write_jpeg(mini_imagenet_train_tree(tmp_path / "data"), mode="L")
    assert_one_line_error(train_on_mini_imagenet(tmp_path / "data", tmp_path), "grayscale")


def test_an_image_bomb_is_one_line(tmp_path):
    mini_imagenet_train_tree(tmp_path / "data").write_bytes(png_bomb(9000, 9000))
    assert_one_line_error(train_on_mini_imagenet(tmp_path / "data", tmp_path), "declares 9000x9000 pixels")


def test_a_wrong_ravi_csv_is_one_line(tmp_path):
    base = tmp_path / "data" / "mini-imagenet"
    write_jpeg(base / "images" / "n0153282900000005.jpg")
    (base / "split-ravi").mkdir(parents=True)
    (base / "split-ravi" / "train.csv").write_text("image;class\nn0153282900000005.jpg;n01532829\n")
    assert_one_line_error(train_on_mini_imagenet(tmp_path / "data", tmp_path), "is not a Ravi split CSV")


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("finished")
    run = where / "run"
    done = run_cli("train", *FAST, "trainer.steps=2", f"hydra.run.dir={run}", cwd=where)
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def finished_run(trained_once, tmp_path) -> Path:
    """A finished run of its own for each test (a copy of one trained per module: training costs seconds)."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def assert_nothing_lost(run: Path, before: dict) -> None:
    after = snapshot(run)
    assert {name: after.get(name) for name in before} == before


@pytest.mark.parametrize("overrides,needle", [
    (["algo=maml"], "was trained with algo metacli.algorithms.protonet.ProtoNet, not metacli.algorithms.maml.MAML"),
    (["backbone.hidden=32"], "does not fit the ProtoNet"),
])
def test_resuming_a_checkpoint_of_another_network_is_one_line(finished_run, tmp_path, overrides, needle):
    before = snapshot(finished_run)
    done = run_cli("train", *FAST, "trainer.steps=4", *overrides, "trainer.resume=true", f"hydra.run.dir={finished_run}",
                   cwd=tmp_path)
    assert_one_line_error(done, needle)
    assert_nothing_lost(finished_run, before)


def test_truncated_checkpoints_are_one_line(finished_run, tmp_path):
    for name in ("best.pt", "last.pt", "last.pt.prev"):
        path = finished_run / name
        if path.exists():
            path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(finished_run)
    done = run_cli("eval", f"checkpoint={finished_run}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert_one_line_error(done, "is not a readable metacli checkpoint")
    done = run_cli("train", *FAST, "trainer.steps=4", "trainer.resume=true", f"hydra.run.dir={finished_run}",
                   cwd=tmp_path)
    assert_one_line_error(done, "is not a readable metacli checkpoint")
    assert_nothing_lost(finished_run, before)


def test_a_new_run_over_an_existing_one_is_refused(finished_run, tmp_path):
    before = snapshot(finished_run)
    done = run_cli("train", *FAST, f"hydra.run.dir={finished_run}", cwd=tmp_path)
    assert_one_line_error(done, "already holds a run (last.pt, last.pt.prev, best.pt")
    assert_nothing_lost(finished_run, before)


def test_an_eval_into_a_run_dir_is_refused_and_loses_nothing(finished_run, tmp_path):
    before = snapshot(finished_run)
    done = run_cli("eval", f"checkpoint={finished_run}", f"hydra.run.dir={finished_run}", cwd=tmp_path)
    assert_one_line_error(done, "already holds a run's records (last.pt, last.pt.prev, best.pt")
    assert snapshot(finished_run) == before


def test_an_eval_override_of_the_wrong_type_is_one_line(finished_run, tmp_path):
    done = run_cli("eval", f"checkpoint={finished_run}", "task.n_way=abc", f"hydra.run.dir={tmp_path / 'e'}",
                   cwd=tmp_path)
    assert_one_line_error(done, "task.n_way=abc: Value 'abc' of type 'str' could not be converted to Integer")
