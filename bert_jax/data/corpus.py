"""Corpus readers: raw text in, documents as lists of sentences out.

A corpus (`config.data.corpus`) is file globs separated by commas, `builtin` (the Python
standard library's documentation: English prose every machine has offline), `builtin+packages`
(that and the documentation of bert-jax's dependencies, 9 times as much) or `tfds:NAME[:SPLIT]`
(a TFDS dataset already prepared; nothing is downloaded). `list_sources` cuts it into picklable
units for parallel workers, `read_source` reads one, `fingerprint` digests what they read.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from bert_jax.config import ConfigError

BUILTIN = "builtin"
BUILTIN_WITH_PACKAGES = "builtin+packages"
TFDS_PREFIX = "tfds:"
_BUILTIN_PREFIX = f"{BUILTIN}:"
_PYDOC_TOPICS = f"{BUILTIN}:pydoc_topics"

# The packages whose documentation follows the standard library's in `builtin+packages`:
# bert-jax's dependencies, so every machine that runs bert-jax has them (as installed: the
# corpus fingerprint hashes every file read, so other versions name another dataset).
BUILTIN_PACKAGES = ("numpy", "jax", "flax", "optax", "orbax", "keras", "tensorflow",
                    "tensorflow_datasets")
# Folders of tests, tools and vendored code, by name or path from the root.
_BUILTIN_SKIPPED = frozenset({"test", "tests", "testing", "testdata", "idlelib", "lib2to3",
                              "site-packages", "__pycache__", "turtledemo",
                              "ensurepip/_bundled", "_vendor", "third_party"})

# Byte-order marks and the codecs that read past them; UTF-32's before UTF-16's, whose marks
# begin UTF-32 LE's.
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                     (codecs.BOM_UTF16_BE, "utf-16"))
_SNIFFED_BYTES = 1 << 16  # how much of each file the encoding and binary checks read
# Above these shares of undecodable bytes a file is refused (docs/data.md): not UTF-8 (a few
# stray bytes in a large corpus pass, replaced and counted), or not text at all.
NOT_UTF8_SHARE = 0.001
BINARY_SHARE = 0.1

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Python's "surrogateescape" escapes bytes from 128 only: a UTF-16/32 error can be any byte.
_ESCAPE_ANY_BYTE = "bert_jax.escape_any_byte"
codecs.register_error(_ESCAPE_ANY_BYTE, lambda error: (
    "\udc80" * (error.end - error.start), error.end))

# A possible sentence end: terminal punctuation, closing quotes or brackets, whitespace; the
# lookahead captures the first character of what follows, past any opening quote or bracket.
_CLOSERS = "\"')]\u201d\u2019"
_OPENERS = "\"'([\u201c\u2018"
_SENTENCE_END = re.compile(
    rf"([.!?\u2026]+)[{re.escape(_CLOSERS)}]*\s+(?=[{re.escape(_OPENERS)}]*(\S))")
# Documentation paragraphs that are prose end like a sentence (not in "..." as signatures do).
_PROSE_END = re.compile(rf"[^.\s][.!?][{re.escape(_CLOSERS)}]*$")
_LIST_MARKER = re.compile(r"^\s*(?:[*+-]|\d{1,2}\.)\s+")
# Dotted initialisms (e.g, i.e, U.S, a.m) and abbreviations that a period does not end a
# sentence after, whatever follows; and those that it does not end before a number.
_INITIALISM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st rev gen col capt lt sgt hon gov sen rep pres "
    "cf vs viz al approx ca resp incl esp".split())
_ABBREVIATIONS_BEFORE_NUMBERS = frozenset(
    "no nos fig figs eq eqs vol vols pp sec ch art op ref refs".split())


@dataclasses.dataclass
class ReadStats:
    """Counts gathered while reading, for the prepare-data summary."""

    sources: int = 0
    documents: int = 0
    sentences: int = 0
    replaced_bytes: int = 0  # undecodable (non-UTF-8) bytes replaced by U+FFFD

    def add(self, other: ReadStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def list_sources(spec: str) -> list[str]:
    """The readable units of a corpus in a fixed order: each glob's files sorted, each once;
    `builtin:PATH` per standard-library module and `builtin:pydoc_topics`; or one
    `tfds:NAME:SPLIT` (SPLIT `train` by default, or a slice such as `train[:10%]`)."""
    spec = spec.strip()
    if spec in (BUILTIN, BUILTIN_WITH_PACKAGES):
        return _builtin_sources(spec == BUILTIN_WITH_PACKAGES)
    if not spec.startswith(TFDS_PREFIX):
        return _file_sources(spec)
    import tensorflow_datasets as tfds  # heavy, and needed on this path only

    name, split = _parse_tfds(spec)
    try:  # checked before any reading starts
        tfds.builder_cls(name.split("/")[0])
    except tfds.core.registered.DatasetNotFoundError:  # its message lists every dataset
        raise ConfigError(f"corpus {spec!r}: TFDS has no dataset {name!r}: expected a TFDS "
                          f"name, such as '{TFDS_PREFIX}wikipedia/20230601.en:train'") from None
    return [f"{TFDS_PREFIX}{name}:{split}"]


def read_source(source: str, stats: ReadStats | None = None, *, text_field: str = "text",
                tfds_data_dir: str | None = None) -> Iterator[list[str]]:
    """The non-empty documents (lists of stripped, non-empty sentences) of one source, counted in
    `stats`. Files (docs/data.md): JSON Lines, google-research/bert's (a blank line between
    documents) or a document per line; TFDS text is feature `text_field`, or the only one."""
    stats = ReadStats() if stats is None else stats
    if source.startswith(TFDS_PREFIX):
        documents = _read_tfds(source, stats, text_field, tfds_data_dir)
    elif source == _PYDOC_TOPICS:
        documents = _read_pydoc_topics(stats)
    elif source.startswith(_BUILTIN_PREFIX):
        documents = _read_builtin_module(source[len(_BUILTIN_PREFIX):], stats)
    else:
        documents = _read_file(source, stats, text_field)
    for document in documents:
        if document:
            stats.documents += 1
            stats.sentences += len(document)
            yield document


def fingerprint(spec: str, tfds_data_dir: str | None = None) -> str:
    """The hex SHA-256 of what corpus `spec` reads, naming what is built from it (docs/data.md).
    Files hash one after another, again only when size or mtime change: SHA-256 runs at over
    1 GB/s on one core, and threads made the builtin corpus's thousands of small files 4x
    slower (they contend for the GIL between reads)."""
    parts = [_source_fingerprint(source, tfds_data_dir) for source in list_sources(spec)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _source_fingerprint(source: str, tfds_data_dir: str | None) -> list:
    if source.startswith(TFDS_PREFIX):
        import tensorflow_datasets as tfds

        name, _ = _parse_tfds(source)
        return [source, tfds.builder(name, data_dir=tfds_data_dir).info.full_name]
    path = (importlib.util.find_spec("pydoc_data.topics").origin if source == _PYDOC_TOPICS
            else source.removeprefix(_BUILTIN_PREFIX))
    stat = os.stat(path)
    return [source, stat.st_size, _file_sha256(path, stat.st_size, stat.st_mtime_ns)]


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's SHA-256, streamed; `size` and `mtime_ns` key the cache only."""
    del size, mtime_ns
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def split_sentences(text: str) -> list[str]:
    """Running text -> sentences, whitespace collapsed. Rule-based (learned splitters need model
    files, not to be had offline): `.`, `!`, `?` or an ellipsis, then closing quotes or brackets,
    whitespace and an upper-case letter or digit, end one; except after an abbreviation (Mr.),
    an initialism (e.g., U.S.), an initial (J. Smith), or No./Fig. before a number."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if _ends_sentence(text, match):
            sentences.append(text[start:match.end()].rstrip())
            start = match.end()
    sentences.append(text[start:])
    return [sentence for sentence in sentences if sentence]


def builtin_stdlib_root() -> Path:
    """The folder of the Python standard library in use: the `builtin` corpus's files."""
    return Path(sysconfig.get_path("stdlib"))


