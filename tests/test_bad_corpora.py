"""Corpora a new user gives by mistake, and small ones (issue 22): each is checked before any
work, failing with one line and exit code 2 that names the file and what is wrong with it, or
read as the text it is; a corpus too small for the vocabulary asked for gets the largest one it
supports, and the model follows it."""

import codecs
import json
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from bert_jax.config import ConfigError, default_run
from bert_jax.data import corpus, pipeline
from bert_jax.tokenizer import train_sentencepiece

CLI = [sys.executable, "-m", "bert_jax.cli"]
# A tiny run's flags (as tests/pretrain_runs.py's), but the vocabulary size: the default's.
SMALL_RUN = {"data.max_seq_length": 64, "data.max_predictions_per_seq": 10,
             "model.max_position_embeddings": 64, "train.num_steps": 2,
             "train.global_batch_size": 8, "train.warmup_steps": 1, "train.log_every": 1,
             "train.eval_steps": 1, "checkpoint.every_steps": 2, "data.workers": 1}
WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work number night point home water room mother area money story fact month "
         "book eye job word business issue side kind head house service friend father power "
         "hour game line end member law car city name team minute idea body information back "
         "parent face level office door health person art war history party result change "
         "morning reason research girl moment air teacher force education river stone garden "
         "letter music market window table bread summer winter").split()
VERBS = "sees finds keeps takes gives makes brings holds moves reads writes builds".split()


def _lines(count: int, seed: int = 0) -> list[str]:
    """Documents of 2-4 generated sentences each: 286 pieces' worth of words."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        sentences = [" ".join([*rng.choice(WORDS, 2), rng.choice(VERBS),
                               *rng.choice(WORDS, rng.integers(2, 7))]).capitalize() + "."
                     for _ in range(rng.integers(2, 5))]
        lines.append(" ".join(sentences))
    return lines


def _text(count: int = 1000) -> str:
    return "\n".join(_lines(count)) + "\n"


def _bert_jax(command, tmp_path, corpus_file, **overrides) -> subprocess.CompletedProcess:
    values = {"data.corpus": corpus_file, "data.data_dir": tmp_path / "data", **SMALL_RUN,
              **overrides}
    workdir = [f"--workdir={tmp_path / 'run'}"] if command == "pretrain" else []
    return subprocess.run([*CLI, command, *workdir, *(f"--config.{k}={v}" for k, v in
                                                      values.items())],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def _assert_refused(result, tmp_path, *phrases):
    """Exit code 2, one line on stderr naming each of `phrases`, no workdir and no file in the
    data directory."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bert-jax pretrain: error: "), lines
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert not (tmp_path / "run").exists()
    data = tmp_path / "data"
    assert not data.exists() or not [p for p in data.rglob("*") if p.is_file()]


def test_an_empty_corpus_is_named_as_such(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    _assert_refused(_bert_jax("pretrain", tmp_path, "empty.txt"), tmp_path,
                    "empty.txt", "is empty")


def test_a_corpus_too_small_for_any_vocabulary_is_named_as_such(tmp_path):
    (tmp_path / "tiny.txt").write_text("A cat sat. A dog ran.\nThe sun is up.\n")
    _assert_refused(_bert_jax("pretrain", tmp_path, "tiny.txt"), tmp_path,
                    "'tiny.txt'", "is too small", "give a larger corpus")


def test_a_binary_file_is_refused_naming_it(tmp_path):
    shutil.copy("/bin/ls", tmp_path / "ls.txt")
    _assert_refused(_bert_jax("pretrain", tmp_path, "ls.txt"), tmp_path,
                    "ls.txt is binary", "NUL bytes")


def test_a_latin1_file_is_named_not_utf8_with_its_share_of_undecodable_bytes(tmp_path):
    text = _text(200).replace("e", "é", 600)
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1"))
    share = f"{600 / len(text.encode('latin-1')):.2%}"
    _assert_refused(_bert_jax("pretrain", tmp_path, "latin1.txt"), tmp_path,
                    "latin1.txt is not UTF-8", share, "iconv -f latin1")


def test_mostly_undecodable_text_is_refused_as_not_text(tmp_path):
    path = tmp_path / "noise.txt"
    path.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 4000, np.uint8)))
    assert corpus.list_sources(str(path)) == [str(path)]  # no NUL: not seen as binary at once
    stats = corpus.ReadStats()
    list(corpus.read_source(str(path), stats))
    with pytest.raises(ConfigError, match=r"noise.txt is not text: \d+% of its bytes"):
        corpus.check_decoded(str(path), stats)


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be",
                                   "utf-8"])
def test_files_with_a_byte_order_mark_read_as_the_utf8_file(tmp_path, codec):
    # A blank first line: its byte-order mark once made it look like text, and the file
    # like google-research/bert's blank-line format.
    text = "\n\n" + _text(20)
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(text.encode())
    mark = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
            "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE,
            "utf-8": codecs.BOM_UTF8}[codec]
    marked.write_bytes(mark + text.encode(codec))
    stats = corpus.ReadStats()
    documents = list(corpus.read_source(str(marked), stats))
    assert documents == list(corpus.read_source(str(plain)))
    assert len(documents) == 20 and stats.replaced_bytes == 0


