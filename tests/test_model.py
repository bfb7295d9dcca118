import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from bert_jax.config import ConfigError, ModelConfig
from bert_jax.model import create, gelu
from bert_jax.pretrained import Pretrained

SMALL = ModelConfig(vocab_size=61, hidden_size=24, num_layers=3, num_heads=3,
                    intermediate_size=40, max_position_embeddings=32, type_vocab_size=3)
LOGICAL_AXES = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}


def _inputs(batch=2, length=12, config=SMALL, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, config.vocab_size, (batch, length)).astype(np.int32)
    types = rng.integers(0, config.type_vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, length - 4:] = 0  # row 0 is padded
    return ids, types, mask


def _with(model, **changes):
    """The same parameters under a config with `changes`."""
    params = Pretrained.from_model(model).params
    return Pretrained(ModelConfig(**{**model.config.to_dict(), **changes}), params).model()


def _jitted(model):
    """`model`'s training forward, compiled once per shape (eagerly, each of its hundreds of
    operations compiles on its own at each new shape: most of a small test's time)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, *inputs, dropout_key=None):
        return nnx.merge(graphdef, state)(*inputs, dropout_key=dropout_key)

    return lambda *inputs, dropout_key=None: forward(state, *inputs, dropout_key=dropout_key)


def test_forward_shapes_and_float32_logits():
    model = create(SMALL)
    ids, types, mask = _inputs()
    positions = np.array([[1, 3], [2, 5]], np.int32)
    mlm, nsp = model(ids, types, mask, positions)
    assert mlm.shape == (2, 2, SMALL.vocab_size) and mlm.dtype == jnp.float32
    assert nsp.shape == (2, 2) and nsp.dtype == jnp.float32
    full_mlm, full_nsp = model.full_logits(ids, types, mask)
    assert full_mlm.shape == (2, 12, SMALL.vocab_size)
    np.testing.assert_allclose(nsp, full_nsp, atol=1e-6)


def test_masked_position_head_equals_gathered_full_logits():
    model = create(SMALL, seed=1)
    ids, types, mask = _inputs()
    positions = np.array([[0, 4, 7, 7], [11, 2, 0, 5]], np.int32)
    mlm, _ = model(ids, types, mask, positions)
    full, _ = model.full_logits(ids, types, mask)
    np.testing.assert_allclose(mlm, np.take_along_axis(np.asarray(full), positions[..., None], 1),
                               atol=1e-5)


def test_padding_does_not_change_outputs_at_real_positions():
    model = create(SMALL, seed=2)
    ids, types, mask = _inputs(batch=1, length=8)
    mask[:] = 1
    short_mlm, short_nsp = model.full_logits(ids, types, mask)
    rng = np.random.default_rng(3)
    pad = 5
    long_ids = np.concatenate([ids, rng.integers(0, SMALL.vocab_size, (1, pad))], 1)
    long_types = np.concatenate([types, rng.integers(0, 3, (1, pad))], 1)
    long_mask = np.concatenate([mask, np.zeros((1, pad), np.int32)], 1)
    long_mlm, long_nsp = model.full_logits(long_ids.astype(np.int32),
                                           long_types.astype(np.int32), long_mask)
    np.testing.assert_allclose(long_mlm[:, :8], short_mlm, atol=1e-5)
    np.testing.assert_allclose(long_nsp, short_nsp, atol=1e-5)


def test_bfloat16_forward_is_close_to_float32():
    model = create(SMALL, seed=4)
    ids, types, mask = _inputs()
    mlm32, nsp32 = model.full_logits(ids, types, mask)
    mlm16, nsp16 = _with(model, dtype="bfloat16").full_logits(ids, types, mask)
    assert mlm16.dtype == jnp.float32  # logits leave the model in float32
    # bfloat16 keeps 8 mantissa bits: ~0.4% relative error per op. Logits here are O(1).
    scale = float(jnp.abs(mlm32).max())
    assert float(jnp.abs(mlm16 - mlm32).max()) < 0.05 * scale
    assert float(jnp.abs(nsp16 - nsp32).max()) < 0.05 * max(1.0, float(jnp.abs(nsp32).max()))
    assert not np.allclose(mlm16, mlm32, atol=1e-6)  # bf16 really was used


def _loss_and_grads(model, dropout_key, forward=None):
    """A loss of the logits at two positions per row, and its gradients; `forward(model, ids,
    types, mask, positions)` gives the logits (default: the training forward)."""
    ids, types, mask = _inputs()
    positions = np.array([[1, 2, 0], [3, 3, 4]], np.int32)  # a 0 pad and a duplicate, as in data
    graphdef, params = nnx.split(model)
    forward = forward or (lambda model, *inputs: model(*inputs, dropout_key=dropout_key))

    def loss(params):
        mlm, nsp = forward(nnx.merge(graphdef, params), ids, types, mask, positions)
        return jnp.sum(mlm ** 2) + jnp.sum(nsp)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_training_gradients_equal_those_of_the_full_forward(layer_norm):
    """The training forward runs the last layer only where the heads read it; the full
    forward (the one checked against Hugging Face) runs it everywhere. Same gradients, also
    with every layer rematerialized in the training forward."""
    def full_forward(model, ids, types, mask, positions):
        mlm, nsp = model.full_logits(ids, types, mask)
        return jnp.take_along_axis(mlm, positions[..., None], axis=1), nsp

    # 2 layers: the last (run only at the heads' positions) and one before it.
    model = create(ModelConfig(**{**SMALL.to_dict(), "layer_norm": layer_norm,
                                  "num_layers": 2}), seed=6)
    loss, grads = _loss_and_grads(_with(model, remat_policy="full"), None)
    full_loss, full_grads = _loss_and_grads(model, None, full_forward)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads, full_grads)


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_scan_and_remat_match_the_unrolled_stack_with_dropout(layer_norm):
    # Scan alone is covered by scan + remat; remat "full" by the next test.
    model = create(ModelConfig(**{**SMALL.to_dict(), "attention_dropout_rate": 0.1,
                                  "layer_norm": layer_norm}), seed=5)
    key = jax.random.key(7)
    loss, grads = _loss_and_grads(model, key)
    changes = dict(scan_layers=True, remat_policy="dots_with_no_batch_dims")
    other_loss, other_grads = _loss_and_grads(_with(model, **changes), key)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 other_grads, grads)


def test_dropout_is_keyed_and_off_without_a_key():
    model = _jitted(create(ModelConfig(**{**SMALL.to_dict(), "attention_dropout_rate": 0.1,
                                          "num_layers": 2}), seed=6))
    ids, types, mask = _inputs()
    positions = np.array([[1, 2], [3, 4]], np.int32)
    eval_a = model(ids, types, mask, positions)[0]
    eval_b = model(ids, types, mask, positions)[0]
    train_a = model(ids, types, mask, positions, dropout_key=jax.random.key(0))[0]
    train_b = model(ids, types, mask, positions, dropout_key=jax.random.key(0))[0]
    train_c = model(ids, types, mask, positions, dropout_key=jax.random.key(1))[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_c)


def test_explicit_attention_path_equals_the_fused_one():
    # Attention dropout of 1e-9 drops nothing but forces the explicit softmax path.
    model = create(ModelConfig(**{**SMALL.to_dict(), "hidden_dropout_rate": 0.0}), seed=8)
    ids, types, mask = _inputs()
    positions = np.array([[1, 2], [3, 4]], np.int32)
    fused = model(ids, types, mask, positions, dropout_key=jax.random.key(0))[0]
    explicit = _with(model, attention_dropout_rate=1e-9)(
        ids, types, mask, positions, dropout_key=jax.random.key(0))[0]
    np.testing.assert_allclose(explicit, fused, atol=1e-5)


@pytest.mark.parametrize("layer_norm, count", [("post", 26), ("pre", 28)])  # + final norm
def test_every_parameter_has_logical_axis_names(layer_norm, count):
    state = nnx.state(create(ModelConfig(**{**SMALL.to_dict(), "layer_norm": layer_norm})),
                      nnx.Param)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(variables) == count
    for variable in variables:
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == variable.ndim and set(names) <= LOGICAL_AXES, (names, variable.shape)


def _reference_logits(config, params, ids, types, mask):
    """The full forward written from BERT's equations in numpy (float64), with each residual
    block normalized after the sum (post-LN) or before the sub-layer, plus a final norm
    (pre-LN): the oracle for pre-LN, which Hugging Face's BERT does not have."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def norm(x, ln):
        return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True)
                + config.layer_norm_eps) * ln["scale"] + ln["bias"])

    def dense(x, layer, inputs=1):  # kernels are [inputs..., outputs...]
        return np.tensordot(x, layer["kernel"], inputs) + layer["bias"]

    def gelu(x):
        return x / 2 * (1 + scipy.special.erf(x / np.sqrt(2)))

    def attention(h, layer):
        q, k, v = np.moveaxis(dense(h, layer["qkv"]), 2, 0)  # each [B, S, heads, head_dim]
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(config.head_dim)
        scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return dense(np.einsum("bhqs,bshk->bqhk", probs, v), layer["out"], 2)

    def mlp(h, layer):
        return dense(gelu(dense(h, layer["up"])), layer["down"])

    e = p["embeddings"]
    x = norm(e["word"]["embedding"][ids] + e["position"]["embedding"][np.arange(ids.shape[1])]
             + e["token_type"]["embedding"][types], e["norm"])
    for i in range(config.num_layers):
        layer = jax.tree.map(lambda a: a[i], p["encoder"]["layers"])
        for sublayer, name in ((attention, "attention"), (mlp, "mlp")):
            ln, weights = layer[name]["norm"], layer[name]
            if config.layer_norm == "pre":
                x = x + sublayer(norm(x, ln), weights)
            else:
                x = norm(x + sublayer(x, weights), ln)
    if config.layer_norm == "pre":
        x = norm(x, p["encoder"]["final_norm"])
    mlm = (norm(gelu(dense(x, p["mlm"]["transform"])), p["mlm"]["norm"])
           @ e["word"]["embedding"].T + p["mlm"]["bias"])
    return mlm, dense(np.tanh(dense(x[:, 0], p["pooler"])), p["nsp"])


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_forward_equals_a_numpy_reference_of_the_equations(layer_norm):
    """Random values in every parameter (LayerNorm scales and biases too), so that putting
    a norm in another place, or leaving one out, changes the logits."""
    config = ModelConfig(**{**SMALL.to_dict(), "layer_norm": layer_norm})
    rng = np.random.default_rng(9)
    params = jax.tree.map(lambda a: a + rng.normal(0, 0.3, a.shape).astype(np.float32),
                          Pretrained.from_model(create(config, seed=9)).params)
    ids, types, mask = _inputs()
    mlm, nsp = Pretrained(config, params).model().full_logits(ids, types, mask)
    want_mlm, want_nsp = _reference_logits(config, params, ids, types, mask)
    np.testing.assert_allclose(mlm, want_mlm, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nsp, want_nsp, rtol=1e-4, atol=1e-4)


