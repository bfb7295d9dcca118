"""Ahead-of-time compilation of the train step for a TPU slice, on a machine without TPUs.

With the `libtpu` package installed (the `tpu` extra), `jax.experimental.topologies` describes a
slice's chips, and XLA compiles the jitted, sharded train step for them exactly as it would on
the slice (MaxText's train_compile does the same). That answers "does this config fit, and with
how much room?" before any TPU is rented: the compiled program's memory per chip is XLA's own.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import ml_collections

from bert_jax import sharding, train
from bert_jax.config import ModelConfig
from bert_jax.data.masking import batch_shapes
from bert_jax.optim import learning_rate_schedule, make_optimizer

# Cloud TPU accelerator types -> (JAX topology name prefix, TensorCores per chip). The number
# in a v4/v5p type counts TensorCores (2 per chip, run as one "megacore" device); in a
# v5e/v6e type it counts chips.
_GENERATIONS = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5e", 1), "v5litepod": ("v5e", 1),
                "v6e": ("v6e", 1)}
_SHAPES = {  # chips -> topology shape
    "v4": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"},
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
}


def topology_name(accelerator_type: str) -> str:
    """`v5e-16` / `v5litepod-16` -> `v5e:4x4`, `v4-32` -> `v4:2x2x4` (JAX's topology names)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise ValueError(f"TPU type {accelerator_type!r}: expected e.g. v4-32, v5p-128, v5e-16 "
                         f"or v6e-64")
    generation, per_chip = _GENERATIONS[match.group(1)]
    chips = int(match.group(2)) // per_chip
    shape = _SHAPES[generation].get(chips)
    if shape is None:
        raise ValueError(f"TPU type {accelerator_type!r} ({chips} chips): expected one of "
                         f"{sorted(_SHAPES[generation])} chips for {generation}")
    return f"{generation}:{shape}"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What XLA reports for one train step compiled for a slice. `out_of_memory` holds XLA's
    message when the step does not fit a chip (then `bytes_per_chip` is empty)."""

    topology: str
    chips: int
    seconds: float
    bytes_per_chip: dict  # arguments, outputs, aliased, temporaries, code, total
    out_of_memory: str | None = None


def compile_train_step(config: ml_collections.ConfigDict, accelerator_type: str,
                       phase_index: int = 0) -> Compiled:
    """Compiles the train step of one of `config`'s phases for `accelerator_type`."""
    from jax.experimental import topologies

    topology = topology_name(accelerator_type)
    megacore = topology.startswith(("v4", "v5p"))
    devices = topologies.get_topology_desc(
        topology, "tpu", **({"chip_config_name": "megacore"} if megacore else {})).devices
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    phase = train.phases(config)[phase_index]
    model_config = ModelConfig.from_dict(config.model)
    tx = make_optimizer(config.train)
    spec = train.state_spec(model_config, tx, config.train.seed, mesh, config.train.rng_impl)
    batch_sharding = sharding.batch_sharding(mesh)
    rows, length, predictions = (phase.global_batch_size, phase.max_seq_length,
                                 phase.max_predictions_per_seq)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
             for name, (shape, dtype) in batch_shapes(
                 rows, length, predictions, phase.instances_per_row).items()}
    step = train.jit_train_step(spec, tx, learning_rate_schedule(config.train), mesh,
                                phase.grad_accum_steps)
    started = time.perf_counter()
    try:
        compiled = step.lower(spec.abstract, batch).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        message = str(error).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]
        return Compiled(topology, len(devices), time.perf_counter() - started, {}, message)
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
             "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
             "code": memory.generated_code_size_in_bytes}
    # Donated state is aliased: its outputs reuse the arguments' memory.
    sizes["total"] = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"]
                      + sizes["temporaries"] + sizes["code"])
    return Compiled(topology, len(devices), seconds, sizes)
