"""Dynamic MLM masking in numpy, keyed by (seed, global example position): stateless.

google-research/bert's `create_masked_lm_predictions`, per instance: predict
`min(max_predictions, max(1, round(len(tokens) * masked_lm_prob)))` tokens chosen at random
among non-special tokens (whole words with `whole_word_masking`, skipping a word that would
overshoot); replace 80% with [MASK], keep 10%, and put a random token in 10%.
One deliberate difference: the random replacement is drawn from ordinary tokens only (the
reference may insert [CLS] or [PAD]).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingOptions:
    max_predictions: int = 20
    masked_lm_prob: float = 0.15
    whole_word_masking: bool = False
    mask_id: int = 4
    vocab_size: int = 30522
    special_ids: frozenset = frozenset()

    def __post_init__(self):
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob={self.masked_lm_prob}: expected a value in (0, 1)")
        if self.max_predictions < 1:
            raise ValueError(f"max_predictions_per_seq={self.max_predictions}: expected >= 1")


def example_rng(seed: int, position: int) -> np.random.Generator:
    """The generator for the example at `position` of the training stream (step * B + row)."""
    return np.random.default_rng([seed, position])


def mask_example(input_ids: np.ndarray, word_starts: np.ndarray, options: MaskingOptions,
                 rng: np.random.Generator):
    """Masks one instance. Returns (masked ids, positions, original ids) of the predictions,
    positions sorted; at most `options.max_predictions` of them."""
    special = np.isin(input_ids, list(options.special_ids))
    num_to_predict = min(options.max_predictions,
                         max(1, int(round(len(input_ids) * options.masked_lm_prob))))
    candidates = np.flatnonzero(~special)
    if options.whole_word_masking:
        chosen = _choose_whole_words(candidates, word_starts, special, num_to_predict, rng)
    else:
        chosen = np.sort(rng.permutation(candidates)[:num_to_predict])
    labels = input_ids[chosen]
    masked = input_ids.copy()
    action = rng.random(len(chosen))
    masked[chosen[action < 0.8]] = options.mask_id
    random_slots = chosen[action >= 0.9]
    masked[random_slots] = _random_ordinary_ids(len(random_slots), options, rng)
    return masked, chosen, labels


def _choose_whole_words(candidates, word_starts, special, num_to_predict, rng) -> np.ndarray:
    # A piece right after a special token starts a word even if truncation cut its head off.
    starts = word_starts | np.concatenate([[True], special[:-1]])
    word_of_token = np.cumsum(starts) - 1
    words = [candidates[word_of_token[candidates] == w]
             for w in np.unique(word_of_token[candidates])]
    chosen: list[int] = []
    for w in rng.permutation(len(words)):
        if len(chosen) >= num_to_predict:
            break
        if len(chosen) + len(words[w]) > num_to_predict:
            continue
        chosen.extend(words[w])
    return np.sort(np.array(chosen, dtype=np.int64))


def _random_ordinary_ids(count: int, options: MaskingOptions, rng: np.random.Generator):
    ids = rng.integers(0, options.vocab_size, count)
    special = np.array(sorted(options.special_ids), dtype=np.int64)
    while special.size and np.isin(ids, special).any():  # redraw the rare special picks
        clash = np.isin(ids, special)
        ids[clash] = rng.integers(0, options.vocab_size, int(clash.sum()))
    return ids


def mask_batch(examples: list[dict], options: MaskingOptions, max_seq_length: int,
               seed: int, first_position: int) -> dict[str, np.ndarray]:
    """Pads and masks stored instances into BERT's fixed-shape features.

    `examples[r]` holds `input_ids`, `word_starts`, `a_length`, `next_sentence_label`;
    row r is masked with `example_rng(seed, first_position + r)`.
    """
    batch = len(examples)
    out = {
        "input_ids": np.zeros((batch, max_seq_length), np.int32),
        "input_mask": np.zeros((batch, max_seq_length), np.int32),
        "segment_ids": np.zeros((batch, max_seq_length), np.int32),
        "masked_lm_positions": np.zeros((batch, options.max_predictions), np.int32),
        "masked_lm_ids": np.zeros((batch, options.max_predictions), np.int32),
        "masked_lm_weights": np.zeros((batch, options.max_predictions), np.float32),
        "next_sentence_labels": np.zeros((batch,), np.int32),
    }
    for row, example in enumerate(examples):
        ids = np.asarray(example["input_ids"])
        length = len(ids)
        masked, positions, labels = mask_example(ids, np.asarray(example["word_starts"], bool),
                                                 options, example_rng(seed, first_position + row))
        out["input_ids"][row, :length] = masked
        out["input_mask"][row, :length] = 1
        out["segment_ids"][row, int(example["a_length"]) + 2:length] = 1
        count = len(positions)
        out["masked_lm_positions"][row, :count] = positions
        out["masked_lm_ids"][row, :count] = labels
        out["masked_lm_weights"][row, :count] = 1.0
        out["next_sentence_labels"][row] = int(example["next_sentence_label"])
    return out
