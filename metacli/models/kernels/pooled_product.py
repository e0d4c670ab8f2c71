"""The max-pool Conv4's first block (convolution, BatchNorm, 2x2 max-pooling, ReLU) as one native kernel.

Why: the first convolution of the max-pool Conv4 writes a 64x28x28 activation for each 28x28 Omniglot image, four
times the pooled output. Even as :mod:`metacli.models.kernels.patch_conv`'s single product, writing it, pooling it
(with int64 indices) and zero-filling and scattering its gradient took about a third of a ProtoNet episode's time
on one CPU thread, for 2 % of its FLOPs (figures in docs/performance.md). Done window by window in C++, that
activation is never stored, and only a byte per output (which of the four positions went through, or none past the
ReLU) is kept for the backward.

The kernel gets BatchNorm folded into its weights and shift. Its backward (a second kernel) is differentiable in
turn (a third kernel is that one's adjoint), so second-order MAML can take the block; the block kernel and its
backward are C++ autograd functions. BatchNorm's statistics still come from the patches' covariance, as in
:mod:`~metacli.models.kernels.patch_conv`, so every BatchNorm mode is handled as there: a fourth kernel sums the
patches and their outer products in one pass, instead of building the patch matrix and its centred copy.
The kernels let go of the GIL, so task threads run them side by side. They are compiled on first use with
``torch.utils.cpp_extension`` (cached in a private dir, see :func:`_build_dir`); where that fails (no C++
compiler, no ninja), :func:`available` says so once and Conv4 keeps the patch product.
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
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("pooled_product.cpp")
_log = logging.getLogger(__name__)
_module = None
_failed = False
_lock = threading.Lock()
_enabled = True


def _extension():
    """The compiled kernels, built for this CPU the first time (``-march=native``, so the build directory is
    named after the CPU too, for home directories that machines of several kinds share, and after the checkout and
    the torch installation)."""
    global _module, _failed
    if _module is not None or _failed:  # every forward asks: no lock once the build was tried
        return _module
    with _lock:  # task threads reach the first block together
        if _module is None and not _failed:
            # Importing cpp_extension logs a warning about CUDA_HOME on machines without CUDA, which is no concern
            # of a CPU kernel.
            quiet = logging.getLogger("torch.utils.cpp_extension")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load

                # Each checkout and torch installation builds apart: ninja rebuilds whenever its command (the
                # source's path, torch's headers) changes, so two venvs sharing the cache rebuilt at every switch.
                key = f"{platform.machine()} {_cpu_flags()} {_SOURCE} {Path(torch.__file__).parent}"
                tag = hashlib.sha1(key.encode()).hexdigest()[:10]
                # 512-bit vectors where the CPU has them: the loops run over 64 filters.
                wide = ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
                name = f"metacli_pooled_product_{tag}"
                build_dir = _build_dir(name)
                if not (build_dir / f"{name}.so").is_file():  # said before the wait, not after it
                    _log.info("building the native pooled-product kernel for this CPU (first use of the max-pool "
                              "Conv4 here; about a minute, cached for later runs)")
                start = time.perf_counter()
                _module = load(name, [str(_SOURCE)], build_directory=str(build_dir),
                               extra_cflags=["-O3", "-march=native", "-fopenmp-simd", *wide])
                seconds = time.perf_counter() - start
                if seconds > 5:  # a build (this process's or another's), not a load from the cache
                    _log.info("the native pooled-product kernel took %.0f s to build for this CPU (cached for later "
                              "runs)", seconds)
            except Exception as error:  # any build failure leaves the patch product, which computes the same
                _failed = True
                _log.warning("the native pooled-product kernel did not build (%s); Conv4 uses the patch product",
                             str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            finally:
                quiet.setLevel(level)
    return _module


def _build_dir(name: str) -> Path:
    """Where the kernel is compiled and loaded from: ``$TORCH_EXTENSIONS_DIR/<name>``, else
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


def available() -> bool:
    """Whether the kernel is built (building it now if it was never tried)."""
    return _extension() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Conv4 without the kernel while inside: for ``torch.utils.flop_counter``, which counts the native operators
    but cannot see into the kernel."""
    global _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = True


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`pooled_product` can take a batch that :func:`~metacli.models.kernels.patch_conv.applies` to:
    float32 or float64, even sides (2x2 windows tile the map), no gradient wanted for the images, and no ``torch.func``
    transform, which the kernels have no rules for."""
    return (x.dtype in (torch.float32, torch.float64) and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0
            and not x.requires_grad
            and not torch._C._functorch.is_functorch_wrapped_tensor(x) and _enabled and available())


def padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` zero-padded by one on each side, as the kernels take it."""
    return F.pad(x, (1, 1, 1, 1)).contiguous()


def patch_moments(padded_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``[c * 9]`` and biased covariance ``[c * 9, c * 9]`` of the 3x3 patches of a stride-1 convolution
    of ``padded_x``, without a gradient. The sums are taken in float64, where the products of float32 values are
    exact, so the one-pass covariance of float32 images loses nothing to cancellation (float64 images lose what a
    one-pass formula loses in double)."""
    return tuple(_extension().patch_moments(padded_x))


def pooled_product(padded_x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(conv2d(x, w, padding=1) + shift, 2))`` as a channels-last ``[n, c, h / 2, w / 2]`` batch,
    for ``padded_x = padded(x)`` and ``weight = w.flatten(1).T`` (``[c * 9, filters]``)."""
    return _extension().pooled_product(padded_x, weight, shift).permute(0, 3, 1, 2)
