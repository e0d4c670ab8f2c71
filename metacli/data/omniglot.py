"""Omniglot (Lake et al. 2015): 1,623 handwritten characters x 20 drawings, split by pinned character lists.

Each archive (background, evaluation) is decoded once into a uint8 cache; a split is then a selection of
characters by name, with each character's 90-degree rotations added as extra classes.
"""
from __future__ import annotations

import json
import logging
import zipfile
import zlib
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from metacli.data.base import (ClassImages, FewShotDataset, check_member_size, default_cache_dir, default_root,
                               open_bounded, pil_to_uint8)
from metacli.data.cache import cached_split
from metacli.data.download import contents_digest, download_url, zip_entries
from metacli.errors import ConfigError, DataError
from metacli.logging.progress import Progress

log = logging.getLogger(__name__)

KINDS = ("background", "evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_{kind}.zip"
OFFICIAL_MD5 = {"background": "68d2efa1b9178cc56df9314c21c6e718", "evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
SPLIT_NAMES = ("vinyals", "background_evaluation")
DRAWINGS = 20
SPLITS_DIR = Path(__file__).parent / "splits" / "omniglot"
# The official drawings are 105x105 PNGs of at most 486 bytes: bounds far above them, and far below a bomb.
MAX_PNG_BYTES = 1 << 20
MAX_SIDE = 1024
# crop_to_ink keeps a border of this fraction of the strokes' longer extent on every side, so that no stroke
# touches the edge after the resize.
INK_MARGIN = 0.1


@lru_cache(maxsize=None)
def pinned_contents() -> dict:
    """contents.json: per archive, the PNG count, the contents digest and the alphabets it holds."""
    return json.loads((SPLITS_DIR / "contents.json").read_text())


def pinned_characters(split_name: str, split: str) -> list[str]:
    return (SPLITS_DIR / split_name / f"{split}.txt").read_text().split()


def archive_of(character: str) -> str:
    alphabet = character.split("/")[0]
    for kind in KINDS:
        if alphabet in pinned_contents()[f"images_{kind}"]["alphabets"]:
            return kind
    raise DataError(f"Omniglot alphabet {alphabet!r} is in no archive; the split files under {SPLITS_DIR} are damaged")


def _fix(kind: str) -> str:
    return f"delete it and re-run with dataset.download=true, or put the official images_{kind}.zip there"


def ink_square(image: Image.Image, margin: float = INK_MARGIN) -> Image.Image:
    """The square of a drawing (dark strokes on white) centred on its strokes, as wide as their longer extent plus
    ``margin`` of it on each side; white where the square passes the canvas's edge. A blank drawing is kept whole.

    Drawers place and size a character differently on the 105-pixel canvas: cropping removes both and spends every
    pixel of a small resize on the strokes.
    """
    # Inverted, the strokes are the non-zero pixels and a crop past the edge fills with background (zero).
    strokes = ImageOps.invert(image.convert("L"))
    box = strokes.getbbox()
    if box is None:
        return image
    left, top, right, bottom = box
    side = round(max(right - left, bottom - top) * (1 + 2 * margin))
    x0, y0 = round((left + right - side) / 2), round((top + bottom - side) / 2)
    return ImageOps.invert(strokes.crop((x0, y0, x0 + side, y0 + side)))


def encode_drawing(image: Image.Image, size: int, crop_to_ink: bool) -> torch.Tensor:
    """One drawing as a ``1 x size x size`` uint8 tensor, strokes bright on black: training's and predict's path."""
    return pil_to_uint8(ink_square(image) if crop_to_ink else image, "L", size, invert=True)


def _decode_members(names: list[str], read: Callable[[str], bytes], kind: str, size: int, crop_to_ink: bool,
                    where: Path) -> tuple[ClassImages, list[tuple[str, int, int]]]:
    """Decode PNG members ``images_<kind>/<alphabet>/<character>/<file>.png`` into one class per character.

    Returns the images and the ``(name, CRC32, size)`` entries of the bytes actually read, so a folder source can be
    checked against the pinned digest without a second pass.
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        parts = name.split("/")
        if len(parts) != 4:
            raise DataError(f"{where}: unexpected member {name!r} (want images_{kind}/<alphabet>/<character>/<file>.png); "
                            f"{_fix(kind)}")
        groups.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
    classes = sorted(groups)
    for character in classes:
        if len(groups[character]) != DRAWINGS:
            raise DataError(f"{where}: {character} has {len(groups[character])} drawings, expected {DRAWINGS}; {_fix(kind)}")
    images = torch.empty(len(classes), DRAWINGS, 1, size, size, dtype=torch.uint8)
    entries = []
    with Progress(f"decode {where.name}", total=len(classes), unit="characters") as progress:
        for c, character in enumerate(classes):
            for i, name in enumerate(groups[character]):
                try:
                    data = read(name)
                    entries.append((name, zlib.crc32(data), len(data)))
                    with open_bounded(data, MAX_SIDE) as image:
                        images[c, i] = encode_drawing(image, size, crop_to_ink)
                except ValueError as exc:
                    raise DataError(f"{where}: {name} is refused: {exc}; {_fix(kind)}") from None
            progress.advance()
    return ClassImages(images=images, class_names=classes), entries


def decode_zip(path: Path, kind: str, size: int, crop_to_ink: bool = False) -> ClassImages:
    """Decode one official archive; zipfile checks every member's CRC32 as it is read."""
    def read(archive: zipfile.ZipFile, name: str) -> bytes:
        check_member_size(archive.getinfo(name).file_size, MAX_PNG_BYTES)  # zipfile reads no more than declared
        return archive.read(name)

    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.startswith(f"images_{kind}/") and n.endswith(".png")]
            data, _ = _decode_members(names, partial(read, archive), kind, size, crop_to_ink, path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); {_fix(kind)}") from None
    return data


def decode_folder(folder: Path, kind: str, size: int, crop_to_ink: bool = False) -> ClassImages:
    """Decode an extracted ``images_<kind>/`` folder and check it against the pinned contents digest."""
    names = [f"images_{kind}/{p.relative_to(folder).as_posix()}" for p in folder.glob("*/*/*.png")]

    def read(name: str) -> bytes:
        path = folder.parent / name
        check_member_size(path.stat().st_size, MAX_PNG_BYTES)
        return path.read_bytes()

    try:
        data, entries = _decode_members(names, read, kind, size, crop_to_ink, folder)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{folder} holds an unreadable image ({exc}); replace the folder with the official "
                        f"images_{kind}.zip") from None
    expected = pinned_contents()[f"images_{kind}"]
    if contents_digest(entries) != expected["sha256"]:
        raise DataError(f"{folder} differs from the official Omniglot images_{kind} ({len(entries)} PNGs, expected "
                        f"{expected['pngs']}, or changed files); replace the folder with the official images_{kind}.zip")
    return data


