"""Pretraining losses and accuracies: pure functions, float32 reductions.

Everything derives from sums (`pretraining_sums`): a mean over a batch is a sum divided by a
count, so micro-batches (gradient accumulation) and evaluation batches combine exactly by
adding their sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

METRICS = ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")


def pretraining_sums(mlm_logits_bpv, nsp_logits_b2, batch) -> dict[str, Array]:
    """Summed MLM and NSP losses and hits, with their counts, from a batch holding
    `masked_lm_ids`, `masked_lm_weights` and `next_sentence_labels` (1: B is random)."""
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    ids, labels = batch["masked_lm_ids"], batch["next_sentence_labels"]
    mlm_logits = mlm_logits_bpv.astype(jnp.float32)
    nsp_logits = nsp_logits_b2.astype(jnp.float32)
    return {
        "mlm_loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(mlm_logits, ids)
                            * weights),
        "mlm_hits": jnp.sum((jnp.argmax(mlm_logits, -1) == ids) * weights),
        "mlm_count": jnp.sum(weights),
        "nsp_loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(nsp_logits, labels)),
        "nsp_hits": jnp.sum((jnp.argmax(nsp_logits, -1) == labels).astype(jnp.float32)),
        "nsp_count": jnp.asarray(labels.shape[0], jnp.float32),
    }


def metrics_from_sums(sums: dict[str, Array]) -> dict[str, Array]:
    """Means from sums. The loss is MLM + NSP, as google-research/bert adds them."""
    def mean(total, count):
        return jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)

    metrics = {
        "mlm_loss": mean(sums["mlm_loss"], sums["mlm_count"]),
        "mlm_accuracy": mean(sums["mlm_hits"], sums["mlm_count"]),
        "nsp_loss": mean(sums["nsp_loss"], sums["nsp_count"]),
        "nsp_accuracy": mean(sums["nsp_hits"], sums["nsp_count"]),
    }
    metrics["loss"] = metrics["mlm_loss"] + metrics["nsp_loss"]
    return metrics


def pretraining_metrics(mlm_logits_bpv, nsp_logits_b2, batch) -> dict[str, Array]:
    """Loss, MLM/NSP losses and accuracies of one batch."""
    return metrics_from_sums(pretraining_sums(mlm_logits_bpv, nsp_logits_b2, batch))
