"""Continued pretraining: `train.init` from a Hugging Face directory or a workdir (weights,
architecture and tokenizer taken, missing heads fresh), bad inits refused before anything is
written, and a finished run continued for more steps on the new schedule."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers
from flax import traverse_util

import bert_jax
from bert_jax import hf, init, workdir as workdirs
from bert_jax.config import default_config
from bert_jax.metrics import read_metrics
from bert_jax.optim import learning_rate_schedule
from pretrain_runs import overrides, pretrain

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"


def _data_overrides(data_dir, **extra) -> list[str]:
    """The tiny run's overrides without the architecture, which an init brings."""
    return [arg for arg in overrides(data_dir, **extra)
            if not arg.startswith(("--config.model.", "--config.data.vocab_size"))]


def _flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _as_masked_lm(export, out):
    """`export` saved as a `BertForMaskedLM` (no pooler, no NSP head), with its tokenizer."""
    transformers.BertForMaskedLM.from_pretrained(export).save_pretrained(out)
    for name in export.iterdir():
        if not (out / name.name).exists():
            shutil.copy(name, out)
    return out


def test_masked_lm_and_bare_encoder_directories_load_with_their_heads_missing(tmp_path,
                                                                                straight_run):
    export = straight_run[0] / "export"
    masked = _as_masked_lm(export, tmp_path / "masked")
    transformers.BertModel.from_pretrained(export).save_pretrained(tmp_path / "bare")
    shutil.copy(export / "tokenizer.model", tmp_path / "bare")
    whole = _flat(bert_jax.load(export).params)
    for path, missing in [(export, ""), (masked, " (pooler, nsp: none there, they start fresh)"),
                          (tmp_path / "bare", " (mlm, nsp: none there, they start fresh)")]:
        lines = []
        params = _flat(init.load(init.describe(str(path)), lines.append))
        assert lines == [f"starting from the Hugging Face weights of {path}{missing}"]
        assert params.keys() <= whole.keys()
        for name, value in params.items():
            np.testing.assert_array_equal(value, whole[name], err_msg=name)
    assert not any(name.startswith(("pooler", "nsp")) for name in _flat(
        init.load(init.describe(str(masked)), print)))


def test_continue_config_starts_from_a_hugging_face_masked_lm(tmp_path, straight_run):
    """configs/continue.py:PATH, one step: the warmup's first rate is 0, so the weights after it are the init's (the
    heads it lacks freshly initialized); the architecture and tokenizer are the init's."""
    export = straight_run[0] / "export"
    masked = _as_masked_lm(export, tmp_path / "masked")
    run = tmp_path / "run"
    result = pretrain(run, [f"--config={CONFIGS / 'continue.py'}:{masked}",
                            f"--config.data.data_dir={tmp_path / 'data'}",
                            "--config.data.max_seq_length=64",  # the init's positions
                            "--config.data.max_predictions_per_seq=10",
                            "--config.train.num_steps=1", "--config.train.global_batch_size=16"])
    assert result.returncode == 0, result.stderr
    assert (f"starting from the Hugging Face weights of {masked} (pooler, nsp: none there, "
            f"they start fresh)") in result.stdout
    assert [m["learning_rate"] for m in read_metrics(run) if "split" not in m] == [0.0]
    trained, init_params = _flat(bert_jax.load(run).params), _flat(bert_jax.load(export).params)
    for name, value in trained.items():
        if name.startswith(("pooler", "nsp")):
            assert not np.array_equal(value, init_params[name]), name  # fresh, not the export's
        else:
            np.testing.assert_array_equal(value, init_params[name], err_msg=name)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["num_layers"] == hf.read_config(masked).num_layers
    assert saved["data"]["vocab_file"] == str(masked / "tokenizer.model")


def test_pretraining_starts_from_a_workdirs_checkpoint(tmp_path, straight_run):
    workdir = straight_run[0]
    run = tmp_path / "run"
    result = pretrain(run, [*_data_overrides(tmp_path / "data", **{"train.num_steps": 1}),
                            f"--config.train.init={workdir}", "--config.train.init_step=10"])
    assert result.returncode == 0, result.stderr
    assert f"starting from the workdir weights of {workdir}\n" in result.stdout
    trained = _flat(bert_jax.load(run).params)
    at_ten = _flat(workdirs.load_weights(workdir, 10)[0].params)
    assert trained.keys() == at_ten.keys()
    for name, value in trained.items():
        np.testing.assert_array_equal(value, at_ten[name], err_msg=name)
    assert not np.array_equal(trained["nsp/kernel"], _flat(bert_jax.load(workdir).params)[
        "nsp/kernel"])  # step 10's weights, not the latest (20)


def _copy_export(straight_run, tmp_path, name="init"):
    return shutil.copytree(straight_run[0] / "export", tmp_path / name)


def _edit_config(path, **values):
    config = path / hf.CONFIG_FILE
    config.write_text(json.dumps({**json.loads(config.read_text()), **values}))
    return path


