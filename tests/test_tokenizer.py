"""Tokenizers: SentencePiece training and parity, WordPiece parity, the Hugging Face export.

The oracles are the outside libraries: `sentencepiece` itself for the vocabularies trained
here, `transformers.BertTokenizerFast` for WordPiece vocab.txt files, and
`transformers.AutoTokenizer` on what `save_hf` writes.
"""

import inspect
import json
import random
import re
import shutil
import textwrap
import unicodedata

import numpy as np
import pytest
import sentencepiece
import tokenizers
import transformers

from bert_jax.tokenizer import SPECIAL_TOKENS, _sample, load_tokenizer, train_sentencepiece

_SUBJECTS = ("the engineer", "a small dog", "our neighbours", "Marie", "the committee",
             "every student", "the old lighthouse keeper", "two researchers", "my sister",
             "the Zürich office", "a naïve tourist", "the café owner")
_VERBS = ("measured", "painted", "discovered", "believed in", "carried", "ordered",
          "was unable to find", "forgot", "counted", "described", "repaired",
          "was capable of moving")
_OBJECTS = ("bridges", "apples", "wavelengths in ångströms", "boats", "letters", "mountains",
            "résumés", "trains", "questions", "windows", "numbers",
            "unbelievably long rivers")
_ENDINGS = (".", "!", "?", ", again.", " (twice).", " in 1999.", "; nobody knew why.",
            " at 3:45 p.m.", " [sic].", " near São Paulo.")
# Repeated so that SentencePiece keeps their characters (it drops the rarest 0.05%).
_OTHER_SCRIPTS = ("漢字 日本語 テスト ガギ パピ", "한국어 가나다 텍스트", "Tiếng Việt có dấu người được")

# Texts on which the export must give exactly our ids.
TRICKY_TEXTS = (
    "Café, naïve, Ångström", "CAFÉ NAÏVE résumé", "漢字 日本語", "🙂👍🏽 emoji", "3.14159",
    "2026-11-23 at 10:30", '"Hello, world!" (x) [y] {z} ...',
    " leading\tand\n\ntrailing  \r\n", "", "   ", "[MASK] in [CLS] the [SEP] text [PAD][UNK]",
    "[mask] is not special",
    "unbelievable", "x" * 150, "ｶﾞｷﾞ ㄱㅏ ①", "\x00control\ufffd chars\u200b", "a\u00a0b\u3000c")


def _sentences(seed, count):
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.randint(2, 999)} "
            f"{rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}" for _ in range(count)]


@pytest.fixture(scope="module")
def corpus():
    """Templated sentences, other scripts, and the prose of a few stdlib docstrings."""
    docs = [inspect.getdoc(obj) for module in (json, textwrap, random, inspect)
            for obj in (module, *vars(module).values()) if callable(obj) or obj is module]
    lines = [line.strip() for doc in docs if doc for line in doc.splitlines()]
    return _sentences(0, 600) + list(_OTHER_SCRIPTS) * 20 + [line for line in lines if line]


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    return train_sentencepiece(corpus, 400, tmp_path_factory.mktemp("sp") / "sp.model")


@pytest.fixture(scope="module")
def wp_vocab(corpus, tmp_path_factory):
    """A vocab.txt trained by `tokenizers` (cased, so both casings find their pieces)."""
    trainer = tokenizers.BertWordPieceTokenizer(lowercase=False, strip_accents=False)
    trainer.train_from_iterator(corpus, vocab_size=500, special_tokens=list(SPECIAL_TOKENS),
                                show_progress=False)
    out = tmp_path_factory.mktemp("wp")
    trainer.save_model(str(out))
    return out / "vocab.txt"


@pytest.fixture(scope="module", params=["sentencepiece", "wordpiece-uncased", "wordpiece-cased"])
def any_tokenizer(request, sp_model, wp_vocab):
    if request.param == "sentencepiece":
        return load_tokenizer(sp_model)
    return load_tokenizer(wp_vocab, lowercase=request.param == "wordpiece-uncased")


def test_sentencepiece_vocabulary_has_the_special_tokens_at_fixed_ids(sp_model):
    tok = load_tokenizer(sp_model)
    assert tok.kind == "sentencepiece"
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.id_to_token(range(5)) == list(SPECIAL_TOKENS)
    assert tok.special_ids == {0, 2, 3, 4}
    proto = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert [proto.id_to_piece(i) for i in range(5)] == list(SPECIAL_TOKENS)


