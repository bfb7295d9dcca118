"""Hugging Face interop: our flat parameters `{"encoder/layers/mlp/up/kernel": array}` <->
the state dicts of `transformers.BertForPreTraining` and `BertForSequenceClassification`.

One table (`_entries`) lists every correspondence and both directions read it, so they cannot
drift apart. PyTorch `.bin` files load only through `torch.load(weights_only=True)`, which
cannot execute code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re

import numpy as np
import safetensors.numpy
from etils import epath
from flax import traverse_util

from bert_jax import files
from bert_jax.config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"

# Tensors some checkpoints carry that hold nothing of their own: a buffer, and the MLM decoder
# tied to the word embeddings and the prediction bias (checked equal to them when present).
_POSITION_IDS = "bert.embeddings.position_ids"
_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias"}

# ModelConfig field -> config.json key.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_dropout_rate": "hidden_dropout_prob",
    "attention_dropout_rate": "attention_probs_dropout_prob",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
}

# The config.json values of the one architecture implemented: written, and required of a read.
_ARCHITECTURE = {"model_type": "bert", "position_embedding_type": "absolute"}
# `model.hidden_act` -> config.json's `hidden_act`, and what a read maps back (`gelu_new` and
# `gelu_pytorch_tanh` are the same tanh approximation).
_ACTIVATION_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_ACTIVATION_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# Each head's Hugging Face class, and the ModelConfig choices they represent, {field: (values,
# what they have instead)}: export refuses others.
_CLASSES = {"pretraining": "BertForPreTraining", "classification": "BertForSequenceClassification"}
_SUPPORTED = {"layer_norm": (("post",), "has post-LayerNorm layers only")}

# How one of our (sub-)arrays is laid out as a Hugging Face tensor (`_Entry.inputs`): as it is,
# flattened, or a linear kernel with 1 or 2 leading input dims (stored transposed, 2-D).
_SAME, _FLAT, _KERNEL, _KERNEL_2D_IN = None, 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Entry:
    ours: str  # flat parameter path
    index: tuple  # the part of our array this tensor fills (layer, q/k/v)
    hf: str
    inputs: int | None  # the layout: _SAME, _FLAT, _KERNEL or _KERNEL_2D_IN

    def hf_shape(self, shape) -> tuple:
        if self.inputs is None:
            return tuple(shape)
        if self.inputs == 0:
            return (math.prod(shape),)
        return (math.prod(shape[self.inputs:]), math.prod(shape[:self.inputs]))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.inputs:
            return x.reshape(self.hf_shape(x.shape)[::-1]).T
        return x.reshape(self.hf_shape(x.shape))

    def from_hf(self, w: np.ndarray, shape) -> np.ndarray:
        return (w.T if self.inputs else w).reshape(shape)


def _dense(ours, hf, index=(), inputs=_KERNEL):
    return [_Entry(f"{ours}/kernel", index, f"{hf}.weight", inputs),
            _Entry(f"{ours}/bias", index, f"{hf}.bias", _FLAT)]


def _norm(ours, hf, index=()):
    return [_Entry(f"{ours}/scale", index, f"{hf}.weight", _SAME),
            _Entry(f"{ours}/bias", index, f"{hf}.bias", _SAME)]


def _entries(num_layers: int, head: str | None = "pretraining") -> list[_Entry]:
    """The encoder's entries, then those of `head` (None: the encoder alone)."""
    entries = [_Entry(f"embeddings/{ours}/embedding", (), f"bert.embeddings.{hf}.weight", _SAME)
               for ours, hf in (("word", "word_embeddings"), ("position", "position_embeddings"),
                                ("token_type", "token_type_embeddings"))]
    entries += _norm("embeddings/norm", "bert.embeddings.LayerNorm")
    layers = "encoder/layers"
    for i in range(num_layers):
        hf = f"bert.encoder.layer.{i}"
        for j, name in enumerate(("query", "key", "value")):
            entries += [
                _Entry(f"{layers}/attention/qkv/kernel", (i, slice(None), j),
                       f"{hf}.attention.self.{name}.weight", _KERNEL),
                _Entry(f"{layers}/attention/qkv/bias", (i, j),
                       f"{hf}.attention.self.{name}.bias", _FLAT)]
        entries += [
            *_dense(f"{layers}/attention/out", f"{hf}.attention.output.dense", (i,), _KERNEL_2D_IN),
            *_norm(f"{layers}/attention/norm", f"{hf}.attention.output.LayerNorm", (i,)),
            *_dense(f"{layers}/mlp/up", f"{hf}.intermediate.dense", (i,)),
            *_dense(f"{layers}/mlp/down", f"{hf}.output.dense", (i,)),
            *_norm(f"{layers}/mlp/norm", f"{hf}.output.LayerNorm", (i,))]
    entries += _dense("pooler", "bert.pooler.dense")
    if head == "pretraining":
        entries += [
            *_dense("mlm/transform", "cls.predictions.transform.dense"),
            *_norm("mlm/norm", "cls.predictions.transform.LayerNorm"),
            _Entry("mlm/bias", (), "cls.predictions.bias", _SAME),
            *_dense("nsp", "cls.seq_relationship")]
    elif head == "classification":
        entries += _dense("classifier", "classifier")
    return entries


