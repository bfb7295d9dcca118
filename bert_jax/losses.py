"""Pretraining losses and accuracies: pure functions, float32 reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _weighted_mean(values, weights) -> Array:
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.where(total > 0, jnp.sum(values * weights) / jnp.maximum(total, 1e-12), 0.0)


def mlm_cross_entropy(logits_bpv, label_ids_bp, weights_bp) -> Array:
    """Cross-entropy at masked positions, averaged over the weights (padding predictions: 0)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits_bpv.astype(jnp.float32), label_ids_bp)
    return _weighted_mean(losses, weights_bp)


def mlm_accuracy(logits_bpv, label_ids_bp, weights_bp) -> Array:
    correct = jnp.argmax(logits_bpv, axis=-1) == label_ids_bp
    return _weighted_mean(correct.astype(jnp.float32), weights_bp)


def nsp_cross_entropy(logits_b2, labels_b) -> Array:
    """Next-sentence (or sentence-order) cross-entropy; label 1 means "B is random"."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_b2.astype(jnp.float32), labels_b))


def nsp_accuracy(logits_b2, labels_b) -> Array:
    return jnp.mean((jnp.argmax(logits_b2, axis=-1) == labels_b).astype(jnp.float32))


def pretraining_metrics(mlm_logits_bpv, nsp_logits_b2, batch) -> dict[str, Array]:
    """The loss (MLM + NSP, as google-research/bert sums them) and its parts, from a batch
    with `masked_lm_ids`, `masked_lm_weights` and `next_sentence_labels`."""
    ids, weights = batch["masked_lm_ids"], batch["masked_lm_weights"]
    labels = batch["next_sentence_labels"]
    metrics = {
        "mlm_loss": mlm_cross_entropy(mlm_logits_bpv, ids, weights),
        "mlm_accuracy": mlm_accuracy(mlm_logits_bpv, ids, weights),
        "nsp_loss": nsp_cross_entropy(nsp_logits_b2, labels),
        "nsp_accuracy": nsp_accuracy(nsp_logits_b2, labels),
    }
    metrics["loss"] = metrics["mlm_loss"] + metrics["nsp_loss"]
    return metrics
