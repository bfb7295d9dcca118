"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (parameters and optimizer state sharded, batch
sharded too), `tensor` (Megatron-style: heads and MLP hidden split). The model names its
parameter dimensions logically (`embed`, `mlp`, ...); `RULES` maps those names to mesh axes
(t5x's standard rules; names it lacks, `kv` and `layers`, are replicated). A dimension its mesh
axes do not divide is replicated, with a warning.
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bert_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = {"batch": BATCH_AXES, "vocab": ("tensor",), "embed": ("fsdp",), "mlp": ("tensor",),
         "heads": ("tensor",)}


def mesh_shape(sizes: dict, device_count: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes with one -1 filled from `device_count`."""
    shape = [int(sizes[axis]) for axis in MESH_AXES]
    named = dict(zip(MESH_AXES, shape))
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh {named}: expected positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if device_count % known:
            raise ConfigError(f"mesh {named} cannot fill {device_count} devices: {device_count} "
                              f"is not a multiple of {known}")
        shape[shape.index(-1)] = device_count // known
    elif known != device_count:
        raise ConfigError(f"mesh {named} has {known} devices: expected {device_count}")
    return tuple(shape)


def make_mesh(sizes: dict, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out by JAX so that
    inner axes get the fastest links. Axes are `Auto`: XLA propagates shardings from the
    parameters and the batch (the model carries no sharding annotations of its own)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(mesh_shape(sizes, len(devices)), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def spec_for(logical_names, shape, mesh: Mesh, what: str) -> PartitionSpec:
    """PartitionSpec of an array (`what`, for the warning) whose dimensions have `logical_names`."""
    spec, used = [], set()
    for name, size in zip(logical_names, shape):
        axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            warnings.warn(f"{what}: dimension {name!r} of size {size} is not divisible by mesh "
                          f"axes {axes} ({ways} ways): replicated along them", stacklevel=2)
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def logical_names(abstract_params_state: nnx.State) -> dict:
    """Pure dict of each parameter's logical axis names (from the model's metadata)."""
    specs = nnx.get_partition_spec(abstract_params_state)
    return jax.tree.map(tuple, nnx.to_pure_dict(specs),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(abstract_params: dict, names: dict, mesh: Mesh) -> dict:
    """NamedShardings of a pure parameter dict, from the parameters' logical names."""
    def sharding(path, leaf, leaf_names):
        return NamedSharding(mesh, spec_for(leaf_names, leaf.shape, mesh,
                                            jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(
        sharding, abstract_params, names, is_leaf=lambda x: isinstance(x, tuple))


def like_params(tree, params_shardings: dict, mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose parameter-shaped subtrees mirror the
    parameters: a leaf whose path ends with a parameter's path gets that parameter's
    sharding; anything else (counts, scalars) is replicated."""
    by_path = dict(jax.tree_util.tree_flatten_with_path(params_shardings)[0])

    def sharding(path, leaf):
        for start in range(len(path)):
            if path[start:] in by_path:
                return by_path[path[start:]]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding, tree)


class MeshJit:
    """`jax.jit(fn, **options)` whose calls and lowerings run under `jax.set_mesh(mesh)`: the
    kernels that are mapped over the mesh by hand (`bert_jax.attention`) read it there."""

    def __init__(self, fn, mesh: Mesh, **options):
        self.mesh = mesh
        self._jitted = jax.jit(fn, **options)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self._jitted(*args)

    def lower(self, *args, lowering_platforms=None):
        """The lowered step; `lowering_platforms` (e.g. `("cuda",)`) lowers for another
        platform than this machine's."""
        with jax.set_mesh(self.mesh):
            return self._jitted.trace(*args).lower(lowering_platforms=lowering_platforms)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over `data` x `fsdp`; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold (what its loader reads),
    from the batch sharding itself, not the process index: right for any device order, and
    for processes holding the same rows (when a non-batch axis spans them)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    spans = sorted({(index[0].start or 0, index[0].stop or global_batch_size)
                    for index in indices.values()})
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise ConfigError(f"this process's devices hold batch rows {spans}, not one "
                              f"contiguous range: order the mesh so that each process's "
                              f"devices are adjacent along the batch axes {BATCH_AXES}")
    return slice(spans[0][0], spans[-1][1])


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 global_batch_size: int) -> dict[str, jax.Array]:
    """This process's rows (`process_rows`) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(
                sharding, value, (global_batch_size, *value.shape[1:]))
            for name, value in local_batch.items()}