def _pickled_code(path):
    (path / hf.WEIGHTS_FILE).unlink()

    class Exploit:
        def __reduce__(self):
            return (open, (str(path / "pwned"), "w"))

    (path / hf.TORCH_WEIGHTS_FILE).write_bytes(pickle.dumps({"x": Exploit()}, protocol=2))
    return path


def _without_tokenizer(path):
    for name in ("tokenizer.model", "tokenizer.json", "vocab.txt"):
        (path / name).unlink(missing_ok=True)
    return path


@pytest.mark.parametrize("make, extra, words", [
    (lambda export, tmp, workdir: tmp / "nowhere", [],
     ["train.init='", "nowhere' does not exist", "expected a bert-jax workdir, a Hugging "
                                                  "Face BERT directory"]),
    (lambda export, tmp, workdir: _edit_config(export, model_type="roberta"), [],
     ["model_type='roberta'", "expected 'bert'"]),
    (lambda export, tmp, workdir: _edit_config(export, intermediate_size=100), [],
     ["tensor 'bert.encoder.layer.0.intermediate.dense.weight' has shape (512, 128)",
      "expected (100, 128)"]),
    (lambda export, tmp, workdir: _pickled_code(export), [], ["is not a weights-only PyTorch file"]),
    (lambda export, tmp, workdir: _without_tokenizer(export), [], ["holds no", "tokenizer beside"]),
    (lambda export, tmp, workdir: export, ["--config.model.num_layers=3"],
     ["--config.model.num_layers=3 contradicts train.init=", "whose model.num_layers is 2"]),
    (lambda export, tmp, workdir: export, ["--config.data.vocab_size=4096"],
     ["--config.data.vocab_size=4096 contradicts", "whose data.vocab_size is 2000"]),
    (lambda export, tmp, workdir: workdir, ["--config.train.init_step=7"],
     ["no checkpoint for step 7", "expected one of [10, 15, 20]"]),
])
def test_a_bad_init_is_one_line_exit_2_and_writes_nothing(tmp_path, straight_run, make, extra,
                                                          words):
    path = make(_copy_export(straight_run, tmp_path), tmp_path, straight_run[0])
    result = pretrain(tmp_path / "run", [*_data_overrides(tmp_path / "data"),
                                         f"--config.train.init={path}", *extra])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bert-jax pretrain: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "init" / "pwned").exists()


def test_continue_config_without_a_path_says_what_to_give(tmp_path):
    result = pretrain(tmp_path / "run", [f"--config={CONFIGS / 'continue.py'}"])
    assert result.returncode == 2, result.stderr
    assert ("train.init='<give PATH in --config=configs/continue.py:PATH or "
            "--config.train.init=PATH>' does not exist") in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_finished_run_continues_for_more_steps_on_the_new_schedule(tmp_path, straight_run):
    workdir, data_dir, _ = straight_run
    run = shutil.copytree(workdir, tmp_path / "run")
    before = [m for m in read_metrics(run) if "split" not in m]
    result = pretrain(run, overrides(data_dir, **{"train.num_steps": 30}))
    assert result.returncode == 0, result.stderr
    assert ("train.num_steps raised from 20 to 30 at step 20: the learning rate now decays to "
            "step 30") in result.stdout
    after = [m for m in read_metrics(run) if "split" not in m]
    assert after[:20] == before  # the first 20 steps' record untouched
    assert [m["step"] for m in after] == list(range(1, 31))
    settings = default_config().train
    settings.update(num_steps=30, warmup_steps=5, learning_rate=1e-3)
    schedule = learning_rate_schedule(settings)
    for m in after[20:]:  # step N applied the rate of step N - 1, now the 30-step schedule's
        assert m["learning_rate"] == pytest.approx(float(schedule(m["step"] - 1)), rel=1e-6)
    checkpointer = workdirs.open_checkpoints(run)
    try:
        metadata = checkpointer.restore_metadata()
    finally:
        checkpointer.close()
    assert metadata["num_steps_raised"] == [{"step": 20, "from": 20, "to": 30}]
    loss = [m["loss"] for m in after]
    assert np.mean(loss[20:]) < np.mean(loss[10:20])  # it keeps learning, with no jump back up
    assert loss[20] < max(loss[15:20])


@pytest.mark.parametrize("change, words", [
    ({"train.num_steps": 10}, ["train.num_steps=20 but the config has 10",
                               "expected at least 20"]),
    ({"train.learning_rate": 5e-4}, ["learning_rate"]),
])
def test_a_resume_still_refuses_a_lower_end_and_other_schedule_changes(tmp_path, straight_run,
                                                                       change, words):
    workdir, data_dir, _ = straight_run
    run = shutil.copytree(workdir, tmp_path / "run")
    result = pretrain(run, overrides(data_dir, **change))
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr.strip().splitlines()[-1]
