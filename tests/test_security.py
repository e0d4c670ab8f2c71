"""Saved runs are data: no run dir, checkpoint or cache an attacker can write makes metacli run code, and every
damaged one is refused (or rebuilt) with one line.

Each payload test first shows that its payload does run code when trusted (a control marker appears), then that
``metacli eval`` and ``load_learner`` refuse it with one line and no marker appears.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import assert_one_line_error, run_cli
from metacli import load_learner
from metacli.reliability.checkpoint import (LAST, CheckpointError, load_checkpoint, load_latest_good, previous,
                                           save_checkpoint)
from metacli.cli import config_dir
from metacli.data.base import ClassImages
from metacli.data.cache import cache_path, cached_split
from metacli.data.mini_imagenet import index_archives, pinned_wnids
from metacli.data.omniglot import decode_zip
from metacli.errors import DataError
from metacli.saved_config import BUILDABLE

FAST = ["experiment=smoke", "trainer.steps=2", "trainer.val_every=1", "trainer.val_episodes=2", "eval.episodes=2",
        "trainer.progress=false"]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("trained")
    done = run_cli("train", *FAST, f"hydra.run.dir={where / 'run'}", cwd=where)
    assert done.returncode == 0, done.stderr
    return where / "run"


@pytest.fixture
def run(trained_once, tmp_path) -> Path:
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def evaluate(run: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    return run_cli("eval", f"checkpoint={run}", *extra, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, env=env)


def edit_config(run: Path, change) -> None:
    config = run / ".hydra" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    change(data)
    config.write_text(yaml.safe_dump(data))


# ---------------------------------------------------------------- the registry


def targets(node) -> set[str]:
    """The ``_target_``s a run's saved config can hold: Hydra's own section (callbacks, sweepers) is never saved
    with it."""
    if isinstance(node, dict):
        own = {node["_target_"]} if "_target_" in node else set()
        return own | {t for key, value in node.items() if key != "hydra" for t in targets(value)}
    return {t for value in node for t in targets(value)} if isinstance(node, list) else set()


def test_the_registry_holds_every_shipped_target_and_only_classes():
    shipped = {t for path in config_dir().rglob("*.yaml") for t in targets(yaml.safe_load(path.read_text()))}
    assert len(shipped) > 20 and shipped <= BUILDABLE, shipped - BUILDABLE
    for target in BUILDABLE:
        module, name = target.rsplit(".", 1)
        assert isinstance(getattr(__import__(module, fromlist=[name]), name), type), target


# ---------------------------------------------------------------- payloads that run code when trusted


class Exploit:
    """A pickle that runs a command when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickle_bomb(marker: Path) -> str:
    """A file that runs ``touch marker`` when a loader unpickles it."""
    path = marker.with_suffix(".pt")
    torch.save({"x": Exploit(marker)}, path)
    return str(path)


def attribute_path(marker: Path) -> dict:
    """A dotted path that starts with ``metacli.`` and walks through a module attribute to a loader that unpickles
    the file it is given."""
    return {"_target_": "metacli.reliability.checkpoint.torch.load", "f": pickle_bomb(marker), "weights_only": False}


def resolver_node(marker: Path) -> str:
    """``oc.create`` makes a node with a ``_target_`` when the config is resolved: no walk of the file sees it."""
    return f"${{oc.create:{{_target_: torch.load, f: '{pickle_bomb(marker)}', weights_only: false}}}}"


def reference_to_target(marker: Path) -> dict:
    return {"_target_": "${algo.payload}", "f": pickle_bomb(marker), "weights_only": False}


PAYLOADS = {
    "attribute path": (attribute_path, lambda cfg, p: cfg.__setitem__("dataset", p), "dataset._target_"),
    "resolver-created node": (resolver_node, lambda cfg, p: cfg.__setitem__("dataset", p), "oc.create"),
    "nested in a list": (attribute_path, lambda cfg, p: cfg["algo"].__setitem__("extra", [p]), "algo.extra.0._target_"),
    "target by reference": (reference_to_target,
                            lambda cfg, p: (cfg["algo"].__setitem__("payload", "torch.load"), cfg.__setitem__("dataset", p)),
                            "dataset._target_=${algo.payload}"),
}


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_a_payload_in_a_saved_config_runs_nothing(run, tmp_path, name):
    make, place, needle = PAYLOADS[name]
    control = tmp_path / "control-marker"
    # The control: trusted, the payload does run a command.
    trusted = OmegaConf.create({"node": make(control), "algo": {"payload": "torch.load"}})
    instantiate(OmegaConf.to_container(trusted, resolve=True)["node"])
    assert control.exists(), "the payload must be a real one"

    marker = tmp_path / "marker"
    edit_config(run, lambda cfg: place(cfg, make(marker)))
    assert_one_line_error(evaluate(run, tmp_path), needle)
    with pytest.raises(CheckpointError, match="saved config"):
        load_learner(run)
    assert not marker.exists()


