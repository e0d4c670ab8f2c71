"""The wheel ships conf/ and the split files, and a non-editable install finds them."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_install_finds_configs_and_splits(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, text=True)
    wheel = next((tmp_path / "dist").glob("metacli-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for group in ("algo", "dataset", "backbone", "device", "logger", "experiment", "augment"):
        for path in (REPO / "conf" / group).glob("*.yaml"):
            assert f"metacli/conf/{group}/{path.name}" in names
    assert {"metacli/conf/train.yaml", "metacli/conf/eval.yaml", "metacli/data/splits/omniglot/contents.json",
            "metacli/data/splits/omniglot/vinyals/test.txt", "metacli/data/splits/mini_imagenet/ravi/val.txt",
            "metacli/published.yaml", "metacli/models/kernels/coordinate_lstm.cpp"} <= names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    probe = ("import metacli.cli as c, hydra; from metacli.config_schema import register; register(); d = c.config_dir();"
             "hydra.initialize_config_dir(config_dir=str(d), version_base='1.3');"
             "cfg = hydra.compose('train', overrides=['algo=maml', 'dataset=mini_imagenet']);"
             "from metacli.data.mini_imagenet import pinned_wnids; print(d, cfg.algo._target_, len(pinned_wnids('test')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr
    config_dir, target_name, test_classes = done.stdout.split()
    assert Path(config_dir) == target / "metacli" / "conf"
    assert target_name == "metacli.algorithms.maml.MAML" and test_classes == "20"