def test_special_tokens_are_atomic(any_tokenizer):
    tok = any_tokenizer
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token) == [i]
    ids = tok.encode("before [MASK]after [SEP] end")
    assert ids.count(tok.mask_id) == 1 and ids.count(tok.sep_id) == 1
    assert tok.mask_id not in tok.encode("[mask] [ MASK ]")


def test_encode_matches_sentencepiece_itself(sp_model, corpus):
    tok, reference = load_tokenizer(sp_model), sentencepiece.SentencePieceProcessor(
        model_file=str(sp_model))
    unseen = _sentences(1, 300)
    for text in unseen:
        assert tok.encode(text) == reference.encode(text), text
    for text in corpus:
        ids, expected = tok.encode(text), reference.encode(text)
        # Runs such as "-----" can be cut into the same pieces in several orders of equal
        # score; each library breaks that tie its own way.
        assert ids == expected or sorted(ids) == sorted(expected), text
    assert tok.decode(tok.encode(unseen[0])) == unseen[0]


def test_normalization_matches_sentencepiece_where_graphemes_mislead_tokenizers(sp_model):
    # SentencePiece maps halfwidth katakana with sound marks, compatibility jamo and decomposed
    # accents over several characters, where `tokenizers` alone maps grapheme by grapheme;
    # U+0085 is whitespace to Rust but not to SentencePiece.
    tok, reference = load_tokenizer(sp_model), sentencepiece.SentencePieceProcessor(
        model_file=str(sp_model))
    texts = ["ｶﾞｷﾞ ﾊﾟﾋﾟ", "ㄱㅏ ㄴㅏ", unicodedata.normalize("NFD", _OTHER_SCRIPTS[2]),
             unicodedata.normalize("NFD", "한국어 가나다")]
    for text in texts:
        assert tok.unk_id not in tok.encode(text), f"{text}: no pieces for it, test is moot"
    for text in texts + ["ends in a next-line control\x85"]:
        assert tok.encode(text) == reference.encode(text), text


def test_training_is_deterministic_and_independent_of_the_path(sp_model, corpus, tmp_path):
    again = train_sentencepiece(corpus, 400, tmp_path / "elsewhere" / "again.model")
    assert again.read_bytes() == sp_model.read_bytes()
    assert load_tokenizer(again).fingerprint == load_tokenizer(sp_model).fingerprint
    from_generator = train_sentencepiece((text for text in corpus), 400, tmp_path / "g.model")
    assert from_generator.read_bytes() == sp_model.read_bytes()


def test_training_sample_is_uniform_and_fixed_by_the_seed():
    sample = _sample(iter(range(100_000)), 1000, seed=0)
    assert sample == _sample(range(100_000), 1000, seed=0)
    assert sample != _sample(range(100_000), 1000, seed=1)
    assert len(set(sample)) == 1000 and set(sample) <= set(range(100_000))
    assert abs(np.mean(sample) - 50_000) < 5 * 28_868 / 1000 ** 0.5  # 5 standard errors
    assert _sample(["a", "b"], 1000, seed=0) == ["a", "b"]
    first_kept = sum(_sample(["a", "b"], 1, seed=seed) == ["a"] for seed in range(400))
    assert 150 < first_kept < 250  # each of two items is kept half the time


def test_training_rejects_a_vocabulary_the_corpus_cannot_fill(corpus, tmp_path):
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece(corpus[:50], 5000, tmp_path / "big.model")
    with pytest.raises(ValueError, match="must end in .model"):
        train_sentencepiece(corpus, 400, tmp_path / "sp.bin")
    assert not list(tmp_path.iterdir())


