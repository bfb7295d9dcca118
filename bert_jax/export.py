"""Trained weights out of a workdir: `load_workdir`, Hugging Face `export`, and `fill_mask`.

A workdir holds `checkpoints/` (Orbax), `config.json`, `metrics.jsonl`, `tensorboard/` and the
tokenizer's vocabulary file (`vocab.txt` or `tokenizer.model`), copied there by training so
that export needs neither the dataset nor the corpus.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from etils.epath import Path  # local paths and gs:// alike

from bert_jax import hf
from bert_jax import tokenizer as tokenization
from bert_jax.checkpoint import Checkpointer
from bert_jax.config import ModelConfig
from bert_jax.pretrained import Classifier, Pretrained
from bert_jax.tokenizer import Tokenizer, load_tokenizer

CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = (tokenization.SENTENCEPIECE_FILE, tokenization.VOCAB_FILE)
# What `write_export` writes (Hugging Face's model and tokenizer files, the vocabulary).
EXPORT_FILES = {hf.CONFIG_FILE, hf.WEIGHTS_FILE, tokenization.TOKENIZER_FILE,
                tokenization.TOKENIZER_CONFIG_FILE, tokenization.SPECIAL_TOKENS_MAP_FILE,
                *TOKENIZER_FILES}


def is_workdir(path) -> bool:
    return (Path(path) / CHECKPOINTS).is_dir()


def keep_tokenizer(workdir, vocabulary_file) -> None:
    """Copies the vocabulary file of the training data into the workdir."""
    name = tokenization.kept_file_name(vocabulary_file)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / name).write_bytes(Path(vocabulary_file).read_bytes())


def lowercase_of(path) -> bool:
    """`do_lower_case` of an export's tokenizer_config.json (default True)."""
    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return bool(config.get("do_lower_case", True))


def tokenizer_file_of(path) -> Path:
    """The vocabulary file kept in a workdir or export (`TOKENIZER_FILES`)."""
    for name in TOKENIZER_FILES:
        if (Path(path) / name).is_file():
            return Path(path) / name
    raise ValueError(f"{path} holds no {' or '.join(TOKENIZER_FILES)}: expected a bert-jax "
                     f"workdir or export")


def load_tokenizer_of(path, lowercase: bool | None = None) -> Tokenizer:
    """The tokenizer kept in a workdir or exported beside a Hugging Face model. `lowercase`
    None reads it from an export (`lowercase_of`)."""
    lowercase = lowercase_of(path) if lowercase is None else lowercase
    return load_tokenizer(tokenizer_file_of(path), lowercase=lowercase)


def open_checkpoints(workdir) -> Checkpointer:
    """The checkpoints of an existing workdir (nothing is created for a wrong path)."""
    if not is_workdir(workdir):
        found = "has no checkpoint" if Path(workdir).exists() else "does not exist"
        raise ValueError(f"{workdir} {found}: expected a workdir of bert-jax pretrain")
    checkpointer = Checkpointer(Path(workdir) / CHECKPOINTS)
    if checkpointer.latest_step() is None:
        checkpointer.close()
        raise ValueError(f"{workdir} has no checkpoint: expected a workdir of bert-jax pretrain")
    return checkpointer


def pretraining_config(checkpointer: Checkpointer, workdir,
                       step: int | None = None) -> ml_collections.ConfigDict:
    """The run config saved with a pretraining checkpoint (a clear error for a fine-tuning
    workdir, whose checkpoints hold another model)."""
    config = ml_collections.ConfigDict(checkpointer.restore_metadata(step)["config"])
    if "task" in config:
        raise ValueError(f"{workdir} is a fine-tuning workdir: expected a pretraining one (a "
                         f"fine-tuned model is in {Path(workdir) / 'export'})")
    return config


def load_workdir(workdir, step: int | None = None) -> tuple[Pretrained, ml_collections.ConfigDict]:
    """The parameters of a workdir's checkpoint (`step`, default the latest) on the host."""
    from bert_jax import sharding, train  # training machinery only when a workdir is read

    one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                    devices=jax.local_devices()[:1])
    config, _, _, state, _ = train.restore_workdir(workdir, step, one_device)
    params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    return Pretrained(ModelConfig.from_dict(config.model), params), config


def export(workdir, out_dir, step: int | None = None) -> Path:
    """Writes a Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    check_export_dir(out_dir)  # before the checkpoint is read
    pretrained, config = load_workdir(workdir, step)
    return write_export(pretrained, workdir, out_dir, config.data.lowercase)


def check_export_dir(out_dir) -> None:
    """An export replaces only an earlier export: `out_dir` must be new, empty, or hold
    nothing but export files, so that no file, folder or workdir is ever deleted for it."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"export directory {out_dir} is a file: expected a new directory, an "
                         f"empty one or an earlier export")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ValueError(f"export directory {out_dir} holds {others[0]!r}, which is not an "
                         f"export's: expected a new directory, an empty one or an earlier "
                         f"export")


def write_export(weights: Pretrained | Classifier, workdir, out_dir, lowercase: bool) -> Path:
    """`export` of weights already in memory (the end of pretraining or fine-tuning), with
    the workdir's tokenizer, replacing an earlier export at `out_dir` (`check_export_dir`)."""
    check_export_dir(out_dir)
    tokenizer = load_tokenizer_of(workdir, lowercase)
    out_dir = Path(out_dir)
    # Written under a temporary name, then renamed: an interrupted export leaves no directory
    # that looks complete (a previous export stays whole until the new one replaces it).
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if partial.exists():
        partial.rmtree()
    try:
        weights.save_hf(partial)
        tokenizer.save_hf(partial, model_max_length=weights.config.max_position_embeddings)
        keep_tokenizer(partial, tokenizer_file_of(workdir))
    except BaseException:
        if partial.exists():
            partial.rmtree()
        raise
    if out_dir.exists():
        previous = out_dir.parent / f".{out_dir.name}.previous-{os.getpid()}"
        out_dir.rename(previous)
        partial.rename(out_dir)
        previous.rmtree()
    else:
        partial.rename(out_dir)
    return out_dir


def load_with_tokenizer(path) -> tuple[Pretrained, Tokenizer]:
    """A workdir or an exported directory: the model and its tokenizer."""
    if is_workdir(path):
        pretrained, config = load_workdir(path)
        return pretrained, load_tokenizer_of(path, config.data.lowercase)
    from bert_jax.pretrained import load

    return load(path), load_tokenizer_of(path)


def fill_mask(pretrained: Pretrained, tokenizer: Tokenizer, text: str, top_k: int = 5):
    """For each [MASK] in `text`: the `top_k` most likely tokens with their probabilities."""
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    if len(ids) > pretrained.config.max_position_embeddings:
        raise ValueError(f"the text has {len(ids)} tokens: expected at most "
                         f"{pretrained.config.max_position_embeddings}")
    masks = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    if not masks:
        raise ValueError(f"text {text!r} has no [MASK]: expected at least one")
    logits, _ = pretrained.logits(np.array([ids], np.int32))
    results = []
    for position in masks:
        scores = logits[0, position].astype(np.float64)
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        best = np.argsort(-probabilities)[:top_k]
        results.append(list(zip(tokenizer.id_to_token(best), probabilities[best].tolist())))
    return results
