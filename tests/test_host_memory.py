"""trainer.retain_host_memory: freed activations are reused without page-faulting them back in."""
import subprocess
import sys

from metacli.reliability.host_memory import retain_freed_memory

# A training step's shape of host allocations, in MiB: blocks alive together, some freed early, one above glibc's
# largest dynamic mmap threshold (32 MiB), which by default is a fresh mmap, faulted in page by page, every step.
STEP = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from metacli.reliability.host_memory import retain_freed_memory
    assert retain_freed_memory()
def step():
    live = [torch.empty(mib << 20, dtype=torch.uint8).fill_(1) for mib in (16, 4, 16, 8, 16, 40, 2)]
    del live[::2]
    live += [torch.empty(mib << 20, dtype=torch.uint8).fill_(1) for mib in (16, 16)]
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults_per_step(mode: str) -> list[int]:
    """Minor faults of each of twelve steps. Retained, the heap takes up to five steps to grow to the step's
    footprint (16 MiB blocks fault in until it has), and then faults nothing.

    A fresh interpreter each, so that the allocator settings of this process (the runner sets them) play no part.
    """
    done = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True)
    return [int(value) for value in done.stdout.split()]


def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    # By default the 40 MiB block (10,240 pages) is a fresh mmap after the first step, until glibc, sometimes,
    # finds it room; so the default run is judged over all steps after the first.
    assert sum(default[1:]) >= 9_000, f"glibc's default should fault the 40 MiB block in again: {default}"
    assert max(retained[-4:]) <= 1_024, f"minor faults a step with freed memory retained: {retained}"


def test_settings_apply_on_glibc():
    assert retain_freed_memory() is sys.platform.startswith("linux")
