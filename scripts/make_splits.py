"""Regenerate the pinned split files and Omniglot content digests under metacli/data/splits/ from the raw data.

Usage: python scripts/make_splits.py [--data DIR]   (DIR holds omniglot/*.zip and mini-imagenet/split-ravi/*.csv;
default $METACLI_DATA). The outputs are committed; this script documents how they were made and checks the counts.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metacli.data.base import default_root  # noqa: E402
from metacli.data.download import contents_digest, zip_entries  # noqa: E402

OUT = REPO / "metacli" / "data" / "splits"

# Vinyals et al. (2016) / Snell et al. (2017): 5 background alphabets held out for validation.
VAL_ALPHABETS = {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
# Their test set: these evaluation alphabets, plus the last 4 Gurmukhi characters (the first 41 go to train).
VINYALS_TEST_ALPHABETS = {"Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
                          "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG"}
VINYALS_TEST_EXTRA = {f"Gurmukhi/character{n:02d}" for n in range(42, 46)}


def omniglot_characters(zip_path: Path, kind: str) -> tuple[list[str], dict]:
    """Sorted ``<alphabet>/<characterNN>`` names of one archive, and its contents.json record."""
    entries = zip_entries(zip_path, prefix=f"images_{kind}/", suffix=".png")
    per_char: dict[str, int] = {}
    for name, _, _ in entries:
        _, alphabet, character, _ = name.split("/")
        per_char[f"{alphabet}/{character}"] = per_char.get(f"{alphabet}/{character}", 0) + 1
    assert set(per_char.values()) == {20}, f"{zip_path}: not 20 drawings per character"
    record = {
        "pngs": len(entries),
        "characters": len(per_char),
        "sha256": contents_digest(entries),
        "digest_of": "sorted lines 'name<TAB>crc32 as 8 hex<TAB>size' of the images_<kind>/**.png members",
        "alphabets": sorted({c.split("/")[0] for c in per_char}),
    }
    return sorted(per_char), record


def write_split(folder: Path, split: str, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.txt").write_text("".join(f"{n}\n" for n in sorted(names)))


def make_omniglot(data: Path) -> None:
    background, bg_record = omniglot_characters(data / "omniglot" / "images_background.zip", "background")
    evaluation, ev_record = omniglot_characters(data / "omniglot" / "images_evaluation.zip", "evaluation")
    assert (bg_record["pngs"], ev_record["pngs"]) == (19280, 13180)
    assert (len(background), len(evaluation)) == (964, 659)

    def alphabet(name: str) -> str:
        return name.split("/")[0]

    val = [c for c in background if alphabet(c) in VAL_ALPHABETS]
    test = [c for c in evaluation if alphabet(c) in VINYALS_TEST_ALPHABETS or c in VINYALS_TEST_EXTRA]
    train = [c for c in background + evaluation if c not in set(val) | set(test)]
    assert (len(train), len(val), len(test)) == (1028, 172, 423), (len(train), len(val), len(test))
    for split, names in (("train", train), ("val", val), ("test", test)):
        write_split(OUT / "omniglot" / "vinyals", split, names)

    lake_train = [c for c in background if alphabet(c) not in VAL_ALPHABETS]
    assert (len(lake_train), len(val), len(evaluation)) == (792, 172, 659)
    for split, names in (("train", lake_train), ("val", val), ("test", evaluation)):
        write_split(OUT / "omniglot" / "background_evaluation", split, names)

    contents = {"images_background": bg_record, "images_evaluation": ev_record}
    (OUT / "omniglot" / "contents.json").write_text(json.dumps(contents, indent=2) + "\n")


def make_mini_imagenet(data: Path) -> None:
    expected = {"train": 64, "val": 16, "test": 20}
    seen: set[str] = set()
    for split, n in expected.items():
        with open(data / "mini-imagenet" / "split-ravi" / f"{split}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        wnids = sorted({row["label"] for row in rows})
        assert len(wnids) == n and len(rows) == 600 * n, (split, len(wnids), len(rows))
        assert not seen & set(wnids)
        seen |= set(wnids)
        write_split(OUT / "mini_imagenet" / "ravi", split, wnids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_root())
    args = parser.parse_args()
    make_omniglot(args.data)
    make_mini_imagenet(args.data)
    print(f"wrote splits under {OUT}")


if __name__ == "__main__":
    main()
