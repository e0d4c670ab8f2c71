"""Every bad input ends with one line naming the problem and the fix, exit code 2, and no traceback."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import run_cli

FAST = ["trainer.steps=1", "trainer.val_every=1", "trainer.val_episodes=2", "eval.episodes=2", "dataset=synthetic",
        "device=cpu", "trainer.progress=false"]


def corrupt_omniglot_root(tmp_path: Path, shared_data: Path) -> Path:
    root = tmp_path / "corrupt"
    (root / "omniglot").mkdir(parents=True)
    shutil.copy(shared_data / "omniglot" / "images_evaluation.zip", root / "omniglot")
    data = (shared_data / "omniglot" / "images_background.zip").read_bytes()
    (root / "omniglot" / "images_background.zip").write_bytes(data[: len(data) // 3])
    return root


CASES = {
    "unknown algo": (["algo=reptil"], "unknown algo 'reptil'"),
    "unknown dataset": (["dataset=imagenet"], "unknown dataset 'imagenet'"),
    "unknown backbone": (["backbone=vgg"], "unknown backbone 'vgg'"),
    "unknown device": (["device=tpu"], "unknown device 'tpu'"),
    "unknown key": (["trainer.stepz=3"], "trainer.stepz"),
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
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_override_is_one_line(name, tmp_path):
    args, expected = CASES[name]
    done = run_cli("train", *args, *[f for f in FAST if f.split("=")[0] not in {a.split("=")[0] for a in args}],
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metacli: error: "), done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stdout + done.stderr


def test_corrupt_archive_is_one_line(tmp_path, shared_data):
    root = corrupt_omniglot_root(tmp_path, shared_data)
    done = run_cli("train", "dataset=omniglot", f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}",
                   "trainer.steps=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "images_background.zip" in lines[0] and "Traceback" not in done.stderr


def test_unknown_command_and_bad_eval_dir(tmp_path):
    done = run_cli("trian", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == \
        "metacli: error: unknown command 'trian': use one of train, eval (see metacli --help)"
    done = run_cli("eval", f"checkpoint={tmp_path}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert done.returncode == 2 and "not a metacli run dir" in done.stderr and "Traceback" not in done.stderr


def test_not_a_checkpoint_keeps_the_run_dir(tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run / "best.pt").write_bytes(b"not a checkpoint")
    done = run_cli("eval", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert done.returncode == 2 and "not a readable metacli checkpoint" in done.stderr
    assert (run / "results.json").is_file() and (run / "last.pt").is_file()


def test_full_error_shows_the_traceback(tmp_path):
    done = run_cli("train", *FAST, "device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                   env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "CUDA is not available" in done.stderr
