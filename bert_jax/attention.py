"""Scaled dot-product attention: one entry point, the fused kernel of each platform.

Which keys a query sees is given as segment ids, the form the fused kernels take: a query
sees its own segment's keys. Unpacked rows need only the keys' ids (the attention mask: 1
for tokens, 0 for padding); packed rows number their instances (1, 2, ...; 0 for padding)
for queries and keys alike.

Kernels (`model.attention_impl`): `xla` (the ids as a boolean mask); `cudnn` (cuDNN flash
attention, the padding as key lengths; JAX 0.10 gives it no segment ids and no float32, so
packed rows and float32 take `pallas`); `pallas` (JAX's Triton flash attention, GPUs);
`splash` (JAX's Splash attention, TPUs). `auto`: Splash on TPU, cuDNN on GPU (Pallas where
JAX finds no cuDNN), XLA on CPU. The Pallas kernels are mapped over the step's mesh by hand,
and run in Pallas's interpret mode when lowered for CPU, which is how the tests check them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

_LANES = 128  # Splash's blocks are multiples of the TPU's 128 lanes
_PADDING = -1  # the segment of the positions a kernel's block multiple adds: seen by none


class Segments(NamedTuple):
    """Segment ids [B, S] of the keys and, for packed rows, of the queries (None: unpacked,
    every query sees the keys of the nonzero segments)."""

    kv: jax.Array
    q: jax.Array | None = None


def platform_of(devices) -> str:
    """'cpu', 'gpu' or 'tpu' for a list of devices (CUDA and ROCm GPUs alike)."""
    platform = devices[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve(implementation: str, platform: str) -> str:
    """The kernel that `implementation` (a config value) means on `platform`."""
    if implementation != "auto":
        return implementation
    if platform == "tpu":
        return "splash"
    if platform != "gpu":
        return "xla"
    from jax._src.cudnn import fused_attention_stablehlo

    try:  # JAX's cuDNN attention lowers only where it finds the cuDNN library
        fused_attention_stablehlo.check_cudnn_version()
    except RuntimeError:
        return "pallas"
    return "cudnn"


def kernel(implementation: str, dtype, packed: bool) -> str:
    """The kernel a resolved `implementation` runs for rows `packed` or not in `dtype`."""
    if implementation == "cudnn" and (packed or jnp.dtype(dtype) == jnp.float32):
        return "pallas"
    return implementation


def attend(implementation: str, q_bshk, k_bshk, v_bshk, segments: Segments,
           query_positions_bq=None, dropout=None):
    """Attention of every query (or of those at `query_positions_bq` [B, Q]) to the keys its
    segment allows: [B, S or Q, H, K]. `dropout`, a function of the probabilities, forces the
    XLA softmax (fused kernels never form them). `auto` (in a model not built by a run, which
    resolves it: `train.state_spec`) means the kernel of this process's devices."""
    if implementation == "auto":
        implementation = resolve(implementation, platform_of(jax.devices()))
    name = kernel(implementation, q_bshk.dtype, segments.q is not None)
    if name == "pallas" and dropout is None:  # one id array: every query runs, some are kept
        y_bshk = _mapped(_interpreted_on_cpu(_pallas_gpu), q_bshk, k_bshk, v_bshk,
                         segments.kv, segments.kv)
        return (y_bshk if query_positions_bq is None else
                at_positions(y_bshk, query_positions_bq))
    q_segments = segments.q
    if query_positions_bq is not None:
        q_bshk = at_positions(q_bshk, query_positions_bq)
        if q_segments is not None:
            q_segments = at_positions(q_segments, query_positions_bq)
    if dropout is not None:
        return _softmax_attention(q_bshk, k_bshk, v_bshk, segments.kv, q_segments, dropout)
    if name == "splash":
        if q_segments is None:
            q_segments = jnp.ones(q_bshk.shape[:2], jnp.int32)
        return _mapped(_interpreted_on_cpu(_splash), q_bshk, k_bshk, v_bshk, q_segments,
                       segments.kv)
    if name == "cudnn":  # unpacked rows only (`kernel`): the queries' ids are not needed
        return _mapped(_cudnn, q_bshk, k_bshk, v_bshk, segments.kv, segments.kv)
    return jax.nn.dot_product_attention(q_bshk, k_bshk, v_bshk,
                                        mask=_mask(segments.kv, q_segments), implementation="xla")


def at_positions(x_bs, positions_bq):
    """The rows of `x_bs` ([batch, sequence, ...]) at each batch row's own positions
    ([batch, Q]): [batch, Q, ...]."""
    index_bq = positions_bq.reshape(positions_bq.shape + (1,) * (x_bs.ndim - 2))
    return jnp.take_along_axis(x_bs, index_bq, axis=1)


def _mask(kv_segments_bs, q_segments_bq):
    """[B, 1, 1, S] (unpacked) or [B, 1, Q, S] booleans: which keys each query sees."""
    if q_segments_bq is None:
        return (kv_segments_bs != 0)[:, None, None, :]
    return q_segments_bq[:, None, :, None] == kv_segments_bs[:, None, None, :]


def _softmax_attention(q_bqhk, k_bshk, v_bshk, kv_segments_bs, q_segments_bq, dropout):
    scale = q_bqhk.shape[-1] ** -0.5
    logits_bhqs = jnp.einsum("bqhk,bshk->bhqs", q_bqhk, k_bshk,
                             preferred_element_type=jnp.float32) * scale
    logits_bhqs = jnp.where(_mask(kv_segments_bs, q_segments_bq), logits_bhqs,
                            jnp.finfo(jnp.float32).min)
    probs_bhqs = dropout(jax.nn.softmax(logits_bhqs, axis=-1))
    return jnp.einsum("bhqs,bshk->bqhk", probs_bhqs.astype(v_bshk.dtype), v_bshk)


