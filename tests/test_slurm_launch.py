"""launch/slurm.sbatch run by a fake SLURM (tests/fakes/sbatch, srun, scontrol; real syntax,
local processes): the tasks start jax.distributed through JAX's own SLURM detection, a run
hitting its time limit saves, requeues itself and finishes with the losses of a straight run;
the chaining rules (successor jobs, when not to continue) with a stand-in for bert-jax."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain_runs import assert_same_run, overrides

REPO = Path(__file__).parents[1]
FAKES = Path(__file__).parent / "fakes"
SBATCH = REPO / "launch" / "slurm.sbatch"


@pytest.fixture
def slurm(tmp_path):
    """The environment of a fake SLURM cluster (state in tmp_path/slurm); returns a function
    giving sbatch's environment with `extra`. Ends whatever the test's jobs left running."""
    state = tmp_path / "slurm"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # bert-jax of this checkout, on this interpreter (as python3, which the script also runs).
    (bin_dir / "bert-jax").write_text(f"#!/bin/sh\nexec {sys.executable} -m bert_jax.cli \"$@\"\n")
    (bin_dir / "bert-jax").chmod(0o755)
    path = os.pathsep.join([str(FAKES), str(bin_dir), str(Path(sys.executable).parent),
                            os.environ["PATH"]])

    def env(**extra):
        return {**os.environ, "PATH": path, "FAKE_SLURM_DIR": str(state), "JAX_PLATFORMS": "cpu",
                **{k: str(v) for k, v in extra.items()}}

    env.state = state
    env.bin = bin_dir
    yield env
    for job_file in state.glob("jobs/*/job.json"):
        job = json.loads(job_file.read_text())
        groups = [job.get("batch_pid")] + [int(g) for f in job_file.parent.glob("steps/*")
                                           for g in f.read_text().split()]
        for group in filter(None, groups):
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _jobs(state) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(
        state.glob("jobs/*/job.json"), key=lambda p: int(p.parent.name))]


def _calls(state, tool) -> list[list[str]]:
    return [call[1:] for call in map(json.loads, (state / "calls.log").read_text().splitlines())
            if call[0] == tool]


def _wait_for_all_jobs(state, timeout_s=120) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        jobs = _jobs(state)
        if jobs and all(j["state"] in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED")
                        for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"jobs still running after {timeout_s}s: {_jobs(state)}")


def _sbatch(env, *args, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def test_srun_gives_each_task_what_jax_slurm_detection_reads(slurm, tmp_path):
    script = tmp_path / "probe.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=2
        srun {sys.executable} -c 'from jax._src.clusters.slurm_cluster import SlurmCluster as S
        print(S.is_env_present(), S.get_coordinator_address(None, None), S.get_process_count(),
              S.get_process_id(), S.get_local_process_id())'
        """))
    result = _sbatch(slurm(), "--wait", f"--output={tmp_path}/probe-%j.log", str(script),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (job,) = _jobs(slurm.state)
    port = job["id"] % 4096 + 61440  # JAX's port for a SLURM job
    lines = sorted((tmp_path / f"probe-{job['id']}.log").read_text().splitlines())
    assert lines == [f"True localhost:{port} 4 {rank} {rank % 2}" for rank in range(4)]


def _stub(slurm, name="bert-jax"):
    """A stand-in for bert-jax, fast enough for the chaining rules: `pretrain` makes one
    checkpoint folder every 0.2 s up to $STUB_STEPS (or --config.train.stop_at_step), stops at
    SIGTERM with exit 0, fails at $STUB_FAIL_AT, writes WORKDIR/export when done; every call
    is logged to $STUB_LOG."""
    stub = slurm.bin / name
    stub.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        set -euo pipefail
        echo "$*" >>"$STUB_LOG"
        [[ $1 == pretrain ]] || exit 0
        workdir=runs/default; stop=${STUB_STEPS:-10}
        for arg; do
          case $arg in
            --workdir=*) workdir=${arg#*=} ;;
            --config.train.stop_at_step=*) stop=${arg#*=} ;;
          esac
        done
        step=$(ls "$workdir/checkpoints" 2>/dev/null | sort -n | tail -1 || true)
        step=${step:-0}
        term=0
        trap 'term=1' TERM
        while ((step < stop && !term)); do
          sleep 0.2 || true  # SIGTERM ends the sleep too
          step=$((step + 1))
          mkdir -p "$workdir/checkpoints/$step"
          if [[ $step == "${STUB_FAIL_AT:-}" ]]; then exit 1; fi
        done
        if ((step == ${STUB_STEPS:-10})); then mkdir -p "$workdir/export"; fi
        """))
    stub.chmod(0o755)


def test_a_run_past_its_time_limit_continues_in_a_successor_job_with_the_same_resources(
        slurm, tmp_path):
    _stub(slurm)
    workdir, log = tmp_path / "run", tmp_path / "stub.log"
    env = slurm(STUB_LOG=log, FAKE_SLURM_CLOCK_FROM=workdir / "checkpoints" / "3",
                FAKE_SLURM_KILL_WAIT_S=5)
    first = _sbatch(env, "--wait", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1",
                    "--time=1:00", "--signal=TERM@60", "--partition=gpu", "--account=lab",
                    f"--output={tmp_path}/job-%j.log", f"--chdir={tmp_path}", str(SBATCH),
                    "--chain=resubmit", "--", f"--workdir={workdir}", "--config=c.py")
    assert first.returncode == 0, first.stderr
    one, two = _wait_for_all_jobs(slurm.state)
    assert (one["state"], two["state"]) == ("COMPLETED", "COMPLETED")
    (successor,) = _calls(slurm.state, "sbatch")[1:]
    assert successor[:10] == [
        "--dependency=singleton", "--job-name=bert-jax", "--nodes=1", "--time=00:01:00",
        "--partition=gpu", "--account=lab", "--qos=normal", "--ntasks-per-node=1",
        "--gpus-per-node=1", "--cpus-per-task=8"]
    assert successor[10:] == [f"--chdir={tmp_path}", successor[11], "--chain", "resubmit", "--",
                              f"--workdir={workdir}", "--config=c.py"]
    assert successor[11].endswith("slurm_script")  # sbatch's copy of the script, submitted again
    assert _calls(slurm.state, "scontrol") == [["show", "job", str(one["id"])]]
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == 10
    assert (workdir / "export").is_dir()
    first_log = (tmp_path / f"job-{one['id']}.log").read_text()
    assert "continuing with sbatch --dependency=singleton" in first_log, first_log
    # The successor logs where the script's #SBATCH --output says.
    assert "the run has finished" in (tmp_path / f"bert-jax-{two['id']}.log").read_text()
    # Each job: prepare-data with the config (and without --workdir), then pretrain.
    assert log.read_text().splitlines() == [
        "prepare-data --config=c.py", f"pretrain --workdir={workdir} --config=c.py"] * 2


@pytest.mark.parametrize("case, stub_env, saved_step, extra_args, words", [
    ("failed", {"STUB_FAIL_AT": 2}, None, [], "task 0: Exited with exit code 1"),
    ("stop_at_step", {}, None, ["--config.train.stop_at_step=4"],
     "stopped at step 4, not continued: --config.train.stop_at_step=4"),
    ("no progress", {}, 3, ["--config.train.stop_at_step=3"],
     "stopped at step 3, not continued: no new checkpoint in this job"),
], ids=["failed", "stop_at_step", "no-progress"])
def test_a_run_that_failed_stopped_where_asked_or_saved_nothing_new_is_not_requeued(
        slurm, tmp_path, case, stub_env, saved_step, extra_args, words):
    _stub(slurm)
    workdir, log = tmp_path / "run", tmp_path / "stub.log"
    if saved_step:
        (workdir / "checkpoints" / str(saved_step)).mkdir(parents=True)
    result = _sbatch(slurm(STUB_LOG=log, **stub_env), "--wait", "--nodes=1",
                     "--ntasks-per-node=1", f"--output={tmp_path}/job.log", str(SBATCH),
                     "--no-prepare-data", "--", f"--workdir={workdir}", *extra_args)
    (job,) = _jobs(slurm.state)
    output = (tmp_path / "job.log").read_text()
    assert words in output
    assert job["restarts"] == 0 and not _calls(slurm.state, "scontrol"), output
    assert [call.split()[0] for call in log.read_text().splitlines()] == ["pretrain"]
    if case == "failed":
        assert result.returncode == 1 and job["state"] == "FAILED"
    else:
        assert result.returncode == 0 and job["state"] == "COMPLETED"


@pytest.mark.slow
def test_a_run_hitting_its_time_limit_requeues_itself_and_equals_a_straight_run(
        straight_run, slurm, tmp_path):
    """2 nodes x 1 task, each task 2 CPU devices (4 in all, as the straight run): SLURM's
    TERM comes as the first checkpoint lands (step 5), both processes save at one step and
    exit 0, the job requeues itself and its second run resumes and finishes."""
    reference, data_dir, _ = straight_run
    workdir = tmp_path / "run"
    env = slurm(FAKE_SLURM_CLOCK_FROM=workdir / "checkpoints" / "5",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = _sbatch(env, "--wait", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                     "--cpus-per-task=1", "--time=1:00", "--signal=TERM@60",
                     f"--output={tmp_path}/bert-jax-%j.log", f"--chdir={tmp_path}",
                     str(SBATCH), "--", f"--workdir={workdir}", *overrides(data_dir))
    (job,) = _jobs(slurm.state)
    output = (tmp_path / f"bert-jax-{job['id']}.log").read_text()
    assert result.returncode == 0, output
    assert job["state"] == "COMPLETED" and job["restarts"] == 1
    assert _calls(slurm.state, "scontrol") == [["requeue", str(job["id"])]]
    first, second = output.split("slurm.sbatch: job ")[1:]
    assert first.startswith(f"{job['id']}, run 1") and second.startswith(f"{job['id']}, run 2")
    # Both runs: the data step, then 2 processes found through SLURM, with the GPU flags
    # (which XLA would refuse at start if it did not know one).
    for run in (first, second):
        assert "srun --nodes=1 --ntasks=1 env JAX_PLATFORMS=cpu bert-jax prepare-data" in run
        assert "process 0 of 2 (SLURM), 2 of 4 devices" in run
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in run
    assert "(preempted: checkpoint saved, run again to resume)" in first
    stopped = int(first.split("slurm.sbatch: stopped at step ")[1].split(":")[0])
    assert 5 <= stopped < 20, first
    assert "continuing with scontrol requeue" in first
    assert f"resumed from {workdir / 'checkpoints'} at step {stopped}" in second
    assert "the run has finished" in second
    assert_same_run(reference, workdir, rtol=1e-5)
