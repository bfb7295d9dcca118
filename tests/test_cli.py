import re
import subprocess
import sys

import pytest


def _bert_jax(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    result = _bert_jax("--help")
    assert result.returncode == 0
    assert "pretrain" in result.stdout
    sub = _bert_jax("pretrain", "--help")
    assert sub.returncode == 0 and "--config.FIELD=VALUE" in sub.stdout


def test_pretrain_smoke_run_lowers_the_loss():
    result = _bert_jax("pretrain", "--steps=6", "--config.train.global_batch_size=4")
    assert result.returncode == 0, result.stderr
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert last < first - 0.5


@pytest.mark.parametrize("args, words", [
    (["--config.model.num_heads=3"], ["hidden_size=128", "num_heads=3"]),
    (["--config.model.bogus=1"], ["bogus"]),
    (["--config.model.num_layers=two"], ["num_layers", "two"]),
    (["--config=missing.py"], ["missing.py", "does not exist"]),
    (["--verbose"], ["--verbose"]),
])
def test_bad_config_is_one_line_and_exit_code_2(args, words):
    result = _bert_jax("pretrain", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
