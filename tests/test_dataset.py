"""The prepared TFDS dataset, end to end: corpus -> tokenizer -> ArrayRecord -> masked batches."""

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pydoc_data.topics
import pytest
import tensorflow_datasets as tfds

from bert_jax.config import DataConfig, RunConfig, default_config
from bert_jax.data import dataset, masking, pipeline
from bert_jax.tokenizer import load_tokenizer

SEQ = 64


def _write_topics(root, files=2):
    """Python's topic help as google-research/bert-format files (one sentence per line)."""
    documents = []
    for text in pydoc_data.topics.topics.values():
        lines = [" ".join(line.split()) for line in text.splitlines()]
        lines = [line for line in lines if len(line) > 1]
        documents += [lines[i:i + 25] for i in range(0, len(lines), 25)]
    for index in range(files):
        part = documents[index::files]
        (root / f"part{index}.txt").write_text("\n\n".join("\n".join(d) for d in part) + "\n")
    return str(root / "part*.txt")


def _config(tmp_path, corpus, **data):
    config = default_config("tiny")
    config.data.corpus = corpus
    config.data.data_dir = str(tmp_path / "data")
    config.data.vocab_size = 1000
    config.data.max_seq_length = SEQ
    config.data.max_predictions_per_seq = 10
    config.data.workers = 2
    config.train.global_batch_size = 16
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _prepare(config):
    return pipeline.prepare(RunConfig.from_dict(config))


def _loader(config, prepared, split="train", rows=None):
    return pipeline.loader(RunConfig.from_dict(config), prepared, split, rows=rows)


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    root = tmp_path_factory.mktemp("topics")
    corpus = _write_topics(root)
    config = _config(root, corpus)
    return config, _prepare(config)


def _all(prepared, split):
    source = prepared.data_source(split)
    return [source[i] for i in range(len(source))]


def test_prepared_instances_have_bert_layout_and_summary(topics):
    config, prepared = topics
    summary = prepared.metadata["summary"]
    train = _all(prepared, "train")
    assert summary["instances"]["train"] == len(train) >= 2000
    assert summary["instances"]["validation"] >= 20
    assert summary["sources"] == 2 and summary["documents"] > 300
    assert 0.5 < summary["fill_ratio"] <= 1.0
    tokenizer = prepared.tokenizer
    for example in train:
        ids = example["input_ids"]
        a = example["a_length"]
        assert len(ids) <= SEQ and ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
        assert ids[a + 1] == tokenizer.sep_id
        assert (ids == tokenizer.sep_id).sum() == 2 and (ids == tokenizer.cls_id).sum() == 1
    assert prepared.metadata["identity"]["tokenizer_fingerprint"] == tokenizer.fingerprint


