"""Trained weights in memory: a `Pretrained` (config, params, MLM/NSP logits), what
`bert_jax.load(path)` gives; a fine-tuned `Classifier` (sequence classification logits).
Both read and write Hugging Face directories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bert_jax import hf
from bert_jax.config import ConfigError, ModelConfig
from bert_jax.model import ENCODER_PARAMS, BertForPreTraining, abstract


def param_shapes(config: ModelConfig, num_labels: int | None = None) -> dict[str, tuple]:
    """Flat parameter paths and shapes of a model, computed without allocating it."""
    state = nnx.state(abstract(config, num_labels), nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


class _Weights:
    """A model's config and float32 parameters (the nested dict of numpy arrays that
    `nnx.to_pure_dict` gives), with the model's inference forward jitted."""

    head = "pretraining"  # the Hugging Face class `save_hf` writes (`hf.save`)
    labels: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig, params: dict, num_labels: int | None, forward):
        self.config = config
        self.params = params
        self._graphdef, self._state = nnx.split(abstract(config, num_labels))
        nnx.replace_by_pure_dict(self._state, jax.tree.map(jnp.asarray, params))
        self._forward = jax.jit(lambda state, *inputs: forward(nnx.merge(self._graphdef, state),
                                                               *inputs))

    def model(self):
        """A live NNX model holding these parameters."""
        return nnx.merge(self._graphdef, self._state)

    def logits(self, input_ids, token_type_ids=None, attention_mask=None):
        """Float32 numpy logits: (MLM [B, S, V], NSP [B, 2]) of a `Pretrained`, [B, num_labels]
        of a `Classifier`. The model checks shapes and dtypes and fills the defaults."""
        return jax.tree.map(np.asarray, self._forward(self._state, input_ids, token_type_ids,
                                                      attention_mask))

    def save_hf(self, out_dir) -> None:
        """Writes a Hugging Face directory (config.json + model.safetensors)."""
        hf.save(out_dir, self.config, hf.flatten(self.params), self.head, self.labels)


class Pretrained(_Weights):
    """A pretrained BERT (MLM and NSP heads)."""

    def __init__(self, config: ModelConfig, params: dict):
        super().__init__(config, params, None, BertForPreTraining.full_logits)

    @classmethod
    def from_model(cls, model: BertForPreTraining) -> Pretrained:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return cls(model.config, jax.tree.map(np.asarray, params))


class Classifier(_Weights):
    """A fine-tuned BERT sequence classifier whose classes are `labels` (none: a regression
    model with one output)."""

    head = "classification"

    def __init__(self, config: ModelConfig, params: dict, labels: tuple[str, ...]):
        super().__init__(config, params, len(labels) or 1, lambda model, *inputs: model(*inputs))
        self.labels = tuple(labels)


def load_hf(path) -> Pretrained:
    """A Hugging Face BERT pretraining directory (config.json + model.safetensors or .bin)."""
    config = hf.read_config(path)
    if "BertForSequenceClassification" in hf.architectures(path):
        raise ConfigError(f"{path} holds a sequence classifier: load it with "
                          f"bert_jax.load_classifier (fill-mask needs a pretraining model)")
    flat = hf.from_hf(hf.read_tensors(path), config, param_shapes(config))
    return Pretrained(config, hf.unflatten(flat))


def load_encoder(path) -> tuple[ModelConfig, dict]:
    """The config and encoder parameters (`ENCODER_PARAMS` subtrees) of any Hugging Face BERT
    directory (pretraining, sequence classification, a bare `BertModel`), heads ignored."""
    config = hf.read_config(path)
    shapes = {name: shape for name, shape in param_shapes(config).items()
              if name.split("/")[0] in ENCODER_PARAMS}
    flat = hf.from_hf(hf.encoder_tensors(hf.read_tensors(path)), config, shapes, head=None)
    return config, hf.unflatten(flat)


def load_classifier(path) -> Classifier:
    """A fine-tuned model from a Hugging Face `BertForSequenceClassification` directory (as
    `bert-jax finetune` exports)."""
    config, labels = hf.read_config(path), hf.read_labels(path)
    shapes = param_shapes(config, len(labels) or 1)
    flat = hf.from_hf(hf.read_tensors(path), config, shapes, head="classification")
    return Classifier(config, hf.unflatten(flat), labels)
