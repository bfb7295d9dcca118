"""Parity with Hugging Face `transformers.BertForPreTraining` (PyTorch), the outside oracle."""

import json
import pickle
import re

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import bert_jax
from bert_jax import hf
from bert_jax.config import PRESETS, ConfigError, ModelConfig, preset
from bert_jax.model import create
from bert_jax.pretrained import Pretrained, param_shapes


def _random_hf_config(seed):
    """An odd-sized BERT config: sizes nobody would pick, to catch layout mistakes."""
    rng = np.random.default_rng(seed)
    heads = int(rng.integers(1, 5))
    return transformers.BertConfig(
        vocab_size=int(rng.integers(40, 160)), hidden_size=heads * int(rng.integers(3, 10)),
        num_hidden_layers=int(rng.integers(1, 4)), num_attention_heads=heads,
        intermediate_size=int(rng.integers(5, 50)), max_position_embeddings=int(rng.integers(20, 70)),
        type_vocab_size=int(rng.integers(1, 4)), layer_norm_eps=float(rng.choice([1e-12, 1e-5])),
        hidden_act=str(rng.choice(["gelu", "gelu_new", "gelu_pytorch_tanh"])))


def _inputs(config, seed, batch=3, length=19):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, length))
    types = rng.integers(0, config.type_vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, length // 2:] = 0
    mask[2, length - 3:] = 0
    return ids, types, mask


def _hf_logits(model, ids, types, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                    attention_mask=torch.tensor(mask))
    return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


def _assert_logits_equal(ours, theirs, mask):
    real = mask.astype(bool)  # padded positions' outputs are meaningless on both sides
    assert np.abs(ours[0] - theirs[0])[real].max() <= 1e-4
    assert np.abs(ours[1] - theirs[1]).max() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hugging_face_weights_import_with_equal_logits(tmp_path, seed):
    torch.manual_seed(seed)
    hf_config = _random_hf_config(seed)
    hf_model = transformers.BertForPreTraining(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    ids, types, mask = _inputs(hf_config, seed)
    loaded = bert_jax.load(tmp_path)
    assert loaded.config.num_layers == hf_config.num_hidden_layers
    _assert_logits_equal(loaded.logits(ids, types, mask), _hf_logits(hf_model, ids, types, mask),
                         mask)


@pytest.mark.parametrize("seed", [10, 11])
def test_our_weights_export_with_equal_logits(tmp_path, seed):
    hf_config = _random_hf_config(seed)
    config = hf.config_from_hf(hf_config.to_dict())
    ours = Pretrained.from_model(create(config, seed=seed))
    ours.save_hf(tmp_path)
    hf_model = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    ids, types, mask = _inputs(hf_config, seed)
    _assert_logits_equal(ours.logits(ids, types, mask), _hf_logits(hf_model, ids, types, mask),
                         mask)
    # The round trip through the file is exact.
    again = bert_jax.load(tmp_path)
    for path, value in hf.flatten(ours.params).items():
        np.testing.assert_array_equal(hf.flatten(again.params)[path], value)


@pytest.mark.parametrize("act, hf_act", [("gelu", "gelu"), ("gelu_tanh", "gelu_new")])
def test_config_round_trips_through_config_json(act, hf_act):
    config = ModelConfig(vocab_size=77, hidden_size=18, num_layers=2, num_heads=3,
                         intermediate_size=29, max_position_embeddings=50, type_vocab_size=4,
                         hidden_dropout_rate=0.2, attention_dropout_rate=0.05,
                         layer_norm_eps=1e-6, initializer_range=0.03, hidden_act=act)
    values = hf.config_to_hf(config)
    assert hf.config_from_hf(values) == config
    hf_config = transformers.BertConfig(**values)
    assert (hf_config.hidden_act, hf_config.num_hidden_layers) == (hf_act, 2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_equal_hugging_face(name):
    config = preset(name)
    with torch.device("meta"):  # counts shapes without allocating
        hf_model = transformers.BertForPreTraining(transformers.BertConfig(**hf.config_to_hf(config)))
    hf_count = sum(p.numel() for p in hf_model.parameters())
    ours = sum(int(np.prod(shape)) for shape in param_shapes(config).values())
    assert ours == hf_count


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small HF directory and its tensors, for the bad-input tests."""
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.BertForPreTraining(_random_hf_config(5)).save_pretrained(path)
    return path, load_file(path / hf.WEIGHTS_FILE)


def _write(path, tensors, config_json):
    path.mkdir()
    save_file(tensors, path / hf.WEIGHTS_FILE)
    (path / hf.CONFIG_FILE).write_text(config_json)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop("bert.pooler.dense.weight"), ["missing", "'bert.pooler.dense.weight'"]),
    (lambda t: t.update({"bert.extra.weight": np.zeros((2, 3), np.float32)}),
     ["unexpected", "'bert.extra.weight'", "(2, 3)"]),
    (lambda t: t.update({"cls.predictions.bias": np.zeros((7,), np.float32)}),
     ["'cls.predictions.bias'", "(7,)", "expected ("]),
    (lambda t: t.update({"bert.encoder.layer.0.attention.self.key.weight":
                         np.zeros((1, 2), np.float32)}),
     ["'bert.encoder.layer.0.attention.self.key.weight'", "(1, 2)"]),
    (lambda t: t.update({"cls.predictions.decoder.weight":
                         t["bert.embeddings.word_embeddings.weight"] + 1}),
     ["'cls.predictions.decoder.weight'", "ties"]),
])
def test_bad_checkpoints_raise_value_errors_naming_the_tensor(tmp_path, tiny_checkpoint, change,
                                                             words):
    path, tensors = tiny_checkpoint
    tensors = dict(tensors)
    change(tensors)
    bad = _write(tmp_path / "bad", tensors, (path / hf.CONFIG_FILE).read_text())
    with pytest.raises(ValueError) as error:
        bert_jax.load(bad)
    for word in words:
        assert word in str(error.value)


def test_tied_decoder_and_position_ids_are_accepted(tmp_path, tiny_checkpoint):
    path, tensors = tiny_checkpoint
    tensors = dict(tensors)
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
    tensors["bert.embeddings.position_ids"] = np.arange(10)[None]
    good = _write(tmp_path / "good", tensors, (path / hf.CONFIG_FILE).read_text())
    np.testing.assert_array_equal(bert_jax.load(good).logits(np.ones((1, 4), int))[0],
                                  bert_jax.load(path).logits(np.ones((1, 4), int))[0])


def test_unsupported_configs_are_refused(tmp_path, tiny_checkpoint):
    path, tensors = tiny_checkpoint
    values = json.loads((path / hf.CONFIG_FILE).read_text())
    for key, value in [("hidden_act", "relu"), ("position_embedding_type", "relative_key"),
                       ("model_type", "roberta")]:
        bad = _write(tmp_path / key, tensors, json.dumps({**values, key: value}))
        with pytest.raises(ValueError, match=f"{key}='{value}'"):
            bert_jax.load(bad)
    with pytest.raises(ValueError, match="nowhere does not exist: expected a bert-jax "
                                         "workdir, a Hugging Face BERT directory or a "
                                         "google-research/bert checkpoint"):
        bert_jax.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json does not exist"):
        bert_jax.load(tmp_path / "empty")


def test_pytorch_bin_loads_and_pickled_code_is_refused(tmp_path, tiny_checkpoint):
    path, tensors = tiny_checkpoint
    good = tmp_path / "bin"
    good.mkdir()
    (good / hf.CONFIG_FILE).write_text((path / hf.CONFIG_FILE).read_text())
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, good / hf.TORCH_WEIGHTS_FILE)
    ids = np.ones((1, 5), int)
    np.testing.assert_array_equal(bert_jax.load(good).logits(ids)[1],
                                  bert_jax.load(path).logits(ids)[1])

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / hf.CONFIG_FILE).write_text((path / hf.CONFIG_FILE).read_text())
    (evil / hf.TORCH_WEIGHTS_FILE).write_bytes(pickle.dumps({"x": Exploit()}, protocol=2))
    with pytest.raises(ConfigError, match=r"evil/pytorch_model.bin is not a weights-only PyTorch "
                                          r"file \(torch.load\(weights_only=True\) refused it"):
        bert_jax.load(evil)
    assert not marker.exists()


def test_sharded_safetensors_load(tmp_path, tiny_checkpoint):
    path, tensors = tiny_checkpoint
    names = sorted(tensors)
    shards = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard)
    (sharded / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    (sharded / hf.CONFIG_FILE).write_text((path / hf.CONFIG_FILE).read_text())
    ids = np.ones((1, 5), int)
    np.testing.assert_array_equal(bert_jax.load(sharded).logits(ids)[0],
                                  bert_jax.load(path).logits(ids)[0])


def test_export_writes_nothing_when_parameters_are_incomplete(tmp_path):
    config = preset("tiny", vocab_size=50, num_layers=1)
    params = Pretrained.from_model(create(config)).params
    del params["pooler"]
    with pytest.raises(KeyError):
        hf.save(tmp_path / "out", config, hf.flatten(params))
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_a_config_bert_cannot_represent_and_writes_nothing(tmp_path):
    config = preset("tiny", vocab_size=50, num_layers=1, layer_norm="pre")
    params = hf.flatten(Pretrained.from_model(create(config)).params)
    for head, hf_class in [("pretraining", "BertForPreTraining"),
                           ("classification", "BertForSequenceClassification")]:
        with pytest.raises(ConfigError) as error:
            hf.save(tmp_path / "out", config, params, head=head)
        message = str(error.value)
        assert message.startswith(f"model.layer_norm='pre': Hugging Face {hf_class} has "
                                  f"post-LayerNorm layers only; expected 'post'")
        assert "\n" not in message
        with pytest.raises(ConfigError, match=re.escape(message)):
            hf.config_to_hf(config, head)
    assert not (tmp_path / "out").exists()


def test_released_checkpoints_with_gamma_beta_layer_norms_load(tmp_path, tiny_checkpoint):
    path, tensors = tiny_checkpoint
    renamed = {name.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): value
               for name, value in tensors.items()}
    assert any(name.endswith("LayerNorm.gamma") for name in renamed)
    old = _write(tmp_path / "old", renamed, (path / hf.CONFIG_FILE).read_text())
    ids = np.ones((1, 6), int)
    np.testing.assert_array_equal(bert_jax.load(old).logits(ids)[0],
                                  bert_jax.load(path).logits(ids)[0])
