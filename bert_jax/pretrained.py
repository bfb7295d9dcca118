"""`bert_jax.load(path)`: trained weights as an object with `.config`, `.params` and `.logits`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from bert_jax import hf
from bert_jax.config import ModelConfig
from bert_jax.model import BertForPreTraining, abstract


def param_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Flat parameter paths and shapes of a model, computed without allocating it."""
    state = nnx.state(abstract(config), nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


class Pretrained:
    """A BERT's config and float32 parameters, with a jitted inference forward.

    `params` is the nested dict of numpy arrays that `nnx.to_pure_dict` gives.
    """

    def __init__(self, config: ModelConfig, params: dict):
        self.config = config
        self.params = params
        graphdef, state = nnx.split(abstract(config))
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        self._graphdef, self._state = graphdef, state
        self._forward = jax.jit(
            lambda state, *inputs: nnx.merge(graphdef, state).full_logits(*inputs))

    @classmethod
    def from_model(cls, model: BertForPreTraining) -> Pretrained:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return cls(model.config, jax.tree.map(np.asarray, params))

    def model(self) -> BertForPreTraining:
        """A live NNX model holding these parameters."""
        return nnx.merge(self._graphdef, self._state)

    def logits(self, input_ids, token_type_ids=None, attention_mask=None):
        """Returns (MLM logits [B, S, V], NSP logits [B, 2]) as float32 numpy arrays."""
        # The model checks shapes and dtypes and fills the defaults.
        mlm, nsp = self._forward(self._state, input_ids, token_type_ids, attention_mask)
        return np.asarray(mlm), np.asarray(nsp)

    def save_hf(self, out_dir) -> None:
        """Writes a Hugging Face directory (config.json + model.safetensors)."""
        hf.save(out_dir, self.config, hf.flatten(self.params))


def load(path) -> Pretrained:
    """Loads a training workdir (its latest checkpoint) or a Hugging Face BERT directory
    (config.json + model.safetensors or .bin)."""
    from bert_jax import export  # reads Orbax checkpoints; not needed for HF directories

    if export.is_workdir(path):
        return export.load_workdir(path)[0]
    config = hf.read_config(path)
    flat = hf.from_hf(hf.read_tensors(path), config, param_shapes(config))
    return Pretrained(config, hf.unflatten(flat))
