import pytest

from bert_jax.config import DataConfig, preset
from bert_jax.data.checks import check_batch_topology, check_data_against_model


def test_matching_data_and_model_pass():
    check_data_against_model(DataConfig(vocab_size=1000), preset("tiny", vocab_size=1000), 1000)
    check_batch_topology(32, data_parallel=8)


@pytest.mark.parametrize("data, model, tokens, words", [
    (DataConfig(), preset("tiny", vocab_size=8192), 30522,
     ["30522 tokens", "model.vocab_size=8192", "expected model.vocab_size=30522"]),
    (DataConfig(max_seq_length=1024, max_predictions_per_seq=160), preset("tiny", vocab_size=8),
     8, ["data.max_seq_length=1024", "max_position_embeddings=512"]),
    (DataConfig(max_seq_length=512, max_predictions_per_seq=20), preset("tiny", vocab_size=8),
     8, ["max_predictions_per_seq=20", "= 77"]),
])
def test_mismatches_are_one_line_errors_naming_both_values(data, model, tokens, words):
    with pytest.raises(ValueError) as error:
        check_data_against_model(data, model, tokens)
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_batch_must_divide_over_the_data_parallel_shards():
    with pytest.raises(ValueError, match="global_batch_size=32 is not divisible by the "
                                         "data-parallel size 6: expected a multiple of 6"):
        check_batch_topology(32, 6)
