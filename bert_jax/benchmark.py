"""`bert-jax benchmark`: the train step training runs, timed on synthetic batches with BERT's
layout and 15% masking. Nothing here imports TensorFlow, so it runs on accelerator images
without it. Each step is waited for and the median reported: the figure peers are compared with.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import statistics
import tempfile
import time

import jax
import ml_collections

from bert_jax import flops
from bert_jax import run as runs
from bert_jax import sharding
from bert_jax.config import ModelConfig, RunConfig, default_config
from bert_jax.data.synthetic import synthetic_batch


def benchmark_config(size: str, batch: int, seq: int, dtype: str = "float32",
                     attention: str = "auto", scan: bool = False, remat: str = "none",
                     instances_per_row: int = 1) -> ml_collections.ConfigDict:
    """BERT-`size` with BERT's vocabulary, one phase of `batch` x `seq` with 15% of the tokens
    predicted, rows packed with up to `instances_per_row` instances."""
    config = default_config(size)
    config.data.update(vocab_size=30522,  # BERT's WordPiece vocabulary, as the peers use
                       max_seq_length=seq, max_predictions_per_seq=max(1, round(0.15 * seq)),
                       instances_per_row=instances_per_row)
    config.model.update(dtype=dtype, attention_impl=attention, scan_layers=scan,
                        remat_policy=remat)
    config.train.update(global_batch_size=batch, num_steps=1000, warmup_steps=10)
    return config


def train_step_and_inputs(config: ml_collections.ConfigDict, devices=None):
    """(jitted train step on `devices` (default: the local ones), fresh state, two synthetic
    batches, attention kernel): what `run` times, and what tests compile to read the HLO."""
    settings = RunConfig.from_dict(config)
    run = runs.build(settings.model, settings.train, settings.mesh,
                     devices=jax.local_devices() if devices is None else devices)
    data, batch_size = settings.data, settings.train.global_batch_size
    batches = [sharding.global_batch(
        synthetic_batch(seed, batch_size, data.max_seq_length, settings.model.vocab_size,
                        data.max_predictions_per_seq, instances_per_row=data.instances_per_row),
        run.mesh, batch_size) for seed in range(2)]
    kernel = run.spec.attention_kernel(settings.model.dtype, data.instances_per_row > 1)
    return run.train_step(), run.init_state(), batches, kernel


def run(config: ml_collections.ConfigDict, steps: int = 10, profile_steps: int = 0) -> dict:
    """The figures of `steps` timed train steps of `config`, and with `profile_steps` the
    operations that took the most time in that many more, traced (`profile_summary`)."""
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
    profile = _profile(compiled, state, batches, profile_steps) if profile_steps else None
    devices = jax.local_devices()
    seq_per_s = batch_size / seconds
    flops_per_sequence = flops.train_flops_per_sequence(ModelConfig.from_dict(config.model),
                                                        seq, predictions)
    mfu = flops.mfu(seq_per_s, flops_per_sequence, devices[0].device_kind, len(devices))
    return {
        "step_ms": round(1000 * seconds, 2), "seq_per_s": round(seq_per_s, 1),
        "tokens_per_s": round(seq_per_s * seq),
        "real_tokens_per_s": round(statistics.mean(tokens) / seconds),
        "mfu": None if mfu is None else round(mfu, 4),
        "compile_s": round(compile_s, 2),
        "peak_memory_bytes": _peak_memory(devices[0], compiled),
        "device": devices[0].device_kind, "devices": len(devices),
        "model": {k: config.model[k] for k in ("num_layers", "hidden_size", "num_heads")},
        "batch": batch_size, "seq": seq, "predictions": predictions,
        "dtype": config.model.dtype, "attention": kernel,
        "scan": config.model.scan_layers, "remat": config.model.remat_policy,
        "instances_per_row": config.data.instances_per_row,
        "steps": steps, "loss": round(float(metrics["loss"]), 4),
        **({"profile": profile} if profile_steps else {}),
    }


# What the device check runs: (case, size, global batch, length, instances per row), in
# bfloat16 with each attention kernel; sized to finish within 8 minutes on one H200.
DEVICE_SUITE = (("base@128", "base", 256, 128, 1), ("large@128", "large", 128, 128, 1),
                ("large@512 packed", "large", 32, 512, 3))


def run_suite(cases=DEVICE_SUITE, attentions=("cudnn", "xla"), steps: int = 10,
              profile_steps: int = 3, log=print) -> dict:
    """`run` for every case with every attention kernel (scanned layers: short compiles), each
    with its profile. A case that fails is recorded with its error and the suite goes on: one
    run on a lent device must give every figure it can."""
    results = []
    for case, size, batch, seq, instances_per_row in cases:
        for attention in attentions:
            config = benchmark_config(size, batch, seq, "bfloat16", attention, scan=True,
                                      instances_per_row=instances_per_row)
            started = time.perf_counter()
            try:
                figures = run(config, steps, profile_steps)
            except Exception as error:  # noqa: BLE001 (recorded, and the suite goes on)
                figures = {"asked": attention, "error": f"{type(error).__name__}: "
                                                        f"{str(error).splitlines()[0]}"}
            results.append({"case": case, "asked": attention, **figures,
                            "wall_s": round(time.perf_counter() - started, 1)})
            log(json.dumps({k: v for k, v in results[-1].items() if k != "profile"}))
    return {"device": jax.local_devices()[0].device_kind, "devices": jax.local_device_count(),
            "jax": jax.__version__, "results": results}


def _profile(compiled, state, batches, steps: int) -> list:
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for index in range(steps):
                state, metrics = compiled(state, batches[index % 2])
            jax.block_until_ready(metrics)
        (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as trace:
            return profile_summary(json.load(trace), steps)


def profile_summary(trace: dict, steps: int, top: int = 12) -> list:
    """The `top` operations by time in a Perfetto trace of `steps` steps, with their share of
    the traced time: device streams where the trace has them, else the host's non-Python."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and e["args"]["name"].startswith("/device:")}
    totals = collections.Counter()
    for event in events:
        wanted = event.get("ph") == "X" and not event["name"].startswith("$")  # $: Python frames
        if wanted and (not devices or event["pid"] in devices):
            totals[event["name"]] += event.get("dur", 0.0)
    whole = sum(totals.values()) or 1.0
    return [{"name": name, "ms_per_step": round(us / 1000 / steps, 3),
             "share": round(us / whole, 4)} for name, us in totals.most_common(top)]


def _peak_memory(device, compiled) -> int:
    """The device's peak allocation where it reports one (GPU, TPU), else XLA's estimate."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
