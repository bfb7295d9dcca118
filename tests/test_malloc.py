"""The `bert-jax` command re-executes itself with glibc malloc's huge-page tunable where that
helps (bert_jax.malloc), which cuts the page faults of a large block 30-fold."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from bert_jax import malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc malloc and its tunables: Linux only")

# Prints how many times it started, GLIBC_TUNABLES, and the page faults of a 64 MB malloc
# block written and freed; with `reexec` it first calls what the command calls first.
PROGRAM = """
import ctypes, os, resource, sys
with open(sys.argv[2], "a") as starts:
    starts.write("started\\n")
from bert_jax import malloc
if sys.argv[1] == "reexec":
    malloc.reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
libc.free(block)
starts = len(open(sys.argv[2]).readlines())
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(starts, os.environ.get("GLIBC_TUNABLES"), faults)
"""


def _run(tmp_path, mode: str, tunables: str | None = None) -> tuple[int, str, int]:
    """(starts, GLIBC_TUNABLES as the program saw it, page faults of the block)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    starts_file = tmp_path / f"starts-{mode}-{tunables}"
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode, str(starts_file)],
                            capture_output=True, text=True, check=True, env=env, timeout=60)
    starts, seen, faults = result.stdout.split()
    return int(starts), seen, int(faults)


def test_the_tunable_is_added_once_where_it_cuts_page_faults(tmp_path):
    _, _, plain_faults = _run(tmp_path, "plain")
    starts, seen, faults = _run(tmp_path, "reexec", "glibc.malloc.tcache_count=3")
    if malloc.huge_pages_would_help():  # this project's CI and hosts: glibc 2.36, madvise
        assert plain_faults >= (64 << 20) // 4096  # 4 KB a fault
        assert (starts, seen) == (2, "glibc.malloc.tcache_count=3:glibc.malloc.hugetlb=1")
        assert faults < plain_faults / 10
    else:
        assert (starts, seen) == (1, "glibc.malloc.tcache_count=3")


def test_a_hugetlb_tunable_already_set_is_left_alone(tmp_path):
    assert _run(tmp_path, "reexec", "glibc.malloc.hugetlb=0")[:2] == (1, "glibc.malloc.hugetlb=0")


def test_the_command_is_the_entry_point_that_reexecutes():
    (script,) = [entry for entry in importlib.metadata.entry_points(group="console_scripts")
                 if entry.name == "bert-jax"]
    assert script.value == "bert_jax.cli:run"
