"""NSP/SOP instances from tokenized documents, with google-research/bert's semantics.

`create_instances_from_document` follows `create_pretraining_data.py` down to its random draws
(a test compares them), including a random B whenever a chunk holds one segment. Each document
gets its own `random.Random` seeded by (seed, pass, document): instances do not depend on how
documents are spread over worker processes.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents of sentences of tokens, in flat arrays (memory-mappable; no Python lists).
    Sentence `s` is `ids[sentence_offsets[s]:sentence_offsets[s + 1]]`; document `d` is
    sentences `document_offsets[d]` to `document_offsets[d + 1]`."""

    ids: np.ndarray  # int32 [tokens]
    word_starts: np.ndarray  # bool [tokens]
    sentence_offsets: np.ndarray  # int64 [sentences + 1]
    document_offsets: np.ndarray  # int64 [documents + 1]

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    def sentences(self, document: int) -> range:
        return range(int(self.document_offsets[document]), int(self.document_offsets[document + 1]))

    def sentence_length(self, sentence: int) -> int:
        return int(self.sentence_offsets[sentence + 1] - self.sentence_offsets[sentence])

    def tokens(self, sentences) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated ids and word-start flags of contiguous `sentences`."""
        start = self.sentence_offsets[sentences[0]]
        end = self.sentence_offsets[sentences[-1] + 1]
        return self.ids[start:end], self.word_starts[start:end]

    def subset(self, documents: np.ndarray) -> TokenizedCorpus:
        """A corpus of the given documents, in the given order (e.g. one split)."""
        sentences = _spans(self.document_offsets, documents)
        tokens = _spans(self.sentence_offsets, sentences)
        return TokenizedCorpus(self.ids[tokens], self.word_starts[tokens],
                               offsets_of(np.diff(self.sentence_offsets)[sentences]),
                               offsets_of(np.diff(self.document_offsets)[documents]))


def offsets_of(counts) -> np.ndarray:
    """The int64 offsets [len(counts) + 1] of runs of `counts` items laid end to end."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _spans(bounds: np.ndarray, items) -> np.ndarray:
    """The indices `bounds[i]` to `bounds[i + 1] - 1` of each of `items`, concatenated."""
    return np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in items]
                          or [np.zeros(0, int)])


@dataclasses.dataclass(frozen=True)
class InstanceOptions:
    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    objective: str = "nsp"  # "sop": ALBERT's sentence order (B swapped before A)

    def __post_init__(self):  # DataConfig checked the rest; it allows lengths from 1
        if self.max_seq_length < 5:
            raise ValueError(f"max_seq_length={self.max_seq_length}: expected at least 5")


@dataclasses.dataclass
class Instance:
    """`[CLS] A [SEP] B [SEP]` ids, word-start flags, len(A), and the NSP/SOP label
    (1: B is random (NSP) or swapped before A (SOP))."""

    input_ids: np.ndarray
    word_starts: np.ndarray
    a_length: int
    next_sentence_label: int


def document_rng(seed: int, dupe: int, document: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and machines.
    return random.Random(f"bert-jax:{seed}:{dupe}:{document}")


def create_instances_from_document(corpus: TokenizedCorpus, document: int,
                                   options: InstanceOptions, rng: random.Random,
                                   cls_id: int, sep_id: int) -> list[Instance]:
    """The instances of one document (google-research/bert's algorithm; see module doc)."""
    sentences = corpus.sentences(document)
    max_num_tokens = options.max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < options.short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    instances = []
    chunk, chunk_length = [], 0  # sentence indices, their tokens
    i = 0
    while i < len(sentences):
        chunk.append(sentences[i])
        chunk_length += corpus.sentence_length(sentences[i])
        if i == len(sentences) - 1 or chunk_length >= target_seq_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a_ids, a_starts = corpus.tokens(chunk[:a_end])
            label = 0
            if len(chunk) == 1 or (options.objective == "nsp" and rng.random() < 0.5):
                label = 1
                b_ids, b_starts = _random_segment(corpus, document, target_seq_length - len(a_ids),
                                                  rng)
                i -= len(chunk) - a_end  # put the unused sentences back
            else:
                b_ids, b_starts = corpus.tokens(chunk[a_end:])
                if options.objective == "sop" and rng.random() < 0.5:
                    label = 1
                    (a_ids, a_starts), (b_ids, b_starts) = (b_ids, b_starts), (a_ids, a_starts)
            a, b = _truncate_pair([list(a_ids), list(a_starts)], [list(b_ids), list(b_starts)],
                                  max_num_tokens, rng)
            instances.append(Instance(
                input_ids=np.array([cls_id, *a[0], sep_id, *b[0], sep_id], np.int32),
                word_starts=np.array([True, *a[1], True, *b[1], True], bool),
                a_length=len(a[0]), next_sentence_label=label))
            chunk, chunk_length = [], 0
        i += 1
    return instances


def _random_segment(corpus: TokenizedCorpus, document: int, target_length: int, rng: random.Random):
    """Contiguous sentences of another document, from a random start, up to `target_length`."""
    other = document
    for _ in range(10):  # the reference gives up after 10 tries on tiny corpora
        other = rng.randint(0, corpus.num_documents - 1)
        if other != document:
            break
    sentences = corpus.sentences(other)
    start = rng.randint(0, len(sentences) - 1)
    end, length = start, 0
    while end < len(sentences):
        length += corpus.sentence_length(sentences[end])
        end += 1
        if length >= target_length:
            break
    return corpus.tokens(sentences[start:end])


def _truncate_pair(a, b, max_num_tokens: int, rng: random.Random):
    """Trims the longer of the [ids, word_starts] pairs `a`, `b` at a random end until both fit."""
    while len(a[0]) + len(b[0]) > max_num_tokens:
        longer = a if len(a[0]) > len(b[0]) else b
        index = 0 if rng.random() < 0.5 else -1
        for values in longer:
            del values[index]
    return a, b
