"""Files replaced whole or not at all: a kill, a full disk or a power cut mid-write leaves the previous version.

The one writer behind checkpoints, the dataset cache, a run's results and timing, and ``metacli report --out``. It
imports nothing heavy, so the commands that never touch torch can use it.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def replacing(path: Path, keep_previous: Path | None = None) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into: a temp file of this process's own beside it, synced and renamed
    over ``path`` when the block ends. With ``keep_previous`` the version it replaces is moved there first.

    An error in the block or in the write leaves no temp file behind and ``path`` as it was (or, with
    ``keep_previous``, moved there), and is raised as it came (``OSError`` for the file system's).
    """
    # A name no other writer shares (two reports or two ranks at once); O_EXCL never follows a planted link, and
    # mode 666 leaves the permissions to the umask as any other file the user writes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def replace_file(path: Path, data: bytes | memoryview, keep_previous: Path | None = None) -> None:
    """Make ``path`` hold ``data``, whole or not at all (:func:`replacing`)."""
    with replacing(path, keep_previous) as handle:
        handle.write(data)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable: without it a power cut may forget it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        # Some file systems refuse to sync a folder. The file is complete and in place by now; saying the write
        # failed would be wrong.
        pass
