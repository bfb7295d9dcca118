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


def decay_mask(params):
    """True for weight matrices and embedding tables; False for LayerNorm scales and biases."""
    def decays(path, _):
        return jax.tree_util.keystr(path).rsplit("'", 2)[-2] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The optimizer of `train`, at the rate each update is given:
    `tx.update(grads, state, params, learning_rate=schedule(step))`. Not a schedule inside the
    optimizer: it would count the optimizer's updates, which fall behind the train state's
    step when non-finite steps skip theirs."""
    make = optax.adamw if train.optimizer == "adamw" else optax.lamb
    # learning_rate=None: the update direction, unscaled (optax.scale_by_learning_rate).
    direction = make(None, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                     weight_decay=train.weight_decay, mask=decay_mask)
    clip = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm else []
    return optax.chain(*clip, direction, _scale_by_given_rate())


def _scale_by_given_rate() -> optax.GradientTransformationExtraArgs:
    """Updates times -learning_rate, the rate passed to each `update` call (no state)."""
    def update(updates, state, params=None, *, learning_rate, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: jnp.asarray(-learning_rate, u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
