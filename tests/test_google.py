"""google-research/bert's TensorFlow checkpoints against the graph that wrote them, the oracle:
modeling.py, run_pretraining.py's heads and optimization.py of the `bert-tensorflow` package,
run under tf.compat.v1. bert-jax must read the same model, and `bert-jax convert` must write it
for `transformers`."""

import ast
import dataclasses
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers
from bert import optimization

import bert_jax
from bert_jax.config import MODEL_RUN_SETTINGS

v1 = tf.compat.v1
BERT_SOURCES = Path(importlib.util.find_spec("bert").origin).parent
# Odd sizes nobody would pick, so a transposed or swapped tensor cannot fit by accident.
CONFIG = dict(vocab_size=99, hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [c + v + e for c in "bdfgklmnprst" for v in "aeiou" for e in "nst"]
VOCAB = [*SPECIALS, *WORDS][:CONFIG["vocab_size"]]
BATCH, LENGTH = 3, 11
HEADS = ("gather_indexes", "get_masked_lm_output", "get_next_sentence_output")
# float32 on either side agrees to ~2e-6; LayerNorm's epsilon 1e-5 instead of modeling.py's
# 1e-12 moves these logits by ~1e-4, exact GELU instead of its tanh approximation by ~1e-3.
TOLERANCE = dict(rtol=1e-5, atol=2e-5)


def _layer_norm(inputs, begin_norm_axis=-1, begin_params_axis=-1, scope=None):
    """tf.contrib.layers.layer_norm (TF 1.x, gone in TF 2) as modeling.py calls it: over the
    last axis, variables `LayerNorm/beta` and `LayerNorm/gamma`, epsilon 1e-12."""
    assert begin_norm_axis == begin_params_axis == -1
    with v1.variable_scope(scope, default_name="LayerNorm"):
        shape = inputs.shape[-1:]
        beta = v1.get_variable("beta", shape, initializer=v1.zeros_initializer())
        gamma = v1.get_variable("gamma", shape, initializer=v1.ones_initializer())
        mean, variance = v1.nn.moments(inputs, [inputs.shape.rank - 1], keep_dims=True)
        return v1.nn.batch_normalization(inputs, mean, variance, offset=beta, scale=gamma,
                                         variance_epsilon=1e-12)


def _dense(inputs, units, activation=None, kernel_initializer=None, name=None):
    """tf.layers.dense (Keras 2's, refused under Keras 3) on the [batch, width] inputs the
    pooler and the MLM transform give it: variables `dense/kernel` [width, units], `dense/bias`."""
    with v1.variable_scope(name, default_name="dense"):
        kernel = v1.get_variable("kernel", [inputs.shape[-1], units],
                                 initializer=kernel_initializer)
        bias = v1.get_variable("bias", [units], initializer=v1.zeros_initializer())
        outputs = v1.nn.bias_add(v1.matmul(inputs, kernel), bias)
    return outputs if activation is None else activation(outputs)


class _CompatV1:
    """`tf` as the reference sees it: tf.compat.v1, with `tf.layers.dense` back."""

    layers = types.SimpleNamespace(dense=_dense)

    def __getattr__(self, name):
        return getattr(v1, name)


def _reference_code():
    """modeling.py, importable under TF 2 with `tensorflow.contrib` shimmed, and
    run_pretraining.py's head functions, compiled from its source without its module body
    (whose flags clash with create_pretraining_data.py's, which test_instances imports)."""
    contrib = types.ModuleType("tensorflow.contrib")
    contrib.layers = types.SimpleNamespace(layer_norm=_layer_norm)
    spec = importlib.util.spec_from_file_location("google_bert_modeling",
                                                  BERT_SOURCES / "modeling.py")
    modeling = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorflow.contrib", contrib)
        spec.loader.exec_module(modeling)
    modeling.tf = _CompatV1()
    source = BERT_SOURCES / "run_pretraining.py"
    functions = [node for node in ast.parse(source.read_text()).body
                 if isinstance(node, ast.FunctionDef) and node.name in HEADS]
    assert {f.name for f in functions} == set(HEADS)
    heads = {"tf": modeling.tf, "modeling": modeling}
    exec(compile(ast.Module(functions, type_ignores=[]), str(source), "exec"), heads)
    return modeling, heads


def _inputs():
    """A padded batch: row 0 full, rows 1 and 2 padded; token types as in [CLS] A [SEP] B."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CONFIG["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types_ = np.zeros((BATCH, LENGTH), np.int32)
    types_[0, 5:] = 1
    types_[1, 3:7] = 1
    return ids, types_, mask


def _random_value(variable, rng):
    """Every weight random, LayerNorm's and the biases too (the initializer leaves them 1 and
    0, where a swap would hide); std 0.2 rather than 0.02 so attention is far from uniform."""
    shape = variable.shape.as_list()
    noise = 0.2 * rng.standard_normal(shape).astype(np.float32)
    return 1 + noise if variable.op.name.endswith("/gamma") else noise


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference graph, its outputs and two checkpoint directories: `released` (weights
    only, `bert_model.ckpt`, as Google released them, with vocab.txt) and `trained` (after one
    step of run_pretraining.py's optimizer: `model.ckpt-1` with `global_step` and the Adam
    slots, as its Estimator saves them). Built in its own graph: eager mode stays on globally."""
    modeling, heads = _reference_code()
    config = modeling.BertConfig(**CONFIG)
    assert config.hidden_act == "gelu"
    ids, types_, mask = _inputs()
    root = tmp_path_factory.mktemp("google")
    released, trained = root / "released", root / "trained"
    for directory in released, trained:
        directory.mkdir()
        (directory / "bert_config.json").write_text(config.to_json_string())
    (released / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    rng = np.random.default_rng(0)
    with tf.Graph().as_default(), v1.Session() as session:
        model = modeling.BertModel(config, is_training=False, input_ids=v1.constant(ids),
                                   input_mask=v1.constant(mask),
                                   token_type_ids=v1.constant(types_))
        every_position = np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1))
        mlm_loss, _, mlm_log_probs = heads["get_masked_lm_output"](
            config, model.get_sequence_output(), model.get_embedding_table(),
            v1.constant(every_position), v1.constant(ids), v1.constant(mask.astype(np.float32)))
        nsp_loss, _, nsp_log_probs = heads["get_next_sentence_output"](
            config, model.get_pooled_output(), v1.constant([0, 1, 0]))
        # The heads return log-softmaxes; compare the logits they were taken of.
        assert mlm_log_probs.op.type == nsp_log_probs.op.type == "LogSoftmax"
        outputs = {"sequence": model.get_sequence_output(),
                   "pooled": model.get_pooled_output(),
                   "mlm": v1.reshape(mlm_log_probs.op.inputs[0], [BATCH, LENGTH, -1]),
                   "nsp": nsp_log_probs.op.inputs[0]}
        weights = v1.trainable_variables()
        train_op = optimization.create_optimizer(mlm_loss + nsp_loss, 1e-2, 10, 0, False)
        session.run(v1.global_variables_initializer())
        session.run([w.assign(_random_value(w, rng)) for w in weights])
        v1.train.Saver(weights).save(session, str(released / "bert_model.ckpt"))
        before = session.run(outputs)
        session.run(train_op)
        v1.train.Saver().save(session, str(trained / "model.ckpt"),
                              global_step=v1.train.get_global_step())
        after = session.run(outputs)
    return types.SimpleNamespace(released=released, trained=trained, inputs=(ids, types_, mask),
                                 before=before, after=after)


