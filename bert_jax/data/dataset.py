"""The prepared pretraining dataset: a TFDS builder that writes NSP/SOP instances as ArrayRecord.

`prepare(data_config)` builds `DATA_DIR/bert_pretraining/NAME/VERSION/` (local, or `gs://` for
every host of a pod to read) once: NAME hashes all that determines the instances (`identity`), so
neither a changed config nor an edited corpus file reuses a stale dataset.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bert_jax import files, progress
from bert_jax import tokenizer as tokenization
from bert_jax.config import ConfigError, DataConfig
from bert_jax.data import checks
from bert_jax.data import corpus as corpora
from bert_jax.data import packing
from bert_jax.data.instances import (InstanceOptions, TokenizedCorpus,
                                     create_instances_from_document, document_rng, offsets_of)

VERSION = "1.0.0"
# TFDS warns at each build and open that a builder config is custom: here every one is.
logging.getLogger("absl").addFilter(
    lambda record: not record.getMessage().startswith("Using custom data configuration"))
# Fields of DataConfig that do not change the instances (which store no masks: masking is dynamic).
_NOT_IDENTITY = {"data_dir", "workers", "max_predictions_per_seq", "masked_lm_prob",
                 "whole_word_masking", "tfds_data_dir"}
_WORKER_CORPUS: TokenizedCorpus | None = None  # a worker process's, from `_set_worker_corpus`


class BertPretrainingConfig(tfds.core.BuilderConfig):
    def __init__(self, *, data_config: DataConfig, tokenizer_file: str, identity: dict, **kwargs):
        super().__init__(**kwargs)
        self.data_config = data_config
        self.tokenizer_file = tokenizer_file
        self.identity = identity  # `identity(...)`, as the dataset's name hashes it


class BertPretraining(tfds.core.GeneratorBasedBuilder):
    """BERT pretraining instances, one per example or (`data.instances_per_row` > 1) packed
    back to back, with each instance's length, len(A) and label."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []  # made per identity at run time

    def _info(self) -> tfds.core.DatasetInfo:
        tokens = {"input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                  "word_starts": tfds.features.Tensor(shape=(None,), dtype=np.bool_)}
        if self.builder_config.data_config.instances_per_row > 1:
            per_instance = {name: tfds.features.Tensor(shape=(None,), dtype=np.int32)
                            for name in ("lengths", "a_lengths", "next_sentence_labels")}
        else:
            per_instance = {"a_length": tfds.features.Scalar(dtype=np.int32),
                            "next_sentence_label": tfds.features.ClassLabel(num_classes=2)}
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({**tokens, **per_instance}),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)  # the loader permutes; storage order stays creation order

    def _split_generators(self, dl_manager):
        config: BertPretrainingConfig = self.builder_config
        data = config.data_config
        tokenizer = tokenization.load_tokenizer(config.tokenizer_file, lowercase=data.lowercase)
        started = time.perf_counter()
        corpus, stats = tokenize_corpus(data, config.tokenizer_file)
        if corpus.num_documents == 0:
            raise ConfigError(f"corpus {data.corpus!r} has no documents: expected text")
        splits = _split_documents(corpus.num_documents, data)
        options = InstanceOptions(data.max_seq_length, data.short_seq_prob, data.objective)
        instances = {name: create_instances(corpus.subset(docs), options, data.seed,
                                            data.dupe_factor, tokenizer, data.workers,
                                            f"creating {name} instances")
                     for name, docs in splits.items()}
        kept_tokenizer = tokenization.kept_file_name(config.tokenizer_file)
        epath.Path(config.tokenizer_file).copy(epath.Path(self.data_dir) / kept_tokenizer,
                                               overwrite=True)
        rows = {name: (packing.pack([len(i.input_ids) for i in examples], data.max_seq_length,
                                    data.instances_per_row)
                       if data.instances_per_row > 1 else None)
                for name, examples in instances.items()}
        self.info.metadata.update({
            "identity": config.identity,
            "tokenizer_file": kept_tokenizer,
            "vocab_size": tokenizer.vocab_size,  # what the model's vocabulary must be
            "summary": _summary(stats, corpus, instances, rows, data.max_seq_length,
                                time.perf_counter() - started),
        })
        return {name: self._generate_examples(examples, rows[name])
                for name, examples in instances.items()}

    def _generate_examples(self, instances, rows=None):  # rows: lists of instance indices
        if rows is None:  # an `Instance`'s fields are the unpacked features
            yield from ((index, vars(instance)) for index, instance in enumerate(instances))
            return
        for index, row in enumerate(rows):
            members = [instances[i] for i in row]
            yield index, {
                "input_ids": np.concatenate([m.input_ids for m in members]),
                "word_starts": np.concatenate([m.word_starts for m in members]),
                "lengths": np.array([len(m.input_ids) for m in members], np.int32),
                "a_lengths": np.array([m.a_length for m in members], np.int32),
                "next_sentence_labels": np.array([m.next_sentence_label for m in members],
                                                 np.int32)}


