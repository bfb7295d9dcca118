"""Trained models at work: `load` a workdir, a Hugging Face or a Google directory, and
`fill_mask`."""

from __future__ import annotations

import numpy as np
from etils.epath import Path

from bert_jax import workdir as workdirs
from bert_jax.config import ConfigError
from bert_jax.pretrained import Pretrained, load_dir
from bert_jax.tokenizer import MASK, Tokenizer


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
    """For each [MASK] in `text`: the `top_k` most likely tokens with their probabilities,
    each token as text, as the tokenizer's decoder gives it (the `token_str` of the
    `transformers` fill-mask pipeline: `▁the` is `the`; a WordPiece continuation stays `##s`)."""
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
        results.append([(tokenizer.decode([i]), p)
                        for i, p in zip(best.tolist(), probabilities[best].tolist())])
    return results


def shown(token: str) -> str:
    """A decoded token as printed in a list: quoted unless letters and digits only (a comma,
    an empty string, `##s`)."""
    return token if token.isalnum() else repr(token)


def masked_sentence(tokenizer: Tokenizer, segments) -> tuple[str, str] | None:
    """A probe for fill-mask from text the model has not trained on: the first sentence of
    `segments` (token ids, e.g. the validation split's first segments) with 4 words or more,
    one of which is a single token of letters, with the word nearest its middle masked.
    Returns (the sentence with [MASK], the masked word), or None where none qualifies."""
    from bert_jax.data.corpus import split_sentences

    for ids in segments:
        for sentence in split_sentences(tokenizer.decode(ids)):
            words = sentence.split()
            single = [i for i, word in enumerate(words)
                      if word.isalpha() and len(tokenizer.encode(word)) == 1]
            if len(words) < 4 or not single:
                continue
            chosen = min(single, key=lambda i: (abs(2 * i + 1 - len(words)), i))
            masked = " ".join(MASK if i == chosen else word for i, word in enumerate(words))
            return masked, words[chosen]
    return None


def validation_segments(prepared, count: int = 16):
    """The first segment (A, between [CLS] and [SEP]) of each of the first `count` instances
    of a prepared dataset's validation split, in storage order (packed rows: each instance)."""
    source = prepared.data_source("validation")
    found = 0
    for index in range(len(source)):
        example = source[index]
        ids = np.asarray(example["input_ids"])
        lengths = example.get("lengths", [len(ids)])
        a_lengths = example.get("a_lengths", [example.get("a_length", 0)])
        start = 0
        for length, a_length in zip(np.atleast_1d(lengths), np.atleast_1d(a_lengths)):
            yield ids[start + 1:start + 1 + int(a_length)].tolist()
            start += int(length)
            found += 1
            if found == count:
                return
