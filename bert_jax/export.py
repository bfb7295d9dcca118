"""Hugging Face directories: config.json, model.safetensors and the tokenizer's files, from a
workdir's checkpoint or from weights in memory, written so that an interrupted export never
leaves a directory that looks complete."""

from __future__ import annotations

import dataclasses
import json
import os

from etils.epath import Path  # local paths and gs:// alike

import bert_jax
from bert_jax import files, hf
from bert_jax import tokenizer as tokenization
from bert_jax import workdir as workdirs
from bert_jax.config import ConfigError
from bert_jax.pretrained import Classifier, Pretrained, load_dir

# bert-jax's own file in every export: it marks the folder as one that a new export may
# replace, and records what config.json does not say (the dropout the weights trained with).
MARKER_FILE = "bert_jax_export.json"
# What `write_export` writes (Hugging Face's model and tokenizer files, the vocabulary).
EXPORT_FILES = {hf.CONFIG_FILE, hf.WEIGHTS_FILE, tokenization.TOKENIZER_FILE,
                tokenization.TOKENIZER_CONFIG_FILE, tokenization.SPECIAL_TOKENS_MAP_FILE,
                *workdirs.TOKENIZER_FILES, MARKER_FILE}
# The dropout a pretraining export's config.json carries for fine-tuning, hidden and
# attention-probs alike: BERT's 0.1, whatever pretraining ran with (often none: fused
# attention kernels, short runs), since `transformers` fine-tunes with config.json's values.
FINETUNING_DROPOUT = 0.1


def export(workdir, out_dir, step: int | None = None,
           dropout: float | None = FINETUNING_DROPOUT) -> Path:
    """Writes a Hugging Face directory: config.json, model.safetensors, tokenizer files.
    `dropout`: config.json's hidden and attention-probs dropout (None: the pretraining's)."""
    check_export_dir(out_dir)  # before the checkpoint is read
    pretrained, config = workdirs.load_weights(workdir, step)
    return write_export(pretrained, workdir, out_dir, config.data.lowercase, dropout=dropout)


def convert(source, out_dir) -> Path:
    """A google-research/bert checkpoint directory (or any `bert_jax.load` reads, but a
    workdir: `export`) -> a Hugging Face directory with its tokenizer, as `export` writes."""
    check_export_dir(out_dir)
    if workdirs.is_workdir(source):
        raise ConfigError(f"{source} is a bert-jax workdir: export it with bert-jax export")
    # A released model's config.json keeps its own dropout (BERT's 0.1).
    return write_export(load_dir(source), source, out_dir, workdirs.lowercase_of(source),
                        dropout=None)


def export_run(weights: Pretrained | Classifier, workdir, lowercase: bool, log) -> Path | None:
    """`WORKDIR/export` at the end of a run; None, said in `log`, for a model variant its
    Hugging Face class cannot hold (the workdir keeps the weights)."""
    try:
        hf.check_exportable(weights.config, weights.head)
    except ConfigError as e:
        log(f"  not exported: {e}")
        return None
    return write_export(weights, workdir, Path(workdir) / workdirs.EXPORT, lowercase)


def check_export_dir(out_dir) -> None:
    """An export replaces only an earlier export of bert-jax: `out_dir` must be new, empty,
    or hold `MARKER_FILE` and nothing but export files, so that no file, folder or workdir
    is ever deleted for it (not even a folder holding only a config.json of one's own)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    expected = "expected a new directory, an empty one or an earlier export of bert-jax"
    if not out_dir.is_dir():
        raise ConfigError(f"export directory {out_dir} is a file: {expected}")
    names = {p.name for p in out_dir.iterdir()}
    if others := sorted(names - EXPORT_FILES):
        raise ConfigError(f"export directory {out_dir} holds {others[0]!r}, which is not an "
                          f"export's: {expected}")
    if names and MARKER_FILE not in names:
        raise ConfigError(f"export directory {out_dir} holds {sorted(names)[0]!r} but no "
                          f"{MARKER_FILE}, so it is not an export of bert-jax: {expected}")


def exported_config(weights: Pretrained | Classifier, dropout: float | None):
    """The ModelConfig config.json carries: a pretraining model's with `dropout` (None: as
    trained); a fine-tuned classifier's as it is (it trained with its fine-tuning dropout)."""
    if dropout is None or weights.head != "pretraining":
        return weights.config
    return dataclasses.replace(weights.config, hidden_dropout_rate=dropout,
                               attention_dropout_rate=dropout)


def _marker(weights: Pretrained | Classifier, exported) -> bytes:
    values = {"bert_jax_version": bert_jax.__version__, "head": weights.head,
              "config_json_dropout": {"hidden_dropout_prob": exported.hidden_dropout_rate,
                                      "attention_probs_dropout_prob":
                                          exported.attention_dropout_rate},
              "trained_with_dropout": {"hidden_dropout_prob": weights.config.hidden_dropout_rate,
                                       "attention_probs_dropout_prob":
                                           weights.config.attention_dropout_rate}}
    return (json.dumps(values, indent=2) + "\n").encode()


def read_marker(path) -> dict | None:
    """An export's `MARKER_FILE` (None where there is none: not an export of bert-jax)."""
    marker = Path(path) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def write_export(weights: Pretrained | Classifier, workdir, out_dir, lowercase: bool, *,
                 dropout: float | None = FINETUNING_DROPOUT) -> Path:
    """`export` of weights already in memory (the end of pretraining or fine-tuning), with
    the workdir's tokenizer, replacing an earlier export at `out_dir` (`check_export_dir`).
    `dropout`: a pretraining model's config.json dropout (`exported_config`); the marker
    file records the dropout it trained with."""
    check_export_dir(out_dir)
    exported = exported_config(weights, dropout)
    tokenizer = workdirs.load_tokenizer_of(workdir, lowercase)
    out_dir = Path(out_dir)
    # Written under a temporary name, then renamed: an interrupted export leaves no directory
    # that looks complete (a previous export stays whole until the new one replaces it).
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    partial.rmtree(missing_ok=True)
    try:
        weights.save_hf(partial, exported)
        tokenizer.save_hf(partial, model_max_length=weights.config.max_position_embeddings)
        workdirs.keep_tokenizer(partial, workdirs.tokenizer_file_of(workdir))
        files.write_atomically(partial / MARKER_FILE, _marker(weights, exported))
    except BaseException:
        partial.rmtree(missing_ok=True)
        raise
    if out_dir.exists():
        previous = out_dir.parent / f".{out_dir.name}.previous-{os.getpid()}"
        out_dir.rename(previous)
        partial.rename(out_dir)
        previous.rmtree()
    else:
        partial.rename(out_dir)
    return out_dir
