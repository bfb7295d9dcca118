"""Multi-process runs on JAX's own runtime: start it, wait for each other, stop together.

One process per host (TPU VM worker, GPU node, or group of CPU devices), each running the same
program on its own devices, connected by XLA's collectives (ICI/DCN on TPU, NCCL on GPU, gloo
on CPU). When one process dies, `jax.distributed`'s coordination service stops the others with
an error within the heartbeat timeout, instead of leaving them blocked in a collective for ever.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from bert_jax.config import ConfigError

# Long enough for a stalled host to recover, short enough that a dead one stops the run
# within a minute (the detection takes up to this long, then the others abort).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class Options:
    """Where the processes meet. All None: detect a cluster, or run as one process."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S

    @classmethod
    def from_env(cls, **given) -> Options:
        """`given` values (None: unset) over JAX's variables JAX_COORDINATOR_ADDRESS,
        JAX_NUM_PROCESSES and JAX_PROCESS_ID (which `launch/` scripts set)."""
        env = {"coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
               "num_processes": _env_int("JAX_NUM_PROCESSES"),
               "process_id": _env_int("JAX_PROCESS_ID")}
        values = {k: v for k, v in given.items() if v is not None}
        return cls(**{**env, **values})


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    if not value.isdigit():
        raise ConfigError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def detected_cluster() -> str | None:
    """The multi-process environment this process was started in, if any, by the variables
    (or devices) that `jax.distributed.initialize()` itself detects."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if importlib.util.find_spec("libtpu") is not None and _has_tpu_chips():
        return "Cloud TPU"  # one host or many: the TPU metadata tells JAX which
    return None


def _has_tpu_chips() -> bool:
    for vendor_file in Path("/sys/bus/pci/devices").glob("*/vendor"):
        try:  # TPU chips show up as PCI devices of Google's vendor id
            if vendor_file.read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False


def initialize(options: Options) -> str | None:
    """Starts JAX's distributed runtime when the run spans processes; must run before anything
    touches a JAX device. Returns how the processes were found (None: one process).

    Explicit options win; otherwise SLURM, Open MPI and Cloud TPU are detected and JAX reads
    their variables. `num_processes=1` forces a one-process run."""
    if options.num_processes == 1:
        return None
    missing = [name for name in ("coordinator_address", "num_processes", "process_id")
               if getattr(options, name) is None]
    if len(missing) < 3:  # given explicitly, all or some
        if missing and detected_cluster() is None:
            flag = missing[0].replace("_", "-")
            raise ConfigError(f"a multi-process run needs coordinator_address, num_processes and "
                              f"process_id; missing {missing}: pass --{flag} or set "
                              f"JAX_{missing[0].upper()}")
        how = "given addresses"
    else:
        how = detected_cluster()
        if how is None:
            return None
    if options.process_id is not None and options.num_processes is not None and not (
            0 <= options.process_id < options.num_processes):
        raise ConfigError(f"process_id={options.process_id}: expected 0 <= process_id < "
                          f"num_processes={options.num_processes}")
    import jax  # here, not at import: `bert-jax --help` stays quick

    # CPU devices talk through gloo (the default CPU backend has no cross-process collectives);
    # the setting only concerns the CPU backend, so GPU and TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(options.coordinator_address, options.num_processes,
                               options.process_id,
                               heartbeat_timeout_seconds=options.heartbeat_timeout_s)
    return how


def barrier(name: str, timeout_s: int = 24 * 3600) -> None:
    """Waits until every process reaches `name` (unique; a no-op in one process): a
    coordination-service barrier, not a device collective, so it may wait for hours (process 0
    building the dataset) without tripping a collective's timeout."""
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=f"bert-jax:{name}", timeout_ms=timeout_s * 1000)