def test_an_unknown_layer_norm_placement_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^model\.layer_norm='sandwich': expected one of "
                                          r"\['post', 'pre'\]$"):
        ModelConfig(layer_norm="sandwich")


@pytest.mark.parametrize("call, words", [
    (lambda m, i, t, a, p: m(i[0], None, None, p), ["input_ids", "(12,)", "[batch, length]"]),
    (lambda m, i, t, a, p: m(i.astype(np.float32), t, a, p), ["input_ids", "float32", "integer"]),
    (lambda m, i, t, a, p: m(i, t[:, :5], a, p), ["token_type_ids", "(2, 5)", "(2, 12)"]),
    (lambda m, i, t, a, p: m(i, t, a[:1], p), ["attention_mask", "(1, 12)", "(2, 12)"]),
    (lambda m, i, t, a, p: m(i, t.astype(np.float32), a, p), ["token_type_ids", "float32"]),
    (lambda m, i, t, a, p: m(i, t, a, p[0]), ["masked_lm_positions", "(2,)"]),
    (lambda m, i, t, a, p: m(i, t, a, p.astype(np.float32)), ["masked_lm_positions", "float32"]),
    (lambda m, i, t, a, p: m.full_logits(np.zeros((1, 40), np.int32)),
     ["length 40", "max_position_embeddings=32"]),
])
def test_bad_inputs_raise_value_errors_naming_shapes(call, words):
    model = create(SMALL)
    ids, types, mask = _inputs()
    with pytest.raises(ValueError) as error:
        call(model, ids, types, mask, np.array([[1, 2], [3, 4]], np.int32))
    for word in words:
        assert word in str(error.value)


