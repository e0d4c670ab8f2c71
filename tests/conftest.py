import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data: $METACLI_TEST_DATA, else <repo>/../shared/data. Missing data fails, never skips."""
    path = Path(os.environ.get("METACLI_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    missing = [name for name in ("images_background.zip", "images_evaluation.zip") if not (path / "omniglot" / name).is_file()]
    if missing:
        pytest.fail(f"real-data tests need {', '.join(missing)} under {path / 'omniglot'}; "
                    "set METACLI_TEST_DATA to the folder holding omniglot/ and mini-imagenet/")
    return path
