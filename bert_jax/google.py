"""google-research/bert's checkpoint directories (`bert_config.json`, `bert_model.ckpt.*`,
`vocab.txt`, as released or as its run_pretraining.py writes them), read with TensorFlow's
checkpoint reader (no graph) into the Hugging Face names that `hf.from_hf` maps.

The config says `hidden_act: gelu`, which modeling.py computes with the tanh approximation:
the model reads as `hidden_act="gelu_tanh"`, so its logits are the reference graph's
(docs/continued-pretraining.md).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from etils.epath import Path  # local paths and gs:// alike

from bert_jax import hf
from bert_jax.config import ConfigError, ModelConfig

CONFIG_FILE = "bert_config.json"
CHECKPOINT = "bert_model.ckpt"
# modeling.py's activations by config name, as the `transformers` names of the same functions.
_ACTIVATIONS = {"gelu": "gelu_new"}
# Variables that hold no weights: the step and the optimizer's slots (run_pretraining.py's).
_NOT_WEIGHTS = re.compile(r"(^global_step$|/adam_[mv]$|/lamb_[mv]$)")


def is_checkpoint_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(path) -> ModelConfig:
    """`bert_config.json` -> ModelConfig (LayerNorm epsilon 1e-12, as modeling.py's)."""
    values = json.loads((Path(path) / CONFIG_FILE).read_text())
    act = values.get("hidden_act")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{Path(path) / CONFIG_FILE} has hidden_act={act!r}: expected "
                          f"{' or '.join(map(repr, _ACTIVATIONS))}")
    return hf.config_from_hf({**values, "hidden_act": _ACTIVATIONS[act], "layer_norm_eps": 1e-12})


def checkpoint_prefix(path) -> str:
    """`bert_model.ckpt`, else the newest checkpoint the directory's `checkpoint` file names
    (run_pretraining.py's `model.ckpt-N`)."""
    tf = _tensorflow()

    if (Path(path) / f"{CHECKPOINT}.index").is_file():
        return str(Path(path) / CHECKPOINT)
    if latest := tf.train.latest_checkpoint(str(path)):
        return latest
    raise ConfigError(f"{path} has {CONFIG_FILE} but no {CHECKPOINT}.index or TensorFlow "
                      f"checkpoint: expected a google-research/bert checkpoint directory")


def read_tensors(path) -> dict[str, np.ndarray]:
    """The checkpoint's weights, named and laid out as Hugging Face's `BertForPreTraining`."""
    tf = _tensorflow()

    prefix = checkpoint_prefix(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise ConfigError(f"cannot read the TensorFlow checkpoint {prefix}: "
                          f"{str(e).splitlines()[0]}") from e
    return dict(_renamed(name, reader.get_tensor(name))
                for name in reader.get_variable_to_shape_map() if not _NOT_WEIGHTS.search(name))


def _tensorflow():
    """TensorFlow, imported on this path only, without the oneDNN banner it prints to stderr
    on import (only checkpoints are read: no kernels run)."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    return tf


def _renamed(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """`bert/encoder/layer_3/attention/self/query/kernel` -> `bert.encoder.layer.3.attention.
    self.query.weight`, transposed: TensorFlow keeps kernels [in, out], PyTorch [out, in]."""
    *scopes, last = name.split("/")
    if last == "kernel":
        value, last = value.T, "weight"
    elif last == "output_weights":  # cls/seq_relationship's, already [out, in]
        last = "weight"
    elif last == "output_bias":
        last = "bias"
    elif last.endswith("_embeddings"):
        scopes, last = [*scopes, last], "weight"
    scopes = [re.sub(r"^layer_(\d+)$", r"layer.\1", scope) for scope in scopes]
    return ".".join([*scopes, last]), np.asarray(value, np.float32)
