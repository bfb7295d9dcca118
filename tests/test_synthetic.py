import numpy as np

from bert_jax.data.synthetic import CLS_ID, MASK_ID, PAD_ID, SEP_ID, synthetic_batch


def test_synthetic_batch_has_bert_layout_and_masking():
    batch = synthetic_batch(0, batch_size=64, seq_length=32, vocab_size=100, max_predictions=5)
    ids, mask, segments = batch["input_ids"], batch["input_mask"], batch["segment_ids"]
    for row in range(64):
        length = mask[row].sum()
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert ids[row, 0] == CLS_ID and ids[row, length - 1] == SEP_ID
        assert (ids[row, length:] == PAD_ID).all()
        assert (ids[row, :length] == SEP_ID).sum() == 2
        weights = batch["masked_lm_weights"][row]
        positions = batch["masked_lm_positions"][row][weights > 0]
        assert len(positions) >= 1 and (positions < length - 1).all() and (positions > 0).all()
        assert set(np.unique(segments[row, :length])) == {0, 1}
    predicted = batch["masked_lm_weights"] > 0
    labels = batch["masked_lm_ids"][predicted]
    assert (labels >= 5).all()  # special tokens are never prediction targets
    at_positions = np.take_along_axis(ids, batch["masked_lm_positions"], 1)[predicted]
    assert 0.65 < (at_positions == MASK_ID).mean() < 0.95  # about 80% [MASK]