def flatten(params: dict) -> dict[str, np.ndarray]:
    """Nested parameter dict (as `nnx.to_pure_dict` gives) -> {"a/b/c": numpy array}."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def to_hf(flat_params: dict[str, np.ndarray], config: ModelConfig,
          head: str = "pretraining") -> dict[str, np.ndarray]:
    """Our flat parameters -> the float32 tensors of `head`'s Hugging Face class."""
    return {e.hf: np.ascontiguousarray(e.to_hf(np.asarray(flat_params[e.ours])[e.index]),
                                       dtype=np.float32)
            for e in _entries(config.num_layers, head)}


def from_hf(tensors: dict[str, np.ndarray], config: ModelConfig, shapes: dict[str, tuple],
            head: str | None = "pretraining", optional=()) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> our flat parameters of `shapes` (`head` None: the encoder alone).
    A parameter subtree named in `optional` ("pooler", "mlm") may be absent as a whole, and is
    then left out. ConfigError names the first missing, unexpected or misshapen tensor."""
    # LayerNorm `gamma`/`beta` (released checkpoints) -> `weight`/`bias`, as `transformers`.
    renamed = {"gamma": "weight", "beta": "bias"}
    tensors = {re.sub(r"(?<=\.LayerNorm\.)(gamma|beta)$", lambda match: renamed[match[1]], name):
               value for name, value in tensors.items()}
    entries = _entries(config.num_layers, head)
    extra = sorted(set(tensors) - {e.hf for e in entries} - set(_TIED) - {_POSITION_IDS})
    if extra:
        raise ConfigError(f"unexpected tensor {extra[0]!r} (shape {np.shape(tensors[extra[0]])}) "
                          f"in a checkpoint for {_describe(config)}: expected none such "
                          f"({len(extra)} unexpected in all)")
    absent = {group for group in optional
              if not any(e.hf in tensors for e in entries if _subtree(e.ours) == group)}
    entries = [e for e in entries if _subtree(e.ours) not in absent]
    flat = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()
            if _subtree(path) not in absent}
    for e in entries:
        want = e.hf_shape(np.broadcast_to(0, shapes[e.ours])[e.index].shape)
        if e.hf not in tensors:
            raise ConfigError(f"missing tensor {e.hf!r}: expected shape {want} for "
                              f"{_describe(config)}")
        got = np.shape(tensors[e.hf])
        if got != want:
            raise ConfigError(f"tensor {e.hf!r} has shape {got}: expected {want} for "
                              f"{_describe(config)}")
        target = flat[e.ours]
        target[e.index] = e.from_hf(np.asarray(tensors[e.hf], np.float32), target[e.index].shape)
    for tied, source in _TIED.items():
        if tied in tensors and source in tensors and not np.array_equal(
                np.asarray(tensors[tied], np.float32), np.asarray(tensors[source], np.float32)):
            raise ConfigError(f"tensor {tied!r} differs from {source!r}: bert-jax ties them, "
                              f"so an untied checkpoint cannot be represented")
    return flat


def _subtree(path: str) -> str:
    return path.split("/")[0]


def as_pretraining(tensors: dict) -> dict:
    """The tensors of any BERT checkpoint under `BertForPreTraining`'s names: a bare
    `BertModel`'s (`embeddings.*`, `encoder.*`, `pooler.*`) given the `bert.` prefix, and a
    classifier's (`classifier.*`) dropped."""
    bare = ("embeddings.", "encoder.", "pooler.")
    return {(f"bert.{name}" if name.startswith(bare) else name): value
            for name, value in tensors.items() if not name.startswith("classifier.")}


def _describe(config: ModelConfig) -> str:
    return (f"L={config.num_layers} H={config.hidden_size} A={config.num_heads} "
            f"I={config.intermediate_size} V={config.vocab_size}")


def check_exportable(config: ModelConfig, head: str = "pretraining") -> None:
    """Raises ConfigError naming a field the Hugging Face class of `head` cannot represent
    (`_SUPPORTED`): export calls it, and so can a run before it trains."""
    hf_class = _CLASSES[head]
    for field, (allowed, instead) in _SUPPORTED.items():
        if (value := getattr(config, field)) not in allowed:
            raise ConfigError(
                f"model.{field}={value!r}: Hugging Face {hf_class} {instead}; expected "
                f"{' or '.join(map(repr, allowed))} to export (bert_jax.load reads the workdir)")