def _ends_sentence(text: str, match: re.Match) -> bool:
    punctuation, following = match.group(1), match.group(2)
    if not (following.isupper() or following.isdigit()):
        return False
    if punctuation != ".":  # ?, ! and ellipses are never abbreviations
        return True
    word = text[text.rfind(" ", 0, match.start()) + 1:match.start()].lstrip(_OPENERS)
    lowered = word.lower()
    if lowered in _ABBREVIATIONS or _INITIALISM.fullmatch(word):
        return False
    if lowered in _ABBREVIATIONS_BEFORE_NUMBERS and following.isdigit():
        return False
    return not (len(word) == 1 and word.isupper())


def _text_sentences(text: str) -> list[str]:
    """Sentences of free text; a blank line always ends one (paragraphs, headings)."""
    return [sentence for paragraph in _PARAGRAPH_BREAK.split(text)
            for sentence in split_sentences(paragraph)]


# --- files --------------------------------------------------------------------------------

def _file_sources(spec: str) -> list[str]:
    patterns = [pattern.strip() for pattern in spec.split(",") if pattern.strip()]
    if not patterns:
        raise ConfigError(f"corpus {spec!r} names no file, glob, {BUILTIN!r} or "
                          f"'{TFDS_PREFIX}NAME[:SPLIT]'")
    paths = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(path for path in glob.glob(expanded, recursive=True)
                         if os.path.isfile(path))
        if not matches:
            if os.path.isdir(expanded):
                why = f"is a folder; give a glob of its files, such as {expanded.rstrip('/')}/*"
            else:
                why = "matches no file" if re.search(r"[*?[]", expanded) else "no such file"
            raise ConfigError(f"corpus {pattern!r}: {why}")
        paths += matches
    paths = list(dict.fromkeys(paths))
    sizes = [os.path.getsize(path) for path in paths]
    if not any(sizes):
        what = paths[0] if len(paths) == 1 else f"its {len(paths)} files"
        raise ConfigError(f"corpus {spec!r} is empty: {what} {'has' if len(paths) == 1 else 'have'}"
                          f" 0 bytes: expected text, a document per line")
    for path in paths:
        file_encoding(path)  # refuses binary files before anything reads them whole
    return paths


