"""Preflight checks: mismatches between data, model and topology, caught before training."""

from __future__ import annotations

from etils import epath

from bert_jax import files
from bert_jax.config import ConfigError, DataConfig, ModelConfig


def vocab_file(data: DataConfig) -> epath.Path:
    """The configured `data.vocab_file`, checked to exist before data preparation or training
    starts, not in their middle."""
    path = files.path(data.vocab_file)
    if not path.is_file():
        raise ConfigError(f"data.vocab_file={data.vocab_file!r} does not exist: expected a "
                          f"WordPiece vocab.txt or a SentencePiece .model")
    return path


def check_data_against_model(data: DataConfig, model: ModelConfig, tokenizer_vocab_size: int):
    """A one-line ConfigError naming both values when data and model cannot work together."""
    if tokenizer_vocab_size != model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer_vocab_size} tokens but "
                          f"model.vocab_size={model.vocab_size}: expected "
                          f"model.vocab_size={tokenizer_vocab_size} (equal to data.vocab_size, "
                          f"it follows the tokenizer)")
    if data.max_seq_length > model.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={data.max_seq_length} exceeds "
                          f"model.max_position_embeddings={model.max_position_embeddings}")
    needed = round(data.max_seq_length * data.masked_lm_prob)
    if data.max_predictions_per_seq < needed:
        raise ConfigError(f"data.max_predictions_per_seq={data.max_predictions_per_seq} is below "
                          f"max_seq_length x masked_lm_prob = {needed}: full-length sequences "
                          f"would be masked below data.masked_lm_prob={data.masked_lm_prob}")


def check_batch_topology(global_batch_size: int, data_parallel: int):
    """The global batch must split evenly over the data-parallel shards (devices along the
    batch axes, times gradient-accumulation micro-batches)."""
    if global_batch_size % data_parallel:
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by "
                          f"the data-parallel size {data_parallel}: expected a multiple of "
                          f"{data_parallel}")
