import subprocess
import sys
from pathlib import Path

import pytest

PODS = Path(__file__).parents[1] / "configs" / "pods"


def _bert_jax(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_explains_every_subcommand():
    result = _bert_jax("--help")
    assert result.returncode == 0
    subcommands = ["pretrain", "prepare-data", "inspect-data", "benchmark-data", "eval",
                   "export", "fill-mask", "compile"]
    for name in subcommands:
        assert name in result.stdout
        sub = _bert_jax(name, "--help")
        assert sub.returncode == 0 and len(sub.stdout.splitlines()) > 4, name


@pytest.mark.parametrize("args, words", [
    (["pretrain", "--config.model.num_heads=3"], ["hidden_size=128", "num_heads=3"]),
    (["pretrain", "--config.model.bogus=1"], ["bogus"]),
    (["pretrain", "--config.model.num_layers=two"], ["num_layers", "two"]),
    (["pretrain", "--config=missing.py"], ["missing.py", "does not exist"]),
    (["pretrain", f"--config={PODS}/base.py:v9-8"], ["v9-8", "v4-32"]),
    (["pretrain", "--num-processes=2", "--config.train.num_steps=1"],
     ["missing ['coordinator_address', 'process_id']", "--coordinator-address"]),
    (["pretrain", "--verbose"], ["--verbose"]),
    (["pretrain", "--config.train.optimizer=sgd"], ["train.optimizer='sgd'", "adamw"]),
    (["prepare-data", "--config.data.corpus=/nowhere/*.txt"], ["/nowhere/*.txt"]),
    (["prepare-data", "--config.data.masked_lm_prob=1.5"], ["masked_lm_prob=1.5"]),
    (["eval", "--workdir=/nowhere"], ["/nowhere", "no checkpoint"]),
    (["export", "--workdir=/nowhere", "--out=/tmp/x", "--config.data.seed=1"],
     ["--config.data.seed=1", "saved in the workdir"]),
    (["fill-mask", "/nowhere", "a [MASK]"], ["/nowhere"]),
    (["inspect-data", "--steps=0"], ["--steps", "'0'", "positive integer"]),
    (["inspect-data", "--config.train.phases=((0, 64, 10, 8), (5, 128, 20, 8))",
      "--config.train.num_steps=10", "--start-step=3", "--steps=4"],
     ["cross the phase boundary at step 5"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["compile", "--tpu=v4-32"], ["libtpu", "pip install 'bert-jax[tpu]'"]),  # not in [test]
])
def test_bad_input_is_one_line_and_exit_code_2(args, words):
    result = _bert_jax(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
