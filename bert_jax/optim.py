"""Optimizers: AdamW (default) or LAMB, linear warmup then polynomial decay, weight decay that
skips LayerNorm parameters and biases, global-norm clipping (google-research/bert's recipe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bert_jax.config import TrainConfig


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """0 -> `learning_rate` over `warmup_steps`, then polynomial decay (power 1: linear) to
    `end_learning_rate` at `num_steps`."""
    warmup = min(train.warmup_steps, train.num_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1)),
         optax.polynomial_schedule(train.learning_rate, train.end_learning_rate,
                                   power=train.decay_power,
                                   transition_steps=max(train.num_steps - warmup, 1))],
        boundaries=[warmup])


def _decays(path) -> bool:
    return jax.tree_util.keystr(path).rsplit("'", 2)[-2] in ("kernel", "embedding")


def decay_mask(params):
    """True for weight matrices and embedding tables; False for LayerNorm scales and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), params)


def _tensor_axes(path) -> tuple[int, ...]:
    """The axes of a parameter array that index separate tensors of the model as written
    (and as Hugging Face stores it): the layer of a stacked encoder array, and query, key or
    value in the fused projection."""
    name = jax.tree_util.keystr(path)
    if "'layers'" not in name:
        return ()
    if "'qkv'" in name:
        return (0, 2) if name.endswith("['kernel']") else (0, 1)
    return (0,)


def scale_by_layer_trust_ratio() -> optax.GradientTransformation:
    """LAMB's trust ratio, ||p|| / ||u|| (1 where either is 0), per tensor: per layer of a
    stacked encoder array and per query/key/value (optax's `scale_by_trust_ratio` would take
    one ratio over all layers at once), and none for what is not decayed, LayerNorm and biases,
    as google-research/bert's and NVIDIA's LAMB exclude them from layer adaptation."""
    def update(updates, state, params):
        def scale(path, u, p):
            if not _decays(path):
                return u
            axes = tuple(a for a in range(u.ndim) if a not in _tensor_axes(path))
            p_norm, u_norm = (jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axes,
                                               keepdims=True)) for x in (p, u))
            ratio = jnp.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
            return (u * ratio).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The optimizer of `train`, at the rate each update is given:
    `tx.update(grads, state, params, learning_rate=schedule(step))`. Not a schedule inside the
    optimizer: it would count the optimizer's updates, which fall behind the train state's
    step when non-finite steps skip theirs."""
    # Adam's direction plus decoupled weight decay: AdamW's, and LAMB's before its trust ratio.
    direction = optax.chain(
        optax.scale_by_adam(b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps),
        optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
        *([scale_by_layer_trust_ratio()] if train.optimizer == "lamb" else []))
    clip = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm else []
    return optax.chain(*clip, direction, _scale_by_given_rate())


def _scale_by_given_rate() -> optax.GradientTransformationExtraArgs:
    """Updates times -learning_rate, the rate passed to each `update` call (no state)."""
    def update(updates, state, params=None, *, learning_rate, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: jnp.asarray(-learning_rate, u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
