"""Native CPU kernels, compiled for this machine on first use with ``torch.utils.cpp_extension``.

Each kernel's source builds in a private cache dir of its own (see :func:`build_dir`). Where a build fails (no C++
compiler, no ninja), :meth:`NativeKernels.module` says so once and returns ``None``, and the caller keeps its
PyTorch path, which computes the same.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

_log = logging.getLogger(__name__)


class NativeKernels:
    """The compiled module of one C++ source, built the first time it is asked for.

    Args:
        source: the ``.cpp`` file.
        what: how the log names it ("the native pooled-product kernel").
        first_use: when a build happens, said while the user waits ("first use of the max-pool Conv4 here").
        fallback: what runs instead where the build fails ("Conv4 uses the patch product").
        extra_ldflags: libraries to link beyond torch's.
    """

    def __init__(self, source: Path, what: str, first_use: str, fallback: str,
                 extra_ldflags: tuple[str, ...] = ()) -> None:
        self.source, self.what, self.first_use, self.fallback = source, what, first_use, fallback
        self.extra_ldflags = list(extra_ldflags)
        self.enabled = True
        self._module = None
        self._failed = False
        self._lock = threading.Lock()

    def module(self):
        """The compiled kernels, or ``None`` where they did not build. ``-march=native``: the build dir is named
        after the CPU too, for home directories that machines of several kinds share, and after the checkout and
        the torch installation."""
        if self._module is not None or self._failed:  # every forward asks: no lock once the build was tried
            return self._module
        with self._lock:  # task threads reach the first call together
            if self._module is None and not self._failed:
                self._build()
        return self._module

    def _build(self) -> None:
        # Importing cpp_extension logs a warning about CUDA_HOME on machines without CUDA, which is no concern of
        # a CPU kernel.
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load

            # Each checkout and torch installation builds apart: ninja rebuilds whenever its command (the source's
            # path, torch's headers) changes, so two venvs sharing the cache rebuilt at every switch.
            key = f"{platform.machine()} {_cpu_flags()} {self.source} {Path(torch.__file__).parent}"
            tag = hashlib.sha1(key.encode()).hexdigest()[:10]
            # 512-bit vectors where the CPU has them: the kernels' inner loops are long enough to fill them.
            wide = ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
            name = f"metacli_{self.source.stem}_{tag}"
            directory = build_dir(name)
            if not (directory / f"{name}.so").is_file():  # said before the wait, not after it
                _log.info("building %s for this CPU (%s; about a minute, cached for later runs)", self.what,
                          self.first_use)
            start = time.perf_counter()
            self._module = load(name, [str(self.source)], build_directory=str(directory),
                                extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", *wide],
                                extra_ldflags=self.extra_ldflags)
            seconds = time.perf_counter() - start
            if seconds > 5:  # a build (this process's or another's), not a load from the cache
                _log.info("%s took %.0f s to build for this CPU (cached for later runs)", self.what, seconds)
        except Exception as error:  # any build failure leaves the PyTorch path, which computes the same
            self._failed = True
            _log.warning("%s did not build (%s); %s", self.what,
                         str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                         self.fallback)
        finally:
            quiet.setLevel(level)

    @property
    def tried(self) -> bool:
        """Whether a build (or a load from the cache) was attempted in this process."""
        return self._module is not None or self._failed

    def available(self) -> bool:
        """Whether the kernels are built (building them now if that was never tried)."""
        return self.module() is not None

    def usable(self) -> bool:
        """Built, and not switched off by :meth:`disabled`."""
        return self.enabled and self.available()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The PyTorch path while inside: for ``torch.utils.flop_counter``, which counts the native operators but
        cannot see into a kernel."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def build_dir(name: str) -> Path:
    """Where a kernel is compiled and loaded from: ``$TORCH_EXTENSIONS_DIR/<name>``, else
    ``~/.cache/metacli/kernels/<name>``, created private to the user: whoever can write there runs code in every
    later metacli process."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "metacli" / "kernels")
    path = root / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
