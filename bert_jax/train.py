"""Training steps. Until the data and training issues land, `pretrain` is a smoke run:
a few AdamW steps of the model on one synthetic batch, which proves forward, backward and
update work end to end (the loss must fall)."""

from __future__ import annotations

import time

import jax
import ml_collections
import optax
from flax import nnx

from bert_jax import losses
from bert_jax.config import ModelConfig
from bert_jax.data.synthetic import synthetic_batch
from bert_jax.model import create


def loss_and_metrics(params: nnx.State, graphdef: nnx.GraphDef, batch, dropout_key):
    """Pure loss of a batch under `params`; returns (loss, metrics)."""
    model = nnx.merge(graphdef, params)
    mlm_logits, nsp_logits = model(batch["input_ids"], batch["segment_ids"],
                                   batch["input_mask"], batch["masked_lm_positions"],
                                   dropout_key=dropout_key)
    metrics = losses.pretraining_metrics(mlm_logits, nsp_logits, batch)
    return metrics["loss"], metrics


def smoke_run(config: ml_collections.ConfigDict, steps: int = 10, log=print) -> dict:
    """Runs `steps` AdamW steps on one synthetic batch; returns the first and last metrics."""
    model_config = ModelConfig.from_dict(config.model)
    train = config.train
    graphdef, params = nnx.split(create(model_config, seed=train.seed))
    tx = optax.adamw(1e-3, weight_decay=0.01)
    batch = synthetic_batch(train.seed, train.global_batch_size, config.data.max_seq_length,
                            model_config.vocab_size, config.data.max_predictions_per_seq)

    @jax.jit
    def step(params, opt_state, step_index):
        key = jax.random.fold_in(jax.random.key(train.seed), step_index)
        grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(params, graphdef, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state = tx.init(params)
    start = time.perf_counter()
    history = []
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, i)
        history.append({k: float(v) for k, v in metrics.items()})
        log(f"step {i + 1}/{steps}  loss {history[-1]['loss']:.4f}  "
            f"mlm_accuracy {history[-1]['mlm_accuracy']:.3f}")
    return {"first": history[0], "last": history[-1], "seconds": time.perf_counter() - start}