def test_a_utf16_corpus_trains(tmp_path):
    (tmp_path / "utf16.txt").write_bytes(_text().encode("utf-16"))
    result = _bert_jax("pretrain", tmp_path, "utf16.txt", **{"data.vocab_size": 280})
    assert result.returncode == 0, result.stderr
    sentences = sum(map(len, map(corpus.split_sentences, _lines(1000))))
    assert f"documents 1,000  sentences {sentences:,}" in result.stdout  # pretrain's summary
    assert "replaced non-UTF-8 bytes 0" in result.stdout


def test_a_small_corpus_gets_the_largest_vocabulary_it_supports(tmp_path):
    """prepare-data with the default vocabulary size (2,048): one line says it is lowered, the
    dataset's metadata records the size, and the tokenizer has it."""
    (tmp_path / "small.txt").write_text(_text())
    result = _bert_jax("prepare-data", tmp_path, "small.txt")
    assert result.returncode == 0, result.stderr
    assert default_run().data.vocab_size == 2048
    assert result.stdout.startswith(
        "data.vocab_size=2048 is more than this corpus supports: using 286\n")
    [metadata] = (tmp_path / "data" / "bert_pretraining").glob("*/*/metadata.json")
    assert json.loads(metadata.read_text())["vocab_size"] == 286
    assert "tokenizer sentencepiece, 286 tokens" in result.stdout


def test_a_small_corpus_pretrains_with_the_default_vocabulary_size(tmp_path):
    (tmp_path / "small.txt").write_text(_text())
    result = _bert_jax("pretrain", tmp_path, "small.txt")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("data.vocab_size=2048 is more than this corpus supports: using 286") == 1
    assert out.count("dataset: ") == 1  # the summary, once
    validation = int(re.search(r"instances [\d,]+ train, (\d+) validation", out).group(1))
    assert (f"warning: the validation split has {validation} instances, too few to measure on "
            f"(at least 100 are wanted): raise data.validation_fraction=0.03 or give a larger "
            f"corpus") in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["vocab_size"], saved["data"]["vocab_size"]) == (286, 2048)
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert exported["vocab_size"] == 286


def test_fitting_the_vocabulary_and_its_floor(tmp_path):
    sentences = [s for line in _lines(1000) for s in corpus.split_sentences(line)]
    with pytest.raises(ConfigError, match="Vocabulary size too high"):  # asked exactly
        train_sentencepiece(sentences, 4096, tmp_path / "exact.model")
    from bert_jax.tokenizer import load_tokenizer

    fitted = train_sentencepiece(sentences, 4096, tmp_path / "fit.model", fit=True)
    assert load_tokenizer(fitted).vocab_size == 286
    with pytest.raises(ConfigError, match="corpus 'x' is too small: .* at most 1[0-9] pieces"):
        train_sentencepiece(["A cat sat.", "A dog ran."], 4096, tmp_path / "tiny.model",
                            fit=True, corpus="corpus 'x'")
    with pytest.raises(ConfigError, match="corpus 'x' has no text"):
        train_sentencepiece([], 4096, tmp_path / "none.model", corpus="corpus 'x'")


def test_the_model_follows_a_given_vocabulary_where_tied(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                *"abcdefghijklmnopqrstuvwxyz"]) + "\n")
    config = default_run()
    config.data.vocab_file = str(vocab)
    followed = pipeline.follow_tokenizer(config)
    assert (followed.model.vocab_size, followed.data.vocab_size) == (31, 2048)
    assert config.model.vocab_size == 2048  # a copy
    untied = ml_collections.ConfigDict(config.to_dict())
    untied.model.vocab_size = 999  # set on its own: the tokenizer must fit it
    assert pipeline.follow_tokenizer(untied) is untied


class _Prepared:
    path = "DATA/bert_pretraining/seq64_x/1.0.0"

    def __init__(self, validation):
        from bert_jax.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.__new__(Tokenizer)
        self.tokenizer.kind, self.tokenizer.vocab_size = "sentencepiece", 305
        self.metadata = {
            "identity": {"vocab_size": 4096, "vocab_file": "", "validation_fraction": 0.02},
            "summary": {"documents": 1000, "sentences": 3046, "tokens": 33818,
                        "replaced_bytes": 0, "instances": {"train": 1624, "validation": validation},
                        "examples": {}, "fill_ratio": 0.5, "seconds": 1.0}}


def test_the_summary_warns_of_a_small_validation_split():
    lines = pipeline.describe(_Prepared(33)).splitlines()
    assert lines[0] == "dataset: DATA/bert_pretraining/seq64_x/1.0.0"
    assert lines[2] == "  instances 1,624 train, 33 validation  fill ratio 0.500"
    assert lines[3] == ("  tokenizer sentencepiece, 305 tokens (data.vocab_size=4,096: more "
                        "than the corpus supports)")
    assert lines[-1].startswith("warning: the validation split has 33 instances")
    assert "raise data.validation_fraction=0.02 or give a larger corpus" in lines[-1]
    assert not pipeline.describe(_Prepared(100)).splitlines()[-1].startswith("warning")
