"""Training objectives (pretraining MLM + NSP, classification, regression): losses and
metrics as pure functions with float32 reductions.

Everything derives from sums, so micro-batches and evaluation batches combine exactly by
adding them. An objective gives the train step a (micro-)batch's sums, the whole batch's
denominators (the loss is the sum of `sums[k] / denominators[k]`) and the metrics of sums."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

METRICS = ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")


def pretraining_sums(mlm_logits_bpv, nsp_logits, batch) -> dict[str, Array]:
    """Summed MLM and NSP losses and hits, with their counts, from a batch holding
    `masked_lm_ids`, `masked_lm_weights` and `next_sentence_labels` (1: B is random): [B], or
    [B, K] for packed rows, whose `next_sentence_weights` mark the instances present."""
    return {**_classification_sums(mlm_logits_bpv, batch["masked_lm_ids"],
                                   batch["masked_lm_weights"], "mlm_"),
            **_classification_sums(nsp_logits, batch["next_sentence_labels"],
                                   _nsp_weights(batch), "nsp_")}


def _classification_sums(logits, labels, weights, prefix="") -> dict[str, Array]:
    """Weighted sums of the cross-entropy losses and of the hits, and the weights' sum."""
    logits, weights = logits.astype(jnp.float32), weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {f"{prefix}loss": jnp.sum(losses * weights),
            f"{prefix}hits": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
            f"{prefix}count": jnp.sum(weights)}


def _nsp_weights(batch) -> Array:
    """1 per NSP label (each row of an unpacked batch), or the packed batch's weights."""
    ones = jnp.ones(batch["next_sentence_labels"].shape, jnp.float32)
    return batch.get("next_sentence_weights", ones)


def _denominator(weights) -> Array:
    return jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)


def metrics_from_sums(sums: dict[str, Array]) -> dict[str, Array]:
    """Means from sums. The loss is MLM + NSP, as google-research/bert adds them."""
    def mean(total, count):
        return jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)

    metrics = {f"{task}_{name}": mean(sums[f"{task}_{total}"], sums[f"{task}_count"])
               for task in ("mlm", "nsp")
               for name, total in (("loss", "loss"), ("accuracy", "hits"))}
    metrics["loss"] = metrics["mlm_loss"] + metrics["nsp_loss"]
    return metrics


def pretraining_metrics(mlm_logits_bpv, nsp_logits, batch) -> dict[str, Array]:
    """Loss, MLM/NSP losses and accuracies of one batch."""
    return metrics_from_sums(pretraining_sums(mlm_logits_bpv, nsp_logits, batch))


class PretrainingObjective:
    """MLM + NSP on batches of `bert_jax.data` (a `BertForPreTraining` model)."""

    @staticmethod
    def sums(model, batch, dropout_key) -> dict[str, Array]:
        mlm_logits, nsp_logits = model(batch["input_ids"], batch["segment_ids"],
                                       batch["input_mask"], batch["masked_lm_positions"],
                                       batch.get("next_sentence_positions"),
                                       dropout_key=dropout_key)
        # Non-padding tokens (`input_mask` > 0, packed rows included): the log's tokens/s.
        return {**pretraining_sums(mlm_logits, nsp_logits, batch),
                "tokens": jnp.sum(batch["input_mask"] > 0, dtype=jnp.float32)}

    @staticmethod
    def denominators(batch) -> dict[str, Array]:
        # Per predicted token for MLM, per instance for NSP, as google-research/bert averages.
        return {"mlm_loss": _denominator(batch["masked_lm_weights"]),
                "nsp_loss": _denominator(_nsp_weights(batch))}

    @staticmethod
    def metrics(sums: dict[str, Array]) -> dict[str, Array]:
        return {**metrics_from_sums(sums), "tokens": sums["tokens"]}


@dataclasses.dataclass(frozen=True)
class SequenceObjective:
    """Cross-entropy and accuracy or, with `regression`, squared error of one output, for a
    `BertForSequenceClassification`; batches hold `labels` and `weights` (0: padding rows)."""

    regression: bool = False

    @staticmethod
    def logits(model, batch, dropout_key=None) -> Array:
        return model(batch["input_ids"], batch["segment_ids"], batch["input_mask"],
                     dropout_key=dropout_key)

    def sums(self, model, batch, dropout_key) -> dict[str, Array]:
        return self.sums_of_logits(self.logits(model, batch, dropout_key), batch)

    def sums_of_logits(self, logits_bl, batch) -> dict[str, Array]:
        if not self.regression:
            return _classification_sums(logits_bl, batch["labels"], batch["weights"])
        weights = batch["weights"].astype(jnp.float32)
        errors = (logits_bl[:, 0] - batch["labels"].astype(jnp.float32)) ** 2
        return {"loss": jnp.sum(errors * weights), "count": jnp.sum(weights)}

    @staticmethod
    def denominators(batch) -> dict[str, Array]:
        return {"loss": _denominator(batch["weights"])}

    def metrics(self, sums) -> dict[str, Array]:
        count = jnp.maximum(sums["count"], 1e-12)
        metrics = {"loss": sums["loss"] / count}
        if not self.regression:
            metrics["accuracy"] = sums["hits"] / count
        return metrics
