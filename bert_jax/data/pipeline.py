"""From a data config to masked batches: prepare (or reuse) the dataset, check it, load it."""

from __future__ import annotations

import dataclasses
import time

import ml_collections
import numpy as np

from bert_jax.config import ConfigError, DataConfig, ModelConfig, Phase, RunConfig
from bert_jax.data.checks import check_data_against_model
from bert_jax.data.loader import Loader
from bert_jax.data.masking import MaskingOptions

# A validation split with fewer instances measures too little to compare runs by.
MIN_VALIDATION_INSTANCES = 100


def prepare(config: RunConfig, phase: Phase | None = None):
    """The dataset of a phase's rows (default: the first phase's), built once, then reused
    (`dataset.Prepared`), checked against the model, whose vocabulary follows the tokenizer's
    where tied to `data.vocab_size` (`follows_tokenizer`). TensorFlow Datasets is imported
    here, not with this module: a run that only compiles or benchmarks never needs it."""
    from bert_jax.data import dataset

    data = (phase or config.phases[0]).data(config.data)
    prepared = dataset.prepare(data)
    check_data_against_model(data, model_for(config.model, data, prepared.vocab_size),
                             prepared.vocab_size)
    return prepared


def follows_tokenizer(model: ModelConfig, data: DataConfig) -> bool:
    """Whether the model's vocabulary is the tokenizer's, whatever its size: where
    `model.vocab_size` is `data.vocab_size` (`default_config` ties them). A trained tokenizer
    may have fewer pieces than asked for (a small corpus), a `data.vocab_file` any number."""
    return model.vocab_size == data.vocab_size


def model_for(model: ModelConfig, data: DataConfig, vocab_size: int) -> ModelConfig:
    """`model` with the tokenizer's `vocab_size` where it follows the tokenizer."""
    return (dataclasses.replace(model, vocab_size=vocab_size)
            if follows_tokenizer(model, data) else model)


def tokenizer_vocab_size(data: DataConfig) -> int:
    """The vocabulary size of the data's tokenizer: a `data.vocab_file`'s, or the one trained
    on the corpus (trained now, once: `dataset.tokenizer_file`)."""
    from bert_jax import tokenizer
    from bert_jax.data import dataset

    return tokenizer.load_tokenizer(dataset.tokenizer_file(data),
                                    lowercase=data.lowercase).vocab_size


def follow_tokenizer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config with `model.vocab_size` the tokenizer's where it follows it (a copy;
    `data.vocab_size` stays as asked, so the data's names and a resume's checks hold), else
    `config` itself. Trains the tokenizer if it is not cached: corpus errors come here."""
    data = DataConfig.from_dict(config.data)
    model = ModelConfig.from_dict(config.model)
    if not follows_tokenizer(model, data):
        return config
    size = tokenizer_vocab_size(data)
    if size == model.vocab_size:
        return config
    followed = ml_collections.ConfigDict(config.to_dict())
    followed.model.vocab_size = size
    return followed


def describe(prepared) -> str:
    """The summary of a prepared dataset that `prepare-data` and `pretrain` print: its
    documents, sentences, instances per split, tokenizer and replaced bytes, and a warning
    line when the validation split is too small to measure on."""
    summary, identity = prepared.metadata["summary"], prepared.metadata["identity"]
    instances = ", ".join(f"{n:,} {split}" for split, n in summary["instances"].items())
    per_row = identity.get("instances_per_row", 1)
    if per_row > 1:
        rows = ", ".join(f"{n:,} {split}" for split, n in summary["examples"].items())
        instances += f" packed into rows of up to {per_row}: {rows}"
    tokenizer = prepared.tokenizer
    lowered = (f" (data.vocab_size={identity['vocab_size']:,}: more than the corpus supports)"
               if not identity.get("vocab_file") and tokenizer.vocab_size < identity["vocab_size"]
               else "")
    lines = [f"dataset: {prepared.path}",
             f"  documents {summary['documents']:,}  sentences {summary['sentences']:,}  "
             f"tokens {summary['tokens']:,}",
             f"  instances {instances}  fill ratio {summary['fill_ratio']:.3f}",
             f"  tokenizer {tokenizer.kind}, {tokenizer.vocab_size:,} tokens{lowered}",
             f"  replaced non-UTF-8 bytes {summary['replaced_bytes']:,}  "
             f"built in {summary['seconds']}s"]
    validation = summary["instances"].get("validation")
    if validation is not None and validation < MIN_VALIDATION_INSTANCES:
        lines.append(f"warning: the validation split has {validation:,} instances, too few to "
                     f"measure on (at least {MIN_VALIDATION_INSTANCES} are wanted): raise "
                     f"data.validation_fraction={identity['validation_fraction']} or give a "
                     f"larger corpus")
    return "\n".join(lines)


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
