"""The built-in fine-tuning task: is a sentence's word order its own, or shuffled?

Made from the built-in corpus, so it runs offline wherever `bert-jax pretrain` does, and small
enough for a CPU; every other sentence has its words permuted (never into their own order).
It shows what pretraining bought: telling them apart takes knowing which word sequences the
language uses (docs/finetune.md). The sentences depend on the Python version's standard library.
"""

from __future__ import annotations

import functools

import numpy as np

from bert_jax.data import corpus
from bert_jax.config import ConfigError

LABELS = ("original", "shuffled")
METRICS = ("accuracy", "matthews")
TRAIN_EXAMPLES = 1200
VALIDATION_EXAMPLES = 600
MIN_WORDS, MAX_WORDS = 6, 30
SEED = 0


def splits() -> dict[str, tuple[list[str], np.ndarray]]:
    """Texts and labels (int32 indices into `LABELS`) by split, "train" and "validation", the
    same on every call (`bert_jax.tasks` makes them a task)."""
    sentences = _sentences()
    needed = TRAIN_EXAMPLES + VALIDATION_EXAMPLES
    if len(sentences) < needed:
        raise ConfigError(f"the built-in corpus has {len(sentences)} sentences of "
                          f"{MIN_WORDS}-{MAX_WORDS} words: the built-in task needs {needed}; "
                          f"use a file task")
    rng = np.random.default_rng(SEED)
    texts = []
    for number, index in enumerate(rng.permutation(len(sentences))[:needed]):
        words = sentences[index].split()
        if number % 2:  # every other text is shuffled: label 1
            order = np.arange(len(words))
            while (order == np.arange(len(words))).all():
                order = rng.permutation(len(words))
            words = [words[i] for i in order]
        texts.append(" ".join(words))
    labels = np.arange(needed, dtype=np.int32) % 2
    return {"train": (texts[:TRAIN_EXAMPLES], labels[:TRAIN_EXAMPLES]),
            "validation": (texts[TRAIN_EXAMPLES:], labels[TRAIN_EXAMPLES:])}


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    """The built-in corpus's distinct sentences of `MIN_WORDS` to `MAX_WORDS` words, sorted;
    read once per process, as parsing the standard library is slow (docs/finetune.md)."""
    return tuple(sorted({sentence for source in corpus.list_sources(corpus.BUILTIN)
                         for document in corpus.read_source(source) for sentence in document
                         if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS}))
