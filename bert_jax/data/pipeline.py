"""From a data config to masked batches: prepare (or reuse) the dataset, check it, load it."""

from __future__ import annotations

import time

import numpy as np

from bert_jax.config import ConfigError, Phase, RunConfig
from bert_jax.data.checks import check_data_against_model
from bert_jax.data.loader import Loader
from bert_jax.data.masking import MaskingOptions


def prepare(config: RunConfig, phase: Phase | None = None):
    """The dataset of a phase's rows (default: the first phase's), built once, then reused
    (`dataset.Prepared`), checked against the model. TensorFlow Datasets is imported here,
    not with this module: a run that only compiles or benchmarks never needs it."""
    from bert_jax.data import dataset

    data = (phase or config.phases[0]).data(config.data)
    prepared = dataset.prepare(data)
    check_data_against_model(data, config.model, prepared.tokenizer.vocab_size)
    return prepared


def loader(config: RunConfig, prepared, split: str = "train", phase: Phase | None = None,
           rows: slice | None = None) -> Loader:
    """Masked batches of `split` of a phase's dataset (default: the first phase's); `rows` of
    each global batch (default: all)."""
    if split not in prepared.splits:
        raise ConfigError(f"split {split!r} is not in dataset {prepared.path}: expected one of "
                          f"{prepared.splits}")
    phase = phase or config.phases[0]
    data, tokenizer = phase.data(config.data), prepared.tokenizer
    masking = MaskingOptions(
        max_predictions=data.max_predictions_per_seq, masked_lm_prob=data.masked_lm_prob,
        whole_word_masking=data.whole_word_masking, mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size, special_ids=frozenset(tokenizer.special_ids))
    return Loader(prepared.data_source(split), masking,
                  global_batch_size=phase.global_batch_size, seed=config.train.seed,
                  max_seq_length=data.max_seq_length, rows=rows, shuffle=split == "train",
                  instances_per_row=data.instances_per_row)


def describe_row(batch: dict[str, np.ndarray], row: int, tokenizer) -> str:
    """One masked row as text: the NSP label of each instance in the row, then the tokens
    with [MASK] shown and `(label)` after each prediction."""
    length = int((batch["input_mask"][row] > 0).sum())
    tokens = tokenizer.id_to_token(batch["input_ids"][row, :length].tolist())
    weights = batch["masked_lm_weights"][row] > 0
    labels = tokenizer.id_to_token(batch["masked_lm_ids"][row][weights].tolist())
    for position, label in zip(batch["masked_lm_positions"][row][weights], labels):
        tokens[position] = f"{tokens[position]}({label})"
    nsp = np.atleast_1d(batch["next_sentence_labels"][row])
    if "next_sentence_weights" in batch:
        nsp = nsp[batch["next_sentence_weights"][row] > 0]
    return "[" + ", ".join("random next" if label else "is next" for label in nsp) + "] " + \
        " ".join(tokens)


def measure_throughput(loader: Loader, steps: int) -> dict:
    """Sequences per second of `loader.batch` (read + mask) in this thread, after one warm-up."""
    loader.batch(0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loader.batch(step)
    seconds = time.perf_counter() - start
    return {"seq_per_s": round(steps * loader.global_batch_size / seconds),
            "global_batch_size": loader.global_batch_size,
            "max_seq_length": loader.max_seq_length, "steps": steps,
            "seconds": round(seconds, 3)}
