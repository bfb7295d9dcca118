import pytest

from bert_jax.config import PRESETS, ModelConfig, default_config, preset


def test_presets_follow_google_research_bert_sizes():
    for name, (layers, hidden, heads) in PRESETS.items():
        config = preset(name)
        assert (config.num_layers, config.hidden_size, config.num_heads) == (layers, hidden, heads)
        assert config.intermediate_size == 4 * hidden
        assert config.head_dim * config.num_heads == hidden
    assert preset("base").head_dim == 64


def test_default_config_model_round_trips_through_model_config():
    config = default_config("mini")
    assert ModelConfig.from_dict(config.model) == preset("mini", vocab_size=8192)
    config.data.vocab_size = 1000  # the model's vocabulary follows the data's by default
    assert ModelConfig.from_dict(config.model).vocab_size == 1000


@pytest.mark.parametrize("fields, words", [
    (dict(hidden_size=128, num_heads=3), ["hidden_size=128", "num_heads=3"]),
    (dict(num_layers=0), ["num_layers=0"]),
    (dict(vocab_size=2.5), ["vocab_size=2.5"]),
    (dict(dtype="float16"), ["dtype='float16'", "bfloat16"]),
    (dict(attention_impl="flash"), ["attention_impl='flash'", "cudnn"]),
    (dict(remat_policy="some"), ["remat_policy='some'"]),
    (dict(hidden_dropout_rate=1.0), ["hidden_dropout_rate=1.0"]),
])
def test_bad_model_config_names_the_value(fields, words):
    with pytest.raises(ValueError) as error:
        ModelConfig(**fields)
    for word in words:
        assert word in str(error.value)


def test_unknown_keys_and_sizes_are_rejected():
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({"hidden_sise": 4})
    with pytest.raises(ValueError, match="'huge'"):
        preset("huge")
