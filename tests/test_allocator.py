"""zsad.runtime.allocator: freed large buffers go back to the system (glibc), checked in a fresh process each time."""

import subprocess
import sys

import pytest

FREE_TEN_MIB_THREE_TIMES = """
import os, sys, torch
from zsad.runtime.allocator import return_large_buffers_to_the_system
def resident_mib():
    return int(next(l.split()[1] for l in open(f"/proc/{os.getpid()}/status") if l.startswith("VmRSS"))) / 1024
if sys.argv[1] == "tuned":
    assert return_large_buffers_to_the_system()
torch.ones(2**20, dtype=torch.uint8).add_(1)  # start torch's worker threads (their stacks are not what we measure)
before = resident_mib()
for _ in range(3):
    buffer = torch.empty(10 * 2**20, dtype=torch.uint8).fill_(1)
    del buffer
print(resident_mib() - before)
"""


def _kept_mib(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", FREE_TEN_MIB_THREE_TIMES, mode], capture_output=True, text=True, check=True)
    return float(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_ten_mib_buffers_are_kept_by_default_and_returned_when_tuned():
    assert _kept_mib("default") >= 9  # glibc raised its mmap threshold after the first free and kept the rest
    assert _kept_mib("tuned") < 3