def _bert_jax(*args):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=300)


def _assert_same_logits(mlm, nsp, expected, mask):
    """MLM logits at every real (non-padding) position, NSP logits of every row."""
    real = mask.astype(bool)
    np.testing.assert_allclose(mlm[real], expected["mlm"][real], **TOLERANCE)
    np.testing.assert_allclose(nsp, expected["nsp"], **TOLERANCE)


def test_load_reads_the_reference_graph_of_a_released_checkpoint(reference):
    ids, types_, mask = reference.inputs
    pretrained = bert_jax.load(reference.released)
    sequence, pooled = pretrained.model().encode(ids, types_, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(sequence)[real], reference.before["sequence"][real],
                               **TOLERANCE)
    np.testing.assert_allclose(np.asarray(pooled), reference.before["pooled"], **TOLERANCE)
    _assert_same_logits(*pretrained.logits(ids, types_, mask), reference.before, mask)


def test_a_run_pretraining_checkpoint_loads_without_its_optimizer_state(reference):
    """`model.ckpt-1` (found through the `checkpoint` file) holds the step's weights beside
    `global_step` and Adam slots of the same shapes: the weights must be the ones read."""
    ids, types_, mask = reference.inputs
    saved = dict(tf.train.list_variables(str(reference.trained / "model.ckpt-1")))
    assert "global_step" in saved
    word_embeddings = [CONFIG["vocab_size"], CONFIG["hidden_size"]]
    assert (saved["bert/embeddings/word_embeddings/adam_m"] ==
            saved["bert/embeddings/word_embeddings"] == word_embeddings)
    assert np.abs(reference.after["mlm"] - reference.before["mlm"]).max() > 0.01
    _assert_same_logits(*bert_jax.load(reference.trained).logits(ids, types_, mask),
                        reference.after, mask)


