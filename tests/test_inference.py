"""fill-mask: guesses shown as text, as the `transformers` pipeline shows them; the end-of-run
probe on a sentence of the run's own validation split; exports that fine-tune with dropout."""

import json
import re

import numpy as np
import pytest

import bert_jax
from bert_jax import export, inference, workdir as workdirs
from bert_jax import tokenizer as tokenization
from bert_jax.config import preset
from bert_jax.model import create
from bert_jax.pretrained import Pretrained, load_params

WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
             "dog", "##s", "##ing", ".", "a"]
SENTENCES = ["The cat sat on the mat.", "A dog sat on a mat.", "The cats are sitting.",
             "Dogs and cats sat on mats all day.", "The mat is on the floor of the room."] * 20


@pytest.fixture(params=["wordpiece", "sentencepiece"])
def model_dir(request, tmp_path):
    """A folder holding a vocabulary, as a workdir does, and a tiny random model for it."""
    folder = tmp_path / "workdir"
    folder.mkdir()
    if request.param == "wordpiece":
        (folder / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    else:
        tokenization.train_sentencepiece(SENTENCES, 30, folder / "tokenizer.model")
    tokenizer = workdirs.load_tokenizer_of(folder, lowercase=True)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, num_layers=1,
                    hidden_dropout_rate=0.0)
    return Pretrained.from_model(create(config)), folder, tokenizer


def test_guesses_are_text_as_the_transformers_fill_mask_pipeline_shows(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    pretrained, folder, tokenizer = model_dir
    out = export.write_export(pretrained, folder, tmp_path / "export", lowercase=True)
    text = "the cat sat on the [MASK]."
    ours = inference.fill_mask(pretrained, tokenizer, text, top_k=tokenizer.vocab_size)[0]
    pipeline = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out),
                                     device="cpu")
    theirs = pipeline(text, top_k=tokenizer.vocab_size)
    assert [token for token, _ in ours] == [guess["token_str"] for guess in theirs]
    np.testing.assert_allclose([p for _, p in ours], [g["score"] for g in theirs], atol=1e-5)
    shown = {token for token, _ in ours}
    assert not any("▁" in token for token in shown)  # SentencePiece's word marker
    if tokenizer.kind == "wordpiece":
        assert {"##s", "cat"} <= shown  # a continuation stays one, as the pipeline shows it


def test_the_probe_masks_the_middle_one_token_word_of_the_first_fitting_sentence(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    tokenizer = workdirs.load_tokenizer_of(tmp_path, lowercase=True)
    segments = [tokenizer.encode("Cats."),  # too short
                tokenizer.encode("The cats sat on the mat."), tokenizer.encode("A cat sat.")]
    text, word = inference.masked_sentence(tokenizer, segments)
    assert text.replace("[MASK]", word) == "the cats sat on the mat."
    # The one-token words of letters ("cats" is two) nearest the middle of 6: "sat", "on".
    assert (text, word) == ("the cats [MASK] on the mat.", "sat")
    assert inference.masked_sentence(tokenizer, segments) == (text, word)  # deterministic
    assert inference.masked_sentence(tokenizer, segments[:1]) is None


@pytest.mark.slow
def test_the_end_of_run_probe_is_a_validation_sentence_shown_as_text(straight_run):
    from bert_jax.data import dataset

    workdir, data_dir, stdout = straight_run
    line = next(line for line in stdout.splitlines() if "fill-mask" in line)
    found = re.fullmatch(r"  fill-mask \(validation\): '(.*)', masked '(\w+)' -> (.*)", line)
    assert found, line
    text, word, guesses = found.groups()
    assert "Python lists" not in text and text.count("[MASK]") == 1
    assert len(re.findall(r"\(\d\.\d\d\)", guesses)) == 5 and "▁" not in guesses
    prepared = dataset.open_prepared(next(data_dir.glob("bert_pretraining/*/*/dataset_info.json"))
                                     .parent)
    tokenizer = workdirs.load_tokenizer_of(workdir)
    first = [tokenizer.decode(ids) for ids in inference.validation_segments(prepared, 16)]
    assert any(text.replace("[MASK]", word) in " ".join(segment.split()) for segment in first)


def test_an_export_fine_tunes_with_dropout_and_records_the_pretrainings(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "workdir"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    config = preset("tiny", vocab_size=len(WORDPIECE), num_layers=1, hidden_dropout_rate=0.0,
                    attention_dropout_rate=0.0)
    pretrained = Pretrained.from_model(create(config))
    out = export.write_export(pretrained, folder, tmp_path / "export", lowercase=True)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["hidden_dropout_prob"] == hf_config["attention_probs_dropout_prob"] == 0.1
    assert transformers.BertConfig.from_pretrained(out).hidden_dropout_prob == 0.1
    assert export.read_marker(out)["trained_with_dropout"] == {
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    ids = np.array([[2, 5, 6, 4, 9, 3]])
    loaded = bert_jax.load(out)  # dropout is off at inference: the same logits
    for ours, theirs in zip(loaded.logits(ids), pretrained.logits(ids)):
        np.testing.assert_array_equal(ours, theirs)
    _, params, missing = load_params(out)  # as a run's train.init re-imports it
    assert missing == ()
    for a, b in zip(*(jax_leaves(p) for p in (params, pretrained.params))):
        np.testing.assert_array_equal(a, b)
    kept = export.write_export(pretrained, folder, tmp_path / "as-trained", lowercase=True,
                               dropout=None)
    assert json.loads((kept / "config.json").read_text())["hidden_dropout_prob"] == 0.0


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.parametrize("args", [["eval"], ["export", "--out=out"], ["fill-mask", "a [MASK]"]])
def test_commands_read_the_workdir_pretrain_writes_by_default(tmp_path, args):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"bert-jax {args[0]}: error: runs/default does not exist"), line
    assert list(tmp_path.iterdir()) == []  # nothing written
    usage = subprocess.run([sys.executable, "-m", "bert_jax.cli", args[0], "--help"],
                           capture_output=True, text=True, timeout=300).stdout
    assert "(default runs/default)" in " ".join(usage.split())
