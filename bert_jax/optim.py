"""Optimizers: AdamW (default) or LAMB, linear warmup then polynomial decay, weight decay that
skips LayerNorm parameters and biases, global-norm clipping (google-research/bert's recipe)."""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("adamw", "lamb")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """0 -> `learning_rate` over `warmup_steps`, then polynomial decay (power 1: linear) to
    `end_learning_rate` at `num_steps`."""
    warmup = min(int(train.warmup_steps), int(train.num_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, train.learning_rate, max(warmup, 1)),
         optax.polynomial_schedule(train.learning_rate, train.end_learning_rate,
                                   power=train.decay_power,
                                   transition_steps=max(int(train.num_steps) - warmup, 1))],
        boundaries=[warmup])


def decay_mask(params):
    """True for weight matrices and embedding tables; False for LayerNorm scales and biases."""
    def decays(path, _):
        return jax.tree_util.keystr(path).rsplit("'", 2)[-2] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={train.optimizer!r}: expected one of "
                         f"{list(OPTIMIZERS)}")
    schedule = learning_rate_schedule(train)
    make = optax.adamw if train.optimizer == "adamw" else optax.lamb
    optimizer = make(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                     weight_decay=train.weight_decay, mask=decay_mask)
    if train.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), optimizer)
    return optimizer