def verify_zip(path: Path, kind: str) -> None:
    """Compare the archive's (name, CRC32, size) listing with the pinned digest: reads only the central directory."""
    try:
        entries = zip_entries(path, prefix=f"images_{kind}/", suffix=".png")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a readable zip ({exc}); {_fix(kind)}") from None
    expected = pinned_contents()[f"images_{kind}"]
    if len(entries) != expected["pngs"] or contents_digest(entries) != expected["sha256"]:
        raise DataError(f"{path} does not hold the official Omniglot images ({len(entries)} PNGs, expected "
                        f"{expected['pngs']}, or changed files); {_fix(kind)}")


class Omniglot(FewShotDataset):
    """Omniglot with the ``vinyals`` (1028/172/423 characters) or ``background_evaluation`` (792/172/659) split.

    ``rotations`` turns each character into that many classes (1: as drawn; 4: also rotated 90, 180, 270 degrees).
    Class names are ``<alphabet>/<characterNN>`` for the unrotated character and ``.../rot090`` etc. for rotations.
    ``crop_to_ink`` crops every drawing to the square around its strokes (:func:`ink_square`) before the resize.
    """

    name = "omniglot"
    has_alphabets = True
    channels = 1
    # Measured over the 964 background characters at 28 px: ink covers about 8% of the canvas, 14% cropped to it.
    mean = (0.0815,)
    std = (0.2359,)
    cropped_mean = (0.1370,)
    cropped_std = (0.3031,)

    def __init__(self, root: str | None = None, split: str = "vinyals", image_size: int = 28, rotations: int = 4,
                 download: bool = False, cache_dir: str | None = None, crop_to_ink: bool = False) -> None:
        super().__init__()
        if split not in SPLIT_NAMES:
            raise ConfigError(f"dataset.split={split!r} is not an Omniglot split; use one of {', '.join(SPLIT_NAMES)}")
        if not isinstance(rotations, int) or not 1 <= rotations <= 4:
            raise ConfigError(f"dataset.rotations={rotations!r}; use 1 (no rotation) to 4 (0/90/180/270 degrees)")
        if not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"dataset.image_size={image_size!r}; use an integer of at least 8 (28 is standard)")
        if not isinstance(crop_to_ink, bool):
            raise ConfigError(f"dataset.crop_to_ink={crop_to_ink!r}; use true or false")
        self.root = Path(root).expanduser() if root else default_root()
        self.split_name, self.image_size, self.rotations, self.download = split, image_size, rotations, bool(download)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.crop_to_ink = crop_to_ink
        if self.crop_to_ink:
            self.mean, self.std = self.cropped_mean, self.cropped_std
        self._archives: dict[str, ClassImages] = {}

    def _locate(self, kind: str) -> Path | None:
        base = self.root / "omniglot"
        for candidate in (base / f"images_{kind}.zip", self.root / f"images_{kind}.zip"):
            if candidate.is_file():
                return candidate
        for candidate in (base / f"images_{kind}", self.root / f"images_{kind}"):
            if candidate.is_dir():
                return candidate
        return None

    def archive(self, kind: str) -> ClassImages:
        """All characters of one archive, decoded once and cached as ``omniglot-<kind>[-ink]-<size>px-v*.pt``."""
        if kind in self._archives:
            return self._archives[kind]
        source = self._locate(kind)
        if source is None:
            if not self.download:
                raise DataError(f"Omniglot not found: put images_background.zip and images_evaluation.zip in "
                                f"{self.root / 'omniglot'}/ (or set dataset.root / METACLI_DATA), or add dataset.download=true")
            source = download_url(URL.format(kind=kind), self.root / "omniglot" / f"images_{kind}.zip", OFFICIAL_MD5[kind])
        log.info("Omniglot images_%s from %s", kind, source)
        if source.is_file():
            # Checked on every load, not only when decoding: the cache is trusted only for the pinned contents.
            verify_zip(source, kind)
            build = lambda: decode_zip(source, kind, self.image_size, self.crop_to_ink)  # noqa: E731
        else:
            build = lambda: decode_folder(source, kind, self.image_size, self.crop_to_ink)  # noqa: E731
        name = f"{kind}-ink" if self.crop_to_ink else kind
        self._archives[kind] = cached_split(self.cache_dir, "omniglot", name, self.image_size, build)
        return self._archives[kind]

    def split_shape(self, name: str) -> tuple[int, int]:
        return len(pinned_characters(self.split_name, name)) * self.rotations, DRAWINGS

    def decoded_bytes(self) -> int:
        # The splits are drawn from both archives, which stay decoded beside them.
        archives = sum(pinned_contents()[f"images_{kind}"]["pngs"] for kind in KINDS) * self.image_size ** 2
        return super().decoded_bytes() + archives

    def load_split(self, name: str) -> ClassImages:
        characters = pinned_characters(self.split_name, name)
        archives = {kind: self.archive(kind) for kind in KINDS if any(archive_of(c) == kind for c in characters)}
        index = {kind: {n: i for i, n in enumerate(data.class_names)} for kind, data in archives.items()}
        picked = []
        for character in characters:
            kind = archive_of(character)
            if character not in index[kind]:
                raise DataError(f"Omniglot character {character} is missing from images_{kind}; {_fix(kind)}")
            picked.append(archives[kind].images[index[kind][character]])
        images = torch.stack(picked)  # [chars, 20, 1, H, W]
        rotated = torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(self.rotations)], dim=1)
        names = [c if r == 0 else f"{c}/rot{90 * r:03d}" for c in characters for r in range(self.rotations)]
        return ClassImages(images=rotated.flatten(0, 1).contiguous(), class_names=names)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        return encode_drawing(image, self.image_size, self.crop_to_ink)

    def describe(self) -> dict:
        described = {**super().describe(), "split": self.split_name, "rotations": self.rotations}
        # Only when set, so that the fingerprints of the runs made before the option stay valid.
        return {**described, "crop_to_ink": True} if self.crop_to_ink else described
