"""Dynamic MLM masking in numpy, keyed by (seed, position in the training stream): stateless.

google-research/bert's `create_masked_lm_predictions`, per instance: predict
`min(max_predictions, max(1, round(n * masked_lm_prob)))` tokens chosen uniformly at random
among the n non-special tokens (whole words with `whole_word_masking`, skipping a word that
would overshoot); replace 80% with [MASK], keep 10%, and put a random token in 10%.
Two deliberate differences: `n` counts maskable tokens only (the reference counts [CLS] and
[SEP] too, which masks 16-17% of the text at length 64), and random replacements are drawn
from ordinary tokens only (the reference may insert [CLS] or [PAD]). Stream position p draws
from a generator keyed by (seed, MASK_STREAM, p // BLOCK): one per block of rows, for any
process layout (docs/data.md).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

BLOCK = 64  # stream positions per random generator
MASK_STREAM = 1  # the epoch permutations draw from stream 0 (loader.ORDER_STREAM)


@dataclasses.dataclass(frozen=True)
class MaskingOptions:
    max_predictions: int = 20
    masked_lm_prob: float = 0.15
    whole_word_masking: bool = False
    mask_id: int = 4
    vocab_size: int = 30522
    special_ids: frozenset = frozenset()

    @functools.cached_property
    def is_special(self) -> np.ndarray:
        """Lookup table [vocab_size]: True for ids never masked."""
        table = np.zeros(self.vocab_size, bool)
        table[list(self.special_ids)] = True
        return table

    @functools.cached_property
    def ordinary_ids(self) -> np.ndarray:
        """The ids a random replacement draws from."""
        return np.flatnonzero(~self.is_special)


def stream_randoms(seed: int, first_position: int, rows: int, length: int, predictions: int):
    """Uniform [0, 1) (token keys [rows, length], actions and replacements [rows, predictions])
    of `rows` stream positions from `first_position`."""
    first_block, last_block = first_position // BLOCK, (first_position + rows - 1) // BLOCK
    width = length + 2 * predictions
    blocks = [np.random.default_rng([seed, MASK_STREAM, block]).random((BLOCK, width),
                                                                       dtype=np.float32)
              for block in range(first_block, last_block + 1)]
    start = first_position - first_block * BLOCK
    values = np.concatenate(blocks)[start:start + rows]
    return (values[:, :length], values[:, length:length + predictions],
            values[:, length + predictions:])


def pad(examples: list[dict], max_seq_length: int,
        instances_per_row: int = 1) -> dict[str, np.ndarray]:
    """Stored examples -> fixed-shape features. `input_mask` numbers each token's instance (1,
    2, ...; 0 on padding). Packed, `next_sentence_labels` is [B, K] (else [B]), with each
    instance's [CLS] `next_sentence_positions` and `next_sentence_weights` (1 where it exists).
    """
    tokens, instances = (len(examples), max_seq_length), (len(examples), instances_per_row)
    ids, instance_mask, segment_ids = (np.zeros(tokens, np.int32) for _ in range(3))
    starts = np.zeros(tokens, bool)
    labels, cls_positions = np.zeros(instances, np.int32), np.zeros(instances, np.int32)
    weights = np.zeros(instances, np.float32)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        ids[row, :length] = example["input_ids"]
        starts[row, :length] = example["word_starts"]
        lengths, a_lengths, nsp_labels = _instances(example, instances_per_row)
        labels[row, :len(nsp_labels)] = nsp_labels
        start = 0
        for number, (size, a_length) in enumerate(zip(lengths, a_lengths)):
            instance_mask[row, start:start + size] = number + 1
            segment_ids[row, start + a_length + 2:start + size] = 1  # B and its [SEP]
            cls_positions[row, number] = start
            weights[row, number] = 1.0
            start += size
    padded = {"input_ids": ids, "word_starts": starts, "input_mask": instance_mask,
              "segment_ids": segment_ids, "next_sentence_labels": labels[:, 0]}
    if instances_per_row == 1:
        return padded
    return {**padded, "next_sentence_labels": labels, "next_sentence_positions": cls_positions,
            "next_sentence_weights": weights}


def _instances(example: dict, instances_per_row: int):
    """(lengths, lengths of A, NSP labels) of the instances of a stored example."""
    if "lengths" not in example:  # unpacked
        return ([len(example["input_ids"])], [int(example["a_length"])],
                [int(example["next_sentence_label"])])
    if len(example["lengths"]) > instances_per_row:
        raise ValueError(f"a stored row holds {len(example['lengths'])} instances: expected at "
                         f"most instances_per_row={instances_per_row}, as the dataset was "
                         f"prepared")
    return example["lengths"], example["a_lengths"], example["next_sentence_labels"]


def batch_shapes(rows: int, length: int, predictions: int,
                 instances_per_row: int = 1) -> dict[str, tuple[tuple[int, ...], type]]:
    """The (shape, dtype) of each feature `mask_batch` makes: what a compiled step is given."""
    shapes = {"input_ids": (rows, length), "segment_ids": (rows, length),
              "input_mask": (rows, length), "masked_lm_positions": (rows, predictions),
              "masked_lm_ids": (rows, predictions), "masked_lm_weights": (rows, predictions),
              "next_sentence_labels": (rows,)}
    if instances_per_row > 1:
        shapes.update({name: (rows, instances_per_row) for name in (
            "next_sentence_labels", "next_sentence_positions", "next_sentence_weights")})
    return {name: (shape, np.float32 if name.endswith("weights") else np.int32)
            for name, shape in shapes.items()}


def mask_batch(examples: list[dict], options: MaskingOptions, max_seq_length: int,
               seed: int, first_position: int, instances_per_row: int = 1
               ) -> dict[str, np.ndarray]:
    """Pads (`pad`) and masks stored examples; row r is stream position `first_position + r`.
    A packed row is masked as one sequence: 15% of its tokens."""
    padded = pad(examples, max_seq_length, instances_per_row)
    ids = padded.pop("input_ids")
    starts = padded.pop("word_starts")
    keys, actions, replacements = stream_randoms(seed, first_position, len(examples),
                                                 max_seq_length, options.max_predictions)
    candidates = (padded["input_mask"] > 0) & ~options.is_special[ids]
    count = candidates.sum(axis=1)
    to_predict = np.minimum(options.max_predictions,
                            np.maximum(1, np.rint(count * options.masked_lm_prob))).astype(int)
    to_predict = np.minimum(to_predict, count)
    if options.whole_word_masking:
        chosen = _choose_whole_words(candidates, starts, keys, to_predict)
    else:
        rank = np.argsort(np.where(candidates, keys, 2.0), axis=1, kind="stable").argsort(axis=1)
        chosen = rank < to_predict[:, None]
    positions, weights = _positions(chosen, options.max_predictions)
    labels = np.where(weights, np.take_along_axis(ids, positions, axis=1), 0)
    new_values = np.where(actions < 0.8, options.mask_id, labels)
    random_ids = options.ordinary_ids[(replacements * len(options.ordinary_ids)).astype(int)]
    new_values = np.where(actions >= 0.9, random_ids, new_values)
    masked = ids.copy()
    rows = np.nonzero(weights)[0]
    masked[rows, positions[weights]] = new_values[weights]
    return {"input_ids": masked, **padded,
            "masked_lm_positions": positions.astype(np.int32),
            "masked_lm_ids": labels.astype(np.int32),
            "masked_lm_weights": weights.astype(np.float32)}


def _positions(chosen: np.ndarray, max_predictions: int):
    """Chosen flags [B, S] -> sorted positions [B, P] (padded with 0) and weights [B, P]."""
    length = chosen.shape[1]
    order = np.sort(np.where(chosen, np.arange(length), length), axis=1)[:, :max_predictions]
    order = np.pad(order, ((0, 0), (0, max_predictions - order.shape[1])), constant_values=length)
    weights = order < length
    return np.where(weights, order, 0), weights


def _choose_whole_words(candidates, starts, keys, to_predict) -> np.ndarray:
    """Whole words in random order (each ranked by its first piece's key), skipping a word
    that would overshoot, as the reference; a row at a time."""
    # A piece right after a special token starts a word even if truncation cut its head off.
    starts = starts | np.concatenate([np.ones_like(starts[:, :1]), ~candidates[:, :-1]], axis=1)
    chosen = np.zeros_like(candidates)
    for row in range(len(candidates)):
        word = np.cumsum(starts[row]) - 1
        word_key = keys[row][np.flatnonzero(starts[row])]
        budget = int(to_predict[row])
        for w in np.argsort(word_key, kind="stable"):
            if budget == 0:
                break
            members = candidates[row] & (word == w)
            size = int(members.sum())
            if 0 < size <= budget:
                chosen[row] |= members
                budget -= size
    return chosen
