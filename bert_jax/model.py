"""BERT for pretraining in Flax NNX: the encoder (post-LayerNorm as the original, or
pre-LayerNorm: `ModelConfig.layer_norm`), MLM and NSP heads.

Parameters are float32 and carry logical axis names (`vocab, embed, heads, kv, mlp, layers`)
that `bert_jax.sharding` maps to a mesh. Encoder layers are stored stacked (a leading `layers`
axis), scanned or not, so checkpoints and Hugging Face conversion do not depend on that."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax import attention
from bert_jax.config import ConfigError, ModelConfig

Array = jax.Array


def _axes(*names, init=nnx.initializers.zeros_init()):
    """An initializer that tags its parameter with logical axis names (no eager sharding)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _dense_init(config: ModelConfig, *names):
    # google-research/bert initializes every weight matrix with this truncated normal.
    return _axes(*names, init=nnx.initializers.truncated_normal(config.initializer_range))


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics are computed in float32 whatever the compute dtype (nnx.LayerNorm does so).
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                         dtype=config.dtype, scale_init=_axes("embed", init=nnx.initializers.ones),
                         bias_init=_axes("embed"), rngs=rngs)


def _linear(config: ModelConfig, d_in, d_out, in_axes, out_axes, rngs: nnx.Rngs):
    return nnx.LinearGeneral(
        d_in, d_out, axis=tuple(range(-len(in_axes), 0)), dtype=config.dtype,
        kernel_init=_dense_init(config, *in_axes, *out_axes),
        bias_init=_axes(*out_axes), rngs=rngs)


class Embeddings(nnx.Module):
    """Word + learned position + token type embeddings, LayerNorm, dropout."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        def table(rows, *axes):
            return nnx.Embed(rows, config.hidden_size, dtype=config.dtype,
                             embedding_init=_dense_init(config, *axes), rngs=rngs)

        self.word = table(config.vocab_size, "vocab", "embed")
        self.position = table(config.max_position_embeddings, None, "embed")
        self.token_type = table(config.type_vocab_size, None, "embed")
        self.norm = _layer_norm(config, rngs)
        self.dropout_rate = config.hidden_dropout_rate

    def __call__(self, input_ids_bs, token_type_ids_bs, position_ids_bs, dropout_key) -> Array:
        x_bsd = (self.word(input_ids_bs) + self.position(position_ids_bs)
                 + self.token_type(token_type_ids_bs))
        return _dropout(self.dropout_rate, self.norm(x_bsd), dropout_key)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection, output projection and dropout;
    its LayerNorm is applied by the residual block around it (`EncoderLayer`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        h, k = config.num_heads, config.head_dim
        self.qkv = _linear(config, config.hidden_size, (3, h, k), ["embed"],
                           [None, "heads", "kv"], rngs)
        self.out = _linear(config, (h, k), config.hidden_size, ["heads", "kv"], ["embed"], rngs)
        self.norm = _layer_norm(config, rngs)

    def __call__(self, x_bsd, segments: attention.Segments, dropout_key,
                 query_positions_bq=None) -> Array:
        """With `query_positions_bq`, only those positions attend (to all keys) and the output
        is [B, Q, D] at them."""
        attention_key, output_key = _split(dropout_key, 2)
        qkv_bs3hk = self.qkv(x_bsd)
        q_bshk, k_bshk, v_bshk = (qkv_bs3hk[:, :, i] for i in range(3))
        rate = self.config.attention_dropout_rate
        # Dropout on the probabilities needs them: only then the unfused softmax runs.
        dropout = (None if attention_key is None or rate == 0.0 else
                   lambda probs: _dropout(rate, probs, attention_key))
        y_bshk = attention.attend(self.config.attention_impl, q_bshk, k_bshk, v_bshk, segments,
                                  query_positions_bq, dropout)
        return _dropout(self.config.hidden_dropout_rate, self.out(y_bshk), output_key)


@jax.custom_vjp
def gelu(x) -> Array:
    """Exact GELU as BERT and PyTorch write it, x/2 (1 + erf(x/sqrt 2)), in float32 (in bfloat16,
    1 + erf cancels to 0 below x = -2). Not `jax.nn.gelu`'s erfc form, which XLA:CPU runs in
    passes kept for the backward; the hand-written gradient recomputes the derivative's exp fused
    with the incoming gradient, where autodiff would keep it (both timed in docs/performance.md)."""
    x32 = x.astype(jnp.float32)
    return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * 0.5 ** 0.5))).astype(x.dtype)


def _gelu_backward(x, grad):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * jax.lax.erfc(-x32 * 0.5 ** 0.5)  # not 1 + erf: accurate in the left tail
    pdf = jnp.exp(-0.5 * x32 * x32) * (2.0 * jnp.pi) ** -0.5
    return ((grad * (cdf + x32 * pdf)).astype(grad.dtype),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_backward)


def _gelu_tanh(x) -> Array:
    """GELU's tanh approximation, as google-research/bert's modeling.py computes it (and
    `transformers` calls gelu_new): what its released graphs run."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