def test_masked_batches_meet_the_acceptance_rates(topics):
    config, prepared = topics
    loader = _loader(config, prepared)
    steps = -(-len(prepared.data_source("train")) // 16)
    maskable = predicted = masked = kept = 0
    tokenizer = prepared.tokenizer
    for _, batch in loader.iterate(0, steps):
        ids, weights = batch["input_ids"], batch["masked_lm_weights"] > 0
        real = batch["input_mask"] > 0
        # Reconstruct the originals to count maskable tokens.
        original = ids.copy()
        np.put_along_axis(original, batch["masked_lm_positions"],
                          np.where(weights, batch["masked_lm_ids"],
                                   np.take_along_axis(ids, batch["masked_lm_positions"], 1)), 1)
        special = np.isin(original, [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id])
        maskable += int((real & ~special).sum())
        at = np.take_along_axis(ids, batch["masked_lm_positions"], 1)[weights]
        labels = batch["masked_lm_ids"][weights]
        assert not np.isin(labels, [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id]).any()
        predicted += int(weights.sum())
        masked += int((at == tokenizer.mask_id).sum())
        kept += int((at == labels).sum())
        for row in range(len(ids)):  # segment ids: 0 through the first [SEP], then 1
            length = int(real[row].sum())
            first_sep = int(np.flatnonzero(original[row] == tokenizer.sep_id)[0])
            np.testing.assert_array_equal(batch["segment_ids"][row, :length],
                                          np.arange(length) > first_sep)
    assert predicted / maskable == pytest.approx(0.15, abs=0.01)
    assert masked / predicted == pytest.approx(0.8, abs=0.02)
    assert kept / predicted == pytest.approx(0.1, abs=0.02)


def test_batches_are_the_same_for_fresh_resumed_and_resharded_runs(topics):
    config, prepared = topics
    fresh = [b for _, b in _loader(config, prepared).iterate(0, 6)]
    resumed = [b for _, b in _loader(config, prepared).iterate(3, 3)]
    for process_count in (2, 4):
        rows = config.train.global_batch_size // process_count
        parts = [[b for _, b in _loader(config, prepared, rows=slice(
                     p * rows, (p + 1) * rows)).iterate(3, 3)] for p in range(process_count)]
        for step in range(3):
            for name, value in fresh[3 + step].items():
                np.testing.assert_array_equal(resumed[step][name], value)
                np.testing.assert_array_equal(
                    np.concatenate([part[step][name] for part in parts]), value)


def test_inspect_data_out_saves_exactly_the_training_batches(topics, tmp_path):
    config, prepared = topics
    overrides = [f"--config.data.{k}={v}" for k, v in config.data.items()]
    out = tmp_path / "batches.npz"
    result = subprocess.run(
        [sys.executable, "-m", "bert_jax.cli", "inspect-data", "--steps=3", "--start-step=2",
         f"--out={out}", *overrides, "--config.train.global_batch_size=16"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[MASK](" in result.stdout  # decoded text with labels beside masks
    saved = np.load(out)
    expected = [b for _, b in _loader(config, prepared).iterate(2, 3)]
    for name in expected[0]:
        np.testing.assert_array_equal(saved[name], np.stack([b[name] for b in expected]))


def test_packed_rows_hold_exactly_the_instances_and_batch_them_apart(topics):
    config, prepared = topics
    assert "instances_per_row" not in prepared.metadata["identity"]  # unpacked: as before
    packed_config = _config(Path(config.data.data_dir).parent, config.data.corpus,
                            instances_per_row=3)
    packed = _prepare(packed_config)
    summary = packed.metadata["summary"]
    assert packed.metadata["identity"]["instances_per_row"] == 3
    assert summary["instances"] == prepared.metadata["summary"]["instances"]
    assert summary["examples"]["train"] < 0.95 * summary["instances"]["train"]
    assert summary["fill_ratio"] > prepared.metadata["summary"]["fill_ratio"] + 0.04
    for split in ("train", "validation"):
        alone = sorted((e["input_ids"].tobytes(), int(e["a_length"]),
                        int(e["next_sentence_label"])) for e in _all(prepared, split))
        rows = _all(packed, split)
        assert len(rows) == summary["examples"][split]
        assert all(len(r["input_ids"]) <= SEQ and 1 <= len(r["lengths"]) <= 3 for r in rows)
        unpacked = sorted(
            (ids.tobytes(), int(a), int(label)) for r in rows for ids, a, label in zip(
                np.split(r["input_ids"], np.cumsum(r["lengths"])[:-1]), r["a_lengths"],
                r["next_sentence_labels"]))
        assert unpacked == alone
    cls_id = packed.tokenizer.cls_id
    batch = _loader(packed_config, packed).batch(0)
    weights = batch["next_sentence_weights"] > 0
    cls_positions = batch["next_sentence_positions"]
    assert (np.take_along_axis(batch["input_ids"], cls_positions, 1)[weights] == cls_id).all()
    assert (np.take_along_axis(batch["input_mask"], cls_positions, 1)[weights]
            == np.nonzero(weights)[1] + 1).all()
    assert (batch["input_ids"] == cls_id).sum() == weights.sum()
    predicted = np.take_along_axis(batch["input_mask"], batch["masked_lm_positions"], 1)
    assert (predicted[batch["masked_lm_weights"] > 0] > 0).all()
    # What the AOT compile is given (`masking.batch_shapes`) is what the loader makes.
    for per_row, (cfg, data) in ((3, (packed_config, packed)), (1, topics)):
        made = _loader(cfg, data).batch(0)
        assert {k: (v.shape, v.dtype) for k, v in made.items()} == masking.batch_shapes(
            16, SEQ, 10, per_row)


def test_building_is_deterministic_and_reused(topics, tmp_path):
    config, prepared = topics
    again = _config(tmp_path, config.data.corpus, workers=1)
    rebuilt = _prepare(again)  # another data_dir, one worker: the same instances
    assert rebuilt.path.name == prepared.path.name
    assert rebuilt.path != prepared.path
    for a, b in zip(_all(prepared, "train"), _all(rebuilt, "train")):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    mtime = os.stat(rebuilt.path / "dataset_info.json").st_mtime
    assert _prepare(again).path == rebuilt.path  # reused, not rebuilt
    assert os.stat(rebuilt.path / "dataset_info.json").st_mtime == mtime


def test_an_edited_corpus_file_gets_a_new_tokenizer_and_dataset(tmp_path):
    """A trained tokenizer and a dataset are those of the corpus's content, not of its glob:
    a file edited in place (same name, same size) is read again, nothing old is reused."""
    config = _config(tmp_path, _write_topics(tmp_path), workers=1, vocab_size=300)
    before = _prepare(config)
    part = tmp_path / "part1.txt"
    size, documents = part.stat().st_size, part.read_text().split("\n\n")
    part.write_text("\n\n".join(reversed(documents)))  # its documents in another order
    assert part.stat().st_size == size
    after = _prepare(config)
    assert after.path != before.path
    assert len(list((tmp_path / "data" / "tokenizers").iterdir())) == 2  # trained again
    assert ([e["input_ids"].tobytes() for e in _all(after, "validation")]
            != [e["input_ids"].tobytes() for e in _all(before, "validation")])


def test_dataset_names_stay_those_of_the_datasets_on_disk():
    # The default config's dataset name since the corpus's content joined the identity: a new
    # DataConfig field must leave existing names alone (unpacked datasets omit
    # instances_per_row).
    assert dataset.dataset_name(dataset.identity(DataConfig(), "fingerprint", "corpus")) == \
        "seq128_73b2d212a27c0a26"


def test_a_changed_config_gets_another_dataset_and_a_mismatch_is_caught(topics, tmp_path):
    config, prepared = topics
    data = DataConfig.from_dict(config.data)
    other = dataset.identity(DataConfig(**{**data.to_dict(), "max_seq_length": 128}),
                             prepared.tokenizer.fingerprint,
                             prepared.metadata["identity"]["corpus_fingerprint"])
    assert dataset.dataset_name(other) != prepared.path.parent.name
    with pytest.raises(ValueError, match="max_seq_length=64.*max_seq_length=128"):
        dataset.open_prepared(prepared.path, expected=other)


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    good = _write_topics(tmp_path, files=1)
    broken = tmp_path / "zz.jsonl"
    broken.write_text('{"text": "One sentence here. And another."}\nnot json\n')
    config = _config(tmp_path, f"{good},{broken}", vocab_file="", workers=1)
    config.data.vocab_file = str(dataset.tokenizer_file(DataConfig.from_dict(
        _config(tmp_path, good).data)))
    with pytest.raises(ValueError, match="zz.jsonl"):
        _prepare(config)
    built = list((tmp_path / "data" / "bert_pretraining").glob("*/*/dataset_info.json"))
    assert built == []
    assert not [p for p in (tmp_path / "data" / "bert_pretraining").glob("*/*")
                if not p.name.startswith("incomplete")]


def test_empty_corpus_and_missing_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    with pytest.raises(ValueError, match="no documents"):
        _prepare(_config(tmp_path, str(empty), vocab_file=str(vocab), vocab_size=7))
    with pytest.raises(ValueError, match="nowhere.txt"):
        _prepare(_config(tmp_path, str(tmp_path / "nowhere.txt"), vocab_file=str(vocab)))
    with pytest.raises(ValueError, match="missing.model"):
        _prepare(_config(tmp_path, str(empty), vocab_file=str(tmp_path / "missing.model")))


def test_wordpiece_vocabulary_and_preflight_vocab_check(topics, tmp_path):
    import tokenizers

    config, _ = topics
    wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True)
    wordpiece.train(sorted(str(p) for p in (tmp_path.parent.glob("topics*/part*.txt"))) or
                    [str(_write_topics(tmp_path, files=1)).replace("*", "0")],
                    vocab_size=800, show_progress=False)
    wordpiece.save_model(str(tmp_path))
    size = len((tmp_path / "vocab.txt").read_text().splitlines())
    tied = _config(tmp_path, config.data.corpus, vocab_file=str(tmp_path / "vocab.txt"))
    prepared = _prepare(tied)  # model.vocab_size is data.vocab_size's: it follows the tokenizer
    assert prepared.vocab_size == size and pipeline.follow_tokenizer(tied).model.vocab_size == size
    untied = ml_collections.ConfigDict(tied.to_dict())
    untied.model.vocab_size = 999
    with pytest.raises(ValueError,
                       match=f"the tokenizer has {size} tokens but model.vocab_size=999"):
        _prepare(untied)
    assert prepared.tokenizer.kind == "wordpiece"
    assert prepared.tokenizer.cls_id == (tmp_path / "vocab.txt").read_text().split().index("[CLS]")
    assert len(prepared.data_source("train")) > 1000


def test_tfds_catalog_corpus_on_mock_data(tmp_path):
    """The catalog path: a tokenizer trained on, and the tokenized corpus of, `tfds:NAME`.
    (mock_data fakes every TFDS builder, ours too, so the build itself is tested above.)"""
    data = DataConfig.from_dict(_config(tmp_path, "tfds:imdb_reviews", vocab_size=150).data)
    with tfds.testing.mock_data(num_examples=60):
        vocab = dataset.tokenizer_file(data)
        corpus, stats = dataset.tokenize_corpus(data, vocab)
    assert stats.documents == 60 and corpus.num_documents == 60
    assert len(corpus.ids) >= 60 and corpus.ids.max() < 150


def test_tokenizer_files_in_a_bucket(tmp_path, bucket, monkeypatch):
    """A gs:// data_dir caches the trained tokenizer there (not in a local `gs:` folder), and
    a gs:// vocab_file is found there."""
    corpus = _write_topics(tmp_path, files=1)
    data = DataConfig.from_dict(_config(tmp_path, corpus, vocab_size=300,
                                        data_dir="gs://bucket/data").data)
    vocab = dataset.tokenizer_file(data)
    assert str(vocab).startswith("gs://bucket/data/tokenizers/spm_300_")
    assert [p.name for p in (bucket / "data" / "tokenizers").iterdir()] == [vocab.name]
    monkeypatch.setattr(dataset, "_train_tokenizer", None)  # cached: not trained again
    assert dataset.tokenizer_file(data) == vocab
    assert load_tokenizer(vocab).vocab_size == 300
    given = DataConfig(vocab_file=str(vocab))
    assert dataset.tokenizer_file(given) == vocab
    with pytest.raises(ValueError, match="gs://bucket/missing.txt.*does not exist"):
        dataset.tokenizer_file(DataConfig(vocab_file="gs://bucket/missing.txt"))
