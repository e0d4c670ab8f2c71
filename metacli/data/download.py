"""Download a file with an md5 check and an atomic rename, and digest a zip archive by its contents."""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from torchvision.datasets.utils import calculate_md5

from metacli.errors import DataError
from metacli.logging.progress import Progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def download_url(url: str, path: Path | str, md5: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``path`` via ``path.part``; the file appears only once its md5 equals ``md5``.

    On any failure the ``.part`` file is removed and a one-line :class:`DataError` names the URL and the way out.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {path.parent} to download {path.name} ({exc}); "
                        "set dataset.root to a writable folder") from None
    log.info("downloading %s to %s", url, path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            size = response.headers.get("Content-Length")
            with Progress(f"download {path.name}", total=int(size) if size and size.isdigit() else None,
                          unit="bytes") as progress:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    progress.advance(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {url} ({reason}); download it by hand and put it at {path}") from None
    except BaseException:
        part.unlink(missing_ok=True)  # Ctrl-C must not leave a half file that looks like progress
        raise
    digest = calculate_md5(part)  # torchvision's own check, on the complete file
    if digest != md5.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} has md5 {digest}, expected {md5}; "
                        f"the server sent a different file: retry later or put the official file at {path}")
    os.replace(part, path)
    return path


def contents_digest(entries: list[tuple[str, int, int]]) -> str:
    """sha256 over sorted ``(member name, CRC32, size)`` triples: identifies files, not the container that holds them."""
    digest = hashlib.sha256()
    for name, crc, size in sorted(entries):
        digest.update(f"{name}\t{crc:08x}\t{size}\n".encode())
    return digest.hexdigest()


def zip_entries(path: Path | str, prefix: str = "", suffix: str = "") -> list[tuple[str, int, int]]:
    """``(name, CRC32, size)`` of the zip's files under ``prefix`` ending in ``suffix``, from the central directory only.

    Raises ``zipfile.BadZipFile`` (or ``OSError``) for a file that is not a readable zip; callers turn that into a
    DataError naming their own fix.
    """
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, info.CRC, info.file_size) for info in archive.infolist()
                if not info.is_dir() and info.filename.startswith(prefix) and info.filename.endswith(suffix)]

