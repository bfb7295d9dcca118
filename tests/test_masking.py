import numpy as np
import pytest

from bert_jax.data.masking import BLOCK, MaskingOptions, mask_batch

CLS, SEP, PAD, MASK = 2, 3, 0, 4
OPTIONS = MaskingOptions(max_predictions=20, masked_lm_prob=0.15, mask_id=MASK, vocab_size=100,
                         special_ids=frozenset({PAD, 1, CLS, SEP, MASK}))


def _instance(rng, length):
    a = int(rng.integers(1, length - 3))
    ids = rng.integers(5, 100, length).astype(np.int32)
    ids[0], ids[a + 1], ids[-1] = CLS, SEP, SEP
    starts = rng.random(length) < 0.7
    starts[[0, a + 1, length - 1]] = True
    return {"input_ids": ids, "word_starts": starts, "a_length": a,
            "next_sentence_label": int(rng.integers(0, 2))}


def _predictions(batch, row):
    weights = batch["masked_lm_weights"][row] > 0
    return batch["masked_lm_positions"][row][weights], batch["masked_lm_ids"][row][weights]


def test_masking_rates_layout_and_specials_over_many_instances():
    rng = np.random.default_rng(0)
    examples = [_instance(rng, int(rng.integers(60, 129))) for _ in range(2500)]
    batch = mask_batch(examples, OPTIONS, 128, seed=1, first_position=0)
    maskable = predicted = masked = kept = randomized = 0
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        maskable += int((~np.isin(ids, [CLS, SEP])).sum())
        positions, labels = _predictions(batch, row)
        np.testing.assert_array_equal(labels, ids[positions])  # labels are the originals
        assert not np.isin(ids[positions], [CLS, SEP, PAD]).any()
        assert np.all(np.diff(positions) > 0)
        now = batch["input_ids"][row][positions]
        predicted += len(positions)
        masked += int((now == MASK).sum())
        kept += int((now == labels).sum())
        randomized += int(((now != MASK) & (now != labels)).sum())
        unmasked = np.setdiff1d(np.arange(len(ids)), positions)
        np.testing.assert_array_equal(batch["input_ids"][row][unmasked], ids[unmasked])
        length = len(ids)
        assert batch["input_mask"][row].sum() == length
        assert (batch["input_ids"][row, length:] == PAD).all()
        np.testing.assert_array_equal(batch["segment_ids"][row, :length],
                                      np.arange(length) > example["a_length"] + 1)
        assert batch["next_sentence_labels"][row] == example["next_sentence_label"]
    assert predicted / maskable == pytest.approx(0.15, abs=0.01)
    # Random replacements that happen to draw the original count as kept: ~1% of 10%.
    assert masked / predicted == pytest.approx(0.8, abs=0.02)
    assert kept / predicted == pytest.approx(0.1, abs=0.02)
    assert randomized / predicted == pytest.approx(0.1, abs=0.02)
    chosen = np.zeros(128)
    for row in range(len(examples)):
        chosen[_predictions(batch, row)[0]] += 1
    assert chosen[1:60].min() > 0.5 * chosen[1:60].mean()  # no position is favoured


def test_masks_depend_only_on_seed_and_stream_position():
    rng = np.random.default_rng(1)
    examples = [_instance(rng, 100) for _ in range(3 * BLOCK)]
    whole = mask_batch(examples, OPTIONS, 100, seed=3, first_position=1000)
    # Any cut into parts, wherever the blocks fall, gives the same rows.
    for cut in (1, 37, BLOCK, 100):
        head = mask_batch(examples[:cut], OPTIONS, 100, seed=3, first_position=1000)
        tail = mask_batch(examples[cut:], OPTIONS, 100, seed=3, first_position=1000 + cut)
        for name, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([head[name], tail[name]]), value)
    other_seed = mask_batch(examples, OPTIONS, 100, seed=4, first_position=1000)
    other_place = mask_batch(examples, OPTIONS, 100, seed=3, first_position=1001)
    assert not np.array_equal(other_seed["masked_lm_positions"], whole["masked_lm_positions"])
    assert not np.array_equal(other_place["masked_lm_positions"], whole["masked_lm_positions"])


def test_whole_word_masking_masks_every_piece_of_a_chosen_word():
    options = MaskingOptions(max_predictions=20, masked_lm_prob=0.15, whole_word_masking=True,
                             mask_id=MASK, vocab_size=100, special_ids=OPTIONS.special_ids)
    rng = np.random.default_rng(2)
    examples = [_instance(rng, 90) for _ in range(300)]
    batch = mask_batch(examples, options, 90, seed=0, first_position=0)
    sizes = []
    for row, example in enumerate(examples):
        positions, _ = _predictions(batch, row)
        special = np.isin(example["input_ids"], [CLS, SEP])
        word = np.cumsum(example["word_starts"])
        chosen = set(positions.tolist())
        for w in set(word[positions].tolist()):
            members = {i for i in np.flatnonzero(word == w) if not special[i]}
            assert members <= chosen  # all pieces of the word, or none
        assert 1 <= len(positions) <= round(88 * 0.15)
        sizes.append(len(positions))
    assert np.mean(sizes) > 0.8 * round(88 * 0.15)  # words fill most of the budget


def test_short_instances_predict_at_least_one_token_and_at_most_max_predictions():
    rng = np.random.default_rng(3)
    tiny = mask_batch([_instance(rng, 5)], OPTIONS, 8, seed=0, first_position=0)
    assert tiny["masked_lm_weights"].sum() == 1
    capped = MaskingOptions(max_predictions=3, mask_id=MASK, vocab_size=100,
                            special_ids=OPTIONS.special_ids)
    long = mask_batch([_instance(rng, 128)], capped, 128, seed=0, first_position=0)
    assert long["masked_lm_weights"].sum() == 3 and long["masked_lm_positions"].shape == (1, 3)


def test_random_replacements_are_never_special_tokens():
    options = MaskingOptions(max_predictions=20, masked_lm_prob=0.5, mask_id=MASK, vocab_size=8,
                             special_ids=frozenset({0, 1, 2, 3, 4}))
    rng = np.random.default_rng(4)
    examples = []
    for _ in range(300):
        example = _instance(rng, 40)
        ids = example["input_ids"]
        example["input_ids"] = np.where(np.isin(ids, [CLS, SEP]), ids, rng.integers(5, 8, 40))
        examples.append(example)
    batch = mask_batch(examples, options, 40, seed=0, first_position=0)
    replaced = np.take_along_axis(batch["input_ids"], batch["masked_lm_positions"], 1)
    replaced = replaced[batch["masked_lm_weights"] > 0]
    assert not np.isin(replaced[replaced != MASK], [0, 1, 2, 3]).any()
    assert (replaced != MASK).sum() > 0
