"""BERT tokenizers: SentencePiece vocabularies trained here, or released WordPiece vocab.txt files.

Both tokenize through one `tokenizers.Tokenizer` (Rust): a SentencePiece `.model` (SentencePiece
only trains) becomes a Unigram pipeline, so the data pipeline and the exported `tokenizer.json`
are the same tokenizer. Special tokens are atomic: "[MASK]" in a text is the [MASK] id.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tempfile
from collections.abc import Iterable

import numpy as np
import sentencepiece
import tokenizers
from etils import epath
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram, WordPiece

from bert_jax import files
from bert_jax.config import ConfigError

PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Training sees a random sample of at most this many sentences, bounding its memory (docs/data.md);
# sampled here: SentencePiece's own sample differs from run to run whatever its seed.
MAX_TRAINING_SENTENCES = 2_000_000
_SAMPLING_CHUNK = 1 << 16
# A corpus that supports fewer pieces than this is too small to fit a vocabulary to.
MIN_FITTED_VOCAB_SIZE = 100
_LARGEST_VOCAB_SIZE = re.compile(  # as SentencePiece's trainer says it
    r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")

_SPM = sentencepiece_model_pb2.ModelProto
# The SentencePiece options (of `train_sentencepiece`) the conversion to `tokenizers` reproduces.
_CONVERTIBLE_SPM_OPTIONS = {
    "trainer_spec": {"model_type": sentencepiece_model_pb2.TrainerSpec.UNIGRAM,
                     "byte_fallback": False, "treat_whitespace_as_suffix": False,
                     "split_by_whitespace": True},
    "normalizer_spec": {"name": "nmt_nfkc", "add_dummy_prefix": True,
                        "remove_extra_whitespaces": True, "escape_whitespaces": True},
}
_METASPACE = "▁"
_WORDPIECE_PREFIX = "##"

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
VOCAB_FILE = "vocab.txt"
SENTENCEPIECE_FILE = "tokenizer.model"
_SPECIAL_TOKENS_MAP = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS,
                       "sep_token": SEP, "mask_token": MASK}
# transformers 5 leaves token_type_ids out of a plain tokenizer.json's outputs unless told.
_MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def kept_file_name(vocabulary_file) -> str:
    """The name a vocabulary file is kept under beside data, workdirs and exports:
    `vocab.txt` (WordPiece) or `tokenizer.model` (SentencePiece)."""
    return VOCAB_FILE if str(vocabulary_file).endswith(".txt") else SENTENCEPIECE_FILE


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, model_path, *,
                        seed: int = 0, fit: bool = False,
                        corpus: str = "this corpus") -> epath.Path:
    """Trains a SentencePiece unigram model on a seeded sample of `sentences` (any size) and
    writes it whole to `model_path`. [PAD] [UNK] [CLS] [SEP] [MASK] are ids 0..4. A corpus too
    small for exactly `vocab_size` pieces raises, or with `fit` gets the largest vocabulary it
    supports (at least `MIN_FITTED_VOCAB_SIZE`: the model's size says which). `corpus` names
    the corpus in errors."""
    model_path = epath.Path(model_path)
    if model_path.suffix != ".model":
        raise ConfigError(f"{model_path}: a SentencePiece model path must end in .model")
    sample = _sample(sentences, MAX_TRAINING_SENTENCES, seed)
    if not sample:
        raise ConfigError(f"{corpus} has no text: expected text to train a SentencePiece "
                          f"vocabulary on")
    size = vocab_size
    for attempt in range(3):  # SentencePiece names the largest size; it fits at once
        try:
            model = _train_unigram(sample, size)
            break
        except RuntimeError as e:
            message = str(e).strip().splitlines()[-1]
            largest = _LARGEST_VOCAB_SIZE.search(message)
            if not (fit and largest and attempt < 2):
                raise ConfigError(f"cannot train a SentencePiece vocabulary of {size} pieces on "
                                  f"{corpus} ({message}): lower data.vocab_size or give a "
                                  f"larger corpus") from e
            size = int(largest.group(1))
            if size < MIN_FITTED_VOCAB_SIZE:
                raise ConfigError(f"{corpus} is too small: it supports a vocabulary of at most "
                                  f"{size} pieces, and bert-jax fits no fewer than "
                                  f"{MIN_FITTED_VOCAB_SIZE}: give a larger corpus") from None
    model_path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(model_path, model)
    return model_path


def _train_unigram(sample: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()  # no model_prefix: the model's bytes then do not depend on its path
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK,
        bos_id=-1, eos_id=-1, user_defined_symbols=[CLS, SEP, MASK],
        # A fixed thread count (SentencePiece's default): EM sums statistics per thread.
        input_sentence_size=0, num_threads=16, minloglevel=1)
    return model.getvalue()


def _sample(items: Iterable, k: int, seed: int) -> list:
    """A uniform random sample of at most `k` of `items`, in one pass (reservoir sampling,
    Algorithm R, drawing a chunk at a time)."""
    rng = np.random.default_rng(seed)
    items = iter(items)
    sample = list(itertools.islice(items, k))
    seen = len(sample)
    while chunk := list(itertools.islice(items, _SAMPLING_CHUNK)):
        # Item number n (from 0) replaces a uniform slot of [0, n] when that slot is a real one.
        slots = rng.integers(0, np.arange(seen + 1, seen + len(chunk) + 1))
        for i in np.flatnonzero(slots < k):
            sample[slots[i]] = chunk[i]
        seen += len(chunk)
    return sample


class Tokenizer:
    """A BERT tokenizer of `kind` "sentencepiece" or "wordpiece"; build it with `load_tokenizer`.
    `special_ids` ([PAD] [CLS] [SEP] [MASK]; not [UNK], which stands for real text) are never
    masked. `fingerprint` names the tokenizer in dataset metadata."""

    def __init__(self, backend: tokenizers.Tokenizer, *, kind: str, fingerprint: str,
                 hf_config: dict, hf_files: dict[str, bytes]):
        self._backend = backend
        self._hf_config = hf_config  # tokenizer_config.json entries particular to the kind
        self._hf_files = hf_files  # further files the export holds, name -> content
        self.kind = kind
        self.fingerprint = fingerprint
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            backend.token_to_id(token) for token in SPECIAL_TOKENS)
        self.special_ids = frozenset((self.pad_id, self.cls_id, self.sep_id, self.mask_id))

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint[:12]!r})")

    def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each text: its ids (int32, no [CLS]/[SEP]) and word-start flags (words: what the
        pre-tokenizer splits; for WordPiece also each punctuation mark and CJK character)."""
        results = []
        for encoding in self._backend.encode_batch(texts, add_special_tokens=False):
            # A token starts a word when its word id differs from the previous token's; no word
            # (None) is NaN, which differs from everything, so such a token is a word of its own.
            words = np.array(encoding.word_ids, np.float64)
            results.append((np.array(encoding.ids, np.int32), np.diff(words, prepend=np.nan) != 0))
        return results

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without [CLS]/[SEP]."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def id_to_token(self, ids) -> list[str]:
        ids = np.asarray(ids, np.int64).tolist()
        tokens = [self._backend.id_to_token(i) for i in ids]
        if None in tokens:
            raise ConfigError(f"id {ids[tokens.index(None)]} is outside the vocabulary of "
                              f"{self.vocab_size}")
        return tokens

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens shown (as `transformers` decodes by default)."""
        return self._backend.decode(np.asarray(ids, np.int64).tolist(), skip_special_tokens=False)

    def save_hf(self, out_dir, *, model_max_length: int | None = None) -> None:
        """Writes each file for `transformers.AutoTokenizer.from_pretrained(out_dir)` whole:
        tokenizer.json is this pipeline; WordPiece adds vocab.txt and names `BertTokenizer`,
        which `transformers` 5 rebuilds from it and `do_lower_case`."""
        out_dir = epath.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {**self._hf_config, **_SPECIAL_TOKENS_MAP, "model_input_names": _MODEL_INPUT_NAMES,
                  "clean_up_tokenization_spaces": False}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        contents = {TOKENIZER_FILE: self._backend.to_str(pretty=True).encode(),
                    TOKENIZER_CONFIG_FILE: _json_bytes(config),
                    SPECIAL_TOKENS_MAP_FILE: _json_bytes(_SPECIAL_TOKENS_MAP), **self._hf_files}
        for name, content in contents.items():
            files.write_atomically(out_dir / name, content)


def load_tokenizer(vocab_file, *, lowercase: bool = True) -> Tokenizer:
    """The tokenizer of a SentencePiece `.model` or a WordPiece `vocab.txt`. `lowercase` applies
    to WordPiece only (True: BERT-uncased); a SentencePiece model carries its own normalization."""
    path = epath.Path(vocab_file)
    try:
        content = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the vocabulary file {path}: {e}") from e
    # Content decides the kind, whatever the name: a SentencePiece model is never UTF-8 in
    # practice (each score is a float's raw bytes), while a vocab.txt is (a token a line).
    try:
        content.decode("utf-8")
        is_sentencepiece = False
    except UnicodeDecodeError:
        is_sentencepiece = path.suffix != ".txt"  # a broken vocab.txt stays one
    if is_sentencepiece:
        kind, backend = "sentencepiece", _sentencepiece_backend(path, content)
        hf_config, hf_files = {"tokenizer_class": "PreTrainedTokenizerFast"}, {}
    else:
        kind, backend = "wordpiece", _wordpiece_backend(path, content, lowercase)
        hf_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                     "strip_accents": None, "tokenize_chinese_chars": True}
        hf_files = {VOCAB_FILE: content}
    vocab = backend.get_vocab()
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ConfigError(f"the vocabulary {path} lacks {missing[0]}: expected all of "
                          f"{' '.join(SPECIAL_TOKENS)}")
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in SPECIAL_TOKENS])  # atomic in any text
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])])
    fingerprint = hashlib.sha256(
        f"{kind}\0{lowercase if kind == 'wordpiece' else ''}\0".encode() + content).hexdigest()
    return Tokenizer(backend, kind=kind, fingerprint=fingerprint, hf_config=hf_config,
                     hf_files=hf_files)


def _sentencepiece_backend(path: epath.Path, content: bytes) -> tokenizers.Tokenizer:
    """A Unigram pipeline encoding as SentencePiece does, but for the cases docs/data.md lists.
    NFKC first: `tokenizers` applies SentencePiece's character map a grapheme at a time, not by
    longest match, so without it "ｶﾞ", "ㄱㅏ" and decomposed accents normalize differently."""
    proto = _SPM()
    try:
        proto.ParseFromString(content)
    except Exception as e:  # protobuf raises its own DecodeError, not a ValueError
        raise ConfigError(f"{path} is not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise ConfigError(f"{path} is not a SentencePiece model: it has no pieces")
    for spec_name, options in _CONVERTIBLE_SPM_OPTIONS.items():
        spec = getattr(proto, spec_name)
        for option, expected in options.items():
            if getattr(spec, option) != expected:
                raise ConfigError(f"{path}: SentencePiece models with {spec_name}.{option}="
                                  f"{getattr(spec, option)!r} are not supported: expected "
                                  f"{expected!r}, as train_sentencepiece writes")
    backend = tokenizers.Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces],
                                           unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex(r"\A | \z"), "")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE,
                                                     prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    # SentencePiece matches its other user-defined symbols atomically too.
    backend.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces
                        if p.type == _SPM.SentencePiece.USER_DEFINED
                        and p.piece not in SPECIAL_TOKENS])
    return backend


def _wordpiece_backend(path: epath.Path, content: bytes, lowercase: bool) -> tokenizers.Tokenizer:
    """The pipeline of `transformers.BertTokenizerFast` for this vocabulary and casing."""
    # `tokenizers` parses vocabularies from local files only; `path` may be a URL.
    with tempfile.TemporaryDirectory() as tmp:
        local = epath.Path(tmp) / VOCAB_FILE
        local.write_bytes(content)
        try:
            vocab = WordPiece.read_file(str(local))
        except Exception as e:  # tokenizers raises a bare Exception on undecodable files
            raise ConfigError(f"cannot read the WordPiece vocabulary {path}: {e}") from e
    if vocab and max(vocab.values()) + 1 != len(vocab):
        raise ConfigError(f"{path} repeats tokens: {max(vocab.values()) + 1} lines hold "
                          f"{len(vocab)} distinct tokens, so ids would not match lines")
    backend = tokenizers.Tokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100,
                                             continuing_subword_prefix=_WORDPIECE_PREFIX))
    # strip_accents=None follows `lowercase`: BERT-uncased strips accents, cased keeps them.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix=_WORDPIECE_PREFIX)
    return backend


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()

