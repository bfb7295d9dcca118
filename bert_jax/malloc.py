"""Transparent huge pages for glibc malloc's large blocks, set by re-executing the command.

XLA:CPU allocates a step's buffers afresh every step (about 1 GB for the `small` model at
batch 16 x 128). glibc gives blocks that large their own mmap and unmaps them when freed, so
every step faults its buffers in again, 4 KB at a time: about 165,000 page faults a step,
15% of that train step on a 2-core CPU. glibc's `glibc.malloc.hugetlb=1` tunable (glibc
2.35+) has malloc ask the kernel for transparent huge pages, 2 MB a fault (about 900 faults
a step; docs/performance.md). Tunables are read only when a process starts, so the command
re-executes itself once with the tunable set.

Tried: TCMalloc through `LD_PRELOAD` does as well but is a system package not every host has;
glibc with one arena and no mmap reuses freed blocks without any fault, but its heap grew by
fragmentation (1.7 to 3.5 GB over 40 steps).
"""

from __future__ import annotations

import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def reexec_with_huge_pages() -> None:
    """Re-executes this process's command line with `HUGE_PAGES` added to `GLIBC_TUNABLES`,
    unless a hugetlb tunable is set already (the re-executed process, or the user's choice)
    or this is not Linux. Call it first thing: whatever ran before runs again."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables:
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, HUGE_PAGES]))
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