def test_convert_writes_a_transformers_model_of_the_same_logits(reference, tmp_path):
    ids, types_, mask = reference.inputs
    out = tmp_path / "hf"
    result = _bert_jax("convert", f"--from={reference.released}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    model = transformers.BertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       token_type_ids=torch.tensor(types_, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long))
    _assert_same_logits(logits.prediction_logits.numpy(),
                        logits.seq_relationship_logits.numpy(), reference.before, mask)
    words = [WORDS[7], WORDS[0], WORDS[93], WORDS[41]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sentence = f"{words[0].capitalize()} {words[1]} {words[2].upper()} {words[3]}"
    assert tokenizer(sentence)["input_ids"] == [VOCAB.index("[CLS]"),
                                                *map(VOCAB.index, words),
                                                VOCAB.index("[SEP]")]


def test_a_config_without_a_checkpoint_is_refused(reference, tmp_path):
    source = tmp_path / "no_checkpoint"
    source.mkdir()
    (source / "bert_config.json").write_text((reference.released / "bert_config.json")
                                             .read_text())
    with pytest.raises(ValueError, match=r"bert_model\.ckpt\.index"):
        bert_jax.load(source)
    out = tmp_path / "hf"
    result = _bert_jax("convert", f"--from={source}", f"--out={out}")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"bert-jax convert: error: {source} has bert_config.json but no ")
    assert "bert_model.ckpt.index" in line
    assert not out.exists()


@pytest.mark.slow
def test_pretraining_starts_from_a_google_checkpoint(reference, tmp_path):
    """One step of `bert-jax pretrain` from the released directory: the warmup's first rate is
    0, so the weights after it are Google's; architecture, activation and tokenizer follow."""
    from pretrain_runs import pretrain

    run = tmp_path / "run"
    result = pretrain(run, [f"--config.train.init={reference.released}",
                            f"--config.data.data_dir={tmp_path / 'data'}",
                            "--config.data.max_seq_length=32",  # the config's 40 positions
                            "--config.data.max_predictions_per_seq=5",
                            "--config.train.num_steps=1", "--config.train.global_batch_size=8"])
    assert result.returncode == 0, result.stderr
    assert f"starting from the Google weights of {reference.released}\n" in result.stdout
    trained, released = bert_jax.load(run), bert_jax.load(reference.released)
    architecture = [{k: v for k, v in dataclasses.asdict(m.config).items()
                     if k not in MODEL_RUN_SETTINGS} for m in (trained, released)]
    assert architecture[0] == architecture[1] and trained.config.hidden_act == "gelu_tanh"
    jax.tree.map(np.testing.assert_array_equal, trained.params, released.params)
    assert (run / "export" / "vocab.txt").read_text() == "\n".join(VOCAB) + "\n"