def file_encoding(path: str) -> str:
    """The codec that reads corpus file `path`: UTF-8 (a byte-order mark or none), or UTF-16 or
    UTF-32 by their byte-order marks. A file with NUL bytes in its first 64 KiB and no such
    mark is refused as binary (UTF-16/32 without a mark included, which look the same)."""
    stat = os.stat(path)
    return _sniff_encoding(path, stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sniff_encoding(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # the cache's key only
    with open(path, "rb") as file:
        head = file.read(_SNIFFED_BYTES)
    for mark, codec in _BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return codec
    if b"\0" in head:
        raise ConfigError(f"corpus file {path} is binary (it has NUL bytes), not text: expected "
                          f"UTF-8 text (UTF-16 or UTF-32 with a byte-order mark)")
    return "utf-8"


def check_decoded(source: str, stats: ReadStats) -> None:
    """After a source is read (`stats` its own counts): a file of which more than
    `NOT_UTF8_SHARE` of the bytes could not be decoded is refused, naming its share, and above
    `BINARY_SHARE` as not text at all. Other sources pass (the standard library is UTF-8)."""
    if not stats.replaced_bytes or source.startswith((TFDS_PREFIX, _BUILTIN_PREFIX)):
        return
    size = os.path.getsize(source)
    share = stats.replaced_bytes / max(size, 1)
    if share > BINARY_SHARE:
        raise ConfigError(f"corpus file {source} is not text: {share:.0%} of its bytes "
                          f"({stats.replaced_bytes:,} of {size:,}) are not UTF-8: expected "
                          f"UTF-8 text")
    if share > NOT_UTF8_SHARE:
        raise ConfigError(f"corpus file {source} is not UTF-8: {share:.2%} of its bytes "
                          f"({stats.replaced_bytes:,} of {size:,}) cannot be decoded: convert it "
                          f"(a Latin-1 file: iconv -f latin1 -t utf-8 {source} > NEW.txt)")


def _read_file(path: str, stats: ReadStats, text_field: str) -> Iterator[list[str]]:
    if path.lower().endswith((".jsonl", ".json")):
        documents = _json_lines_documents(path, stats, text_field)
    elif _separates_documents_by_blank_lines(path):
        stripped = (line.strip() for line in _decoded_lines(path, stats))
        documents = (list(sentences)
                     for is_text, sentences in itertools.groupby(stripped, key=bool) if is_text)
    else:
        documents = (split_sentences(line) for line in _decoded_lines(path, stats))
    stats.sources += 1
    yield from documents


def _separates_documents_by_blank_lines(path: str) -> bool:
    """Whether a blank line stands between non-blank ones: google-research/bert's format.
    Reads only as far as the second document's first line."""
    lines = _decoded_lines(path, ReadStats())
    try:
        text_onward = itertools.dropwhile(lambda line: not line.strip(), lines)
        runs = itertools.groupby(text_onward, key=lambda line: bool(line.strip()))
        return len(list(itertools.islice(runs, 3))) == 3  # text, blank, text
    finally:
        lines.close()


def _decoded_lines(path: str, stats: ReadStats) -> Iterator[str]:
    """The lines of a file (split at \\n only, as bytes are) in its `file_encoding`, without a
    byte-order mark; undecodable bytes replaced and counted."""
    codec = file_encoding(path)
    if codec.startswith("utf-8"):  # bytes a line: the whole file is never in memory
        with open(path, "rb") as file:
            for number, raw in enumerate(file):
                line = _decode_utf8(raw, stats)
                yield line.removeprefix("\ufeff") if number == 0 else line
        return
    with open(path, encoding=codec, errors=_ESCAPE_ANY_BYTE, newline="\n") as file:
        for line in file:  # the codec reads past the byte-order mark
            line, replaced = _ESCAPED_BYTE.subn("\ufffd", line)
            stats.replaced_bytes += replaced
            yield line


def _decode_utf8(raw: bytes, stats: ReadStats) -> str:
    """Undecodable bytes -> U+FFFD, one each (Python's "replace" merges some), counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text, replaced = _ESCAPED_BYTE.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
        stats.replaced_bytes += replaced
        return text


def _json_lines_documents(path: str, stats: ReadStats, text_field: str) -> Iterator[list[str]]:
    for number, line in enumerate(_decoded_lines(path, stats), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ConfigError(f"{path}:{number}: expected a JSON object with a string field "
                              f"{text_field!r}")
        yield _text_sentences(text)


# --- the builtin corpus: the standard library's documentation -----------------------------

def _builtin_sources(with_packages: bool) -> list[str]:
    """The standard library's modules and its pydoc topics, then (`with_packages`) each of
    `BUILTIN_PACKAGES`' modules; each folder's files sorted."""
    roots = [builtin_stdlib_root(), *(builtin_package_roots().values() if with_packages else ())]
    paths = [sorted(_python_files(root)) for root in roots]
    return [f"{_BUILTIN_PREFIX}{path}" for path in paths[0]] + [_PYDOC_TOPICS] + [
        f"{_BUILTIN_PREFIX}{path}" for package in paths[1:] for path in package]


def builtin_package_roots() -> dict[str, Path]:
    """The folders of the installed `BUILTIN_PACKAGES`, by name (bert-jax depends on each)."""
    roots = {}
    for name in BUILTIN_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = Path(list(spec.submodule_search_locations)[0])
    return roots


def _python_files(root: Path) -> Iterator[str]:
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        subfolders[:] = [name for name in subfolders if name not in _BUILTIN_SKIPPED
                         and (relative / name).as_posix() not in _BUILTIN_SKIPPED]
        yield from (os.path.join(folder, name) for name in files if name.endswith(".py"))


def _read_builtin_module(path: str, stats: ReadStats) -> Iterator[list[str]]:
    """One document: the module's docstrings. Parsed, not imported (`antigravity` and `this`
    have side effects); a file that does not parse counts for nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escapes in old modules: not ours
            tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return
    stats.sources += 1
    yield [sentence for docstring in _docstrings(tree)
           for sentence in _documentation_sentences(docstring)]


def _docstrings(node: ast.AST) -> Iterator[str]:
    """The docstrings of a module, its classes and functions, in source order."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(node, clean=True)  # clean: inspect.cleandoc
        if docstring:
            yield docstring
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, ()):  # lists of statements, handlers or cases
            yield from _docstrings(child)


def _read_pydoc_topics(stats: ReadStats) -> Iterator[list[str]]:
    """One document per topic of the language reference that `help()` shows."""
    from pydoc_data.topics import topics  # a dict literal: importing it does nothing else

    stats.sources += 1
    yield from map(_documentation_sentences, topics.values())


def _documentation_sentences(text: str) -> list[str]:
    """Sentences of documentation prose: doctests, list markers and paragraphs that do not end
    like a sentence (headings, tables, code, signatures, "For example:") go."""
    return [sentence for paragraph in _PARAGRAPH_BREAK.split(_without_doctests(text))
            if _PROSE_END.search(paragraph.rstrip())
            for sentence in split_sentences(_LIST_MARKER.sub("", paragraph))]


def _without_doctests(text: str) -> str:
    """Drops `>>>` examples: each runs, with its `...` lines and output, to a blank line."""
    kept, in_example = [], False
    for line in text.splitlines():
        stripped = line.strip()
        in_example = stripped.startswith(">>>") or (in_example and bool(stripped))
        if not in_example:
            kept.append(line)
    return "\n".join(kept)


# --- TFDS ---------------------------------------------------------------------------------

def _parse_tfds(spec: str) -> tuple[str, str]:
    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    if not name.strip():
        raise ConfigError(f"corpus {spec!r}: expected '{TFDS_PREFIX}NAME[:SPLIT]', such as "
                          f"'{TFDS_PREFIX}wikipedia/20230601.en:train'")
    return name.strip(), split.strip() or "train"


def _read_tfds(source: str, stats: ReadStats, text_field: str,
               data_dir: str | None) -> Iterator[list[str]]:
    import tensorflow_datasets as tfds

    name, split = _parse_tfds(source)
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as error:  # how TFDS says the data directory lacks the dataset
        raise ConfigError(
            f"TFDS dataset {name!r} is not prepared in the data directory "
            f"{builder.data_dir_root}: prepare it there first (bert-jax never downloads), "
            f"or point the data directory where it is prepared") from error
    features = builder.info.features
    texts = [key for key, feature in features.items() if isinstance(feature, tfds.features.Text)]
    if text_field not in texts and len(texts) != 1:
        choice = f"; choose one of {', '.join(texts)} with text_field" if texts else ""
        listing = ", ".join(f"{key} ({type(value).__name__})" for key, value in features.items())
        raise ConfigError(f"TFDS dataset {name!r} has no text feature {text_field!r}{choice} "
                          f"(features: {listing})")
    field = text_field if text_field in texts else texts[0]  # else: the only text feature
    stats.sources += 1
    for raw in tfds.as_numpy(dataset.map(lambda example: example[field])):
        yield _text_sentences(_decode_utf8(raw, stats))
