"""An interrupted export leaves nothing that looks complete; a previous export stays whole."""

import pytest

from bert_jax import export


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_export_leaves_no_directory_and_keeps_the_previous_one(straight_run,
                                                                          tmp_path, monkeypatch):
    workdir, _, _ = straight_run
    pretrained, config = export.load_workdir(workdir)
    out = tmp_path / "export"

    def interrupted(*args):
        raise Interrupted  # the last write of an export: weights and tokenizer are written

    with monkeypatch.context() as patch:
        patch.setattr(export, "keep_tokenizer", interrupted)
        with pytest.raises(Interrupted):
            export.write_export(pretrained, workdir, out, config.data.lowercase)
    assert not out.exists()

    export.write_export(pretrained, workdir, out, config.data.lowercase)
    complete = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(complete)
    with monkeypatch.context() as patch:
        patch.setattr(export, "keep_tokenizer", interrupted)
        with pytest.raises(Interrupted):
            export.write_export(pretrained, workdir, out, config.data.lowercase)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == complete
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial left either
