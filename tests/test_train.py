"""Training: sharded equals single-device, accumulation equals one big step, preemption saves,
exits 0 and resumes exactly, exports load in transformers. (Resuming after stop_at_step, on
other process counts and meshes: test_multihost.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
import torch
import transformers

import bert_jax
from bert_jax import run as runs
from bert_jax import sharding, train
from bert_jax import workdir as workdirs
from bert_jax.config import RunConfig, TrainConfig, default_config, preset
from bert_jax.data.synthetic import synthetic_batch
from bert_jax.metrics import read_metrics
from pretrain_runs import PRETRAIN, assert_same_run, one_process_env, overrides, pretrain


def _run_steps(config, mesh, batches, accum_steps=1, initial=None):
    """Metrics (floats) and final parameters of steps on `batches`, from `initial` (resharded
    onto `mesh`) or a fresh state."""
    model_config = preset(config.model_size, **config.overrides)
    run = runs.build(model_config, TrainConfig(num_steps=10, warmup_steps=2, learning_rate=1e-3),
                     mesh)
    state = (run.init_state() if initial is None
             else jax.device_put(initial, run.spec.shardings))
    step = run.train_step(accum_steps)
    first = jax.device_get(state)
    records = []
    for batch in batches:
        state, metrics = step(state, sharding.global_batch(batch, mesh, len(batch["input_ids"])))
        records.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return records, jax.device_get(state["params"]), first


def _losses(records):
    return np.array([r["loss"] for r in records])


class _Case:
    def __init__(self, model_size, **overrides):
        self.model_size, self.overrides = model_size, overrides


NO_DROPOUT = dict(vocab_size=512, hidden_dropout_rate=0.0)


def test_sharded_meshes_give_the_single_device_losses():
    # mini: its 4 heads split 4 ways, as tensor parallelism on real sizes does.
    case = _Case("mini", vocab_size=512, max_position_embeddings=64, scan_layers=True)
    batches = [synthetic_batch(i, 16, 32, 512, 5) for i in range(3)]
    single, _, initial = _run_steps(case, sharding.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]), batches)
    assert len(jax.devices()) == 8
    for shape in [(2, 2, 2), (1, 2, 4)]:  # every axis sharded; tensor 4 ways
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small dimensions replicated, with a warning
            # The same initial values (sharded init is tested by the resume tests).
            records, _, _ = _run_steps(case, mesh, batches, initial=initial)
        np.testing.assert_allclose(_losses(records), _losses(single), rtol=1e-5,
                                   err_msg=str(shape))


def test_indivisible_dimensions_are_replicated_with_a_warning():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    with pytest.warns(UserWarning, match="'heads' of size 2 is not divisible"):
        spec = runs.build(preset("tiny", vocab_size=512), TrainConfig(), mesh).spec
    qkv = spec.shardings["params"]["encoder"]["layers"]["attention"]["qkv"]["kernel"]
    assert qkv.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None, None)
    up = spec.shardings["params"]["encoder"]["layers"]["mlp"]["up"]["kernel"]
    assert up.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    mu = spec.shardings["opt_state"][1][0].mu["encoder"]["layers"]["mlp"]["up"]["kernel"]
    assert mu.spec == up.spec  # optimizer state sharded like its parameter


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_accumulation_equals_one_step_on_the_whole_batch(packed):
    case = _Case("tiny", **NO_DROPOUT)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
    batches = [synthetic_batch(i, 16, 32, 512, 5, instances_per_row=3 if packed else 1)
               for i in range(2)]
    whole_records, whole, initial = _run_steps(case, mesh, batches)
    accumulated_records, accumulated, _ = _run_steps(case, mesh, batches, accum_steps=4,
                                                     initial=initial)
    np.testing.assert_allclose(_losses(accumulated_records), _losses(whole_records), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 accumulated, whole)
    # The tokens that are not padding, for the log's real tokens per second.
    for records in (whole_records, accumulated_records):
        assert [r["tokens"] for r in records] == [np.count_nonzero(b["input_mask"])
                                                  for b in batches]


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_exactly(straight_run, tmp_path):
    reference, data_dir, _ = straight_run
    args = overrides(data_dir, **{"checkpoint.every_steps": 1000})
    process = subprocess.Popen([*PRETRAIN, f"--workdir={tmp_path}", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=one_process_env())
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "metrics.jsonl").is_file() and len(read_metrics(tmp_path)) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "preempted" in stdout
    saved = read_metrics(tmp_path)[-1]["step"]
    assert 2 <= saved < 20
    resumed = pretrain(tmp_path, args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'checkpoints'} at step {saved}" in resumed.stdout
    assert_same_run(reference, tmp_path)


def _start_and_wait(workdir, args, records: int) -> subprocess.Popen:
    """A pretraining process in a session of its own (a terminal's Ctrl-C reaches its whole
    process group: `os.killpg`), once its metrics hold `records` records."""
    process = subprocess.Popen([*PRETRAIN, f"--workdir={workdir}", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=one_process_env(), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (workdir / "metrics.jsonl").is_file() and len(read_metrics(workdir)) >= records:
            break
        time.sleep(0.01)
    return process


@pytest.mark.slow
def test_ctrl_c_saves_exits_0_and_a_second_ctrl_c_aborts_at_once(straight_run, tmp_path):
    _, data_dir, _ = straight_run
    args = overrides(data_dir, **{"checkpoint.every_steps": 1000})
    process = _start_and_wait(tmp_path, args, 2)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Ctrl-C: stopping after this step to save a checkpoint" in stderr
    # Not a terminal: plain progress lines, no redrawn bars.
    assert "\r" not in stderr and re.search(r"^train \(length 64\): \d+/20 step", stderr, re.M)
    assert "(Ctrl-C: checkpoint saved, run the same command again to resume)" in stdout
    assert "Traceback" not in stderr
    saved = read_metrics(tmp_path)[-1]["step"]
    assert 2 <= saved < 20 and workdirs.has_checkpoint(tmp_path)

    process = _start_and_wait(tmp_path, args, len(read_metrics(tmp_path)) + 2)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "bert-jax pretrain: interrupted: what the last checkpoint holds is kept (the same "
        "command resumes from it)")
    assert "Traceback" not in stderr and "checkpoint saved" not in stdout


@pytest.mark.slow
def test_trained_model_exports_to_transformers_with_equal_logits(straight_run):
    workdir, _, stdout = straight_run
    assert "fill-mask" in stdout and "validation  loss" in stdout
    validation = [m for m in read_metrics(workdir) if m.get("split")]
    assert validation[-1]["split"] == "validation" and validation[-1]["step"] == 20
    out = workdir / "export"
    hf_model = transformers.BertForPreTraining.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoded = hf_tokenizer(["Return a new list.", "The value of x is [MASK]."], padding=True,
                           return_tensors="np")
    ours = bert_jax.load(workdir).logits(encoded["input_ids"], encoded["token_type_ids"],
                                         encoded["attention_mask"])
    with torch.no_grad():
        theirs = hf_model(**{k: torch.tensor(v) for k, v in encoded.items()})
    real = encoded["attention_mask"].astype(bool)
    assert np.abs(ours[0] - theirs.prediction_logits.numpy())[real].max() <= 1e-4
    assert np.abs(ours[1] - theirs.seq_relationship_logits.numpy()).max() <= 1e-4
    tokenizer = workdirs.load_tokenizer_of(workdir)
    assert hf_tokenizer("Return a new list.", add_special_tokens=False)["input_ids"] == (
        tokenizer.encode("Return a new list."))
    evaluated = subprocess.run([sys.executable, "-m", "bert_jax.cli", "eval",
                                f"--workdir={workdir}"], capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    line = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert line["step"] == 20
    assert line["mlm_accuracy"] == pytest.approx(validation[-1]["mlm_accuracy"], abs=1e-6)


def _phases(config):
    return RunConfig.from_dict(config).phases


def test_phases_cover_the_steps_and_bad_phases_are_refused():
    config = default_config()
    config.train.num_steps = 100
    config.train.phases = ((0, 128, 20, 32), (90, 512, 80, 8))
    two_phases = RunConfig.from_dict(config)
    first, second = two_phases.phases
    assert (first.start, first.end, first.max_seq_length) == (0, 90, 128)
    assert (second.start, second.end, second.global_batch_size) == (90, 100, 8)
    config.train.grad_accum_steps = 2
    config.train.phases = ((0, 128, 20, 32), (90, 512, 80, 8, 4))
    assert [p.grad_accum_steps for p in _phases(config)] == [2, 4]
    config.data.instances_per_row = 2
    config.train.phases = ((0, 128, 20, 32), (90, 512, 80, 8, 4, 3))
    assert [(p.grad_accum_steps, p.instances_per_row) for p in _phases(config)] == [
        (2, 2), (4, 3)]
    settings = RunConfig.from_dict(config)
    assert settings.phases[1].data(settings.data).instances_per_row == 3
    # Evaluation runs at the lengths of the phase the last step was in.
    assert [two_phases.phase_of(step) for step in (0, 1, 90, 91, 100)] == [
        first, first, first, second, second]
    for bad in [((10, 128, 20, 32),), ((0, 128, 20),), ((0, 128, 20, 32, 1, 1, 1),),
                ((0, 128, 20, 0),), ((0, 128, 20, 32, 0),), ((0, 128, 20, 32, 1, 0),),
                ((),), (5,), ((0, "128", 20, 32),), ((0, 128.5, 20, 32),)]:
        config.train.phases = bad
        with pytest.raises(ValueError, match="train.phases"):
            _phases(config)
    config.train.phases = ()
    (only,) = _phases(config)
    assert (only.end, only.max_seq_length) == (100, config.data.max_seq_length)


@pytest.mark.parametrize("field, value, expected", [
    ("num_steps", 0, "a positive integer"), ("global_batch_size", -64, "a positive integer"),
    ("grad_accum_steps", 0, "a positive integer"), ("log_every", 0, "a positive integer"),
    ("eval_steps", -1, "an integer >= 0"), ("warmup_steps", -1, "an integer >= 0"),
    ("learning_rate", -1.0, "a positive number"),
    ("nonfinite_patience", True, "a positive integer")])
def test_bad_train_counts_are_refused_before_anything_runs(field, value, expected):
    config = default_config()
    config.train[field] = value
    with pytest.raises(ValueError, match=f"^train.{field}={value!r}: expected {expected}$"):
        _phases(config)


@pytest.mark.slow
def test_two_phase_run_switches_length_and_batch_carrying_the_state(straight_run, tmp_path):
    _, data_dir, _ = straight_run
    # Phase two on packed rows (2 instances at most): the run, data to export, takes them.
    args = overrides(data_dir, **{"train.num_steps": 8, "train.phases":
                                  "((0, 32, 5, 16), (5, 64, 10, 8, 1, 2))"})
    prepared = subprocess.run([*PRETRAIN[:-1], "prepare-data", *args], capture_output=True,
                              text=True, timeout=600, env=one_process_env())
    assert prepared.returncode == 0, prepared.stderr
    built = [line.split("/")[-2] for line in prepared.stdout.splitlines()
             if line.startswith("dataset: ")]
    assert [name[:6] for name in built] == ["seq32_", "seq64_"]  # each phase's
    assert "packed into rows of up to 2" in prepared.stdout
    assert "custom data configuration" not in prepared.stderr  # TFDS's warning, by design
    assert "Downloading" not in prepared.stdout  # TFDS's line, though nothing is downloaded
    result = pretrain(tmp_path, args)
    assert result.returncode == 0, result.stderr
    assert "exported to" in result.stdout
    packing = {(i["max_seq_length"], i.get("instances_per_row", 1)) for i in (
        json.loads(path.read_text())["identity"]
        for path in data_dir.glob("bert_pretraining/*/*/metadata.json"))}
    assert {(32, 1), (64, 2)} <= packing and (32, 2) not in packing
    records = [m for m in read_metrics(tmp_path) if "split" not in m]
    assert [m["step"] for m in records] == list(range(1, 9))
    validation = [m for m in read_metrics(tmp_path) if m.get("split") == "validation"]
    assert 0.0 <= validation[-1]["nsp_accuracy"] <= 1.0
    # Tokens per step: 16 x 32 in phase one, 8 x 64 in phase two; learning continues.
    assert all(m["tokens_per_s"] / m["seq_per_s"] == pytest.approx(32) for m in records[:5])
    assert all(m["tokens_per_s"] / m["seq_per_s"] == pytest.approx(64) for m in records[5:])
    assert all(0 < m["real_tokens_per_s"] <= m["tokens_per_s"] for m in records)
    assert records[5]["learning_rate"] > 0 and (tmp_path / "tensorboard").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resuming_another_run_is_refused_with_both_values():
    config = default_config("tiny")
    config.train.phases = ((0, 128, 20, 256),)
    saved = config.to_dict()
    saved["model"].update(dtype="bfloat16", hidden_dropout_rate=0.0)  # these may change
    saved["data"]["data_dir"] = "/elsewhere"
    saved["train"]["phases"] = [[0, 128, 20, 256]]  # as JSON gives it back
    train.check_resumable(saved, config)
    # A field newer than the checkpoint had its default then.
    del saved["data"]["instances_per_row"]
    train.check_resumable(saved, config)
    config.data.instances_per_row = 3
    with pytest.raises(ValueError, match="data.instances_per_row=1 but the config has 3"):
        train.check_resumable(saved, config)
    config.data.instances_per_row = 1
    with pytest.raises(ValueError, match="holds a fine-tuning run, not a pretraining one"):
        train.check_resumable({**saved, "task": {"name": "builtin"}}, config)
    for section, key, value, shown in [("model", "num_layers", 4, "model.num_layers=4"),
                                       ("train", "seed", 7, "train.seed=7"),
                                       ("data", "max_seq_length", 512, "data.max_seq_length=512")]:
        changed = {**saved, section: {**saved[section], key: value}}
        with pytest.raises(ValueError, match=f"{shown} but the config has"):
            train.check_resumable(changed, config)
