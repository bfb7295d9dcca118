import numpy as np
import pytest

from bert_jax.data.masking import MaskingOptions, example_rng, mask_batch, mask_example

CLS, SEP, PAD, MASK = 2, 3, 0, 4
OPTIONS = MaskingOptions(max_predictions=20, masked_lm_prob=0.15, mask_id=MASK, vocab_size=100,
                         special_ids=frozenset({PAD, 1, CLS, SEP, MASK}))


def _instance(rng, length):
    a = int(rng.integers(1, length - 3))
    ids = rng.integers(5, 100, length).astype(np.int32)
    ids[0], ids[a + 1], ids[-1] = CLS, SEP, SEP
    return {"input_ids": ids, "word_starts": rng.random(length) < 0.7, "a_length": a,
            "next_sentence_label": int(rng.integers(0, 2))}


def test_masking_rates_and_specials_over_many_instances():
    rng = np.random.default_rng(0)
    examples = [_instance(rng, int(rng.integers(60, 129))) for _ in range(2500)]
    batch = mask_batch(examples, OPTIONS, 128, seed=1, first_position=0)
    maskable = predicted = masked = kept = randomized = 0
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        maskable += int((~np.isin(ids, [CLS, SEP])).sum())
        weights = batch["masked_lm_weights"][row] > 0
        positions = batch["masked_lm_positions"][row][weights]
        labels = batch["masked_lm_ids"][row][weights]
        np.testing.assert_array_equal(labels, ids[positions])  # labels are the originals
        assert not np.isin(ids[positions], [CLS, SEP, PAD]).any()
        assert np.all(np.diff(positions) > 0)
        now = batch["input_ids"][row][positions]
        predicted += len(positions)
        masked += int((now == MASK).sum())
        kept += int((now == labels).sum())
        randomized += int(((now != MASK) & (now != labels)).sum())
        length = len(ids)
        assert batch["input_mask"][row].sum() == length
        assert (batch["input_ids"][row, length:] == PAD).all()
        np.testing.assert_array_equal(batch["segment_ids"][row, :length],
                                      np.arange(length) > example["a_length"] + 1)
    assert predicted / maskable == pytest.approx(0.15, abs=0.01)
    # Random replacements that happen to draw the original count as kept: ~0.1% of 10%.
    assert masked / predicted == pytest.approx(0.8, abs=0.02)
    assert kept / predicted == pytest.approx(0.1, abs=0.02)
    assert randomized / predicted == pytest.approx(0.1, abs=0.02)


def test_masks_are_keyed_by_seed_and_position_only():
    rng = np.random.default_rng(1)
    example = _instance(rng, 100)
    first = mask_example(example["input_ids"], example["word_starts"], OPTIONS, example_rng(3, 7))
    again = mask_example(example["input_ids"], example["word_starts"], OPTIONS, example_rng(3, 7))
    other = mask_example(example["input_ids"], example["word_starts"], OPTIONS, example_rng(3, 8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_whole_word_masking_masks_every_piece_of_a_chosen_word():
    options = MaskingOptions(max_predictions=20, masked_lm_prob=0.15, whole_word_masking=True,
                             mask_id=MASK, vocab_size=100, special_ids=OPTIONS.special_ids)
    rng = np.random.default_rng(2)
    for position in range(300):
        example = _instance(rng, 90)
        starts = example["word_starts"]
        _, positions, _ = mask_example(example["input_ids"], starts, options,
                                       example_rng(0, position))
        special = np.isin(example["input_ids"], [CLS, SEP])
        word = np.cumsum(starts | np.concatenate([[True], special[:-1]]))
        chosen = set(positions.tolist())
        for w in set(word[positions].tolist()):
            members = {i for i in np.flatnonzero(word == w) if not special[i]}
            assert members <= chosen  # all pieces of the word, or none
        assert len(positions) <= round(90 * 0.15)


def test_short_instances_predict_at_least_one_token_and_at_most_max_predictions():
    rng = np.random.default_rng(3)
    tiny = _instance(rng, 5)
    _, positions, _ = mask_example(tiny["input_ids"], tiny["word_starts"], OPTIONS,
                                   example_rng(0, 0))
    assert len(positions) == 1
    capped = MaskingOptions(max_predictions=3, mask_id=MASK, vocab_size=100,
                            special_ids=OPTIONS.special_ids)
    long = _instance(rng, 128)
    assert len(mask_example(long["input_ids"], long["word_starts"], capped,
                            example_rng(0, 1))[1]) == 3


def test_random_replacements_are_never_special_tokens():
    options = MaskingOptions(max_predictions=20, masked_lm_prob=0.5, mask_id=MASK, vocab_size=8,
                             special_ids=frozenset({0, 1, 2, 3, 4}))
    rng = np.random.default_rng(4)
    for position in range(200):
        example = _instance(rng, 40)
        example["input_ids"] = np.where(np.isin(example["input_ids"], [CLS, SEP]),
                                        example["input_ids"], rng.integers(5, 8, 40))
        masked, positions, labels = mask_example(example["input_ids"], example["word_starts"],
                                                 options, example_rng(0, position))
        replaced = masked[positions]
        assert not np.isin(replaced[replaced != MASK], [0, 1, 2, 3]).any()
