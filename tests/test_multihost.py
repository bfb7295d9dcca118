"""Multi-process runs on jax.distributed (gloo on localhost), started by
launch/local_multihost.sh: elastic resume equals the one-process run, a dead process stops
the others."""

import re
import subprocess
import time

import pytest

from bert_jax.metrics import read_metrics
from pretrain_runs import assert_same_run, multihost_command, overrides, pretrain


def _run(command):
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_one_process_resumes_as_two_with_the_same_losses(straight_run, tmp_path):
    reference, data_dir, _ = straight_run
    first = pretrain(tmp_path / "a", overrides(data_dir, **{"train.stop_at_step": 10}))
    assert first.returncode == 0, first.stderr
    assert "stopped at step 10" in first.stdout
    # 2 processes x 2 devices, on another mesh: 2-way data x 2-way FSDP.
    as_two = _run(multihost_command(2, tmp_path / "a", overrides(
        data_dir, **{"mesh.data": 2, "mesh.fsdp": 2})))
    assert as_two.returncode == 0, as_two.stderr
    assert "process 0 of 2 (given addresses), 2 of 4 devices" in as_two.stderr
    assert "resumed from" in as_two.stdout and "exported to" in as_two.stdout
    # Sharded parameters sum their gradients in another order: rounding differs.
    assert_same_run(reference, tmp_path / "a", rtol=1e-5)


@pytest.mark.slow
def test_killing_one_process_stops_the_others_with_an_error_within_60_seconds(straight_run,
                                                                               tmp_path):
    _, data_dir, _ = straight_run
    log = tmp_path / "launcher.log"
    # A long grace: the survivor must stop through JAX's own failure detection.
    command = multihost_command(2, tmp_path / "run", overrides(
        data_dir, **{"train.num_steps": 100_000}), "--grace", "600", "--log-dir",
        str(tmp_path / "logs"))
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and not (
                (tmp_path / "run" / "metrics.jsonl").is_file() and read_metrics(tmp_path / "run")):
            assert launcher.poll() is None, log.read_text()
            time.sleep(0.2)
        victim = int(re.search(r"process 1: pid (\d+)", log.read_text()).group(1))
        killed = time.time()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        launcher.wait(timeout=120)
        waited = time.time() - killed
    output = log.read_text()
    assert launcher.returncode != 0
    assert waited < 60, output
    assert "process 1 exited with code 137" in output
    assert re.search(r"process 0 exited with code [1-9]", output)
    assert "another task died" in output  # process 0's own error, from jax.distributed