ACTIVATIONS = {"gelu": gelu, "gelu_tanh": _gelu_tanh}  # by `model.hidden_act`


class FeedForward(nnx.Module):
    """Dense to the intermediate size, GELU (`ACTIVATIONS`), dense back, dropout; its LayerNorm
    is applied by the residual block around it (`EncoderLayer`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.up = _linear(config, config.hidden_size, config.intermediate_size,
                          ["embed"], ["mlp"], rngs)
        self.down = _linear(config, config.intermediate_size, config.hidden_size,
                            ["mlp"], ["embed"], rngs)
        self.norm = _layer_norm(config, rngs)
        self.dropout_rate = config.hidden_dropout_rate
        self.hidden_act = config.hidden_act

    def __call__(self, x_bsd, dropout_key) -> Array:
        hidden = ACTIVATIONS[self.hidden_act](self.up(x_bsd))
        return _dropout(self.dropout_rate, self.down(hidden), dropout_key)


class EncoderLayer(nnx.Module):
    """Attention, then the MLP, each inside a residual block (`_residual`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.attention = SelfAttention(config, rngs=rngs)
        self.mlp = FeedForward(config, rngs=rngs)

    def __call__(self, x_bsd, segments, dropout_key, query_positions_bq=None) -> Array:
        attention_key, mlp_key = _split(dropout_key, 2)
        x_bsd = self._residual(self.attention.norm, x_bsd, query_positions_bq, lambda h_bsd:
                               self.attention(h_bsd, segments, attention_key, query_positions_bq))
        return self._residual(self.mlp.norm, x_bsd, None, lambda h_bsd: self.mlp(h_bsd, mlp_key))

    def _residual(self, norm, x_bsd, query_positions_bq, sublayer) -> Array:
        """x + sublayer(x) with `norm` where `config.layer_norm` puts it: post (BERT) normalizes
        the sum; pre (GPT-2, ModernBERT) the sub-layer's input, so gradients reach early layers
        past no norm (deep stacks train without a long warmup). With positions: [B, Q, D]."""
        residual = (x_bsd if query_positions_bq is None else
                    attention.at_positions(x_bsd, query_positions_bq))
        if self.config.layer_norm == "pre":
            return residual + sublayer(norm(x_bsd))
        return norm(residual + sublayer(x_bsd))


_REMAT_SAVEABLE = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Encoder(nnx.Module):
    """`num_layers` encoder layers with stacked parameters, run by scan or by a Python loop;
    pre-LayerNorm layers leave their sum unnormalized, so a final LayerNorm follows them."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create_layers(rngs):
            return EncoderLayer(config, rngs=rngs)

        self.layers = create_layers(rngs)
        self.final_norm = _layer_norm(config, rngs) if config.layer_norm == "pre" else None

    def __call__(self, x_bsd, segments, dropout_key, output_positions_bq=None) -> Array:
        """The last layer's output [B, S, D], or [B, Q, D] at `output_positions_bq`, the only
        positions the last layer then runs at (its QKV projection everywhere, for the keys)."""
        graphdef, stacked = nnx.split(self.layers)

        def apply_layer(x_bsd, layer_state, layer_key, query_positions_bq=None):
            return nnx.merge(graphdef, layer_state)(x_bsd, segments, layer_key, query_positions_bq)

        if self.config.remat_policy != "none":
            apply_layer = jax.checkpoint(apply_layer,
                                         policy=_REMAT_SAVEABLE[self.config.remat_policy])

        n = self.config.num_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, n)
        if self.config.scan_layers:
            def body(x_bsd, layer):
                return apply_layer(x_bsd, *layer), None

            if output_positions_bq is None:
                x_bsd, _ = jax.lax.scan(body, x_bsd, (stacked, keys))
            else:  # the last layer runs at other shapes, so outside the scan
                head, last = _split_layers(stacked, [n - 1, 1])
                head_keys, last_key = (None, None) if keys is None else (keys[:-1], keys[-1])
                x_bsd, _ = jax.lax.scan(body, x_bsd, (head, head_keys))
                x_bsd = apply_layer(x_bsd, _squeeze(last), last_key, output_positions_bq)
        else:
            for i, layer_state in enumerate(_split_layers(stacked, [1] * n)):
                x_bsd = apply_layer(x_bsd, _squeeze(layer_state),
                                    None if keys is None else keys[i],
                                    output_positions_bq if i == n - 1 else None)
        return x_bsd if self.final_norm is None else self.final_norm(x_bsd)


def _split_layers(stacked, sizes) -> list:
    """The stacked parameters split into parts of `sizes` layers by one split, whose gradient is
    one concatenate (slices' would sum padded copies of the whole stack: O(L^2) work)."""
    per_param = jax.tree.map(lambda p: jax.lax.split(p, sizes), stacked)
    return [jax.tree.map(lambda parts: parts[i], per_param, is_leaf=lambda x: isinstance(x, list))
            for i in range(len(sizes))]


def _squeeze(one_layer):
    return jax.tree.map(lambda p: p[0], one_layer)


class MaskedLMHead(nnx.Module):
    """Dense + GELU (`ACTIVATIONS`) + LayerNorm, then the decoder tied to the word embeddings,
    plus a bias."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.transform = _linear(config, config.hidden_size, config.hidden_size,
                                 ["embed"], [None], rngs)
        self.norm = _layer_norm(config, rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,)), out_sharding=("vocab",),
                              eager_sharding=False)
        self.hidden_act = config.hidden_act

    def __call__(self, x_bpd, word_embeddings: nnx.Embed) -> Array:
        x_bpd = self.norm(ACTIVATIONS[self.hidden_act](self.transform(x_bpd)))
        table_vd = word_embeddings.embedding[...].astype(x_bpd.dtype)
        logits_bpv = jnp.einsum("bpd,vd->bpv", x_bpd, table_vd, preferred_element_type=jnp.float32)
        return logits_bpv + self.bias[...]


class _Bert(nnx.Module):
    """The encoder (embeddings, layers, pooler, input checks) that heads subclass, so shared
    parameters have one path in every model and move into fine-tuning models as they are."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.pooler = _linear(config, config.hidden_size, config.hidden_size,
                              ["embed"], [None], rngs)

    def encode(self, input_ids, token_type_ids=None, attention_mask=None, *, dropout_key=None):
        """Runs the encoder. Returns (sequence output [B, S, D], pooled [CLS] output [B, D])."""
        return self._encode(*self._check_inputs(input_ids, token_type_ids, attention_mask),
                            dropout_key)

    def _encode(self, input_ids, token_type_ids, attention_mask, dropout_key, positions_bp=None,
                cls_positions_bk=None):
        """(sequence output, pooled output); with `positions_bp`, the sequence output is
        [B, P, D] at those positions, where (and at [CLS]) the last layer runs. With
        `cls_positions_bk`, rows pack K instances, each from its [CLS] there, `attention_mask`
        numbering them (1, 2, ...; 0: padding): tokens attend within their instance, position
        ids restart at each [CLS], and the pooled output is [B, K, D], one per instance."""
        embed_key, encoder_key = _split(dropout_key, 2)
        packed = cls_positions_bk is not None
        ids_bs = attention_mask.astype(jnp.int32)  # tokens' (packed: instances') segments
        segments = attention.Segments(ids_bs, ids_bs if packed else None)
        if packed:  # a token counts its position from its instance's [CLS]
            starts_bs = jnp.take_along_axis(cls_positions_bk, jnp.maximum(ids_bs - 1, 0), axis=1)
            position_ids_bs = jnp.arange(ids_bs.shape[1]) - starts_bs
        else:
            cls_positions_bk = jnp.zeros_like(input_ids[:, :1])
            position_ids_bs = jnp.arange(input_ids.shape[1])[None]
        x_bsd = self.embeddings(input_ids, token_type_ids, position_ids_bs, embed_key)
        if positions_bp is not None:  # the [CLS] positions first, for the pooler
            positions_bp = jnp.concatenate([cls_positions_bk, positions_bp], axis=1)
        x_bsd = self.encoder(x_bsd, segments, encoder_key, positions_bp)
        k = cls_positions_bk.shape[1]
        pooled_bkd = jnp.tanh(self.pooler(x_bsd[:, :k]))
        if positions_bp is not None:
            x_bsd = x_bsd[:, k:]
        return x_bsd, (pooled_bkd if packed else pooled_bkd[:, 0])

    def _check_inputs(self, input_ids, token_type_ids, attention_mask):
        """Validates shapes and dtypes (at trace time) and fills the defaults."""
        input_ids = _checked("input_ids", input_ids, lambda shape: len(shape) == 2,
                             "[batch, length]")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ConfigError(f"input_ids has length {input_ids.shape[1]}: expected at most "
                              f"max_position_embeddings={self.config.max_position_embeddings}")

        def like_ids(name, value, integer=True):
            return _checked(name, value, lambda shape: shape == input_ids.shape,
                            f"the shape of input_ids {input_ids.shape}", integer)

        token_type_ids = (jnp.zeros_like(input_ids) if token_type_ids is None else
                          like_ids("token_type_ids", token_type_ids))
        attention_mask = (jnp.ones_like(input_ids) if attention_mask is None else
                          like_ids("attention_mask", attention_mask, integer=False))
        return input_ids, token_type_ids, attention_mask


# The parameter subtrees of `_Bert`: what fine-tuning takes from a pretrained model.
ENCODER_PARAMS = ("embeddings", "encoder", "pooler")


class BertForPreTraining(_Bert):
    """BERT encoder, pooler, masked-LM head and next-sentence head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.mlm = MaskedLMHead(config, rngs=rngs)
        self.nsp = _linear(config, config.hidden_size, 2, ["embed"], [None], rngs)

    def __call__(self, input_ids, token_type_ids, attention_mask, masked_lm_positions,
                 next_sentence_positions=None, *, dropout_key=None):
        """Training forward: float32 (MLM logits [B, P, V], NSP logits [B, 2]), the vocabulary
        projection only at the P `masked_lm_positions` (never [B, S, V]). With
        `next_sentence_positions` [B, K], rows are packed (`_encode`): NSP logits [B, K, 2].
        `dropout_key=None`: deterministic; otherwise every dropout mask derives from that key
        alone, so a step's randomness is reproducible from (seed, step)."""
        inputs = self._check_inputs(input_ids, token_type_ids, attention_mask)
        batch = inputs[0].shape[0]
        positions = _positions("masked_lm_positions", masked_lm_positions, batch)
        cls_positions = (None if next_sentence_positions is None else
                         _positions("next_sentence_positions", next_sentence_positions, batch))
        x_bpd, pooled = self._encode(*inputs, dropout_key, positions, cls_positions)
        return self.mlm(x_bpd, self.embeddings.word), self.nsp(pooled).astype(jnp.float32)

    def full_logits(self, input_ids, token_type_ids=None, attention_mask=None):
        """Inference forward: (MLM logits at every position [B, S, V], NSP logits [B, 2])."""
        x_bsd, pooled_bd = self.encode(input_ids, token_type_ids, attention_mask)
        return self.mlm(x_bsd, self.embeddings.word), self.nsp(pooled_bd).astype(jnp.float32)


class BertForSequenceClassification(_Bert):
    """BERT encoder and pooler, dropout, and a linear layer to `num_labels` outputs (one output:
    regression), as `transformers.BertForSequenceClassification` has them."""

    def __init__(self, config: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.classifier = _linear(config, config.hidden_size, num_labels, ["embed"], [None], rngs)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *,
                 dropout_key=None) -> Array:
        """Returns float32 logits [B, num_labels] (`dropout_key=None`: deterministic)."""
        encoder_key, head_key = _split(dropout_key, 2)
        _, pooled_bd = self.encode(input_ids, token_type_ids, attention_mask,
                                   dropout_key=encoder_key)
        pooled_bd = _dropout(self.config.hidden_dropout_rate, pooled_bd, head_key)
        return self.classifier(pooled_bd).astype(jnp.float32)


def _checked(name, value, shape_ok, expected_shape: str, integer=True) -> Array:
    """`value` as an array, or a one-line error naming it."""
    value = jnp.asarray(value)
    if not shape_ok(value.shape):
        raise ConfigError(f"{name} has shape {value.shape}: expected {expected_shape}")
    if integer and not jnp.issubdtype(value.dtype, jnp.integer):
        raise ConfigError(f"{name} has dtype {value.dtype}: expected an integer dtype")
    return value


def _positions(name, value, batch: int) -> Array:
    return _checked(name, value, lambda shape: len(shape) == 2 and shape[0] == batch,
                    f"[batch, N] with batch {batch}")


def _split(key, n):
    """`n` independent keys from `key`, or `n` Nones (deterministic) when `key` is None."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def _dropout(rate: float, x, key) -> Array:
    """Inverted dropout on 16 random bits per element, half `jax.random.bernoulli`'s hashing
    (docs/performance.md); the rescale uses `rate` rounded to 1/65536, so it keeps the mean."""
    if key is None or rate == 0.0:
        return x
    threshold = round(rate * 65536)
    *lead, last = x.shape
    words = jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    return jnp.where(halves >= threshold, x * (65536 / (65536 - threshold)), 0).astype(x.dtype)


def new_model(config: ModelConfig, seed: int = 0, num_labels: int | None = None) -> _Bert:
    """A pretraining model, or with `num_labels` a sequence classifier, initialized from
    `seed` (eagerly: call it under `jax.jit`, as `create` and `train.init_state` do)."""
    rngs = nnx.Rngs(params=seed)
    if num_labels is None:
        return BertForPreTraining(config, rngs=rngs)
    return BertForSequenceClassification(config, num_labels, rngs=rngs)


def abstract(config: ModelConfig, num_labels: int | None = None) -> _Bert:
    """The model (as `new_model`) with shapes and logical axis names but no values."""
    return nnx.eval_shape(lambda: new_model(config, 0, num_labels))


def create(config: ModelConfig, seed: int = 0, num_labels: int | None = None) -> _Bert:
    """A freshly initialized model, by one compiled computation (eager NNX initialization
    dispatches op by op and takes seconds even for a tiny model)."""
    graphdef, _ = nnx.split(abstract(config, num_labels))
    state = jax.jit(lambda: nnx.state(new_model(config, seed, num_labels)))()
    return nnx.merge(graphdef, state)
