"""Meta-training on the real Omniglot from ../shared/data learns: held-out accuracy far above chance."""
from __future__ import annotations

import io
import json
import random
import zipfile

import torch
from PIL import Image

from conftest import run_cli
from metacli import load_learner


def test_protonet_learns_on_real_omniglot(omniglot_root, tmp_path):
    run_dir = tmp_path / "protonet"
    done = run_cli("train", "algo=protonet", "dataset=omniglot", f"dataset.root={omniglot_root}", "device=cpu",
                   "trainer.steps=150", "trainer.meta_batch=2", "trainer.val_every=75", "trainer.val_episodes=50",
                   "eval.episodes=200", "trainer.progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"]["split"] == "vinyals" and results["episodes"] == 200
    log = (run_dir / "train.log").read_text()  # where the data came from, whichever root found it
    for kind in ("background", "evaluation"):
        assert f"Omniglot images_{kind} from {omniglot_root / 'omniglot' / f'images_{kind}.zip'}" in log, log
    # 5-way chance is 20%; 150 steps reach ~85%, so 65% leaves room for noise but not for a broken learner.
    assert results["accuracy"] - results["ci95"] > 0.65, results

    # The Python API on raw PNGs of evaluation-set characters (never trained on), read straight from the zip.
    learner = load_learner(run_dir)
    archive = zipfile.ZipFile(omniglot_root / "omniglot" / "images_evaluation.zip")
    by_character: dict[str, list[str]] = {}
    for name in archive.namelist():
        if name.endswith(".png"):
            by_character.setdefault(name.rsplit("/", 1)[0], []).append(name)
    rng = random.Random(0)
    correct = total = 0
    for _ in range(10):
        characters = rng.sample(sorted(by_character), 5)
        support, labels, queries, truth = [], [], [], []
        for label, character in enumerate(characters):
            files = rng.sample(sorted(by_character[character]), 4)
            images = [Image.open(io.BytesIO(archive.read(f))) for f in files]
            support.append(images[0])
            labels.append(label)
            queries += images[1:]
            truth += [label] * 3
        predicted = learner.predict(support, labels, queries)
        correct += (predicted == torch.tensor(truth)).sum().item()
        total += len(truth)
    assert correct / total > 0.6, correct / total
