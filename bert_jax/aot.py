"""Ahead-of-time lowering and compilation of the train step for TPUs and GPUs, on a machine
without either.

With libtpu (the `tpu` extra), XLA compiles the sharded train step for a slice's topology
(`jax.experimental.topologies`) exactly as on the slice, as MaxText's train_compile does: its
memory per chip says whether a config fits before any TPU is rented. For CUDA the step is only
lowered: XLA's GPU compiler needs a GPU. Both show the fused attention kernels it would run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
import ml_collections

from bert_jax import run as runs
from bert_jax import sharding
from bert_jax.config import ConfigError, RunConfig
from bert_jax.data.masking import batch_shapes

# Chips -> topology shape: v4 and v5p slices are 3D, v5e and v6e 2D.
_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
          256: "16x16"}
# Cloud TPU accelerator types -> (JAX topology name prefix, TensorCores per chip, shapes). The
# number in a v4/v5p type counts TensorCores (2 per chip, run as one "megacore" device); in a
# v5e/v6e type it counts chips.
_GENERATIONS = {"v4": ("v4", 2, _CUBES), "v5p": ("v5p", 2, _CUBES), "v5e": ("v5e", 1, _GRIDS),
                "v5litepod": ("v5e", 1, _GRIDS), "v6e": ("v6e", 1, _GRIDS)}


def topology_name(accelerator_type: str) -> str:
    """`v5e-16` / `v5litepod-16` -> `v5e:4x4`, `v4-32` -> `v4:2x2x4` (JAX's topology names)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise ConfigError(f"TPU type {accelerator_type!r}: expected e.g. v4-32, v5p-128, v5e-16 "
                          f"or v6e-64")
    generation, per_chip, shapes = _GENERATIONS[match.group(1)]
    chips = int(match.group(2)) // per_chip
    if chips not in shapes:
        raise ConfigError(f"TPU type {accelerator_type!r} ({chips} chips): expected one of "
                          f"{sorted(shapes)} chips for {generation}")
    return f"{generation}:{shapes[chips]}"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One phase's train step lowered (and, for TPUs, compiled) for a target: the phase's
    attention kernel, the fused-attention calls of the lowered module and, for TPUs, XLA's
    memory per chip or its message when the step does not fit a chip."""

    target: str  # a JAX TPU topology, or `cuda`
    devices: int
    attention: str
    fused_attention: list
    seconds: float
    bytes_per_chip: dict | None = None  # arguments, outputs, aliased, temporaries, code, total
    out_of_memory: str | None = None


def lower_train_step(config: ml_collections.ConfigDict, target: str, phase_index: int = 0):
    """The train step of one of `config`'s phases lowered for `target`, on a TPU type's chips
    from libtpu's topology, or for `cuda` on this machine's devices standing in for GPUs.
    Returns (lowered, attention kernel of the phase, devices)."""
    if target == "cuda":
        platform, devices = "gpu", jax.devices()
    else:
        from jax.experimental import topologies

        # A topology holds no chip: let libtpu load beside another process that has it loaded
        # (a run on this TPU VM, or a parallel compile), which its lockfile would refuse.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        megacore = {"chip_config_name": "megacore"} if target.startswith(("v4", "v5p")) else {}
        platform, devices = "tpu", topologies.get_topology_desc(
            topology_name(target), "tpu", **megacore).devices
    settings = RunConfig.from_dict(config)
    run = runs.build(settings.model, settings.train, settings.mesh, devices=devices,
                     platform=platform)
    phase = settings.phases[phase_index]
    batch_sharding = sharding.batch_sharding(run.mesh)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
             for name, (shape, dtype) in batch_shapes(
                 phase.global_batch_size, phase.max_seq_length, phase.max_predictions_per_seq,
                 phase.instances_per_row).items()}
    lowered = run.train_step(phase.grad_accum_steps).lower(
        run.spec.abstract, batch, lowering_platforms=("cuda",) if target == "cuda" else None)
    kernel = run.spec.attention_kernel(settings.model.dtype, phase.instances_per_row > 1)
    return lowered, kernel, devices


# Custom calls that are fused attention: cuDNN's, and Pallas kernels by their names.
_CALL = re.compile(r'stablehlo\.custom_call @"?([\w$.]+)"?(.*)')
_KERNEL_NAME = re.compile(r'\b(?:kernel_)?name = "([^"]+)"')


def fused_attention_calls(module_text: str) -> list[str]:
    """The fused-attention calls of a lowered module, each once: cuDNN's targets, and
    `TARGET:NAME` for Pallas kernels (Splash's on TPU, the Triton `mha_*` ones on GPU)."""
    found = set()
    for target, rest in _CALL.findall(module_text):
        name = _KERNEL_NAME.search(rest)
        if target.startswith("__cudnn$fmha"):
            found.add(target)
        elif name and ("splash" in name.group(1) or "mha" in name.group(1)):
            found.add(f"{target}:{name.group(1)}")
    return sorted(found)


def compile_train_step(config: ml_collections.ConfigDict, target: str,
                       phase_index: int = 0) -> Compiled:
    """`lower_train_step`, then for a TPU type compiled for it (libtpu)."""
    started = time.perf_counter()
    lowered, kernel, devices = lower_train_step(config, target, phase_index)
    calls = fused_attention_calls(lowered.as_text())
    if target == "cuda":
        return Compiled("cuda", len(devices), kernel, calls, time.perf_counter() - started)
    name = topology_name(target)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        message = str(error).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]
        return Compiled(name, len(devices), kernel, calls, time.perf_counter() - started,
                        out_of_memory=message)
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
             "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
             "code": memory.generated_code_size_in_bytes}
    # Donated state is aliased: its outputs reuse the arguments' memory.
    sizes["total"] = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"]
                      + sizes["temporaries"] + sizes["code"])
    return Compiled(name, len(devices), kernel, calls, seconds, sizes)
