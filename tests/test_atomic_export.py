"""An interrupted export leaves nothing that looks complete; a previous export stays whole.
Exports are readable by others, and written to gs:// as to local folders."""

import os
import stat

import numpy as np
import pytest

from bert_jax import export, inference
from bert_jax import workdir as workdirs
from bert_jax.config import preset
from bert_jax.model import create
from bert_jax.pretrained import Pretrained

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_export_leaves_no_directory_and_keeps_the_previous_one(straight_run,
                                                                          tmp_path, monkeypatch):
    workdir, _, _ = straight_run
    pretrained, config = workdirs.load_weights(workdir)
    out = tmp_path / "export"

    def interrupted(*args):
        raise Interrupted  # the last write of an export: weights and tokenizer are written

    with monkeypatch.context() as patch:
        patch.setattr(workdirs, "keep_tokenizer", interrupted)
        with pytest.raises(Interrupted):
            export.write_export(pretrained, workdir, out, config.data.lowercase)
    assert not out.exists()

    export.write_export(pretrained, workdir, out, config.data.lowercase)
    complete = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(complete)
    with monkeypatch.context() as patch:
        patch.setattr(workdirs, "keep_tokenizer", interrupted)
        with pytest.raises(Interrupted):
            export.write_export(pretrained, workdir, out, config.data.lowercase)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == complete
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial left either


@pytest.fixture
def tiny(tmp_path):
    """A tiny model and a folder holding its vocabulary, as a workdir does."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    config = preset("tiny", vocab_size=len(VOCAB), num_layers=1)
    return Pretrained.from_model(create(config)), workdir


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_modes_the_umask_gives(tiny, tmp_path, umask):
    pretrained, workdir = tiny
    old = os.umask(umask)
    try:
        out = export.write_export(pretrained, workdir, tmp_path / "export", lowercase=True)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_export_to_a_bucket_loads_back(tiny, bucket):
    pretrained, workdir = tiny
    export.write_export(pretrained, workdir, "gs://bucket/runs/export", lowercase=True)
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= {
        p.name for p in (bucket / "runs" / "export").iterdir()}
    loaded, tokenizer = inference.load_with_tokenizer("gs://bucket/runs/export")
    ids = np.array([[2, 5, 6, 4, 3]])
    np.testing.assert_array_equal(loaded.logits(ids)[0], pretrained.logits(ids)[0])
    assert tokenizer.encode("the cat") == [5, 6]


def test_an_export_replaces_nothing_but_an_earlier_export(tiny, tmp_path):
    pretrained, workdir = tiny
    out = export.write_export(pretrained, workdir, tmp_path / "export", lowercase=True)
    export.write_export(pretrained, workdir, out, lowercase=True)  # an earlier export: replaced
    (tmp_path / "empty").mkdir()
    export.write_export(pretrained, workdir, tmp_path / "empty", lowercase=True)
    notes, a_file = tmp_path / "notes", tmp_path / "a.txt"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    a_file.write_text("keep")
    (workdir / "checkpoints").mkdir()  # as a workdir has
    for target, message in [(notes, "holds 'todo.txt', which is not an export's"),
                            (a_file, "is a file"), (workdir, "holds 'checkpoints'"),
                            (tmp_path, "holds 'a.txt'")]:
        with pytest.raises(ValueError, match=f"export directory {target} {message}"):
            export.write_export(pretrained, workdir, target, lowercase=True)
    assert (notes / "todo.txt").read_text() == a_file.read_text() == "keep"
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "vocab.txt"]


def test_a_folder_that_is_not_an_export_of_bert_jax_is_never_replaced(tiny, tmp_path):
    pretrained, workdir = tiny
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text('{"mine": true}')  # a name an export also writes
    with pytest.raises(ValueError, match=f"export directory {own} holds 'config.json' but no "
                                         f"bert_jax_export.json, so it is not an export of "
                                         f"bert-jax"):
        export.write_export(pretrained, workdir, own, lowercase=True)
    assert [p.name for p in own.iterdir()] == ["config.json"]
    assert (own / "config.json").read_text() == '{"mine": true}'
    out = export.write_export(pretrained, workdir, tmp_path / "export", lowercase=True)
    assert export.MARKER_FILE in {p.name for p in out.iterdir()}
    (out / export.MARKER_FILE).unlink()  # what bert-jax wrote, but no longer marked as such
    with pytest.raises(ValueError, match="not an export of bert-jax"):
        export.write_export(pretrained, workdir, out, lowercase=True)


def test_export_into_a_users_folder_is_one_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "bert_jax.cli", "export",
                             f"--workdir={tmp_path / 'run'}", f"--out={own}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"bert-jax export: error: export directory {own} holds 'config.json' but no "
        f"bert_jax_export.json, so it is not an export of bert-jax: expected a new directory, "
        f"an empty one or an earlier export of bert-jax"]
    assert (own / "config.json").read_text() == "{}"
