"""Hugging Face directories: config.json, model.safetensors and the tokenizer's files, from a
workdir's checkpoint or from weights in memory, written so that an interrupted export never
leaves a directory that looks complete."""

from __future__ import annotations

import os

from etils.epath import Path  # local paths and gs:// alike

from bert_jax import hf
from bert_jax import tokenizer as tokenization
from bert_jax import workdir as workdirs
from bert_jax.config import ConfigError
from bert_jax.pretrained import Classifier, Pretrained, load_dir

# What `write_export` writes (Hugging Face's model and tokenizer files, the vocabulary).
EXPORT_FILES = {hf.CONFIG_FILE, hf.WEIGHTS_FILE, tokenization.TOKENIZER_FILE,
                tokenization.TOKENIZER_CONFIG_FILE, tokenization.SPECIAL_TOKENS_MAP_FILE,
                *workdirs.TOKENIZER_FILES}


def export(workdir, out_dir, step: int | None = None) -> Path:
    """Writes a Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    check_export_dir(out_dir)  # before the checkpoint is read
    pretrained, config = workdirs.load_weights(workdir, step)
    return write_export(pretrained, workdir, out_dir, config.data.lowercase)


def convert(source, out_dir) -> Path:
    """A google-research/bert checkpoint directory (or any `bert_jax.load` reads, but a
    workdir: `export`) -> a Hugging Face directory with its tokenizer, as `export` writes."""
    check_export_dir(out_dir)
    if workdirs.is_workdir(source):
        raise ConfigError(f"{source} is a bert-jax workdir: export it with bert-jax export")
    return write_export(load_dir(source), source, out_dir, workdirs.lowercase_of(source))


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
    """An export replaces only an earlier export: `out_dir` must be new, empty, or hold
    nothing but export files, so that no file, folder or workdir is ever deleted for it."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    expected = "expected a new directory, an empty one or an earlier export"
    if not out_dir.is_dir():
        raise ConfigError(f"export directory {out_dir} is a file: {expected}")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ConfigError(f"export directory {out_dir} holds {others[0]!r}, which is not an "
                          f"export's: {expected}")


def write_export(weights: Pretrained | Classifier, workdir, out_dir, lowercase: bool) -> Path:
    """`export` of weights already in memory (the end of pretraining or fine-tuning), with
    the workdir's tokenizer, replacing an earlier export at `out_dir` (`check_export_dir`)."""
    check_export_dir(out_dir)
    tokenizer = workdirs.load_tokenizer_of(workdir, lowercase)
    out_dir = Path(out_dir)
    # Written under a temporary name, then renamed: an interrupted export leaves no directory
    # that looks complete (a previous export stays whole until the new one replaces it).
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    partial.rmtree(missing_ok=True)
    try:
        weights.save_hf(partial)
        tokenizer.save_hf(partial, model_max_length=weights.config.max_position_embeddings)
        workdirs.keep_tokenizer(partial, workdirs.tokenizer_file_of(workdir))
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
