"""Transparent huge pages for glibc malloc's large blocks, set by re-executing the command.

XLA:CPU allocates a step's buffers afresh every step; glibc gives large blocks their own mmap
and unmaps them when freed, so every CPU train step faults its buffers in again, 4 KB at a
time. The `glibc.malloc.hugetlb=1` tunable (glibc 2.35+) has malloc ask for transparent huge
pages, 2 MB a fault; glibc reads tunables only at start, hence one re-execution, where it helps.
docs/performance.md ("Page faults") has the measurements, and the alternatives tried (TCMalloc,
which not every host has; one glibc arena without mmap, whose heap grows by fragmentation).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HUGETLB = "glibc.malloc.hugetlb"
# Set for the re-executed process: glibc strips tunables from the environment of setuid
# programs, so the tunable itself cannot tell that the re-execution happened.
_REEXECUTED = "BERT_JAX_MALLOC_REEXECUTED"


def huge_pages_would_help() -> bool:
    """glibc 2.35+ (which has the tunable) and transparent huge pages on request (`madvise`,
    Debian's and Ubuntu's default; in `always` mode malloc gets them anyway)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except (AttributeError, ValueError, OSError):  # not Linux, not glibc, no THP
        return False
    return (name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
            and "[madvise]" in mode)


def reexec_with_huge_pages() -> None:
    """Re-executes this process's command line once with `HUGETLB=1` added to
    `GLIBC_TUNABLES` where that helps, unless the user set a hugetlb tunable. Call it first
    thing: whatever ran before runs again."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (_REEXECUTED in os.environ or HUGETLB in tunables or not sys.executable
            or not huge_pages_would_help()):
        return
    environment = {**os.environ, _REEXECUTED: "1",
                   "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGETLB}=1"]))}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    except OSError:
        pass  # go on without the tunable
