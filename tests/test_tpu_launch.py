"""launch/tpu_vm.sh on a simulated pod, and the GKE JobSet for runs that must recover
without a laptop.

The pod: tests/fakes/gcloud implements the gcloud commands the launcher uses, with gcloud's
own syntax; a v4-32 is 4 workers, each a directory (its home) where `ssh --command` runs as a
local process with what a TPU VM gives JAX (coordinator, process id; here one CPU device per
worker and jax.distributed over localhost). The workers install this commit with real `uv`
into environments of their own, seeded from this machine's packages (`--extra none
--system-site-packages --no-deps`: nothing is downloaded, libtpu included, and uv runs
offline to prove it).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain_runs import assert_same_run, overrides

ROOT = Path(__file__).parents[1]
FAKES = Path(__file__).parent / "fakes"
LAUNCHER = ROOT / "launch" / "tpu_vm.sh"
GKE = ROOT / "launch" / "gke"
ZONE = "us-central2-b"
SIMULATED = ["--name", "bert", "--zone", ZONE, "--type", "v4-32", "--spot",
             "--extra", "none", "--python", sys.executable, "--system-site-packages",
             "--no-deps", "--poll-interval", "1"]


def _fake_env(tmp_path) -> dict:
    uv = pytest.importorskip("uv")
    env = dict(os.environ)
    env.update(PATH=os.pathsep.join([str(FAKES), os.path.dirname(uv.find_uv_bin()), env["PATH"]]),
               FAKE_GCLOUD_DIR=str(tmp_path / "gcloud"), UV_CACHE_DIR=str(tmp_path / "uv-cache"),
               UV_PYTHON_DOWNLOADS="never", UV_OFFLINE="1", UV_NO_BUILD_ISOLATION="1")
    return env


def _gcloud(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(FAKES / "gcloud"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def _until(condition, launcher, log, timeout=300, interval=0.2):
    deadline = time.time() + timeout
    while not condition():
        assert launcher.poll() is None, log.read_text()[-5000:]
        assert time.time() < deadline, log.read_text()[-5000:]
        time.sleep(interval)


def _checkpoints(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() \
        else []


def _alive(pid) -> bool:
    """Running, not a zombie (left by an init that does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _calls(env) -> list[list[str]]:
    return [json.loads(line)
            for line in (Path(env["FAKE_GCLOUD_DIR"]) / "calls.log").read_text().splitlines()]


def test_fake_gcloud_sizes_slices_gives_workers_a_pod_environment_and_preempts(tmp_path):
    env = _fake_env(tmp_path)
    tpu = ["compute", "tpus", "tpu-vm"]
    assert _gcloud(env, *tpu, "create", "t", "--zone", ZONE, "--accelerator-type=v5p-32",
                   "--version=v2-alpha-tpuv5").returncode == 0
    state = _gcloud(env, *tpu, "describe", "t", f"--zone={ZONE}", "--format=value(state)")
    assert state.stdout == "READY\n"
    ssh = _gcloud(env, *tpu, "ssh", "t", f"--zone={ZONE}", "--worker=all",
                  "--command=echo $JAX_PROCESS_ID $JAX_NUM_PROCESSES ${PWD##*/} $JAX_PLATFORMS")
    assert ssh.returncode == 0, ssh.stderr
    assert sorted(ssh.stdout.splitlines()) == [f"{i} 4 {i} cpu" for i in range(4)]  # 4 hosts
    # A detached process on worker 1 survives its session, not the preemption.
    detached = _gcloud(env, *tpu, "ssh", "t", f"--zone={ZONE}", "--worker=1",
                       "--command=setsid nohup sleep 600 >/dev/null 2>&1 </dev/null & echo $!")
    pid = int(detached.stdout)
    assert _alive(pid)
    assert _gcloud(env, "fake", "preempt", "t", f"--zone={ZONE}", "--worker=1").returncode == 0
    time.sleep(0.2)
    assert not _alive(pid)
    state = _gcloud(env, *tpu, "describe", "t", f"--zone={ZONE}", "--format=value(state)")
    assert state.stdout == "PREEMPTED\n"
    assert _gcloud(env, *tpu, "ssh", "t", f"--zone={ZONE}", "--command=true").returncode == 255
    bad = _gcloud(env, *tpu, "ssh", "t", f"--zone={ZONE}", "--frobnicate")
    assert bad.returncode == 2 and "unrecognized arguments: --frobnicate" in bad.stderr
    assert _gcloud(env, *tpu, "delete", "t", f"--zone={ZONE}", "--quiet").returncode == 0
    gone = _gcloud(env, *tpu, "describe", "t", f"--zone={ZONE}")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


@pytest.mark.slow
def test_simulated_pod_survives_a_dropped_ssh_and_a_preemption_with_the_losses_of_a_straight_run(
        straight_run, tmp_path):
    if sys.prefix != sys.base_prefix:
        pytest.skip("the workers' environments are seeded from this interpreter's packages; "
                    "uv would seed them from the base of this virtual environment instead")
    reference, data_dir, _ = straight_run
    env, workdir, log = _fake_env(tmp_path), tmp_path / "run", tmp_path / "launcher.log"
    # `--heartbeat-timeout` is the run's own option, which prepare-data must not be given.
    run_args = [*overrides(data_dir), "--heartbeat-timeout", "15"]
    try:
        with open(log, "w") as out:
            launcher = subprocess.Popen(
                ["bash", str(LAUNCHER), *SIMULATED, "--keep-alive", "--workdir", str(workdir),
                 "--", *run_args], env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                # While the run compiles, the ssh session that follows worker 0 drops.
                _until(lambda: _gcloud(env, "fake", "drop-ssh", "bert", f"--zone={ZONE}",
                                       "--match=--on-worker follow").returncode == 0,
                       launcher, log)
                _until(lambda: "following again" in log.read_text(), launcher, log)
                # After the first checkpoint, a preemption: worker 1's processes die with
                # SIGKILL, the TPU is PREEMPTED (its queued resource SUSPENDED).
                _until(lambda: _checkpoints(workdir), launcher, log, interval=0.05)
                assert _gcloud(env, "fake", "preempt", "bert", f"--zone={ZONE}",
                               "--worker=1").returncode == 0
                launcher.wait(timeout=600)
            finally:
                if launcher.poll() is None:
                    launcher.kill()
        output = log.read_text()
        assert launcher.returncode == 0, output[-5000:]
        assert "lost the ssh session to worker 0 while the TPU is READY; following again" in output
        assert "TPU bert was preempted" in output
        resumed = re.search(r"resumed from \S+ at step (\d+)", output)
        assert resumed and 5 <= int(resumed.group(1)) < 20, output[-5000:]
        assert "stopped at step 20" in output
        # Installed on each worker of the first TPU and of the one created after the
        # preemption (new VMs), data prepared once, the run started twice.
        assert output.count("installing bert-jax") == 8
        assert output.count("bert-jax prepare-data") == 1
        calls = _calls(env)
        assert sum(c[2:4] == ["queued-resources", "create"] for c in calls) == 2
        assert sum(c[2:4] == ["queued-resources", "delete"] for c in calls) == 1
        # Logs reach the workdir every 60 s and at the end, each worker on its own clock: the
        # preempted start has the copies that came before its workers were lost (any of them,
        # as on a real TPU VM); the last start has all four.
        starts = sorted((workdir / "logs").iterdir())
        workers = {f"worker-{i}.log" for i in range(4)}
        assert 1 <= len(starts) <= 2
        assert {p.name for p in starts[-1].iterdir()} == workers
        assert all({p.name for p in start.iterdir()} <= workers for start in starts)
        assert "stopped at step 20" in (starts[-1] / "worker-0.log").read_text()
        assert_same_run(reference, workdir, rtol=1e-5)

        # Something else holds worker 2's chips (no pid file of ours), and a stale libtpu
        # lockfile is left behind: the next start stops that process, removes the file.
        stray = _gcloud(env, "compute", "tpus", "tpu-vm", "ssh", "bert", f"--zone={ZONE}",
                        "--worker=2", "--command=touch tmp/libtpu_lockfile; setsid nohup bash "
                        "-c 'exec 3<dev/accel0; exec sleep 600' >/dev/null 2>&1 </dev/null & "
                        "echo $!")
        stray_pid = int(stray.stdout)
        assert _alive(stray_pid)
        # Again on the same (READY) TPU: the commit is installed, so the install is skipped;
        # a bad override fails the run, and its exit code reaches this side.
        again = subprocess.run(
            ["bash", str(LAUNCHER), *SIMULATED, "--workdir", str(workdir), "--prepare-data",
             "none", "--", *run_args, "--config.train.no_such_field=1"], env=env,
            capture_output=True, text=True, timeout=300)
        output = again.stdout + again.stderr
        assert again.returncode == 2, output[-5000:]
        assert output.count("already installed") == 4 and "installing" not in output
        assert "unknown field 'no_such_field'" in output
        assert f"worker 2: killing pid {stray_pid}, which holds the TPU" in output
        assert not _alive(stray_pid)
        worker_2 = Path(env["FAKE_GCLOUD_DIR"]) / "zones" / ZONE / "nodes" / "bert" / "workers" / "2"
        assert (worker_2 / "dev" / "accel0").exists()
        assert not (worker_2 / "tmp" / "libtpu_lockfile").exists()
    finally:
        _gcloud(env, "compute", "tpus", "queued-resources", "delete", "bert", f"--zone={ZONE}",
                "--force", "--quiet")


def test_a_worker_stops_its_run_by_pid_file_with_sigterm_and_records_the_preemption(tmp_path):
    """The worker side alone (launch/tpu_vm.sh --on-worker ...), with a stand-in bert-jax
    that runs until SIGTERM, then says what bert-jax says after saving on a preemption."""
    home, workdir = tmp_path / "home", tmp_path / "run"
    fake = home / "bert-jax-venv" / "bin" / "bert-jax"
    fake.parent.mkdir(parents=True)
    (home / "bert-jax").mkdir()
    (home / "dev").mkdir()
    (home / "tmp").mkdir()
    fake.write_text("""#!/usr/bin/env bash
trap 'echo "stopped at step 7 after 1s (preempted: checkpoint saved, run again to resume)"; exit 0' TERM
echo "pretrain $*"
while true; do sleep 0.1; done
""")
    fake.chmod(0o755)
    (home / "bert-jax-venv" / ".bert-jax-installed").write_text(
        "abc extra=none python=3.11 system-site-packages=0 no-deps=0\n")
    env = {**os.environ, "HOME": str(home), "JAX_PROCESS_ID": "0",
           "BERT_JAX_TPU_DEVICES": f"{home}/dev/accel*",
           "BERT_JAX_LIBTPU_LOCKFILE": f"{home}/tmp/libtpu_lockfile"}

    def worker(*args):
        return subprocess.run(["bash", str(LAUNCHER), "--on-worker", *args], env=env, cwd=home,
                              capture_output=True, text=True, timeout=60)

    started = worker("start", "20260101T000000Z", str(workdir), "--config.train.seed=1")
    assert started.returncode == 0 and "run started" in started.stdout, started.stderr
    assert worker("status").stdout == "running\n"
    setup = worker("setup", "abc", "none", "3.11", "0", "0")
    assert setup.returncode == 0, setup.stderr
    assert "stopping the run still going" in setup.stdout and "skipping the install" in setup.stdout
    assert worker("status").stdout == "exit preempted\n"
    log = (workdir / "logs" / "20260101T000000Z" / "worker-0.log").read_text()
    assert f"pretrain --workdir={workdir} --config.train.seed=1" in log
    assert "exited with code 0" in log


def _hosts(topology: str, chips_per_host: int = 4) -> int:
    chips = 1
    for side in topology.split("x"):
        chips *= int(side)
    return chips // chips_per_host


def test_gke_jobset_runs_one_process_per_host_of_a_v5p_128_and_restarts_on_failure():
    (jobset,) = yaml.safe_load_all((GKE / "jobset-v5p-128.yaml").read_text())
    assert jobset["apiVersion"].startswith("jobset.x-k8s.io/") and jobset["kind"] == "JobSet"
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 10
    (slice_job,) = jobset["spec"]["replicatedJobs"]
    job = slice_job["template"]["spec"]
    pod = job["template"]["spec"]
    selector = pod["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5p-slice"
    assert selector["cloud.google.com/gke-tpu-topology"] == "4x4x4"  # v5p-128: 64 chips
    # One process per host: 16 pods of 4 chips.
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert job["parallelism"] == job["completions"] == _hosts("4x4x4") == 16
    # A failed pod fails the Job at once, and the JobSet starts the slice again.
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 120  # the checkpoint saved on SIGTERM
    assert container["command"] == ["bash", "/bert-jax/launch/gke/entrypoint.sh"]
    args = container["args"]
    assert "--config=configs/pods/base.py:v5p-128" in args
    assert any(a.startswith("--workdir=gs://") for a in args)
    assert any(a.startswith("--config.data.data_dir=gs://") for a in args)
    assert (ROOT / "configs" / "pods" / "base.py").is_file()
    dockerfile = (GKE / "Dockerfile").read_text()
    assert "WORKDIR /bert-jax" in dockerfile and "'.[tpu]'" in dockerfile
    assert container["workingDir"] == "/bert-jax"


@pytest.mark.parametrize("mode, expected", [("done", 0), ("fail", 3), ("preempted", 75),
                                            ("sigterm", 75)])
def test_gke_entrypoint_passes_sigterm_on_and_fails_a_preempted_run_so_it_restarts(
        tmp_path, mode, expected):
    fake = tmp_path / "bin" / "bert-jax"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env bash
        [[ $1 == pretrain ]] || exit 9
        case {mode} in
          done) echo "stopped at step 20 after 1s" ;;
          fail) exit 3 ;;
          preempted) echo "stopped at step 7 after 1s (preempted: checkpoint saved, run again to resume)" ;;
          sigterm)
            trap 'echo "stopped at step 7 after 1s (preempted: checkpoint saved, run again to resume)"; exit 0' TERM
            touch {tmp_path}/started
            while true; do sleep 0.1; done ;;
        esac
        """)
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    entry = subprocess.Popen(["bash", str(GKE / "entrypoint.sh"), "--workdir=gs://b/r"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if mode == "sigterm":
        deadline = time.time() + 30
        while not (tmp_path / "started").exists():
            assert time.time() < deadline and entry.poll() is None
            time.sleep(0.05)
        entry.send_signal(signal.SIGTERM)
    output, _ = entry.communicate(timeout=30)
    assert entry.returncode == expected, output
    assert ("exit 75 so that the JobSet starts the run again" in output) == (expected == 75)