def identity(data: DataConfig, tokenizer_fingerprint: str, corpus_fingerprint: str) -> dict:
    """What determines a dataset's instances, corpus content included; checked before training."""
    values = {k: v for k, v in data.to_dict().items() if k not in _NOT_IDENTITY}
    if values["instances_per_row"] == 1:  # unpacked: the identity from before packing existed
        del values["instances_per_row"]
    return {**values, "tokenizer_fingerprint": tokenizer_fingerprint,
            "corpus_fingerprint": corpus_fingerprint, "version": VERSION}


def corpus_fingerprint(data: DataConfig) -> str:
    return corpora.fingerprint(data.corpus, data.tfds_data_dir or None)


def dataset_name(identity_values: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity_values, sort_keys=True).encode()).hexdigest()
    return f"seq{identity_values['max_seq_length']}_{digest[:16]}"


def _run_parallel(function, items: list, workers: int, desc: str, unit: str,
                  initializer=None, initargs=()):
    """`map(function, items)` in order over spawned worker processes (forking a process that
    has loaded TensorFlow or JAX is unsafe); one worker or item runs here (TFDS mocks visible)."""
    workers = min(workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        if initializer:
            initializer(*initargs)
        return [function(item) for item in progress.bar(items, desc=desc, unit=unit,
                                                        disable=None)]
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
            initargs=initargs) as pool:
        results = pool.map(function, items, chunksize=max(1, len(items) // (8 * workers)))
        return list(progress.bar(results, total=len(items), desc=desc, unit=unit,
                                 disable=None))


_worker_tokenizer = functools.lru_cache(maxsize=4)(tokenization.load_tokenizer)


def _tokenize_source(source: str, data: DataConfig, tokenizer_file: str):
    """(ids, word starts, sentence lengths, sentences per document, read stats) of a source."""
    tokenizer = _worker_tokenizer(tokenizer_file, lowercase=data.lowercase)
    stats = corpora.ReadStats()
    sentences, document_sizes = [], []
    for document in corpora.read_source(source, stats, text_field=data.text_field,
                                        tfds_data_dir=data.tfds_data_dir or None):
        encoded = [pair for pair in tokenizer.encode_batch(document) if len(pair[0])]
        if encoded:
            sentences += encoded
            document_sizes.append(len(encoded))
    return (_concat([ids for ids, _ in sentences], np.int32),
            _concat([starts for _, starts in sentences], bool),
            np.array([len(ids) for ids, _ in sentences], np.int64),
            np.array(document_sizes, np.int64), stats)


def _concat(arrays, dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def tokenize_corpus(data: DataConfig, tokenizer_file) -> tuple[TokenizedCorpus, corpora.ReadStats]:
    """The whole corpus tokenized, in source order, in parallel over sources."""
    sources = corpora.list_sources(data.corpus)
    results = _run_parallel(functools.partial(_tokenize_source, data=data,
                                              tokenizer_file=str(tokenizer_file)),
                            sources, data.workers, "tokenizing", "source")
    stats = corpora.ReadStats()
    for source, (*_, source_stats) in zip(sources, results):
        corpora.check_decoded(source, source_stats)
        stats.add(source_stats)
    if stats.replaced_bytes:
        print(f"warning: replaced {stats.replaced_bytes} undecodable (non-UTF-8) bytes in "
              f"corpus {data.corpus!r}")
    ids, starts, sentence_lengths, document_sizes = (  # list_sources never gives none
        np.concatenate([result[i] for result in results]) for i in range(4))
    corpus = TokenizedCorpus(ids, starts, offsets_of(sentence_lengths), offsets_of(document_sizes))
    return corpus, stats


def _split_documents(num_documents: int, data: DataConfig) -> dict[str, np.ndarray]:
    """Train/validation document indices: a seeded shuffle, validation taking its share."""
    order = np.random.default_rng([data.seed, 0]).permutation(num_documents)
    if data.validation_fraction == 0:
        return {"train": np.sort(order)}
    if num_documents < 2:
        raise ConfigError(f"corpus {data.corpus!r} has {num_documents} document: expected at "
                          f"least 2 (one for validation), or data.validation_fraction=0")
    held_out = min(num_documents - 1, max(1, round(num_documents * data.validation_fraction)))
    return {"train": np.sort(order[held_out:]), "validation": np.sort(order[:held_out])}


def _set_worker_corpus(corpus: TokenizedCorpus) -> None:
    global _WORKER_CORPUS
    _WORKER_CORPUS = corpus


def _instances_of(documents: range, options: InstanceOptions, seed: int, dupe_factor: int,
                  cls_id: int, sep_id: int):
    return [instance for dupe in range(dupe_factor) for document in documents
            for instance in create_instances_from_document(
                _WORKER_CORPUS, document, options, document_rng(seed, dupe, document),
                cls_id, sep_id)]


def create_instances(corpus: TokenizedCorpus, options: InstanceOptions, seed: int,
                     dupe_factor: int, tokenizer, workers: int = 0,
                     desc: str = "creating instances") -> list:
    """All instances of `corpus`, in document order."""
    bounds = np.linspace(0, corpus.num_documents, 64 + 1).astype(int)
    chunks = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    create = functools.partial(_instances_of, options=options, seed=seed, dupe_factor=dupe_factor,
                               cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id)
    results = _run_parallel(create, chunks, workers, desc, "chunk",
                            initializer=_set_worker_corpus, initargs=(corpus,))
    return [instance for result in results for instance in result]


def _summary(stats, corpus: TokenizedCorpus, instances: dict, rows: dict,
             max_seq_length: int, seconds: float) -> dict:
    """What the build made: `examples` counts what a split stores (instances, or packed
    rows), `fill_ratio` the share of the stored rows' tokens that are not padding."""
    examples = {name: len(rows[name] or items) for name, items in instances.items()}
    tokens = sum(len(i.input_ids) for items in instances.values() for i in items)
    total_examples = sum(examples.values())
    return {"sources": stats.sources, "documents": corpus.num_documents,
            "sentences": len(corpus.sentence_offsets) - 1, "tokens": len(corpus.ids),
            "replaced_bytes": stats.replaced_bytes,
            "instances": {name: len(items) for name, items in instances.items()},
            "examples": examples,
            "fill_ratio": tokens / (total_examples * max_seq_length) if total_examples else 0.0,
            "seconds": round(seconds, 1)}


# --- the tokenizer, trained on the corpus when no vocabulary file is given ----------------

def tokenizer_file(data: DataConfig, fingerprint: str | None = None) -> epath.Path:
    """The configured vocabulary file, or a SentencePiece model trained on the corpus once and
    cached under `data_dir/tokenizers/`, named by the corpus's content (`fingerprint`, computed
    here unless the caller has it) and the requested `vocab_size` (a corpus too small for it
    gets the largest it supports)."""
    if data.vocab_file:
        return checks.vocab_file(data)
    key = json.dumps([fingerprint or corpus_fingerprint(data), data.vocab_size, data.seed,
                      data.text_field])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = files.path(data.data_dir) / "tokenizers" / f"spm_{data.vocab_size}_{digest}.model"
    if not path.is_file():
        _train_tokenizer(data, path)
    return path


def _train_tokenizer(data: DataConfig, path: epath.Path) -> None:
    tokenization.train_sentencepiece(_sentences(data), data.vocab_size, path, seed=data.seed,
                                     fit=True, corpus=f"corpus {data.corpus!r}")
    size = tokenization.load_tokenizer(path).vocab_size
    if size < data.vocab_size:
        print(f"data.vocab_size={data.vocab_size} is more than this corpus supports: "
              f"using {size:,}")


def _sentences(data: DataConfig):
    """The corpus's sentences, read in parallel over sources."""
    read = functools.partial(_source_sentences, data=data)
    for sentences in _run_parallel(read, corpora.list_sources(data.corpus), data.workers,
                                   "reading for the tokenizer", "source"):
        yield from sentences


def _source_sentences(source: str, data: DataConfig) -> list[str]:
    """A source's sentences, the source checked as decoded text once read."""
    stats = corpora.ReadStats()
    sentences = [sentence for document in corpora.read_source(
        source, stats, text_field=data.text_field, tfds_data_dir=data.tfds_data_dir or None)
        for sentence in document]
    corpora.check_decoded(source, stats)
    return sentences


# --- building and opening -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prepared:
    path: epath.Path
    tokenizer: tokenization.Tokenizer
    metadata: dict

    def data_source(self, split: str):
        """Random access to a split's instances (decoded to numpy by TFDS)."""
        return tfds.builder_from_directory(str(self.path)).as_data_source(split=split)

    @property
    def splits(self) -> list[str]:
        return list(self.metadata["summary"]["instances"])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, which the model's must be (datasets built before
        the metadata held it: the tokenizer's)."""
        return self.metadata.get("vocab_size", self.tokenizer.vocab_size)


def prepare(data: DataConfig) -> Prepared:
    """Builds the dataset for `data` unless it exists; returns it either way."""
    fingerprint = corpus_fingerprint(data)  # once: it reads every file of the corpus
    vocab = tokenizer_file(data, fingerprint)
    tokenizer = tokenization.load_tokenizer(vocab, lowercase=data.lowercase)
    values = identity(data, tokenizer.fingerprint, fingerprint)
    builder = BertPretraining(
        config=BertPretrainingConfig(name=dataset_name(values), data_config=data,
                                     tokenizer_file=str(vocab), identity=values),
        data_dir=str(files.path(data.data_dir)))
    if not (epath.Path(builder.data_dir) / "dataset_info.json").is_file():
        # TFDS prints "Downloading and preparing dataset ...", though nothing is downloaded.
        # Nor its bars, 240 characters of a temporary path: bert-jax's own say what is done.
        tfds.display_progress_bar(False)
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
    return open_prepared(builder.data_dir, expected=values)


def open_prepared(path, expected: dict | None = None) -> Prepared:
    """Opens a prepared dataset directory; with `expected`, checks its identity matches."""
    path = epath.Path(path)
    if not (path / "dataset_info.json").is_file():
        raise ConfigError(f"{path} is not a prepared dataset: run `bert-jax prepare-data`")
    metadata = json.loads((path / "metadata.json").read_text())
    for key, want in (expected or {}).items():
        got = metadata["identity"].get(key)
        if got != want:
            raise ConfigError(f"dataset {path} was prepared with {key}={got!r}, but the "
                              f"config has {key}={want!r}: prepare it again")
    tokenizer = tokenization.load_tokenizer(path / metadata["tokenizer_file"],
                                            lowercase=metadata["identity"]["lowercase"])
    return Prepared(path, tokenizer, metadata)
