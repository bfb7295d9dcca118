"""Configuration: the model's typed schema, the size presets, and the run config.

The run config is an `ml_collections.ConfigDict` (overridable on the command line as
`--config.model.num_layers=4`); its `model` part is validated by turning it into a frozen
`ModelConfig`, so a bad value fails once, early, with a message naming it.
"""

from __future__ import annotations

import dataclasses

import ml_collections

# Sizes of google-research/bert's released models: (layers, hidden, heads); intermediate is 4H.
PRESETS = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")  # auto: JAX picks
# Rematerialization policies, by the name of the `jax.checkpoint_policies` entry they use.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a post-LayerNorm BERT.

    `attention_dropout_rate` defaults to 0, unlike the original 0.1: dropout on attention
    probabilities forbids fused (flash) attention kernels, and MosaicBERT and Cramming show
    BERT pretrains as well without it. Set it to 0.1 for the original recipe; the model then
    takes the unfused path while training.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention_impl: str = "auto"  # jax.nn.dot_product_attention's `implementation`
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name}={value!r}: expected a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}: expected a multiple of the head count")
        for name in ("hidden_dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name}={value!r}: expected a rate in [0, 1)")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLEMENTATIONS)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values) -> ModelConfig:
        """Builds a config from a mapping (e.g. `config.model`), rejecting unknown keys."""
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}: expected fields of ModelConfig")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"model.{name}={value!r}: expected one of {list(choices)}")


def preset(name: str, **overrides) -> ModelConfig:
    """The model config of a named size (`tiny` ... `large`), with optional overrides."""
    if name not in PRESETS:
        raise ValueError(f"model size {name!r}: expected one of {list(PRESETS)}")
    layers, hidden, heads = PRESETS[name]
    fields = dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                  intermediate_size=4 * hidden)
    return ModelConfig(**{**fields, **overrides})


def default_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """The run config every file in `configs/` starts from."""
    config = ml_collections.ConfigDict()
    config.model = preset(size).to_dict()
    config.train = ml_collections.ConfigDict(dict(seed=0, global_batch_size=8, seq_length=128,
                                                  max_predictions_per_seq=20))
    return config
