"""`bert-jax benchmark`: full train steps (forward, backward, optimizer) on synthetic batches.

The step is the one training runs (`train.jit_train_step`: sharded over all local devices,
state donated), the batches have BERT's layout and 15% masking (`data.synthetic`), and nothing
here imports TensorFlow, so it runs on accelerator images without it. Times are per step,
each step waited for, and the median reported: the figure peers are compared with.
"""

from __future__ import annotations

import statistics
import time

import jax
import ml_collections

from bert_jax import flops, sharding, train
from bert_jax.config import ModelConfig, default_config
from bert_jax.data.synthetic import synthetic_batch
from bert_jax.optim import learning_rate_schedule, make_optimizer

VOCAB_SIZE = 30522  # BERT's WordPiece vocabulary, as the peers use


def benchmark_config(size: str, batch: int, seq: int, dtype: str = "float32",
                     attention: str = "auto", scan: bool = False, remat: str = "none",
                     instances_per_row: int = 1) -> ml_collections.ConfigDict:
    """A run config for the benchmark: BERT-`size` with BERT's dropout and vocabulary,
    AdamW, one phase of `batch` x `seq` with 15% of the tokens predicted, rows packed with
    up to `instances_per_row` instances."""
    config = default_config(size)
    config.data.vocab_size = VOCAB_SIZE
    config.data.max_seq_length = seq
    config.data.max_predictions_per_seq = max(1, round(0.15 * seq))
    config.data.instances_per_row = instances_per_row
    config.model.update(dtype=dtype, attention_impl=attention, scan_layers=scan,
                        remat_policy=remat)
    config.train.update(global_batch_size=batch, num_steps=1000, warmup_steps=10)
    return config


def train_step_and_inputs(config: ml_collections.ConfigDict, devices=None):
    """(the jitted train step of `config` on a mesh of `devices` (default: every local
    device), a fresh state, two synthetic batches, the attention kernel the step runs): what
    `run` times, and what tests compile to read the step's HLO."""
    model_config = ModelConfig.from_dict(config.model)
    devices = jax.local_devices() if devices is None else devices
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    tx = make_optimizer(config.train)
    spec = train.state_spec(model_config, tx, config.train.seed, mesh, config.train.rng_impl)
    state = train.init_state(model_config, tx, config.train.seed, spec, config.train.rng_impl)
    batch_size = config.train.global_batch_size
    batches = [sharding.global_batch(
        synthetic_batch(seed, batch_size, config.data.max_seq_length, model_config.vocab_size,
                        config.data.max_predictions_per_seq,
                        instances_per_row=config.data.instances_per_row), mesh, batch_size)
        for seed in range(2)]
    step = train.jit_train_step(spec, tx, learning_rate_schedule(config.train), mesh,
                                config.train.grad_accum_steps)
    kernel = spec.attention_kernel(model_config.dtype, config.data.instances_per_row > 1)
    return step, state, batches, kernel


def run(config: ml_collections.ConfigDict, steps: int = 10) -> dict:
    """Compiles and times `steps` train steps of `config`; returns the figures as a dict."""
    step, state, batches, kernel = train_step_and_inputs(config)
    batch_size, seq = config.train.global_batch_size, config.data.max_seq_length
    predictions = config.data.max_predictions_per_seq
    started = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - started
    state, metrics = compiled(state, batches[0])  # the first run allocates; not timed
    jax.block_until_ready(metrics)
    times, tokens = [], []
    for index in range(steps):
        started = time.perf_counter()
        state, metrics = compiled(state, batches[index % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
        tokens.append(float(metrics["tokens"]))  # the batch's tokens that are not padding
    seconds = statistics.median(times)
    devices = jax.local_devices()
    seq_per_s = batch_size / seconds
    flops_per_sequence = flops.train_flops_per_sequence(ModelConfig.from_dict(config.model),
                                                        seq, predictions)
    return {
        "step_ms": round(1000 * seconds, 2), "seq_per_s": round(seq_per_s, 1),
        "tokens_per_s": round(seq_per_s * seq),
        "real_tokens_per_s": round(statistics.mean(tokens) / seconds), "mfu": _round(flops.mfu(
            seq_per_s, flops_per_sequence, devices[0].device_kind, len(devices))),
        "compile_s": round(compile_s, 2),
        "peak_memory_bytes": _peak_memory(devices[0], compiled),
        "device": devices[0].device_kind, "devices": len(devices),
        "model": {k: config.model[k] for k in ("num_layers", "hidden_size", "num_heads")},
        "batch": batch_size, "seq": seq, "predictions": predictions,
        "dtype": config.model.dtype, "attention": kernel,
        "scan": config.model.scan_layers, "remat": config.model.remat_policy,
        "instances_per_row": config.data.instances_per_row,
        "steps": steps, "loss": round(float(metrics["loss"]), 4),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _peak_memory(device, compiled) -> int:
    """The device's peak allocation where it reports one (GPU, TPU); else XLA's estimate for
    the step (arguments + outputs - donated + temporaries)."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
