"""Synthetic pretraining batches with BERT's layout, for smoke runs and benchmarks."""

from __future__ import annotations

import numpy as np

# Ids below this are reserved for special tokens in every bert-jax vocabulary.
FIRST_ORDINARY_ID = 5
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 2, 3, 4


def synthetic_batch(seed: int, batch_size: int, seq_length: int, vocab_size: int,
                    max_predictions: int, masked_lm_prob: float = 0.15) -> dict[str, np.ndarray]:
    """A batch laid out as `[CLS] A [SEP] B [SEP] [PAD]...` with random tokens and lengths,
    `masked_lm_prob` of the real tokens chosen for prediction (at most `max_predictions`).

    Returns the classic BERT features: input_ids, input_mask, segment_ids,
    masked_lm_positions, masked_lm_ids, masked_lm_weights, next_sentence_labels.
    """
    if seq_length < 5 or vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"seq_length={seq_length}, vocab_size={vocab_size}: expected at least "
                         f"5 and more than {FIRST_ORDINARY_ID}")
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_length)
    input_ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, shape, dtype=np.int32)
    input_mask = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros((batch_size, max_predictions), np.int32)
    labels = np.zeros((batch_size, max_predictions), np.int32)
    weights = np.zeros((batch_size, max_predictions), np.float32)
    for row in range(batch_size):
        length = int(rng.integers(seq_length // 2, seq_length + 1))
        sep_a = int(rng.integers(2, length - 2))
        input_ids[row, 0], input_ids[row, sep_a], input_ids[row, length - 1] = CLS_ID, SEP_ID, SEP_ID
        input_ids[row, length:] = PAD_ID
        input_mask[row, :length] = 1
        segment_ids[row, sep_a + 1:length] = 1
        ordinary = np.setdiff1d(np.arange(1, length - 1), [sep_a])
        count = min(max_predictions, max(1, round(len(ordinary) * masked_lm_prob)))
        chosen = np.sort(rng.choice(ordinary, count, replace=False))
        positions[row, :count], labels[row, :count], weights[row, :count] = (
            chosen, input_ids[row, chosen], 1.0)
        input_ids[row, chosen[rng.random(count) < 0.8]] = MASK_ID  # BERT's 80% [MASK]
    return {
        "input_ids": input_ids,
        "input_mask": input_mask,
        "segment_ids": segment_ids,
        "masked_lm_positions": positions,
        "masked_lm_ids": labels,
        "masked_lm_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, (batch_size,), dtype=np.int32),
    }