def test_export_gives_the_same_ids_in_transformers(any_tokenizer, corpus, tmp_path):
    tok = any_tokenizer
    tok.save_hf(tmp_path, model_max_length=128)
    expected_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    if tok.kind == "wordpiece":
        expected_files.add("vocab.txt")
    assert {p.name for p in tmp_path.iterdir()} == expected_files  # no temporary files left
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == 128
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id,
            hf.mask_token_id) == (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)
    cls, sep = tok.cls_id, tok.sep_id
    texts = list(TRICKY_TEXTS) + corpus[:50]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == [cls, *ids, sep], text
        assert hf.decode(ids) == tok.decode(ids), text
    # transformers takes an empty second text for no second text.
    for a, b in [(a, b) for a, b in zip(texts, reversed(texts)) if b]:
        a_ids, b_ids = tok.encode(a), tok.encode(b)
        pair = hf(a, b)
        assert pair["input_ids"] == [cls, *a_ids, sep, *b_ids, sep], (a, b)
        assert pair["token_type_ids"] == [0] * (len(a_ids) + 2) + [1] * (len(b_ids) + 1)


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_matches_bert_tokenizer_fast(wp_vocab, corpus, tmp_path, lowercase):
    shutil.copy(wp_vocab, tmp_path / "vocab.txt")  # the directory holds only the vocabulary
    reference = transformers.BertTokenizerFast.from_pretrained(tmp_path, do_lower_case=lowercase)
    tok = load_tokenizer(wp_vocab, lowercase=lowercase)
    assert tok.kind == "wordpiece" and tok.vocab_size == len(reference)
    for text in list(TRICKY_TEXTS) + corpus[:100]:
        assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
    assert tok.id_to_token(tok.encode("Café")) == reference.tokenize("Café")


def test_lowercase_lowercases_and_strips_accents(wp_vocab):
    uncased = load_tokenizer(wp_vocab, lowercase=True)
    cased = load_tokenizer(wp_vocab, lowercase=False)
    assert uncased.encode("CAFÉ Résumé") == uncased.encode("cafe resume")
    assert cased.encode("CAFÉ Résumé") != cased.encode("cafe resume")
    assert cased.decode(cased.encode("Café")) == "Café"


def test_word_starts_mark_the_first_piece_of_each_word(any_tokenizer):
    tok = any_tokenizer
    [(ids, starts)] = tok.encode_batch(["unbelievable"])
    assert len(ids) > 1, "the word should be split into pieces for this test to mean anything"
    assert starts.tolist() == [True] + [False] * (len(ids) - 1)
    texts = ["unbelievable rivers", "Apples [MASK][MASK] trains", "", "  "]
    for text, (ids, starts) in zip(texts, tok.encode_batch(texts)):
        assert ids.dtype == np.int32 and starts.dtype == bool and ids.shape == starts.shape
        assert ids.tolist() == tok.encode(text)
    (_, starts), (ids, masked_starts) = tok.encode_batch(texts[:2])
    assert starts.sum() == 2 and starts[0]
    masks = ids == tok.mask_id
    assert masks.sum() == 2 and masked_starts[masks].all()
    assert masked_starts[np.flatnonzero(masks)[-1] + 1]  # the word after [MASK] starts anew
    assert masked_starts.sum() == 4


def test_the_kind_follows_the_content_not_the_name(sp_model, wp_vocab, tmp_path):
    shutil.copy(sp_model, tmp_path / "spm.bin")
    shutil.copy(wp_vocab, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path / "spm.bin").kind == "sentencepiece"
    assert load_tokenizer(tmp_path / "tokenizer.model").kind == "wordpiece"


def test_fingerprint_follows_vocabulary_content_and_lowercase(wp_vocab, sp_model, tmp_path):
    uncased = load_tokenizer(wp_vocab, lowercase=True).fingerprint
    copy = tmp_path / "copy.txt"
    shutil.copy(wp_vocab, copy)
    assert load_tokenizer(copy, lowercase=True).fingerprint == uncased
    assert load_tokenizer(wp_vocab, lowercase=False).fingerprint != uncased
    copy.write_text(wp_vocab.read_text(encoding="utf-8") + "zebra\n", encoding="utf-8")
    assert load_tokenizer(copy, lowercase=True).fingerprint != uncased
    assert len(uncased) == 64 and int(uncased, 16) >= 0
    # SentencePiece models carry their own normalization: the flag does not apply to them.
    assert (load_tokenizer(sp_model, lowercase=False).fingerprint
            == load_tokenizer(sp_model, lowercase=True).fingerprint)


def test_bad_vocabulary_files_raise_value_errors_naming_them(wp_vocab, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    without_mask = tmp_path / "vocab.txt"
    lines = wp_vocab.read_text(encoding="utf-8").splitlines(keepends=True)
    without_mask.write_text("".join(line for line in lines if line != "[MASK]\n"),
                            encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks \[MASK\]") as error:
        load_tokenizer(without_mask)
    assert str(without_mask) in str(error.value)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        load_tokenizer(corrupt)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)
