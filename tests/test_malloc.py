"""The `bert-jax` command re-executes itself with glibc malloc's huge-page tunable
(bert_jax.malloc), which cuts the page faults of a large block 30-fold."""

import os
import platform
import subprocess
import sys
from pathlib import Path

# Prints GLIBC_TUNABLES and the page faults of a 64 MB malloc block, written and freed; with
# `huge` it first calls what the command calls first.
PROGRAM = """
import ctypes, os, resource, sys
from bert_jax import malloc
if sys.argv[1] == "huge":
    malloc.reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
libc.free(block)
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_OF_4K = (64 << 20) // 4096


def _tunables_and_faults(mode: str, tunables: str | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                            text=True, check=True, env=env)
    tunables, faults = result.stdout.split()
    return tunables, int(faults)


def _huge_pages_possible() -> bool:
    """glibc 2.35+ (the tunable) and transparent huge pages not switched off."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    name, version = platform.libc_ver()
    return (name == "glibc" and tuple(map(int, version.split("."))) >= (2, 35)
            and thp.exists() and "[never]" not in thp.read_text())


def test_the_tunable_is_added_once_and_cuts_page_faults():
    tunables, plain_faults = _tunables_and_faults("plain")
    assert tunables == "None" and plain_faults >= PAGES_OF_4K  # 4 KB a fault
    tunables, faults = _tunables_and_faults("huge", "glibc.malloc.tcache_count=3")
    assert tunables == "glibc.malloc.tcache_count=3:glibc.malloc.hugetlb=1"  # added, not set
    if _huge_pages_possible():
        assert faults < plain_faults / 10


def test_a_hugetlb_tunable_already_set_is_left_alone():
    tunables, _ = _tunables_and_faults("huge", "glibc.malloc.hugetlb=0")
    assert tunables == "glibc.malloc.hugetlb=0"
