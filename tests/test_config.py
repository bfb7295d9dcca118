import pytest

from bert_jax.config import (POD_TARGETS, PRESETS, ModelConfig, RunConfig, default_config,
                             lamb_schedule, pod_config, preset)


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


def test_lamb_schedule_follows_the_lamb_papers_table():
    # You et al. 2019, Table 4: batch 32K -> 15,625 steps at 5e-3; 8K -> 62,500 at 2.5e-3;
    # warmup 1/5 of the steps at 32K, 1/20 at 8K.
    assert lamb_schedule(32768) == dict(num_steps=15625, learning_rate=5e-3, warmup_steps=3125)
    eight_k = lamb_schedule(8192)
    assert eight_k["num_steps"] == 62500 and eight_k["warmup_steps"] == 62500 // 20
    assert eight_k["learning_rate"] == pytest.approx(2.5e-3)


@pytest.mark.parametrize("target", list(POD_TARGETS))
@pytest.mark.parametrize("size", ["base", "large"])
def test_pod_configs_split_their_batch_evenly_over_chips_and_micro_batches(size, target):
    config = pod_config(size, target)
    chips, memory_gib = POD_TARGETS[target]
    (short, long_) = RunConfig.from_dict(config).phases
    assert (short.max_seq_length, long_.max_seq_length) == (128, 512)
    assert long_.start == config.train.num_steps * 9 // 10
    assert config.train.optimizer == "lamb"
    assert ModelConfig.from_dict(config.model).hidden_size == PRESETS[size][1]
    for phase in (short, long_):
        assert phase.global_batch_size % (chips * phase.grad_accum_steps) == 0
    # Length 512 costs at least 4x the memory per row: at least as many micro-batches.
    assert long_.grad_accum_steps >= short.grad_accum_steps


def test_pod_config_with_an_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="v4-32"):
        pod_config("base", "v9-8")