def test_model_import_does_not_need_tensorflow():
    code = ("import sys, bert_jax, bert_jax.model, bert_jax.train, bert_jax.pretrained; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("rate, shape", [(0.1, (64, 128, 512)), (0.3, (32, 33, 127))])
def test_dropout_drops_at_the_rate_and_keeps_the_expectation(rate, shape):
    from bert_jax.model import _dropout

    ones = jnp.ones(shape, jnp.float32)
    out = np.asarray(_dropout(rate, ones, jax.random.key(0)))
    dropped = float(np.mean(out == 0))
    assert dropped == pytest.approx(rate, abs=4 / np.sqrt(out.size))
    assert float(out.mean()) == pytest.approx(1.0, abs=4 * np.sqrt(rate / out.size) / (1 - rate))
    assert set(np.unique(out)) == {0.0, np.float32(65536 / (65536 - round(rate * 65536)))}
    again = np.asarray(_dropout(rate, ones, jax.random.key(0)))
    other = np.asarray(_dropout(rate, ones, jax.random.key(1)))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    # Neighbouring elements (the two halves of one random word) are independent.
    first, second = out[..., 0:-1:2] == 0, out[..., 1::2] == 0
    assert float(np.mean(first & second)) == pytest.approx(rate ** 2, abs=4 / np.sqrt(first.size))


def test_gelu_gradient_equals_autodiff_of_the_exact_gelu():
    """`model.gelu` replaces autodiff's gradient with a hand-written one (for speed): it
    must be the same function's derivative, relatively exact in the far left tail too."""
    def grads(f, x):
        return jax.vmap(jax.grad(f))(x)

    def exact(v):
        return jax.nn.gelu(v, approximate=False)

    x = jnp.linspace(-4.0, 12.0, 3201)
    np.testing.assert_allclose(grads(gelu, x), grads(exact, x), rtol=1e-6, atol=1e-7)
    tail = jnp.linspace(-12.0, -4.0, 801)
    np.testing.assert_allclose(grads(gelu, tail), grads(exact, tail), rtol=1e-4, atol=0)
    # The values: erf's form (one float32 rounding of 1 + erf) is off by at most ~1e-6
    # absolute, which is relatively large only where the values themselves are below 1e-5.
    wide = jnp.linspace(-12.0, 12.0, 4801)
    np.testing.assert_allclose(gelu(wide), exact(wide), rtol=5e-7, atol=1e-6)
    x16 = x.astype(jnp.bfloat16)  # computed in float32, rounded once: values and gradients
    np.testing.assert_allclose(gelu(x16).astype(jnp.float32), exact(x16.astype(jnp.float32)),
                               rtol=1e-2, atol=1e-6)
    np.testing.assert_allclose(grads(gelu, x16).astype(jnp.float32), grads(exact, x),
                               rtol=1e-2, atol=1e-2)
