"""Corpus readers on real files in tmp_path, the builtin corpus, and TFDS via mock_data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bert_jax.data.corpus import (BUILTIN_PACKAGES, ReadStats, builtin_package_roots,
                                  builtin_stdlib_root, fingerprint, list_sources,
                                  read_source, split_sentences)


def _read(source: str, **kwargs) -> tuple[list[list[str]], ReadStats]:
    stats = ReadStats()
    return list(read_source(source, stats, **kwargs)), stats


def test_bert_format_one_sentence_per_line_blank_lines_between_documents(tmp_path):
    path = tmp_path / "bert.txt"
    path.write_text("\n\nFirst sentence.  \nsecond line, as it is\n\n\n  \n"
                    "Another doc. Two sentences on one line.\t\n\n\n")
    documents, stats = _read(str(path))
    assert documents == [["First sentence.", "second line, as it is"],
                         ["Another doc. Two sentences on one line."]]
    assert stats == ReadStats(sources=1, documents=2, sentences=3, replaced_bytes=0)


def test_one_document_per_line_is_split_into_sentences(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("Dr. Smith arrived. He sat down.\nA second document! Is it?\n")
    documents, stats = _read(str(path))
    assert documents == [["Dr. Smith arrived.", "He sat down."],
                         ["A second document!", "Is it?"]]
    assert (stats.documents, stats.sentences) == (2, 4)


def test_json_lines_reads_text_field_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "Three. Four.\\n\\nA heading", "id": 1}\n\n{"body": "Five."}\n')
    documents, stats = _read(str(path), text_field="body")
    assert documents == [["Three.", "Four.", "A heading"], ["Five."]]
    assert (stats.documents, stats.sentences) == (2, 4)
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: ") + ".*'text'"):
        _read(str(path))
    path.write_text('{"text": "One. Two."}\n{"text": "unterminated\n')
    reader = read_source(str(path))
    assert next(reader) == ["One.", "Two."]
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        next(reader)


def test_several_globs_in_order_each_sorted_each_file_once(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "sub.txt").mkdir()  # a folder that a glob matches is no source
    sources = list_sources(f"{tmp_path}/*.jsonl, {tmp_path}/*.txt,{tmp_path}/a.txt")
    assert sources == [str(tmp_path / name) for name in ("c.jsonl", "a.txt", "b.txt")]


def test_missing_path_empty_glob_and_folder_are_errors_naming_them(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    for spec, message in [(tmp_path / "missing.txt", "no such file"),
                          (tmp_path / "*.nothing", "matches no file"),
                          (tmp_path, "is a folder")]:
        with pytest.raises(ValueError, match=re.escape(str(spec)) + f".*{message}"):
            list_sources(f"{tmp_path}/a.txt,{spec}")
    with pytest.raises(ValueError, match="names no file"):
        list_sources(" , ")
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        _read(str(tmp_path / "gone.txt"))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"\xef\xbb\xbfcaf\xe9 is open.\n\nNa\xefve \xff\xfe text.\n")
    documents, stats = _read(str(path))
    assert documents == [["caf\ufffd is open."], ["Na\ufffdve \ufffd\ufffd text."]]
    assert stats.replaced_bytes == 4


def test_blank_file_gives_no_documents(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\t\n\n")
    documents, stats = _read(str(path))
    assert documents == [] and stats == ReadStats(sources=1)


def test_read_stats_add_sums_every_count():
    total = ReadStats(1, 2, 3, 4)
    total.add(ReadStats(10, 20, 30, 40))
    assert total == ReadStats(11, 22, 33, 44)


@pytest.mark.parametrize("text, sentences", [
    ("Mr. Smith met Dr. Jones in the U.S. Army. They talked.",
     ["Mr. Smith met Dr. Jones in the U.S. Army.", "They talked."]),
    ("Pi is about 3.14. That helps.", ["Pi is about 3.14.", "That helps."]),
    ("Use e.g. this, i.e. that. Pears, etc. are fruit, etc. The end.",
     ["Use e.g. this, i.e. that.", "Pears, etc. are fruit, etc.", "The end."]),
    ('He said "Stop." Then he left. (It was late.) Everyone slept!',
     ['He said "Stop."', "Then he left.", "(It was late.)", "Everyone slept!"]),
    ("Wait... What happened? Nothing\u2026 Really.",
     ["Wait...", "What happened?", "Nothing\u2026", "Really."]),
    ("See Fig. 3 and No. 5 for J. Smith's answer. No. It was 2001. Then",
     ["See Fig. 3 and No. 5 for J. Smith's answer.", "No.", "It was 2001.", "Then"]),
    ("  A line\nbroken   in\t two.\n\nAnother one.  ", ["A line broken in two.", "Another one."]),
    ("   \n ", []),
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_builtin_sources_are_stdlib_modules_and_pydoc_topics():
    sources = list_sources("builtin")
    root = builtin_stdlib_root()
    assert len(sources) > 300 and sources == sorted(sources[:-1]) + ["builtin:pydoc_topics"]
    assert f"builtin:{root / 'json' / '__init__.py'}" in sources
    paths = [source.removeprefix(f"builtin:{root}/") for source in sources[:-1]]
    assert not [path for path in paths if path.startswith(("test/", "idlelib/"))
                or "/test/" in path or "/tests/" in path]


def test_builtin_with_packages_adds_the_dependencies_modules_after_the_standard_library():
    builtin, sources = list_sources("builtin"), list_sources("builtin+packages")
    assert sources[:len(builtin)] == builtin and len(sources) > 5 * len(builtin)
    roots = builtin_package_roots()
    assert list(roots) == list(BUILTIN_PACKAGES)  # bert-jax's dependencies: all installed
    assert f"builtin:{roots['numpy'] / '__init__.py'}" in sources
    added = sources[len(builtin):]
    assert not [s for s in added if {"tests", "testing", "_vendor"} & set(Path(s).parts)]
    for package, root in roots.items():  # in the order of BUILTIN_PACKAGES, each sorted
        own = [s for s in added if s.startswith(f"builtin:{root}/")]
        assert own and own == sorted(own), package


def test_builtin_module_is_one_document_of_its_docstrings():
    source = f"builtin:{builtin_stdlib_root() / 'json' / '__init__.py'}"
    documents, stats = _read(source)
    assert len(documents) == 1 and stats.sources == 1
    text = " ".join(documents[0])
    assert "JSON" in text and "Serialize ``obj`` to a JSON formatted ``str``." in documents[0]
    assert ">>>" not in text and "json.dumps(" not in text  # doctest examples are dropped


def test_builtin_pydoc_topics_are_documents():
    documents, stats = _read("builtin:pydoc_topics")
    assert len(documents) > 50 and stats.sentences > 1000
    assert any("assignment statement" in sentence for d in documents for sentence in d)


def test_unparsable_builtin_module_counts_nothing(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text('"""A docstring."""\ndef (:\n')
    assert _read(f"builtin:{path}") == ([], ReadStats())


def test_fingerprint_is_the_files_content_not_the_glob(tmp_path):
    (tmp_path / "a.txt").write_text("One sentence. Another one.\n")
    (tmp_path / "b.txt").write_text("A second file.\n")
    spec = f"{tmp_path}/*.txt"
    first = fingerprint(spec)
    assert fingerprint(spec) == first
    (tmp_path / "b.txt").write_text("A second file, edited.\n")
    edited = fingerprint(spec)
    assert edited != first
    (tmp_path / "c.txt").write_text("A third file.\n")
    assert fingerprint(spec) not in (first, edited)
    assert fingerprint("builtin") == fingerprint("builtin")


def test_tfds_reads_the_text_feature(tmp_path):
    import tensorflow_datasets as tfds  # slow to import: only the TFDS tests need it

    assert list_sources("tfds:imdb_reviews") == ["tfds:imdb_reviews:train"]
    with tfds.testing.mock_data(num_examples=5):
        documents, stats = _read("tfds:imdb_reviews:train", tfds_data_dir=str(tmp_path))
        assert len(documents) == 5 and stats.sources == 1
        assert all(isinstance(sentence, str) and sentence for d in documents for sentence in d)
        with pytest.raises(ValueError, match="no text feature 'text'; choose one of") as error:
            _read("tfds:ag_news_subset:test", tfds_data_dir=str(tmp_path))
        assert "title" in str(error.value) and "description" in str(error.value)
        documents, _ = _read("tfds:ag_news_subset:test", text_field="title",
                             tfds_data_dir=str(tmp_path))
        assert len(documents) == 5
    # A TFDS corpus is its dataset's name, config and version, and its split.
    assert (fingerprint("tfds:imdb_reviews", str(tmp_path))
            != fingerprint("tfds:imdb_reviews:test", str(tmp_path)))


def test_tfds_dataset_not_prepared_is_an_error_naming_the_data_dir(tmp_path):
    with pytest.raises(ValueError, match="not prepared.*" + re.escape(str(tmp_path))):
        _read("tfds:imdb_reviews:train", tfds_data_dir=str(tmp_path))
