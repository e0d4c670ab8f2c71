"""Real-data layer against the shared Omniglot and mini-ImageNet files: splits, cache, verification, download."""
from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import io
import re
import shutil
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

import metacli.data.mini_imagenet as mini_module
import metacli.data.omniglot as omniglot_module
from metacli.data.base import SPLITS
from metacli.data.cache import cache_path
from metacli.data.download import download_url
from metacli.data.mini_imagenet import MiniImageNet, decode_split, pinned_wnids
from metacli.data.omniglot import Omniglot
from metacli.errors import DataError


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Decoded tensors for this session: tests never write into ~/.cache."""
    return tmp_path_factory.mktemp("tensor-cache")


@pytest.fixture(scope="session")
def vinyals(omniglot_root, cache_dir):
    """The Vinyals split with 4 rotations, decoded once for the session (both archives), and how long that took."""
    dataset = Omniglot(root=str(omniglot_root), split="vinyals", rotations=4, cache_dir=str(cache_dir))
    start = time.perf_counter()
    splits = {name: dataset.split(name) for name in SPLITS}
    return dataset, splits, time.perf_counter() - start


def base_character(class_name: str) -> str:
    return re.sub(r"/rot\d{3}$", "", class_name)


def serve(folder: Path):
    """A quiet http.server on 127.0.0.1 (random port) in a thread; returns (base url, server)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


# ---------------------------------------------------------------- Omniglot


def test_vinyals_split_sizes(vinyals):
    _, splits, elapsed = vinyals
    assert elapsed < 60, f"decoding 32,460 Omniglot PNGs took {elapsed:.1f}s"
    for name, characters in (("train", 1028), ("val", 172), ("test", 423)):
        data = splits[name]
        assert data.images.shape == (characters * 4, 20, 1, 28, 28)
        assert data.images.dtype == torch.uint8
        assert len(set(data.class_names)) == data.n_classes
        assert data.images.float().mean() < 60, "strokes must be bright on a dark background"


def test_rotations_are_new_classes(vinyals):
    _, splits, _ = vinyals
    data = splits["val"]
    assert data.class_names[:4] == ["Armenian/character01", "Armenian/character01/rot090",
                                    "Armenian/character01/rot180", "Armenian/character01/rot270"]
    for r in range(4):
        assert torch.equal(data.images[r], torch.rot90(data.images[0], r, dims=(-2, -1)))


def test_vinyals_splits_are_disjoint(vinyals):
    _, splits, _ = vinyals
    bases = {name: {base_character(c) for c in data.class_names} for name, data in splits.items()}
    assert len(bases["train"]) + len(bases["val"]) + len(bases["test"]) == 1623
    assert not bases["train"] & bases["val"] and not bases["train"] & bases["test"] and not bases["val"] & bases["test"]
    assert {c.split("/")[0] for c in bases["val"]} == {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
    assert sorted(c for c in bases["test"] if c.startswith("Gurmukhi/")) == [f"Gurmukhi/character{n}" for n in range(42, 46)]


def test_background_evaluation_split(vinyals, omniglot_root, cache_dir):
    dataset = Omniglot(root=str(omniglot_root), split="background_evaluation", rotations=1, cache_dir=str(cache_dir))
    splits = {name: dataset.split(name) for name in SPLITS}
    assert [splits[n].n_classes for n in SPLITS] == [792, 172, 659]
    names = {n: set(splits[n].class_names) for n in SPLITS}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    evaluation = set(omniglot_module.pinned_contents()["images_evaluation"]["alphabets"])
    assert {c.split("/")[0] for c in names["test"]} == evaluation
    assert not {c.split("/")[0] for c in names["train"] | names["val"]} & evaluation


def test_second_load_comes_from_cache(vinyals, omniglot_root, cache_dir):
    _, splits, _ = vinyals
    for kind in ("background", "evaluation"):
        assert cache_path(cache_dir, "omniglot", kind, 28).is_file()
    start = time.perf_counter()
    again = Omniglot(root=str(omniglot_root), split="vinyals", rotations=4, cache_dir=str(cache_dir)).split("train")
    assert time.perf_counter() - start < 5
    assert torch.equal(again.images, splits["train"].images)
    assert again.class_names == splits["train"].class_names


def first_validation_drawing(omniglot_root: Path) -> Image.Image:
    """The raw PNG of the first drawing of the first validation class (Armenian character01), as predict gets it."""
    with zipfile.ZipFile(omniglot_root / "omniglot" / "images_background.zip") as archive:
        first = min(n for n in archive.namelist() if n.startswith("images_background/Armenian/character01/") and n.endswith(".png"))
        return Image.open(io.BytesIO(archive.read(first)))


def test_encode_image_matches_the_cache(vinyals, omniglot_root):
    dataset, splits, _ = vinyals
    assert torch.equal(dataset.encode_image(first_validation_drawing(omniglot_root)), splits["val"].images[0, 0])


def test_ink_square_centres_the_strokes_on_a_white_square():
    canvas = Image.new("L", (105, 105), 255)
    canvas.paste(0, (90, 2, 100, 22))  # strokes 10 wide and 20 high, near the right edge
    square = omniglot_module.ink_square(canvas)
    assert square.size == (24, 24)  # the longer extent plus a tenth of it on each side
    assert ImageOps.invert(square).getbbox() == (7, 2, 17, 22)  # centred
    assert square.getpixel((23, 10)) == 255  # past the canvas's right edge: background, not ink
    blank = Image.new("L", (105, 105), 255)
    assert omniglot_module.ink_square(blank) is blank


def test_crop_to_ink_is_its_own_cache_and_predict_path(omniglot_root, cache_dir):
    """Cropped drawings are cached apart from the plain ones, recorded in the fingerprint, and encode_image (what
    predict uses on raw images) crops the same way the decoder did."""
    dataset = Omniglot(root=str(omniglot_root), split="background_evaluation", rotations=1, cache_dir=str(cache_dir),
                       crop_to_ink=True)
    val = dataset.split("val")
    assert cache_path(cache_dir, "omniglot", "background-ink", 28).is_file()
    assert dataset.describe()["crop_to_ink"] is True
    assert "crop_to_ink" not in Omniglot(root=str(omniglot_root), cache_dir=str(cache_dir)).describe()
    assert torch.equal(dataset.encode_image(first_validation_drawing(omniglot_root)), val.images[0, 0])
    # Spread over the canvas, the strokes cover more of it than in the plain 28-px drawing (8% of the pixels' ink).
    assert val.images.float().mean() / 255 > 0.12


def root_with_evaluation_zip(tmp_path: Path, evaluation_bytes: bytes) -> Path:
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "images_evaluation.zip").write_bytes(evaluation_bytes)
    return tmp_path


