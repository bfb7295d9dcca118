"""Paths and atomic writes on local paths and URLs alike (`bert_jax.files`)."""

import os
import stat
from pathlib import Path

import pytest
from etils import epath

from bert_jax import files


def test_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(files.path("gs://b/x")) == "gs://b/x"
    assert str(files.path(epath.Path("gs://b/x") / "y")) == "gs://b/x/y"
    assert files.path("~/x") == epath.Path(tmp_path / "home" / "x")
    assert files.path("data/x") == epath.Path(tmp_path / "data" / "x")
    assert files.path(Path("/abs/x")) == epath.Path("/abs/x")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_modes_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.write_atomically(tmp_path / "new", b"new")
        (tmp_path / "old").write_bytes(b"old")
        os.chmod(tmp_path / "old", 0o600)
        files.write_atomically(tmp_path / "old", b"replaced")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new") == _mode(tmp_path / "old") == 0o666 & ~umask
    assert (tmp_path / "old").read_bytes() == b"replaced"


class Interrupted(Exception):
    pass


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_bytes(b"old")

    def interrupted(*args):
        raise Interrupted

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(Interrupted):
        files.write_atomically(target, b"new")
    with pytest.raises(TypeError):  # fails while writing (str, not bytes)
        files.write_atomically(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert target.read_bytes() == b"old"


def test_urls_are_written_directly(bucket):
    """An object store has no rename to make a write atomic, nor needs one."""
    (bucket / "dir").mkdir()
    url_path = type(epath.Path("gs://bucket"))
    opened = []
    original_open = url_path.open

    def recording_open(self, mode="r", **kwargs):
        opened.append((str(self), mode))
        return original_open(self, mode, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(url_path, "open", recording_open)
        files.write_atomically("gs://bucket/dir/config.json", b"{}")
    assert opened == [("gs://bucket/dir/config.json", "wb")]
    assert [p.name for p in (bucket / "dir").iterdir()] == ["config.json"]
    assert (bucket / "dir" / "config.json").read_bytes() == b"{}"
