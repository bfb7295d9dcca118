import jax
import numpy as np
import optax
import pytest

from bert_jax.config import TrainConfig, default_config, preset
from bert_jax.model import create
from bert_jax.optim import decay_mask, learning_rate_schedule, make_optimizer
from bert_jax.pretrained import Pretrained


def _train_config(**values):
    train = default_config().train
    train.update(values)
    return train


def test_schedule_warms_up_linearly_then_decays_to_the_end_rate():
    schedule = learning_rate_schedule(_train_config(num_steps=110, warmup_steps=10,
                                                    learning_rate=1e-3, end_learning_rate=0.0))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)
    squared = learning_rate_schedule(_train_config(num_steps=110, warmup_steps=10,
                                                   learning_rate=1e-3, decay_power=2.0))
    assert float(squared(60)) == pytest.approx(2.5e-4)


def test_weight_decay_skips_layer_norms_and_biases():
    params = Pretrained.from_model(create(preset("tiny", vocab_size=50, num_layers=1))).params
    mask = decay_mask(params)
    assert mask["encoder"]["layers"]["mlp"]["up"]["kernel"]
    assert mask["embeddings"]["word"]["embedding"]
    assert not mask["encoder"]["layers"]["mlp"]["up"]["bias"]
    assert not mask["encoder"]["layers"]["attention"]["norm"]["scale"]
    assert not mask["mlm"]["bias"]
    decayed = sum(np.size(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert decayed > 0.9 * sum(np.size(p) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_optimizers_clip_and_decay(name):
    params = {"dense": {"kernel": np.ones((3, 3), np.float32), "bias": np.ones(3, np.float32)}}
    tx = make_optimizer(_train_config(optimizer=name, num_steps=10, warmup_steps=0,
                                      learning_rate=0.1, weight_decay=0.5))
    state = tx.init(params)
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero, state, params, learning_rate=0.1)
    # With zero gradients only weight decay moves parameters: the kernel, not the bias.
    assert np.all(np.asarray(updates["dense"]["kernel"]) < 0)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0)
    huge = jax.tree.map(lambda p: np.full_like(p, 1e6), params)
    clipped = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())[0]
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="train.optimizer='sgd'"):
        TrainConfig.from_dict(_train_config(optimizer="sgd"))