def config_to_hf(config: ModelConfig, head: str = "pretraining",
                 labels: tuple[str, ...] = ()) -> dict:
    """ModelConfig -> the `config.json` of `transformers.BertConfig` (checked exportable). A
    classification head names its classes `labels` (none: regression, one output)."""
    check_exportable(config, head)
    values = {"architectures": [_CLASSES[head]], **_ARCHITECTURE, "tie_word_embeddings": True,
              "pad_token_id": 0, "hidden_act": _ACTIVATION_OUT[config.hidden_act],
              **{hf: getattr(config, ours) for ours, hf in _CONFIG_KEYS.items()}}
    if head == "classification":
        names = list(labels) or ["score"]
        values.update(id2label={str(i): name for i, name in enumerate(names)},
                      label2id={name: i for i, name in enumerate(names)},
                      problem_type=("single_label_classification" if labels else "regression"))
    return values


def config_from_hf(values: dict) -> ModelConfig:
    """`config.json` -> ModelConfig; rejects architectures this model does not implement."""
    for key, expected in _ARCHITECTURE.items():
        if values.get(key, expected) != expected:
            raise ConfigError(f"config.json has {key}={values[key]!r}: expected {expected!r}")
    if (act := values.get("hidden_act", "gelu")) not in _ACTIVATION_IN:
        raise ConfigError(f"config.json has hidden_act={act!r}: expected one of "
                          f"{list(_ACTIVATION_IN)}")
    missing = [hf for hf in _CONFIG_KEYS.values() if hf not in values]
    if missing:
        raise ConfigError(f"config.json lacks {missing[0]!r}: expected a BERT config with "
                          f"{sorted(_CONFIG_KEYS.values())}")
    return ModelConfig(**{ours: values[hf] for ours, hf in _CONFIG_KEYS.items()},
                       hidden_act=_ACTIVATION_IN[act])


def save(out_dir, config: ModelConfig, flat_params: dict[str, np.ndarray],
         head: str = "pretraining", labels: tuple[str, ...] = ()) -> None:
    """Writes config.json and model.safetensors, each whole or not at all (nothing for a config
    `config_to_hf` refuses)."""
    hf_config = json.dumps(config_to_hf(config, head, labels), indent=2) + "\n"
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = safetensors.numpy.save(to_hf(flat_params, config, head), metadata={"format": "pt"})
    files.write_atomically(out_dir / WEIGHTS_FILE, weights)
    files.write_atomically(out_dir / CONFIG_FILE, hf_config.encode())


def read_config(path) -> ModelConfig:
    config_path = epath.Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{config_path} does not exist: expected a Hugging Face model directory")
    return config_from_hf(json.loads(config_path.read_text()))


def architectures(path) -> list[str]:
    """The model classes a Hugging Face directory's config.json names (none: or no such file)."""
    config_path = epath.Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return []
    return json.loads(config_path.read_text()).get("architectures") or []


def read_labels(path) -> tuple[str, ...]:
    """The class names of a sequence classification directory (in id order); none for a
    regression model."""
    values = json.loads((epath.Path(path) / CONFIG_FILE).read_text())
    id2label = values.get("id2label") or {}
    if values.get("problem_type") == "regression" or len(id2label) == 1:  # as transformers
        return ()
    return tuple(id2label[key] for key in sorted(id2label, key=int))


def read_tensors(path) -> dict[str, np.ndarray]:
    """The tensors of a Hugging Face directory: safetensors (maybe sharded), else `.bin`."""
    path = epath.Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return _read_safetensors(path / WEIGHTS_FILE)
    if (path / WEIGHTS_INDEX_FILE).is_file():
        shards = sorted(set(json.loads((path / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
                            .values()))
        return {k: v for shard in shards for k, v in _read_safetensors(path / shard).items()}
    if not (path / TORCH_WEIGHTS_FILE).is_file():
        raise ConfigError(f"{path} has no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or "
                          f"{TORCH_WEIGHTS_FILE}: expected a Hugging Face model directory")
    try:
        import torch
    except ImportError as e:
        raise ConfigError(f"{path / TORCH_WEIGHTS_FILE} is a PyTorch file: install torch to read "
                          f"it, or convert it to {WEIGHTS_FILE}") from e
    with (path / TORCH_WEIGHTS_FILE).open("rb") as f:  # a file object: torch.load reads no URLs
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{path / TORCH_WEIGHTS_FILE} is not a weights-only PyTorch file "
                              f"(torch.load(weights_only=True) refused it): expected tensors "
                              f"only, e.g. saved from a state_dict") from e
    return {k: v.float().numpy() for k, v in state.items()}


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    # safetensors memory-maps local files only. An object (gs://...) is read into memory
    # first, holding its bytes beside the arrays for a moment: local files avoid that.
    if files.is_url(path):
        return safetensors.numpy.load(path.read_bytes())
    return safetensors.numpy.load_file(path)
