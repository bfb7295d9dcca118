"""Packed rows (several NSP instances per row): the packing, the padding, the NSP loss, and
logits equal to those of each instance run alone (without dropout)."""

import jax
import numpy as np
import pytest

from bert_jax import losses
from bert_jax.config import ModelConfig
from bert_jax.data import masking, packing
from bert_jax.model import create
from test_model import SMALL, _jitted, _with


def _instance(rng, length):
    """[CLS] A [SEP] B [SEP]: ids, token types."""
    ids = rng.integers(5, SMALL.vocab_size, length).astype(np.int32)
    ids[0] = 2
    types = np.zeros(length, np.int32)
    types[length // 2:] = 1
    return ids, types


@pytest.mark.parametrize("scan, explicit_attention", [(False, False), (True, False),
                                                      (False, True)])
def test_a_packed_row_computes_what_its_instances_compute_alone(scan, explicit_attention):
    # 2 layers (the property does not depend on the depth), compiled once per shape.
    model = _with(create(ModelConfig(**{**SMALL.to_dict(), "num_layers": 2}), seed=3),
                  scan_layers=scan)
    packed_model, key = model, None
    if explicit_attention:  # attention dropout of 1e-9 drops nothing but takes that path
        packed_model = _with(model, attention_dropout_rate=1e-9, hidden_dropout_rate=0.0)
        key = jax.random.key(0)
    rng = np.random.default_rng(0)
    length, lengths = 20, [(7, 5, 6), (9,)]  # row 0: three instances and 2 pads; row 1: one
    instances = [[_instance(rng, n) for n in row] for row in lengths]
    ids, types, numbers = (np.zeros((2, length), np.int32) for _ in range(3))
    cls = np.zeros((2, 3), np.int32)
    for r, row in enumerate(instances):
        start = 0
        for i, (instance_ids, instance_types) in enumerate(row):
            end = start + len(instance_ids)
            ids[r, start:end], types[r, start:end], numbers[r, start:end] = (
                instance_ids, instance_types, i + 1)
            cls[r, i] = start
            start = end
    # Row 0 predicts in every instance; row 1's unused instance slots point at [CLS].
    positions = np.array([[1, 8, 13, 17], [3, 4, 8, 0]], np.int32)
    model, packed_model = _jitted(model), _jitted(packed_model)
    mlm, nsp = packed_model(ids, types, numbers, positions, cls, dropout_key=key)
    assert mlm.shape == (2, 4, SMALL.vocab_size) and nsp.shape == (2, 3, 2)

    for r, row in enumerate(instances):
        for i, (instance_ids, instance_types) in enumerate(row):
            n, start = len(instance_ids), cls[r, i]
            inside = (positions[r] >= start) & (positions[r] < start + n)
            alone_mlm, alone_nsp = model(instance_ids[None], instance_types[None],
                                         np.ones((1, n), np.int32),
                                         positions[r][inside][None] - start)
            np.testing.assert_allclose(mlm[r][inside], alone_mlm[0], atol=2e-5)
            np.testing.assert_allclose(nsp[r, i], alone_nsp[0], atol=2e-5)


def test_best_fit_decreasing_fills_rows_and_places_every_instance_once():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(5, 65, 300), np.full(40, 64)])
    rows = packing.pack(lengths, 64, 3)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(1 <= len(row) <= 3 and lengths[row].sum() <= 64 for row in rows)
    # Close to the bound: at most 1 row in 20 more than the tokens need.
    assert len(rows) <= np.ceil(lengths.sum() / 64) * 1.05
    assert packing.pack([6, 4, 3, 3, 2, 2], 10, 3) == [[0, 1], [2, 3, 4], [5]]
    with pytest.raises(ValueError, match=r"instance lengths 3..11: expected 1..10"):
        packing.pack([3, 11], 10, 2)


def test_packed_rows_pad_to_what_each_instance_pads_to_alone():
    rng = np.random.default_rng(2)
    instances = []
    for length in (9, 6, 12):
        a_length = int(rng.integers(1, length - 3))
        instances.append({"input_ids": rng.integers(5, 50, length).astype(np.int32),
                          "word_starts": rng.random(length) < 0.7, "a_length": a_length,
                          "next_sentence_label": int(rng.integers(0, 2))})
    row = {"input_ids": np.concatenate([i["input_ids"] for i in instances]),
           "word_starts": np.concatenate([i["word_starts"] for i in instances]),
           "lengths": np.array([9, 6, 12]), "a_lengths": [i["a_length"] for i in instances],
           "next_sentence_labels": [i["next_sentence_label"] for i in instances]}
    packed = masking.pad([row], 32, instances_per_row=4)
    np.testing.assert_array_equal(packed["next_sentence_positions"], [[0, 9, 15, 0]])
    np.testing.assert_array_equal(packed["next_sentence_weights"], [[1, 1, 1, 0]])
    np.testing.assert_array_equal(packed["input_mask"][0, 25:], [3, 3, 0, 0, 0, 0, 0])
    for number, (instance, start) in enumerate(zip(instances, (0, 9, 15))):
        alone = masking.pad([instance], 12)
        n = len(instance["input_ids"])
        for name in ("input_ids", "word_starts", "segment_ids"):
            np.testing.assert_array_equal(packed[name][0, start:start + n], alone[name][0, :n])
        assert (packed["input_mask"][0, start:start + n] == number + 1).all()
        assert packed["next_sentence_labels"][0, number] == alone["next_sentence_labels"][0]
    with pytest.raises(ValueError, match="holds 3 instances: expected at most "
                                         "instances_per_row=2"):
        masking.pad([row], 32, instances_per_row=2)


def test_packed_nsp_loss_is_the_mean_over_the_instances_present():
    logits = np.random.default_rng(3).normal(size=(2, 3, 2)).astype(np.float32)
    labels = np.array([[0, 1, 1], [1, 0, 0]], np.int32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    batch = {"masked_lm_ids": np.zeros((2, 1), np.int32),
             "masked_lm_weights": np.ones((2, 1), np.float32), "next_sentence_labels": labels,
             "next_sentence_weights": weights}
    metrics = losses.pretraining_metrics(np.zeros((2, 1, 4)), logits, batch)
    present = weights > 0
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0][present].mean()
    np.testing.assert_allclose(metrics["nsp_loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["nsp_accuracy"],
                               (logits.argmax(-1) == labels)[present].mean(), rtol=1e-6)
    assert losses.PretrainingObjective.denominators(batch)["nsp_loss"] == 3
