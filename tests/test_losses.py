import numpy as np
import pytest

from bert_jax import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_cross_entropy_and_accuracy_weigh_only_real_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 4))
    weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    nll = -np.take_along_axis(_log_softmax(logits), ids[..., None], -1)[..., 0]
    expected = (nll * weights).sum() / weights.sum()
    np.testing.assert_allclose(losses.mlm_cross_entropy(logits, ids, weights), expected, rtol=1e-6)
    correct = logits.argmax(-1) == ids
    np.testing.assert_allclose(losses.mlm_accuracy(logits, ids, weights),
                               (correct * weights).sum() / weights.sum(), rtol=1e-6)
    # Changing logits at zero-weight predictions changes nothing.
    logits[0, 2:] += 100.0
    np.testing.assert_allclose(losses.mlm_cross_entropy(logits, ids, weights), expected, rtol=1e-6)


def test_mlm_loss_is_zero_without_predictions():
    assert float(losses.mlm_cross_entropy(np.zeros((1, 2, 5)), np.zeros((1, 2), int),
                                          np.zeros((1, 2)))) == 0.0


def test_nsp_loss_accuracy_and_total():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.5]], np.float32)
    labels = np.array([0, 0, 1])
    nll = -_log_softmax(logits)[np.arange(3), labels]
    np.testing.assert_allclose(losses.nsp_cross_entropy(logits, labels), nll.mean(), rtol=1e-6)
    assert float(losses.nsp_accuracy(logits, labels)) == pytest.approx(2 / 3)
    batch = {"masked_lm_ids": np.array([[1]]), "masked_lm_weights": np.array([[1.0]]),
             "next_sentence_labels": labels[:1]}
    metrics = losses.pretraining_metrics(np.array([[[0.0, 0.0]]]), logits[:1], batch)
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["mlm_loss"]) + float(metrics["nsp_loss"]))
    assert float(metrics["mlm_loss"]) == pytest.approx(np.log(2))
