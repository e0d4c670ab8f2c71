"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64/16/20 classes x 600 RGB images.

There is no official download; the images are read from whichever local layout is present (a folder tree, the
``.tar.xz`` archives read as a stream, or the original ``images/`` folder with the Ravi CSVs) and cached per split.
"""
from __future__ import annotations

import csv
import logging
import lzma
import tarfile
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from metacli.data.base import (ClassImages, FewShotDataset, check_member_size, default_cache_dir, default_root,
                               open_bounded, pil_to_uint8)
from metacli.data.cache import cache_path, cached_split
from metacli.errors import ConfigError, DataError
from metacli.logging.progress import Progress

log = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).parent / "splits" / "mini_imagenet" / "ravi"
PER_CLASS = 600
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The 84x84 JPEGs take a few kilobytes; bounds that admit full-resolution ImageNet files, and refuse a bomb.
MAX_IMAGE_BYTES = 16 << 20
MAX_SIDE = 4096

# Where each image of a split comes from: wnid -> file name -> a path, or the image already decoded from an archive.
Index = dict[str, dict[str, "Path | torch.Tensor"]]


def pinned_wnids(split: str) -> list[str]:
    return (SPLITS_DIR / f"{split}.txt").read_text().split()


def not_found_message(base: Path) -> str:
    return (f"mini-ImageNet not found under {base}: put the Ravi-split images there as <split>/<wnid>/*.jpg (84x84), "
            "or the mini-imagenet-84-<split>*.tar.xz archives, or images/ with the Ravi CSVs; no official download exists")


def find_source(base: Path, split: str) -> tuple[str, list[Path]] | None:
    """The first layout present for ``split``: ("tree", [dir]), ("archives", [tar.xz...]) or ("ravi", [images, csv])."""
    tree = base / split
    if tree.is_dir() and any(p.is_dir() for p in tree.iterdir()):
        return "tree", [tree]
    archives = sorted(base.glob(f"mini-imagenet-84-{split}.tar.xz")) + sorted(base.glob(f"mini-imagenet-84-{split}-part*.tar.xz"))
    if archives:
        return "archives", archives
    for table in (base / f"{split}.csv", base / "split-ravi" / f"{split}.csv"):
        if (base / "images").is_dir() and table.is_file():
            return "ravi", [base / "images", table]
    return None


def index_tree(folder: Path) -> Index:
    return {d.name: {f.name: f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES}
            for d in folder.iterdir() if d.is_dir()}


def index_archives(archives: list[Path], split: str, wnids: list[str], image_size: int,
                   per_class: int | None = PER_CLASS, progress: Progress | None = None) -> Index:
    """Decode ``<split>/<wnid>/<file>`` members as the archives stream past: nothing is extracted to disk, and
    only one member's bytes are held at a time. A member of another class, past ``per_class`` images of its
    class, or over :data:`MAX_IMAGE_BYTES` is refused before it is read."""
    index: Index = {}
    known = set(wnids)
    for path in archives:
        try:
            with tarfile.open(path, mode="r|xz") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                        continue
                    parts = member.name.split("/")
                    if len(parts) != 3 or parts[0] != split:
                        raise DataError(f"{path} holds {member.name!r}, expected {split}/<wnid>/<file>.jpg; "
                                        f"it is not a mini-ImageNet {split} archive")
                    wnid, name = parts[1], parts[2]
                    if wnid not in known:
                        raise DataError(f"{path}: class {wnid} is not in the pinned Ravi split; it is not a "
                                        f"mini-ImageNet {split} archive")
                    images = index.setdefault(wnid, {})
                    if per_class is not None and len(images) >= per_class and name not in images:
                        raise DataError(f"{path}: class {wnid} has more than {per_class} images; it is not a "
                                        f"mini-ImageNet {split} archive")
                    try:
                        check_member_size(member.size, MAX_IMAGE_BYTES)
                    except ValueError as exc:
                        raise DataError(f"{path}: {member.name} is refused: {exc}; replace the archive") from None
                    images[name] = decode_image(tar.extractfile(member).read(), path.name, wnid, name, image_size)
                    if progress is not None:
                        progress.advance()
        except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
            raise DataError(f"{path} is corrupt or truncated ({exc}); replace it with an intact copy") from None
    return index


def index_ravi(images: Path, table: Path) -> Index:
    index: Index = {}
    try:
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                index.setdefault(row["label"], {})[row["filename"]] = images / row["filename"]
    except (OSError, KeyError, csv.Error) as exc:
        raise DataError(f"{table} is not a Ravi split CSV with the header filename,label ({exc})") from None
    return index


def decode_index(index: Index, wnids: list[str], image_size: int, where: str,
                 per_class: int | None = PER_CLASS, progress: Progress | None = None) -> ClassImages:
    """Check ``index`` holds exactly ``wnids`` with ``per_class`` images each (equal counts when None), then decode.

    Classes follow ``wnids``' order and images are sorted by file name, so the tensor does not depend on the layout.
    """
    extra = sorted(set(index) - set(wnids))
    if extra:
        raise DataError(f"{where}: class {extra[0]} is not in the pinned Ravi split ({len(extra)} such classes); "
                        "remove it or put it under its own split")
    missing = sorted(set(wnids) - set(index))
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(wnids)} classes are missing, e.g. {missing[0]}; "
                        "add them (is an archive part missing?)")
    counts = {wnid: len(index[wnid]) for wnid in wnids}
    want = per_class if per_class is not None else counts[wnids[0]]
    odd = [w for w in wnids if counts[w] != want]
    if odd:
        raise DataError(f"{where}: class {odd[0]} has {counts[odd[0]]} images, expected {want} like every class")
    images = torch.empty(len(wnids), want, 3, image_size, image_size, dtype=torch.uint8)
    for c, wnid in enumerate(wnids):
        for i, name in enumerate(sorted(index[wnid])):
            source = index[wnid][name]
            if isinstance(source, torch.Tensor):  # decoded as its archive streamed past
                images[c, i] = source
                continue
            images[c, i] = decode_image(source, where, wnid, name, image_size)
            if progress is not None:
                progress.advance()
    return ClassImages(images=images, class_names=list(wnids))


def decode_image(source: Path | bytes, where: str, wnid: str, name: str, image_size: int) -> torch.Tensor:
    """One RGB image as uint8 ``3 x image_size x image_size``; anything else is a one-line DataError."""
    try:
        if isinstance(source, Path):
            check_member_size(source.stat().st_size, MAX_IMAGE_BYTES)
        with open_bounded(source, MAX_SIDE) as image:
            if image.mode != "RGB":
                raise DataError(f"{where}: {wnid}/{name} is {'grayscale' if image.mode in ('L', '1') else 'not RGB'} "
                                f"(mode {image.mode}); every mini-ImageNet image must be RGB")
            return pil_to_uint8(image, "RGB", image_size)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode {wnid}/{name} ({exc}); replace that file") from None


def decode_split(base: Path, split: str, wnids: list[str], image_size: int,
                 per_class: int | None = PER_CLASS) -> ClassImages:
    """Decode ``split`` from the first layout found under ``base`` (a ``.../mini-imagenet`` folder)."""
    found = find_source(base, split)
    if found is None:
        raise DataError(not_found_message(base))
    layout, paths = found
    total = None if per_class is None else len(wnids) * per_class
    with Progress(f"decode mini-ImageNet {split}", total=total, unit="images") as progress:
        if layout == "tree":
            index = index_tree(paths[0])
        elif layout == "archives":
            index = index_archives(paths, split, wnids, image_size, per_class, progress)
        else:
            index = index_ravi(*paths)
        where = str(paths[0]) if layout != "archives" else ", ".join(p.name for p in paths)
        data = decode_index(index, wnids, image_size, where, per_class, progress)
    return data


class MiniImageNet(FewShotDataset):
    """mini-ImageNet, Ravi split (train 64, val 16, test 20 classes of 600 images), cached per split."""

    name = "mini-imagenet"
    channels = 3
    # Measured over the 38,400 train images at 84 px.
    mean = (0.4710, 0.4503, 0.4053)
    std = (0.2717, 0.2648, 0.2785)

    def __init__(self, root: str | None = None, image_size: int = 84, cache_dir: str | None = None) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"dataset.image_size={image_size!r}; use an integer of at least 8 (84 is standard)")
        self.root = Path(root).expanduser() if root else default_root()
        self.image_size = image_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    @property
    def base(self) -> Path:
        return self.root / "mini-imagenet"

    def split_shape(self, name: str) -> tuple[int, int]:
        return len(pinned_wnids(name)), PER_CLASS

    def load_split(self, name: str) -> ClassImages:
        # Missing data is reported even when a cache exists: the cache never stands in for the source.
        found = find_source(self.base, name)
        if found is None:
            raise DataError(not_found_message(self.base))
        log.info("mini-ImageNet %s from %s", name, found[1][0])
        wnids = pinned_wnids(name)

        def build() -> ClassImages:
            return decode_split(self.base, name, wnids, self.image_size)

        data = cached_split(self.cache_dir, "mini-imagenet", name, self.image_size, build)
        if data.class_names != wnids or data.per_class != PER_CLASS:
            log.warning("cached mini-ImageNet %s does not match the pinned split; rebuilding", name)
            cache_path(self.cache_dir, "mini-imagenet", name, self.image_size).unlink(missing_ok=True)
            data = cached_split(self.cache_dir, "mini-imagenet", name, self.image_size, build)
        return data

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(image, "RGB", self.image_size)

    def describe(self) -> dict:
        return {**super().describe(), "split": "ravi"}
