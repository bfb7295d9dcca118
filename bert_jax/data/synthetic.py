"""Synthetic pretraining batches with BERT's layout, for smoke runs and benchmarks."""

from __future__ import annotations

import numpy as np

from bert_jax.data import masking

# Ids below this are the special tokens of the SentencePiece vocabularies bert-jax trains.
FIRST_ORDINARY_ID = 5
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 2, 3, 4
SHORTEST_INSTANCE = 5  # [CLS] A [SEP] B [SEP] with one token each in A and B


def synthetic_batch(seed: int, batch_size: int, seq_length: int, vocab_size: int,
                    max_predictions: int, masked_lm_prob: float = 0.15,
                    instances_per_row: int = 1) -> dict[str, np.ndarray]:
    """Rows of random tokens and random lengths in [seq_length / 2, seq_length], laid out as
    `[CLS] A [SEP] B [SEP] [PAD]...` and masked as `masking.mask_batch` masks them.

    With `instances_per_row` K > 1 each row is cut into 1..K instances: packed rows with the
    unpacked rows' lengths, so that timing both compares what a packed row costs.
    """
    if seq_length < SHORTEST_INSTANCE or vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"seq_length={seq_length}, vocab_size={vocab_size}: expected at least "
                         f"{SHORTEST_INSTANCE} and more than {FIRST_ORDINARY_ID}")
    rng = np.random.default_rng(seed)
    rows = [_row(rng, int(rng.integers(seq_length // 2, seq_length + 1)), vocab_size,
                 instances_per_row) for _ in range(batch_size)]
    options = masking.MaskingOptions(max_predictions, masked_lm_prob, mask_id=MASK_ID,
                                     vocab_size=vocab_size,
                                     special_ids=frozenset(range(FIRST_ORDINARY_ID)))
    return masking.mask_batch(rows, options, seq_length, seed, 0, instances_per_row)


def _row(rng, length: int, vocab_size: int, instances_per_row: int) -> dict:
    """A stored example of `length` tokens: one instance, or 1..K packed ones."""
    count = int(rng.integers(1, min(instances_per_row, length // SHORTEST_INSTANCE) + 1))
    lengths = SHORTEST_INSTANCE + rng.multinomial(length - SHORTEST_INSTANCE * count,
                                                  np.full(count, 1 / count))
    ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, length, dtype=np.int32)
    starts = np.cumsum(lengths) - lengths
    a_lengths = np.array([rng.integers(1, n - 3) for n in lengths])  # B keeps a token
    ids[starts] = CLS_ID
    ids[starts + a_lengths + 1] = ids[starts + lengths - 1] = SEP_ID
    labels = rng.integers(0, 2, count)
    row = {"input_ids": ids, "word_starts": np.ones(length, bool)}
    if instances_per_row == 1:
        return {**row, "a_length": int(a_lengths[0]), "next_sentence_label": int(labels[0])}
    return {**row, "lengths": lengths, "a_lengths": a_lengths, "next_sentence_labels": labels}
