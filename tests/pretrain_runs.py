"""`bert-jax pretrain` runs in subprocesses, shared by the training and multi-host tests: the
overrides of a 20-step tiny run, and the check that two runs are the same run."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import bert_jax
from bert_jax.metrics import read_metrics

DEVICES = 4  # the reference run: one process with 4 devices
LOCAL_MULTIHOST = Path(__file__).parents[1] / "launch" / "local_multihost.sh"
PRETRAIN = [sys.executable, "-m", "bert_jax.cli", "pretrain"]


def overrides(data_dir, **extra) -> list[str]:
    values = {"data.data_dir": data_dir, "data.corpus": "builtin", "data.vocab_size": 2000,
              "data.validation_fraction": 0.02, "data.max_seq_length": 64,
              "data.max_predictions_per_seq": 10, "train.num_steps": 20,
              "train.global_batch_size": 16, "train.warmup_steps": 5, "train.learning_rate": 1e-3,
              "train.log_every": 1, "checkpoint.every_steps": 5,
              "model.max_position_embeddings": 64, **extra}
    return [f"--config.{k}={v}" for k, v in values.items()]


def one_process_env(devices: int = DEVICES) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def pretrain(workdir, args, cwd=None) -> subprocess.CompletedProcess:
    """One process with `DEVICES` CPU devices."""
    return subprocess.run([*PRETRAIN, f"--workdir={workdir}", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=one_process_env())


def multihost_command(processes: int, workdir, args, *launcher_options) -> list[str]:
    """`processes` processes sharing `DEVICES` CPU devices, through launch/local_multihost.sh."""
    return ["bash", str(LOCAL_MULTIHOST), "--devices", str(DEVICES), *launcher_options,
            str(processes), "--", *PRETRAIN, f"--workdir={workdir}", *args]


def assert_same_run(a, b, rtol=1e-6):
    """Same logged steps with the same metrics, and the same final weights."""
    train_a = [m for m in read_metrics(a) if "split" not in m]
    train_b = [m for m in read_metrics(b) if "split" not in m]
    assert [m["step"] for m in train_a] == [m["step"] for m in train_b]
    for x, y in zip(train_a, train_b):
        for name in ("loss", "mlm_accuracy", "nsp_loss", "grad_norm", "learning_rate"):
            assert x[name] == pytest.approx(y[name], rel=rtol, abs=rtol / 10), (x["step"], name)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol / 10),
                 bert_jax.load(a).params, bert_jax.load(b).params)