def test_an_environment_resolver_is_refused_without_leaking_the_secret(run, tmp_path):
    secret = "metacli-secret-4d1e"
    edit_config(run, lambda cfg: cfg["eval"].__setitem__("episodes", "${oc.env:METACLI_TEST_SECRET}"))
    line = assert_one_line_error(evaluate(run, tmp_path, env={"METACLI_TEST_SECRET": secret}), "never call a resolver")
    assert secret not in line


# ---------------------------------------------------------------- damaged configs and file names


CONFIG_DAMAGE = {
    "empty": (lambda text: "", "no algo, backbone, dataset, device, task, trainer, eval section"),
    "truncated": (lambda text: text[: len(text) // 3] + "  episodes: [", "is not valid YAML"),
    "not a mapping": (lambda text: "- 1\n- 2\n", "is a ListConfig, not a run's config"),
    "binary": (lambda text: "\x00\x01\x02", "is not valid YAML"),
    "python tag": (lambda text: text + "x: !!python/object/apply:os.system ['true']\n", "is not valid YAML"),
    "oversized": (lambda text: text + "# " + "x" * (1 << 20) + "\n", "too large for a metacli config"),
    "unknown key": (lambda text: text + "extra_section: 1\n", "does not fit metacli's train config"),
    "dangling reference": (lambda text: text.replace("seed: 0", "seed: ${nowhere.at_all}"),
                           "does not fit metacli's train config"),
}


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_a_damaged_saved_config_is_one_line(run, tmp_path, damage):
    change, needle = CONFIG_DAMAGE[damage]
    config = run / ".hydra" / "config.yaml"
    config.write_text(change(config.read_text()))
    assert_one_line_error(evaluate(run, tmp_path), needle)


def test_file_names_stay_inside_the_run_dir(run, tmp_path):
    assert_one_line_error(evaluate(run, tmp_path, "which=../../outside"), "which='../../outside' names no checkpoint")
    outside = tmp_path / "elsewhere.pt"
    shutil.move(run / "best.pt", outside)
    (run / "best.pt").symlink_to(outside)
    assert_one_line_error(evaluate(run, tmp_path), "leads outside the run dir")


def test_a_saved_wandb_run_id_cannot_name_a_path(run, tmp_path):
    (run / "wandb_run_id.txt").write_text("../../escaped")
    done = run_cli("train", *FAST, "trainer.steps=3", "trainer.resume=true", "logger=wandb", f"hydra.run.dir={run}",
                   cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert_one_line_error(done, "not a W&B run id")
    assert not (tmp_path / "escaped").exists()


def test_eval_without_a_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_cli("eval", cwd=tmp_path), "metacli eval needs the run to re-test: metacli eval checkpoint=RUN_DIR")


# ---------------------------------------------------------------- checkpoints


def payload_of(path: Path) -> dict:
    return load_checkpoint(path)


CHECKPOINT_DAMAGE = {
    "pickle payload": (None, "is not a readable metacli checkpoint"),
    "a list, not a dict": (lambda state: [state], "a list instead of a dict"),
    "older format (no origin)": (lambda state: {k: v for k, v in state.items() if k != "origin"}, "no 'origin'"),
    "tensor where a dict belongs": (lambda state: {**state, "optimizer": torch.zeros(3)}, "'optimizer' is a Tensor"),
    "learner entry not a tensor": (lambda state: {**state, "learner": {"w": "text"}}, "learner entry 'w' is not a tensor"),
    "a wall time that is not a number": (lambda state: {**state, "wall_seconds": "x"}, "'wall_seconds' is a str"),
    "generator states without the episodes'": (lambda state: {**state, "rng": {"python": 1}}, "no 'episodes'"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_one_line(run, tmp_path, damage):
    change, needle = CHECKPOINT_DAMAGE[damage]
    marker = tmp_path / "marker"
    if change is None:
        torch.save({"learner": Exploit(marker), "step": 1}, run / "best.pt")
    else:
        save_checkpoint(change(payload_of(run / "best.pt")), run / "best.pt")
    assert_one_line_error(evaluate(run, tmp_path), needle)
    assert not marker.exists()


def test_resume_falls_back_from_an_incomplete_checkpoint(run, tmp_path):
    good = payload_of(run / LAST)
    save_checkpoint({k: v for k, v in good.items() if k != "rng"}, run / LAST)  # the good one becomes .prev
    assert payload_of(previous(run / LAST))["step"] == good["step"]
    done = run_cli("train", *FAST, "trainer.steps=4", "trainer.resume=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no 'rng'" in done.stdout + done.stderr and "resuming from the previous good checkpoint" in \
        done.stdout + done.stderr
    assert payload_of(run / LAST)["step"] == 4


def test_a_checkpoint_of_another_dataset_is_refused(run, tmp_path):
    other = tmp_path / "other"
    done = run_cli("train", *FAST, "dataset.seed=1", f"hydra.run.dir={other}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shutil.copy(other / "best.pt", run / "best.pt")
    line = assert_one_line_error(evaluate(run, tmp_path), "was trained with dataset")
    assert "seed=1" in line and "seed=0" in line and "evaluate the run dir that wrote it" in line
    with pytest.raises(CheckpointError, match="was trained with dataset"):
        load_learner(run)


# ---------------------------------------------------------------- the decoded-tensor cache


def images(seed: int = 0) -> ClassImages:
    pixels = torch.randint(0, 256, (3, 4, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return ClassImages(images=pixels, class_names=["a", "b", "c"])


def alter(path: Path) -> None:
    blob = torch.load(path, weights_only=True)
    blob["images"][1, 2, 0, 3, 3] ^= 0xFF
    torch.save(blob, path)


def zero(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = data.find(bytes(images().images.flatten()[:16].tolist()))
    assert start > 0, "the image bytes are stored verbatim in the file"
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))


def resize(path: Path) -> None:
    blob = torch.load(path, weights_only=True)
    blob["images"] = blob["images"][:, :2].clone()
    torch.save(blob, path)


@pytest.mark.parametrize("damage", [alter, zero, resize], ids=["altered", "zeroed", "resized"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    builds = []

    def build() -> ClassImages:
        builds.append(1)
        return images()

    first = cached_split(tmp_path, "toy", "train", 8, build)
    damage(cache_path(tmp_path, "toy", "train", 8))
    with caplog.at_level("WARNING"):
        again = cached_split(tmp_path, "toy", "train", 8, build)
    assert len(builds) == 2 and torch.equal(again.images, first.images)
    assert "rebuilding the cache" in caplog.text
    assert torch.equal(cached_split(tmp_path, "toy", "train", 8, build).images, first.images) and len(builds) == 2


def test_the_cache_dir_is_private(tmp_path):
    cached_split(tmp_path / "fresh" / "cache", "toy", "train", 8, images)
    assert (tmp_path / "fresh" / "cache").stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- archives and decompression bombs


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` RGB pixels, in well under a kilobyte: decoding it would
    allocate what the header declares."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4096)))
            + chunk(b"IEND", b""))


PEAK_MEMORY = """
import resource, sys
from pathlib import Path
from metacli.errors import DataError
from metacli.data.omniglot import decode_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_folder(Path(sys.argv[1]), "background", 28)
except DataError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, "MiB")
"""


def test_an_image_bomb_is_refused_before_it_is_decoded(tmp_path):
    folder = tmp_path / "omniglot" / "images_background"
    character = folder / "Alphabet" / "character01"
    character.mkdir(parents=True)
    for i in range(20):
        (character / f"0001_{i:02d}.png").write_bytes(png_bomb(9000, 9000))  # 243 MB each, decoded
    assert len(png_bomb(9000, 9000)) < 1024
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(folder)], capture_output=True, text=True)
    message, growth = done.stdout.strip().splitlines()
    assert "0001_00.png is refused: it declares 9000x9000 pixels, more than 1024 a side" in message
    assert int(growth.split()[0]) < 100, f"the refusal itself took {growth}"


def test_an_oversized_zip_member_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(20):  # zeros: 2 MiB declared in a few kilobytes
            archive.writestr(f"images_background/Alphabet/character01/0001_{i:02d}.png", bytes(2 << 20))
    with pytest.raises(DataError, match=r"0001_00.png is refused: it is 2097152 bytes, more than the 1048576"):
        decode_zip(path, "background", 28)


def test_an_oversized_tar_member_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "mini-imagenet-84-val.tar.xz"
    wnid = pinned_wnids("val")[0]
    with tarfile.open(path, "w:xz", preset=0) as archive:
        member = tarfile.TarInfo(f"val/{wnid}/{wnid}00000001.jpg")
        member.size = 17 << 20
        archive.addfile(member, io.BytesIO(bytes(member.size)))
    with pytest.raises(DataError, match=rf"{wnid}00000001.jpg is refused: it is 17825792 bytes, more than"):
        index_archives([path], "val", pinned_wnids("val"), 84)


def test_an_archive_with_too_many_images_per_class_is_refused(tmp_path):
    path = tmp_path / "mini-imagenet-84-val.tar.xz"
    wnid = pinned_wnids("val")[0]
    jpeg = io.BytesIO()
    Image.new("RGB", (84, 84)).save(jpeg, "JPEG")
    with tarfile.open(path, "w:xz", preset=0) as archive:
        for i in range(4):
            member = tarfile.TarInfo(f"val/{wnid}/{wnid}{i:08d}.jpg")
            member.size = len(jpeg.getvalue())
            archive.addfile(member, io.BytesIO(jpeg.getvalue()))
    with pytest.raises(DataError, match=f"class {wnid} has more than 3 images"):
        index_archives([path], "val", pinned_wnids("val"), 84, per_class=3)
