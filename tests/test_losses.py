import numpy as np
import pytest

from bert_jax import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(ids, weights, labels):
    return {"masked_lm_ids": ids, "masked_lm_weights": weights, "next_sentence_labels": labels}


def test_mlm_metrics_weigh_only_real_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
    nsp = rng.normal(size=(3, 2)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 4))
    weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    batch = _batch(ids, weights, np.array([0, 1, 1]))
    nll = -np.take_along_axis(_log_softmax(logits), ids[..., None], -1)[..., 0]
    metrics = losses.pretraining_metrics(logits, nsp, batch)
    np.testing.assert_allclose(metrics["mlm_loss"], (nll * weights).sum() / weights.sum(),
                               rtol=1e-6)
    correct = logits.argmax(-1) == ids
    np.testing.assert_allclose(metrics["mlm_accuracy"],
                               (correct * weights).sum() / weights.sum(), rtol=1e-6)
    logits[0, 2:] += 100.0  # zero-weight predictions change nothing
    np.testing.assert_allclose(losses.pretraining_metrics(logits, nsp, batch)["mlm_loss"],
                               metrics["mlm_loss"], rtol=1e-6)


def test_nsp_loss_accuracy_and_total():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.5]], np.float32)
    labels = np.array([0, 0, 1])
    metrics = losses.pretraining_metrics(np.zeros((3, 1, 2)), logits,
                                         _batch(np.zeros((3, 1), int), np.ones((3, 1)), labels))
    nll = -_log_softmax(logits)[np.arange(3), labels]
    np.testing.assert_allclose(metrics["nsp_loss"], nll.mean(), rtol=1e-6)
    assert float(metrics["nsp_accuracy"]) == pytest.approx(2 / 3)
    assert float(metrics["mlm_loss"]) == pytest.approx(np.log(2))
    assert float(metrics["loss"]) == pytest.approx(float(metrics["mlm_loss"] + metrics["nsp_loss"]))


def test_sums_of_parts_give_the_whole_batch_metrics():
    rng = np.random.default_rng(1)
    logits, nsp = rng.normal(size=(6, 5, 9)), rng.normal(size=(6, 2))
    batch = _batch(rng.integers(0, 9, (6, 5)), (rng.random((6, 5)) < 0.6).astype(np.float32),
                   rng.integers(0, 2, 6))
    whole = losses.pretraining_metrics(logits, nsp, batch)
    parts = [losses.pretraining_sums(logits[s], nsp[s], {k: v[s] for k, v in batch.items()})
             for s in (slice(0, 2), slice(2, 6))]
    combined = losses.metrics_from_sums({k: parts[0][k] + parts[1][k] for k in parts[0]})
    for name in losses.METRICS:
        np.testing.assert_allclose(combined[name], whole[name], rtol=1e-6)


def test_no_predictions_give_zero_not_nan():
    metrics = losses.pretraining_metrics(np.zeros((1, 2, 5)), np.zeros((1, 2)),
                                         _batch(np.zeros((1, 2), int), np.zeros((1, 2)),
                                                np.zeros(1, int)))
    assert float(metrics["mlm_loss"]) == 0.0 and float(metrics["mlm_accuracy"]) == 0.0
