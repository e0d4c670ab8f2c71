"""Where the tests find real data: $METACLI_TEST_DATA, then ../shared/data, then the download folder (downloading
Omniglot there when it can); mini-ImageNet tests are skipped with a one-line reason where it is absent, and fail
instead under .ci/run (METACLI_REQUIRE_REAL_DATA=1). Checked by running pytest on a copy of this conftest in a
checkout-like folder that has no ../shared."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = '''
def test_omniglot(omniglot_root):
    print("OMNIGLOT", omniglot_root)

def test_mini_imagenet(mini_imagenet_root):
    print("MINI", mini_imagenet_root)
'''


@pytest.fixture
def bare_checkout(tmp_path) -> Path:
    tests = tmp_path / "checkout" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests)
    (tests / "test_probe.py").write_text(PROBE)
    return tests


def probe(tests: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("METACLI_TEST_DATA", "METACLI_REQUIRE_REAL_DATA")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider", str(tests)],
                          cwd=tests, capture_output=True, text=True, timeout=300, env={**clean, **env})


def test_the_download_folder_is_the_last_place_looked(bare_checkout, omniglot_root, tmp_path):
    downloads = tmp_path / "downloads" / "omniglot"
    downloads.mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        (downloads / name).symlink_to(omniglot_root / "omniglot" / name)
    done = probe(bare_checkout, METACLI_DATA=str(downloads.parent))
    assert f"OMNIGLOT {downloads.parent}" in done.stdout, done.stdout
    # No mini-ImageNet anywhere: skipped, with the reason on one line.
    assert "1 passed, 1 skipped" in done.stdout and "SKIPPED [1]" in done.stdout
    assert "needs mini-ImageNet (mini-imagenet/mini-imagenet-84-val.tar.xz)" in done.stdout
    # Under .ci/run the same absence fails.
    required = probe(bare_checkout, METACLI_DATA=str(downloads.parent), METACLI_REQUIRE_REAL_DATA="1")
    assert required.returncode == 1 and "1 passed, 1 error" in required.stdout


def test_metacli_test_data_comes_first(bare_checkout, omniglot_root, mini_imagenet_root, tmp_path):
    done = probe(bare_checkout, METACLI_TEST_DATA=str(mini_imagenet_root), METACLI_DATA=str(tmp_path / "empty"))
    assert done.returncode == 0 and f"MINI {mini_imagenet_root}" in done.stdout, done.stdout


def test_omniglot_found_nowhere_is_downloaded_or_fails_saying_where(bare_checkout, tmp_path):
    done = probe(bare_checkout, METACLI_DATA=str(tmp_path / "empty"))
    if done.returncode == 0:  # a machine with internet: downloaded, md5-checked, into the download folder
        assert f"OMNIGLOT {tmp_path / 'empty'}" in done.stdout
        assert (tmp_path / "empty" / "omniglot" / "images_evaluation.zip").is_file()
    else:
        assert "real-data tests need Omniglot" in done.stdout and "downloading it failed" in done.stdout
        assert not (tmp_path / "empty" / "omniglot" / "images_evaluation.zip").exists()
