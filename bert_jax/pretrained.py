"""Trained weights in memory: a `Pretrained` (config, params, MLM/NSP logits), what
`bert_jax.load(path)` gives; a fine-tuned `Classifier` (sequence classification logits).
Both read and write Hugging Face directories; pretrained weights also come from
google-research/bert's checkpoints (`bert_jax.google`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bert_jax import google, hf
from bert_jax.config import ConfigError, ModelConfig
from bert_jax.model import BertForPreTraining, abstract

# Parameter subtrees a released model may lack: `BertForMaskedLM` has no pooler and no NSP
# head, a bare `BertModel` no heads.
OPTIONAL_PARAMS = ("pooler", "mlm", "nsp")


def param_shapes(config: ModelConfig, num_labels: int | None = None) -> dict[str, tuple]:
    """Flat parameter paths and shapes of a model, computed without allocating it."""
    state = nnx.state(abstract(config, num_labels), nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


class _Weights:
    """A model's config and float32 parameters (the nested dict of numpy arrays that
    `nnx.to_pure_dict` gives), with the model's inference forward jitted. The NNX model is
    built on first use: an export needs the parameters only."""

    head = "pretraining"  # the Hugging Face class `save_hf` writes (`hf.save`)
    labels: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig, params: dict, num_labels: int | None, forward):
        self.config = config
        self.params = params
        self._num_labels, self._forward_of_model = num_labels, forward
        self._built = None  # (graphdef, state, jitted forward)

    def _build(self):
        if self._built is None:
            graphdef, state = nnx.split(abstract(self.config, self._num_labels))
            nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, self.params))
            forward = self._forward_of_model
            self._built = graphdef, state, jax.jit(
                lambda state, *inputs: forward(nnx.merge(graphdef, state), *inputs))
        return self._built

    def model(self):
        """A live NNX model holding these parameters."""
        graphdef, state, _ = self._build()
        return nnx.merge(graphdef, state)

    def logits(self, input_ids, token_type_ids=None, attention_mask=None):
        """Float32 numpy logits: (MLM [B, S, V], NSP [B, 2]) of a `Pretrained`, [B, num_labels]
        of a `Classifier`. The model checks shapes and dtypes and fills the defaults."""
        _, state, forward = self._build()
        return jax.tree.map(np.asarray, forward(state, input_ids, token_type_ids,
                                                attention_mask))

    def save_hf(self, out_dir, config: ModelConfig | None = None) -> None:
        """Writes a Hugging Face directory (config.json + model.safetensors); `config`, where
        given, is the one config.json carries (an export's fine-tuning dropout)."""
        hf.save(out_dir, config or self.config, hf.flatten(self.params), self.head,
                self.labels)


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


def read_dir(path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The config and tensors (Hugging Face names) of a Hugging Face BERT directory or a
    google-research/bert checkpoint directory."""
    if google.is_checkpoint_dir(path):
        return google.read_config(path), google.read_tensors(path)
    return hf.read_config(path), hf.read_tensors(path)


def load_dir(path) -> Pretrained:
    """A pretraining model (MLM and NSP heads) from a Hugging Face or Google directory."""
    config, tensors = read_dir(path)
    if "BertForSequenceClassification" in hf.architectures(path):
        raise ConfigError(f"{path} holds a sequence classifier: load it with "
                          f"bert_jax.load_classifier (fill-mask needs a pretraining model)")
    return Pretrained(config, hf.unflatten(hf.from_hf(tensors, config, param_shapes(config))))


def load_params(path) -> tuple[ModelConfig, dict, tuple[str, ...]]:
    """The config and parameters of any BERT directory (pretraining, masked LM, a bare
    `BertModel`, sequence classification: its classifier ignored), and the names of the
    parameter subtrees it lacks (`OPTIONAL_PARAMS`), which a run starts fresh."""
    config, tensors = read_dir(path)
    params = hf.unflatten(hf.from_hf(hf.as_pretraining(tensors), config, param_shapes(config),
                                     optional=OPTIONAL_PARAMS))
    return config, params, tuple(name for name in OPTIONAL_PARAMS if name not in params)


def load_classifier(path) -> Classifier:
    """A fine-tuned model from a Hugging Face `BertForSequenceClassification` directory (as
    `bert-jax finetune` exports)."""
    config, labels = hf.read_config(path), hf.read_labels(path)
    shapes = param_shapes(config, len(labels) or 1)
    flat = hf.from_hf(hf.read_tensors(path), config, shapes, head="classification")
    return Classifier(config, hf.unflatten(flat), labels)
