"""Fused attention: Splash (TPU) and the Pallas GPU kernel, run in Pallas's interpret mode on
this CPU, equal the XLA path in float32 (forward and gradients; unpacked and packed rows, all
queries and pruned ones), alone and inside a sharded train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import attention, sharding
from bert_jax import run as runs
from bert_jax.config import ModelConfig, TrainConfig
from bert_jax.data.synthetic import synthetic_batch

B, S, H, K = 2, 64, 2, 32
# Packed rows: instances numbered from 1, then padding (0); unpacked: tokens, then padding.
INSTANCES = np.zeros((B, S), np.int32)
INSTANCES[0, :20], INSTANCES[0, 20:45], INSTANCES[1, :30], INSTANCES[1, 30:] = 1, 2, 1, 2
TOKENS = (np.arange(S)[None] < np.array([[50], [64]])).astype(np.int32)
POSITIONS = jnp.array([[0, 3, 7, 21, 30], [0, 31, 5, 40, 63]])  # [CLS] first, as training


def _segments(packed):
    return (attention.Segments(jnp.asarray(INSTANCES), jnp.asarray(INSTANCES)) if packed else
            attention.Segments(jnp.asarray(TOKENS)))


def _outputs_and_gradients(implementation, segments, positions):
    """The attention output and the gradients of q, k, v of a loss that reads the outputs at
    tokens only (what a kernel gives padding is its own: nothing reads it)."""
    q, k, v = (jax.random.normal(key, (B, S, H, K)) for key in
               jax.random.split(jax.random.key(0), 3))
    read = segments.kv != 0 if positions is None else jnp.take_along_axis(segments.kv,
                                                                          positions, axis=1)

    def loss(q, k, v):
        y = attention.attend(implementation, q, k, v, segments, positions)
        y = jnp.where(read[..., None, None], y, 0.0)
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return y, grads


@pytest.mark.parametrize("implementation", ["splash", "pallas"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("pruned", [False, True], ids=["all-queries", "pruned"])
def test_interpreted_kernels_equal_the_xla_path(implementation, packed, pruned):
    segments, positions = _segments(packed), POSITIONS if pruned else None
    y, grads = _outputs_and_gradients(implementation, segments, positions)
    y_xla, grads_xla = _outputs_and_gradients("xla", segments, positions)
    assert y.shape == y_xla.shape == (B, POSITIONS.shape[1] if pruned else S, H, K)
    np.testing.assert_allclose(y, y_xla, atol=1e-5, rtol=1e-5)
    for name, g, g_xla in zip("qkv", grads, grads_xla):
        assert float(jnp.abs(g_xla).max()) > 0.1, name  # the check has something to check
        np.testing.assert_allclose(g, g_xla, atol=1e-5, rtol=1e-5, err_msg=name)


def test_cudnn_is_resolved_on_gpus_and_gives_way_where_jax_cannot_run_it(monkeypatch):
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "cpu") == "xla"
    assert attention.resolve("xla", "tpu") == "xla"  # an explicit choice stands
    assert attention.resolve("auto", "gpu") == "pallas"  # no cuDNN on this machine
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    assert attention.resolve("auto", "gpu") == "cudnn"
    # JAX 0.10's cuDNN attention takes no segment ids and no float32.
    assert attention.kernel("cudnn", "bfloat16", packed=False) == "cudnn"
    assert attention.kernel("cudnn", "bfloat16", packed=True) == "pallas"
    assert attention.kernel("cudnn", "float32", packed=False) == "pallas"
    assert attention.kernel("splash", "float32", packed=True) == "splash"


@pytest.mark.slow
def test_a_sharded_train_step_with_interpreted_splash_equals_the_xla_one():
    """Packed rows, the last layer pruned, dropout on: on a data x FSDP x tensor mesh of 8
    devices the kernel runs in `shard_map` (rows and heads split), and the step's loss,
    gradient norm and new parameters equal those of the XLA path. (Splash alone: the Pallas
    GPU kernel is mapped by the same `_mapped`, and equals XLA alone above.)"""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = sharding.global_batch(synthetic_batch(0, 8, 64, 512, 10, instances_per_row=3),
                                  mesh, 8)
    implementation, results = "splash", {}
    for name in (implementation, "xla"):
        config = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                             intermediate_size=128, max_position_embeddings=64,
                             attention_impl=name)
        run = runs.build(config, TrainConfig(), mesh)
        assert run.spec.attention == name
        state, step = run.init_state(), run.train_step()
        text = step.lower(state, batch).as_text()
        assert ("shard_map" in text or "sdy.manual_computation" in text) == (name != "xla")
        results[name] = jax.device_get(step(state, batch))
    (state, metrics), (state_xla, metrics_xla) = results[implementation], results["xla"]
    for name in ("loss", "grad_norm", "nsp_loss"):
        assert metrics[name] == pytest.approx(metrics_xla[name], rel=1e-5), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state["params"], state_xla["params"])


def test_a_run_names_its_attention_kernel_in_its_log_and_first_metrics_record(straight_run):
    from bert_jax.metrics import read_metrics

    workdir, _, stdout = straight_run
    header = read_metrics(workdir)[0]
    assert header == {"step": 0, "split": "run", "platform": "cpu", "devices": 4,
                      "mesh": "data 4, fsdp 1, tensor 1", "attention": "xla", "num_steps": 20}
    assert "4 cpu devices, mesh data 4, fsdp 1, tensor 1, attention xla" in stdout
