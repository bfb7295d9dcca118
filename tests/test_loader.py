import threading
import time

import numpy as np
import pytest

from bert_jax.data.loader import Loader, _prefetched
from bert_jax.data.masking import MaskingOptions

OPTIONS = MaskingOptions(max_predictions=4, masked_lm_prob=0.15, mask_id=4, vocab_size=50,
                         special_ids=frozenset({0, 1, 2, 3, 4}))


def _source(size=37):
    """Stored instances: example i's tokens encode i, so rows can be traced to examples."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(size):
        length = int(rng.integers(8, 17))
        ids = rng.integers(5, 50, length).astype(np.int32)
        ids[0], ids[3], ids[-1] = 2, 3, 3
        ids[1] = 5 + i % 45
        examples.append({"input_ids": ids, "word_starts": np.ones(length, bool), "a_length": 2,
                         "next_sentence_label": i % 2})
    return examples


def _loader(source, **kwargs):
    return Loader(source, OPTIONS, global_batch_size=kwargs.pop("batch", 8), seed=7,
                  max_seq_length=16, **kwargs)


def test_each_epoch_is_a_permutation_and_batches_continue_across_epochs():
    source = _source()
    loader = _loader(source)
    seen = np.concatenate([loader.global_indices(step) for step in range(14)])  # 112 > 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 37:(epoch + 1) * 37]) == list(range(37))
    assert not np.array_equal(seen[:37], seen[37:74])  # a new order each epoch


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_processes_together_read_exactly_the_global_batch(process_count):
    source = _source()
    whole = {step: _loader(source).batch(step) for step in (0, 5, 9)}
    for step, expected in whole.items():
        rows = 8 // process_count
        parts = [_loader(source, rows=slice(p * rows, (p + 1) * rows)).batch(step)
                 for p in range(process_count)]
        for name, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), value)


def test_resume_at_step_k_gives_the_same_batches_as_a_fresh_start():
    source = _source()
    fresh = [batch for _, batch in _loader(source).iterate(0, 10)]
    resumed = [batch for _, batch in _loader(source).iterate(6, 4)]
    for a, b in zip(fresh[6:], resumed):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_prefetching_changes_nothing_and_errors_reach_the_consumer():
    source = _source()
    plain = [b for _, b in _loader(source).iterate(0, 5, prefetch=0)]
    fetched = [b for _, b in _loader(source).iterate(0, 5, prefetch=3)]
    for a, b in zip(plain, fetched):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    broken = _source()
    broken[5] = {"input_ids": np.zeros(40, np.int32)}  # too long and missing fields
    with pytest.raises((ValueError, KeyError)):
        for _ in _loader(broken, batch=37).iterate(0, 3, prefetch=2):
            pass


def test_a_consumer_that_stops_early_releases_the_prefetch_thread():
    def prefetching():
        return {t for t in threading.enumerate() if t.name == "bert-jax-prefetch"}

    before = prefetching()
    batches = _prefetched(iter([0, 1]), 1)
    assert next(batches) == 0
    (thread,) = prefetching() - before
    time.sleep(0.5)  # the thread has queued 1 and waits for room for the end marker
    batches.close()  # as a preemption's break or a rollback leaves the loop
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_unshuffled_reading_is_in_stored_order():
    loader = _loader(_source(), shuffle=False)
    np.testing.assert_array_equal(loader.global_indices(0), np.arange(8))
    np.testing.assert_array_equal(loader.global_indices(4), [32, 33, 34, 35, 36, 0, 1, 2])


@pytest.mark.parametrize("rows", [slice(4, 9), slice(3, 3), slice(0, 8, 2)])
def test_rows_outside_the_global_batch_are_refused(rows):
    with pytest.raises(ValueError, match=f"rows {rows.start}:{rows.stop}: expected a contiguous"):
        _loader(_source(), rows=rows)
