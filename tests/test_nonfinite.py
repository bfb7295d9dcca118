"""Non-finite losses and gradients: the step skips its update and counts it; after
`train.nonfinite_patience` such steps in a row the run rolls back past the offending batches
or stops naming the steps. The faults are real overflows: batches whose MLM weights are near
float32's maximum, so the weighted loss sum becomes inf and the loss inf / inf = NaN."""

import jax
import numpy as np
import pytest

from bert_jax import loop
from bert_jax import run as runs
from bert_jax import sharding, train
from bert_jax.checkpoint import Checkpointer
from bert_jax.config import MeshConfig, TrainConfig, default_run, preset
from bert_jax.data import pipeline
from bert_jax.data.synthetic import synthetic_batch
from bert_jax.metrics import read_metrics

FLOAT32_NEAR_MAX = 3e38


def _overflowing(batch: dict) -> dict:
    batch = dict(batch)
    batch["masked_lm_weights"] = np.where(batch["masked_lm_weights"] > 0, FLOAT32_NEAR_MAX,
                                          0.0).astype(np.float32)
    return batch


def _tiny_steps(**train_values):
    """A fresh tiny state, its jitted train step (`train_values` set on the default run's
    train config), the schedule, and a good and an overflowing batch."""
    model_config = preset("tiny", vocab_size=256, max_position_embeddings=32)
    train_config = default_run().train
    train_config.update(num_steps=10, learning_rate=1e-3, **train_values)
    run = runs.build(model_config, TrainConfig.from_dict(train_config), MeshConfig())
    mesh, schedule, step = run.mesh, run.schedule, run.train_step()
    good = sharding.global_batch(synthetic_batch(0, 8, 32, 256, 5), mesh, 8)
    bad = sharding.global_batch(_overflowing(synthetic_batch(1, 8, 32, 256, 5)), mesh, 8)
    return run.init_state(), step, schedule, good, bad


def _qkv_kernel(state):
    return jax.device_get(state["params"])["encoder"]["layers"]["attention"]["qkv"]["kernel"]


def test_a_non_finite_step_keeps_the_parameters_and_optimizer_state_and_is_counted():
    state, step, _, good, bad = _tiny_steps(warmup_steps=1)
    state, _ = step(state, good)
    before = jax.device_get(state)
    state, metrics = step(state, bad)
    state, again = step(state, bad)
    after = jax.device_get(state)
    assert not np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
    jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
    assert int(after["step"]) == 3
    assert (float(again["nonfinite_consecutive"]), float(again["nonfinite_total"])) == (2, 2)

    state, recovered = step(state, good)
    assert np.isfinite(float(recovered["loss"]))
    assert (float(recovered["nonfinite_consecutive"]), float(recovered["nonfinite_total"])) == (0, 2)
    assert not np.array_equal(_qkv_kernel(state),
                              after["params"]["encoder"]["layers"]["attention"]["qkv"]["kernel"])


def test_after_skipped_steps_the_rate_applied_is_the_one_logged_the_schedule_of_the_step():
    # Without warmup the rate falls linearly from 1e-3 at step 0 to 0 at step 10. Adam's first
    # update of a parameter is g / (|g| + eps), about +-1 where gradients are not tiny, so the
    # largest change of a kernel in the first good step is the rate that step applied.
    state, step, schedule, good, bad = _tiny_steps(warmup_steps=0, weight_decay=0.0,
                                                   grad_clip_norm=0.0)
    state, _ = step(state, bad)
    state, _ = step(state, bad)
    before = _qkv_kernel(state)
    state, metrics = step(state, good)  # the optimizer's first update, at step 2
    applied = float(np.abs(_qkv_kernel(state) - before).max())
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(2)))
    assert applied == pytest.approx(float(schedule(2)), rel=5e-3)


BAD_BATCHES = {6, 7}  # loader indexes: steps 7 and 8, counted from 1


def _run(workdir, data_dir, monkeypatch, **train_overrides):
    """12 tiny steps (a 1-layer model) in this process (8 CPU devices) on the built-in
    corpus, loader batches `BAD_BATCHES` overflowing, checkpoints every 4 steps.
    Returns (summary, iterate starts)."""
    starts = []
    make_loader = pipeline.loader

    def loader_with_faults(config, prepared, split, phase=None, rows=None):
        loader = make_loader(config, prepared, split, phase, rows)
        if split == "train":
            batch, iterate = loader.batch, loader.iterate
            loader.batch = lambda i: _overflowing(batch(i)) if i in BAD_BATCHES else batch(i)
            loader.iterate = lambda start, steps, **kw: (starts.append((start, steps)),
                                                         iterate(start, steps, **kw))[1]
        return loader

    monkeypatch.setattr(pipeline, "loader", loader_with_faults)
    config = default_run()
    config.data.update(data_dir=str(data_dir), corpus="builtin", vocab_size=2000,
                       validation_fraction=0.02, max_seq_length=64, max_predictions_per_seq=10)
    # One narrow layer: what is tested is the loop around the step, not the model.
    config.model.update(max_position_embeddings=64, num_layers=1, hidden_size=32,
                        intermediate_size=64)
    config.train.update(num_steps=12, global_batch_size=16, warmup_steps=2, learning_rate=1e-3,
                        log_every=1, eval_steps=1, nonfinite_patience=2, **train_overrides)
    config.checkpoint.update(every_steps=4, async_save=False)
    return train.train_and_evaluate(config, workdir, log=lambda *a: None), starts


@pytest.mark.slow
def test_two_non_finite_steps_in_a_row_roll_back_past_the_bad_batches(straight_run, tmp_path,
                                                                      monkeypatch):
    _, data_dir, _ = straight_run
    summary, starts = _run(tmp_path, data_dir, monkeypatch, stop_at_step=10)

    assert summary["step"] == 10 and summary["rollbacks"] == 1
    # Steps 7 and 8 were the bad ones; step 8's checkpoint (saved among them) was dropped and
    # the run went back to step 4's, going on with batch 8: batches 4-7 are skipped.
    assert starts == [(0, 10), (8, 6)]
    records = read_metrics(tmp_path)
    assert {"step": 4, "split": "events", "rollbacks": 1} in records
    train_records = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_records] == list(range(1, 11))
    assert all(np.isfinite(r["loss"]) for r in train_records)
    assert train_records[-1]["nonfinite_total"] == 0
    # The skip is part of the checkpoint: the resumed run reads batches 14 and 15 for steps
    # 11 and 12.
    summary, starts = _run(tmp_path, data_dir, monkeypatch)
    assert summary["step"] == 12 and starts == [(14, 2)]


@pytest.mark.slow
def test_stop_policy_names_the_steps(straight_run, tmp_path, monkeypatch):
    _, data_dir, _ = straight_run
    with pytest.raises(loop.NonFiniteError, match=r"2 steps in a row \(steps 7-8;.*"
                                                   r"train.on_nonfinite='stop'"):
        _run(tmp_path, data_dir, monkeypatch, on_nonfinite="stop")
    # What was trained before the bad steps is kept.
    assert 4 in Checkpointer(tmp_path / "checkpoints").all_steps()


def test_bad_nonfinite_settings_are_refused_up_front():
    config = default_run()
    config.train.on_nonfinite = "ignore"
    with pytest.raises(ValueError, match=r"train.on_nonfinite='ignore': expected one of "
                                         r"\['rollback', 'stop'\]"):
        train.train_and_evaluate(config, "/nonexistent/never-created")
