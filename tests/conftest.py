"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported).

The suite runs on pytest-xdist workers (setup.cfg); what is expensive to build once is shared
by them: the compilation cache and the `straight_run` reference."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402  (after the environment above)
from filelock import FileLock  # noqa: E402


def pytest_configure(config):
    """One persistent compilation cache for the run, every xdist worker and the `bert-jax`
    subprocesses alike: the many tiny runs compile the same steps, each once. (Set here, not
    above: a worker learns the run's id only now, still before any test imports jax.)"""
    run = getattr(config, "workerinput", {}).get("testrunuid")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"bert-jax-xla-{run}") if run else tempfile.mkdtemp(
        prefix="bert-jax-xla-"))


def pytest_collection_modifyitems(config, items):
    """The slow tests first: xdist's work stealing then gives the other workers the quick
    ones and nobody waits at the end on a 2-minute test begun last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, worker_id):
    """20 uninterrupted steps on the built-in corpus, one process with 4 devices: the
    reference for resumed, preempted and multi-process runs, built once per test run (the
    first worker to need it builds it; tests copy what they change). Returns (workdir,
    data_dir, stdout)."""
    from pretrain_runs import overrides, pretrain

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # the run's temporary directory, above the workers' own
        shared = shared.parent
    root, stdout = shared / "straight", shared / "straight.stdout"
    with FileLock(str(shared / "straight.lock")):
        if not stdout.is_file():
            result = pretrain(root / "run", overrides(root / "data"))
            assert result.returncode == 0, result.stderr
            stdout.write_text(result.stdout)
    return root / "run", root / "data", stdout.read_text()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://bucket/...` served from a local folder through `etils.epath` (GCS is not
    reachable from tests); returns that folder. Only code that goes through `epath` reaches
    it: the working directory is an empty folder checked at the end, so code that took a URL
    for a local path (leaving a `gs:` folder there) fails the test."""
    from etils.epath import gpath, testing

    root, cwd = tmp_path / "bucket", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # With TensorFlow installed, epath sends gs:// to tf.io.gfile, past mock_epath's backend.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

    def local(path):
        path = os.fspath(path)
        if path.startswith("gs://"):
            bucket_name, _, key = path.removeprefix("gs://").partition("/")
            assert bucket_name == "bucket", path
            return str(root / key)
        return path

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, destination, **kwargs):
        return original(local(path), local(destination), **kwargs)

    with testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, glob=one, walk=one, makedirs=one,
            mkdir=one, remove=one, rmtree=one, stat=one, copy=two, rename=two, replace=two):
        yield root
    assert not list(cwd.iterdir()), "a gs:// path was written as a local path"
