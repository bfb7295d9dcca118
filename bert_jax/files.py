"""Files on local paths and URLs (`gs://...`) alike, through `etils.epath`.

Pod runs keep their data, workdir and exports in a bucket, so every path a user gives may be
a URL. `pathlib` would quietly turn `gs://b/x` into the local folder `gs:/b/x`; `epath`
keeps it a URL and reaches the object store.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def is_url(value) -> bool:
    """Whether `value` names an object by URL (`gs://...`) rather than a local path."""
    return "://" in str(value)


def path(value) -> epath.Path:
    """`value` as an `epath.Path`: a URL untouched (`absolute()` would make `gs://b/x`
    `<cwd>/gs:/b/x`), a local path with `~` expanded and made absolute (TensorStore and TFDS
    want that, and a relative path would change meaning with the working directory)."""
    if is_url(value):
        return epath.Path(value)
    return epath.Path(value).expanduser().absolute()


def write_atomically(target, content: bytes) -> None:
    """Writes `content` to `target` so that readers see the old file or the new one, never part:
    a local file under a temporary name beside it, then renamed over it; a URL directly (an
    object store makes an object appear whole when its write completes)."""
    target = epath.Path(target)
    if is_url(target):
        target.write_bytes(content)
        return
    # Not tempfile.mkstemp: its files are private (0600), and os.replace would keep that
    # mode, so an export would be unreadable by other users (or a serving container).
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:
            f.write(content)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