def load_evaluation(root: Path, cache_dir: Path) -> None:
    Omniglot(root=str(root), split="background_evaluation", cache_dir=str(cache_dir)).split("test")


def test_truncated_zip_is_rejected(omniglot_root, cache_dir, tmp_path):
    with open(omniglot_root / "omniglot" / "images_evaluation.zip", "rb") as fh:
        root = root_with_evaluation_zip(tmp_path, fh.read(1 << 20))
    # The session cache already holds the evaluation tensors: the archive must still be checked.
    with pytest.raises(DataError, match="images_evaluation.zip") as info:
        load_evaluation(root, cache_dir)
    assert "\n" not in str(info.value) and "download=true" in str(info.value)


def test_non_zip_is_rejected(cache_dir, tmp_path):
    root = root_with_evaluation_zip(tmp_path, b"<html>rate limited</html>\n")
    with pytest.raises(DataError, match="images_evaluation.zip"):
        load_evaluation(root, cache_dir)


def test_zip_with_a_png_removed_is_rejected(omniglot_root, cache_dir, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(omniglot_root / "omniglot" / "images_evaluation.zip") as src, \
            zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        members = [n for n in src.namelist() if n.endswith(".png")]
        for name in members[1:]:
            dst.writestr(name, src.read(name))
    root = root_with_evaluation_zip(tmp_path, buffer.getvalue())
    with pytest.raises(DataError, match="13179 PNGs, expected 13180"):
        load_evaluation(root, cache_dir)


def test_damaged_member_fails_the_crc_check(omniglot_root, tmp_path):
    data = bytearray((omniglot_root / "omniglot" / "images_evaluation.zip").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        first = min((i for i in archive.infolist() if i.filename.endswith(".png")), key=lambda i: i.filename)
    # Local header: 30 bytes, then the name and the extra field, whose lengths sit at offsets 26 and 28.
    name_len = int.from_bytes(data[first.header_offset + 26:first.header_offset + 28], "little")
    extra_len = int.from_bytes(data[first.header_offset + 28:first.header_offset + 30], "little")
    start = first.header_offset + 30 + name_len + extra_len
    data[start + first.compress_size // 2] ^= 0xFF  # central directory untouched, so only decoding can notice
    root = root_with_evaluation_zip(tmp_path, bytes(data))
    with pytest.raises(DataError, match="images_evaluation.zip is corrupt"):
        load_evaluation(root, tmp_path / "fresh-cache")


def test_missing_omniglot_says_how_to_get_it(tmp_path, cache_dir):
    with pytest.raises(DataError, match="download=true") as info:
        Omniglot(root=str(tmp_path / "nowhere"), cache_dir=str(cache_dir)).split("train")
    assert "images_background.zip" in str(info.value) and "\n" not in str(info.value)


def test_extracted_folder_is_accepted(omniglot_root, tmp_path):
    with zipfile.ZipFile(omniglot_root / "omniglot" / "images_evaluation.zip") as archive:
        archive.extractall(tmp_path / "omniglot")
    dataset = Omniglot(root=str(tmp_path), split="background_evaluation", rotations=1, cache_dir=str(tmp_path / "cache"))
    assert dataset.split("test").images.shape == (659, 20, 1, 28, 28)
    next((tmp_path / "omniglot" / "images_evaluation" / "ULOG" / "character01").glob("*.png")).unlink()
    with pytest.raises(DataError, match="images_evaluation"):
        Omniglot(root=str(tmp_path), split="background_evaluation", cache_dir=str(tmp_path / "cache2")).split("test")


# ---------------------------------------------------------------- download


@pytest.fixture
def http_folder(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    url, server = serve(folder)
    yield folder, url
    server.shutdown()
    server.server_close()


def test_download_with_matching_md5(http_folder, tmp_path):
    folder, url = http_folder
    payload = bytes(range(256)) * 5000
    (folder / "blob.bin").write_bytes(payload)
    target = tmp_path / "out" / "blob.bin"
    download_url(f"{url}/blob.bin", target, hashlib.md5(payload).hexdigest())
    assert target.read_bytes() == payload
    assert not target.with_name("blob.bin.part").exists()


def test_download_with_wrong_md5_leaves_nothing(http_folder, tmp_path):
    folder, url = http_folder
    (folder / "blob.bin").write_bytes(b"not what you asked for")
    target = tmp_path / "out" / "blob.bin"
    with pytest.raises(DataError, match="md5"):
        download_url(f"{url}/blob.bin", target, "0" * 32)
    assert list(target.parent.iterdir()) == []
    with pytest.raises(DataError, match="could not download"):
        download_url(f"{url}/absent.bin", target, "0" * 32)
    assert list(target.parent.iterdir()) == []


def test_omniglot_download_flow(http_folder, omniglot_root, cache_dir, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="metacli.progress")
    folder, url = http_folder
    shutil.copy(omniglot_root / "omniglot" / "images_evaluation.zip", folder)
    md5 = hashlib.md5((folder / "images_evaluation.zip").read_bytes()).hexdigest()
    monkeypatch.setattr(omniglot_module, "URL", url + "/images_{kind}.zip")
    monkeypatch.setattr(omniglot_module, "OFFICIAL_MD5", {"background": "0" * 32, "evaluation": md5})
    root = tmp_path / "root"
    data = Omniglot(root=str(root), split="background_evaluation", rotations=1, download=True,
                    cache_dir=str(cache_dir)).split("test")
    assert data.n_classes == 659
    assert sorted(p.name for p in (root / "omniglot").iterdir()) == ["images_evaluation.zip"]
    mib = (folder / "images_evaluation.zip").stat().st_size / 2 ** 20
    assert f"download images_evaluation.zip: {mib:.1f}/{mib:.1f} MiB (100%)" in caplog.text


# ---------------------------------------------------------------- mini-ImageNet


def test_mini_imagenet_val_from_archives(mini_imagenet_root, tmp_path, monkeypatch):
    opened = []
    real_open = tarfile.open

    def spy(name=None, *args, **kwargs):
        opened.append(Path(name).name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(mini_module.tarfile, "open", spy)
    dataset = MiniImageNet(root=str(mini_imagenet_root), cache_dir=str(tmp_path))
    start = time.perf_counter()
    data = dataset.split("val")
    elapsed = time.perf_counter() - start
    assert opened == ["mini-imagenet-84-val.tar.xz"], "only the requested split may be decompressed"
    assert elapsed < 60, f"decoding mini-ImageNet val took {elapsed:.1f}s"
    assert data.images.shape == (16, 600, 3, 84, 84) and data.images.dtype == torch.uint8
    assert data.class_names == pinned_wnids("val")
    assert cache_path(tmp_path, "mini-imagenet", "val", 84).is_file()
    assert torch.equal(MiniImageNet(root=str(mini_imagenet_root), cache_dir=str(tmp_path)).split("val").images, data.images)
    assert opened == ["mini-imagenet-84-val.tar.xz"], "the second load must come from the cache"


def test_pinned_ravi_lists():
    lists = {s: pinned_wnids(s) for s in SPLITS}
    assert [len(lists[s]) for s in SPLITS] == [64, 16, 20]
    assert len(set().union(*lists.values())) == 100


def write_jpeg(path: Path, mode: str = "RGB", size: int = 84, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = torch.randint(0, 256, (size, size, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    Image.fromarray(pixels, mode).save(path, quality=95)


@pytest.fixture
def tiny_tree(tmp_path):
    """``mini-imagenet/val/<wnid>/*.jpg``: 2 pinned val wnids with 3 JPEGs each (one 100 px, to exercise the resize)."""
    base = tmp_path / "mini-imagenet"
    wnids = pinned_wnids("val")[:2]
    for w, wnid in enumerate(wnids):
        for i in range(3):
            write_jpeg(base / "val" / wnid / f"{wnid}{i:08d}.jpg", size=100 if i == 0 else 84, seed=10 * w + i)
    return base, wnids


def test_tree_layout(tiny_tree):
    base, wnids = tiny_tree
    data = decode_split(base, "val", wnids, 84, per_class=None)
    assert data.images.shape == (2, 3, 3, 84, 84) and data.class_names == wnids
    with Image.open(base / "val" / wnids[1] / f"{wnids[1]}00000002.jpg") as image:
        assert torch.equal(MiniImageNet(image_size=84).encode_image(image), data.images[1, 2])


def test_tree_missing_wnids_are_reported(tiny_tree, tmp_path):
    base, _ = tiny_tree
    with pytest.raises(DataError, match="14 of 16 classes are missing"):
        MiniImageNet(root=str(base.parent), cache_dir=str(tmp_path / "cache")).split("val")


def test_tree_grayscale_image_is_rejected(tiny_tree):
    base, wnids = tiny_tree
    (base / "val" / wnids[0] / f"{wnids[0]}00000000.jpg").unlink()
    write_jpeg(base / "val" / wnids[0] / f"{wnids[0]}00000000.jpg", mode="L")
    with pytest.raises(DataError, match="grayscale"):
        decode_split(base, "val", wnids, 84, per_class=None)


def test_tree_wnid_outside_the_split_is_rejected(tiny_tree, tmp_path):
    base, wnids = tiny_tree
    intruder = pinned_wnids("train")[0]
    write_jpeg(base / "val" / intruder / "x.jpg")
    with pytest.raises(DataError, match=f"{intruder} is not in the pinned Ravi split"):
        MiniImageNet(root=str(base.parent), cache_dir=str(tmp_path / "cache")).split("val")


def test_tree_unequal_class_sizes_are_rejected(tiny_tree):
    base, wnids = tiny_tree
    write_jpeg(base / "val" / wnids[1] / "extra.jpg")
    with pytest.raises(DataError, match="has 4 images, expected 3"):
        decode_split(base, "val", wnids, 84, per_class=None)


def test_ravi_csv_layout(tmp_path):
    base = tmp_path / "mini-imagenet"
    wnids = pinned_wnids("test")[:2]
    rows = ["filename,label"]
    for w, wnid in enumerate(wnids):
        for i in range(2):
            name = f"{wnid}{i:08d}.jpg"
            write_jpeg(base / "images" / name, size=120, seed=w * 10 + i)
            rows.append(f"{name},{wnid}")
    (base / "split-ravi").mkdir()
    (base / "split-ravi" / "test.csv").write_text("\n".join(rows) + "\n")
    data = decode_split(base, "test", wnids, 84, per_class=None)
    assert data.images.shape == (2, 2, 3, 84, 84) and data.class_names == wnids


def test_missing_mini_imagenet(tmp_path):
    with pytest.raises(DataError, match="<split>/<wnid>") as info:
        MiniImageNet(root=str(tmp_path), cache_dir=str(tmp_path / "cache")).split("test")
    assert str(tmp_path / "mini-imagenet") in str(info.value) and "\n" not in str(info.value)


def test_truncated_mini_imagenet_archive(mini_imagenet_root, tmp_path):
    base = tmp_path / "mini-imagenet"
    base.mkdir()
    with open(mini_imagenet_root / "mini-imagenet" / "mini-imagenet-84-val.tar.xz", "rb") as fh:
        (base / "mini-imagenet-84-val.tar.xz").write_bytes(fh.read(1 << 20))
    with pytest.raises(DataError, match="mini-imagenet-84-val.tar.xz is corrupt or truncated") as info:
        MiniImageNet(root=str(tmp_path), cache_dir=str(tmp_path / "cache")).split("val")
    assert "\n" not in str(info.value)
