"""Trained models at work: `load` a workdir, a Hugging Face or a Google directory, and
`fill_mask`."""

from __future__ import annotations

import numpy as np
from etils.epath import Path

from bert_jax import workdir as workdirs
from bert_jax.config import ConfigError
from bert_jax.pretrained import Pretrained, load_dir
from bert_jax.tokenizer import Tokenizer


def load(path) -> Pretrained:
    """A workdir's weights (its latest checkpoint), a Hugging Face BERT directory's or a
    google-research/bert checkpoint directory's."""
    if workdirs.is_workdir(path):
        return workdirs.load_weights(path)[0]
    if not Path(path).exists():
        raise ConfigError(f"{path} does not exist: expected a bert-jax workdir, a Hugging "
                          f"Face BERT directory or a google-research/bert checkpoint")
    return load_dir(path)


def load_with_tokenizer(path) -> tuple[Pretrained, Tokenizer]:
    """A workdir or an exported directory: the model and its tokenizer."""
    if workdirs.is_workdir(path):
        pretrained, config = workdirs.load_weights(path)
        return pretrained, workdirs.load_tokenizer_of(path, config.data.lowercase)
    return load(path), workdirs.load_tokenizer_of(path)


def fill_mask(pretrained: Pretrained, tokenizer: Tokenizer, text: str, top_k: int = 5):
    """For each [MASK] in `text`: the `top_k` most likely tokens with their probabilities."""
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    if len(ids) > pretrained.config.max_position_embeddings:
        raise ConfigError(f"the text has {len(ids)} tokens: expected at most "
                          f"{pretrained.config.max_position_embeddings}")
    masks = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    if not masks:
        raise ConfigError(f"text {text!r} has no [MASK]: expected at least one")
    logits, _ = pretrained.logits(np.array([ids], np.int32))
    results = []
    for position in masks:
        scores = logits[0, position].astype(np.float64)
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        best = np.argsort(-probabilities)[:top_k]
        results.append(list(zip(tokenizer.id_to_token(best), probabilities[best].tolist())))
    return results