# --- the Pallas kernels ----------------------------------------------------------------------

def _mapped(kernel_fn, q_bqhk, k_bshk, v_bshk, q_segments_bq, kv_segments_bs):
    """`kernel_fn` on each device's rows and heads, by `jax.shard_map` over the step's mesh: XLA
    cannot partition a Pallas call; cuDNN's own partitioning hides it from `bert-jax compile`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel_fn(q_bqhk, k_bshk, v_bshk, q_segments_bq, kv_segments_bs)
    batch_axes = _dividing(mesh, ("data", "fsdp"), q_bqhk.shape[0])
    head_axes = _dividing(mesh, ("tensor",), q_bqhk.shape[2])
    qkv = PartitionSpec(batch_axes, None, head_axes, None)
    ids = PartitionSpec(batch_axes, None)
    return jax.shard_map(kernel_fn, mesh=mesh, in_specs=(qkv, qkv, qkv, ids, ids),
                         out_specs=qkv, check_vma=False)(q_bqhk, k_bshk, v_bshk,
                                                         q_segments_bq, kv_segments_bs)


def _interpreted_on_cpu(kernel_fn):
    """A Pallas kernel compiled for its accelerator, and run by Pallas's interpreter when the
    step is lowered for CPU (the choice is made at lowering: `lax.platform_dependent`)."""
    return functools.partial(jax.lax.platform_dependent,
                             cpu=functools.partial(kernel_fn, interpret=True),
                             default=functools.partial(kernel_fn, interpret=False))


def _dividing(mesh, axes, size):
    """Those of the mesh `axes` (in use) whose product divides `size`: the rest replicate."""
    kept = tuple(axis for axis in axes if axis in mesh.axis_names and mesh.shape[axis] > 1)
    return kept if kept and size % math.prod(mesh.shape[axis] for axis in kept) == 0 else None


def _pad(x, axis, multiple, value=0):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _cudnn(q_bqhk, k_bshk, v_bshk, q_segments_bq, kv_segments_bs):
    """cuDNN flash attention, the padding as key lengths (rows are right-padded). JAX refuses
    an odd query count in training (the pruned last layer's): an extra one is dropped after."""
    del q_segments_bq  # unpacked rows: every query sees the tokens
    lengths_b = jnp.sum(kv_segments_bs != 0, axis=1, dtype=jnp.int32)
    y_bqhk = jax.nn.dot_product_attention(_pad(q_bqhk, 1, 2), k_bshk, v_bshk,
                                          key_value_seq_lengths=lengths_b,
                                          implementation="cudnn")
    return y_bqhk[:, :q_bqhk.shape[1]]


def _splash(q_bqhk, k_bshk, v_bshk, q_segments_bq, kv_segments_bs, *, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)

    queries, heads = q_bqhk.shape[1], q_bqhk.shape[2]
    scale = q_bqhk.shape[-1] ** -0.5  # Splash does not scale the logits itself

    def heads_first(x):  # [B, S, H, K] -> [B, H, S', K], padded to the lanes
        return _pad(jnp.swapaxes(x, 1, 2), 2, _LANES)

    q = heads_first(q_bqhk * jnp.asarray(scale, q_bqhk.dtype))
    k, v = heads_first(k_bshk), heads_first(v_bshk)
    q_ids = _pad(q_segments_bq.astype(jnp.int32), 1, _LANES, _PADDING)
    kv_ids = _pad(kv_segments_bs.astype(jnp.int32), 1, _LANES, _PADDING)
    block_q, block_kv = min(512, q.shape[2]), min(512, k.shape[2])
    while q.shape[2] % block_q:
        block_q -= _LANES
    while k.shape[2] % block_kv:
        block_kv -= _LANES
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_q_dkv=block_q,
                               block_kv_dkv=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
    mask = masks.MultiHeadMask([masks.FullMask((q.shape[2], k.shape[2]))] * heads)
    attention = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1,
                                       q_seq_shards=1, interpret=interpret)
    y_bhqk = jax.vmap(attention)(q, k, v, segment_ids=splash.SegmentIds(q=q_ids, kv=kv_ids))
    return jnp.swapaxes(y_bhqk[:, :, :queries], 1, 2)


def _pallas_gpu(q_bshk, k_bshk, v_bshk, q_segments_bs, kv_segments_bs, *, interpret):
    """JAX's Triton flash attention. It takes one segment-id array for queries and keys, so
    queries come at every position (`attend`) and take the keys' ids: in unpacked rows a
    padding query then sees padding (not the tokens), which changes only padding's output."""
    from jax.experimental.pallas.ops.gpu import attention as gpu

    del q_segments_bs  # the keys' ids, see above
    length = q_bshk.shape[1]
    block = 128 if length >= 128 else 16 * -(-length // 16)
    q, k, v = (_pad(x, 1, block) for x in (q_bshk, k_bshk, v_bshk))
    ids = _pad(kv_segments_bs.astype(jnp.int32), 1, block, _PADDING)
    small = min(32, block)
    blocks = gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=small, block_kv_dkv=small,
                            block_q_dq=small, block_kv_dq=small)
    y_bshk = gpu.mha(q, k, v, ids, sm_scale=q_bshk.shape[-1] ** -0.5, block_sizes=blocks,
                     interpret=interpret)
    return y_bshk[:, :length]
