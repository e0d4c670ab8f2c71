import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason in the summary, where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


REPO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Set by .ci/run: there a real-data test that cannot find its data fails instead of being skipped.
REQUIRE_DATA = os.environ.get("METACLI_REQUIRE_REAL_DATA") == "1"


def data_candidates() -> list[Path]:
    """Where tests look for real data, in order: $METACLI_TEST_DATA, the checkout's ../shared/data, and the folder
    ``dataset.download=true`` downloads into ($METACLI_DATA, else ~/.cache/metacli)."""
    from metacli.data.base import default_root

    given = os.environ.get("METACLI_TEST_DATA")
    return [*([Path(given)] if given else []), REPO_DATA, default_root()]


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """A data root holding omniglot/images_{background,evaluation}.zip: the first of :func:`data_candidates` that
    has them, else the download folder after downloading them (md5-checked). Omniglot can always be downloaded, so
    a test needing it fails, never skips, when that is impossible."""
    from metacli.data import omniglot
    from metacli.errors import DataError

    names = [f"images_{kind}.zip" for kind in omniglot.KINDS]
    for root in data_candidates():
        if all((root / "omniglot" / name).is_file() for name in names):
            return root
    root = data_candidates()[-1]
    try:
        for kind in omniglot.KINDS:
            if not (root / "omniglot" / f"images_{kind}.zip").is_file():
                omniglot.download_url(omniglot.URL.format(kind=kind), root / "omniglot" / f"images_{kind}.zip",
                                      omniglot.OFFICIAL_MD5[kind])
    except DataError as exc:
        pytest.fail(f"real-data tests need Omniglot ({', '.join(names)}) in one of "
                    f"{', '.join(str(c / 'omniglot') for c in data_candidates())}, and downloading it failed: {exc}")
    return root


@pytest.fixture(scope="session")
def mini_imagenet_root() -> Path:
    """A data root holding mini-imagenet/mini-imagenet-84-val.tar.xz, from :func:`data_candidates`. No official
    download exists, so elsewhere its tests are skipped, saying why (and fail under .ci/run, which has the data)."""
    for root in data_candidates():
        if (root / "mini-imagenet" / "mini-imagenet-84-val.tar.xz").is_file():
            return root
    reason = ("needs mini-ImageNet (mini-imagenet/mini-imagenet-84-val.tar.xz) under $METACLI_TEST_DATA or "
              f"{REPO_DATA}; it has no official download")
    if REQUIRE_DATA:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Keep caches and W&B files out of the home dir; CLI subprocesses inherit these variables."""
    root = tmp_path_factory.mktemp("env")
    values = {"METACLI_CACHE": str(root / "cache"), "WANDB_DIR": str(root / "wandb"),
              "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_CONFIG_DIR": str(root / "wandb-config"),
              "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_SILENT": "true"}
    saved = {key: os.environ.get(key) for key in [*values, "WANDB_API_KEY", "WANDB_MODE", "HYDRA_FULL_ERROR"]}
    for key in ("WANDB_API_KEY", "WANDB_MODE", "HYDRA_FULL_ERROR"):
        os.environ.pop(key, None)
    os.environ.update(values)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def metacli_command() -> str:
    """The console script installed beside the running interpreter (what users type)."""
    return str(Path(sys.executable).with_name("metacli"))


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([metacli_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def straight_and_resumed(common: list[str], tmp_path: Path, straight_args: tuple[str, ...] = (),
                         env: dict | None = None) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """The results of two runs of ``common``: 8 steps straight (with ``straight_args`` too), and 4 steps then resumed
    to 8; with the resumed run's finished process."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for args in ([*common, "trainer.steps=8", *straight_args, f"hydra.run.dir={straight}"],
                 [*common, "trainer.steps=4", f"hydra.run.dir={resumed}"],
                 [*common, "trainer.steps=8", "trainer.resume=true", f"hydra.run.dir={resumed}"]):
        done = run_cli("train", *args, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
    first, second = (json.loads((run / "results.json").read_text()) for run in (straight, resumed))
    return first, second, done


def assert_one_line_error(done: subprocess.CompletedProcess, needle: str) -> str:
    """Bad input's promise: exit code 2, one ``metacli: error:`` line holding ``needle``, no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metacli: error: ") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if os.environ.get("METACLI_ERROR_LOG"):  # collects every case's line, e.g. for a release note
        with open(os.environ["METACLI_ERROR_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').rsplit(' ', 1)[0]}\t{lines[0]}\n")
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file's bytes under ``folder`` but logs and the lock (which holds the last owner's pid)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".log" and p.name != ".metacli.lock"}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions: one thread is as fast, reproducible, and not slowed by spinning against other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def glyphs():
    """Synthetic glyph classes for the learning tests (100 train, 10 val, 30 test classes of 20 images)."""
    from metacli.data.synthetic import SyntheticGlyphs

    return SyntheticGlyphs(classes={"train": 100, "val": 10, "test": 30}, per_class=20, image_size=28, seed=0)
