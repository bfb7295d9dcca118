"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, this process and the `bert-jax`
# subprocesses alike: the many tiny runs compile the same steps, each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="bert-jax-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """20 uninterrupted steps on the built-in corpus, one process with 4 devices: the
    reference for resumed, preempted and multi-process runs. Returns (workdir, data_dir,
    stdout)."""
    from pretrain_runs import overrides, pretrain

    root = tmp_path_factory.mktemp("straight")
    result = pretrain(root / "run", overrides(root / "data"))
    assert result.returncode == 0, result.stderr
    return root / "run", root / "data", result.stdout
