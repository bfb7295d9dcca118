"""Configuration: typed sections, phases, size presets and pod sizing.

The run config, an `ml_collections.ConfigDict` (`--config.model.num_layers=4` overrides it), is
resolved once by `RunConfig.from_dict` into frozen sections: a bad value fails early, named."""

from __future__ import annotations

import dataclasses
import math

import ml_collections


class ConfigError(ValueError):
    """A user's mistake (a config value, a path, a file's content): the command line prints
    its one-line message and exits with code 2 (anything else: 1, not the user's fault)."""


# Sizes of google-research/bert's released models: (layers, hidden, heads); intermediate is 4H.
PRESETS = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8),
           "medium": (8, 512, 8), "base": (12, 768, 12), "large": (24, 1024, 16)}

DTYPES = ("float32", "bfloat16")
# Attention kernels (bert_jax.attention); auto: the fused kernel of the platform.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "splash")
# Rematerialization policies, by the name of the `jax.checkpoint_policies` entry they use.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# ModelConfig fields that are a run's choice, not the architecture: how it computes, and its
# regularization. A model's weights carry every other field (`bert_jax.init`).
MODEL_RUN_SETTINGS = ("dtype", "attention_impl", "scan_layers", "remat_policy",
                      "hidden_dropout_rate", "attention_dropout_rate")
# What a rate or number may be, by the words of its error message.
_INTERVALS = {"a rate in [0, 1)": lambda value: 0.0 <= value < 1.0,
              "[0, 1)": lambda value: 0.0 <= value < 1.0,
              "(0, 1)": lambda value: 0.0 < value < 1.0,
              "a positive number": lambda value: value > 0}


class _Section:
    """A config section: its rules are tables (`counts`: least values, `intervals`: keys of
    `_INTERVALS`, `choices`) that one check reads, so each message is written once."""

    counts = intervals = choices = {}

    def __init_subclass__(cls, **kwargs):  # the name in keys and messages: ModelConfig's "model"
        super().__init_subclass__(**kwargs)
        cls.section = cls.__name__.removesuffix("Config").lower()

    def __post_init__(self):
        for name, least in self.counts.items():
            check_int(f"{self.section}.{name}", getattr(self, name), least)
        self._check_fields()
        for name, expected in self.intervals.items():
            value = getattr(self, name)
            if not _INTERVALS[expected](value):
                raise ConfigError(f"{self.section}.{name}={value!r}: expected {expected}")
        for name, allowed in self.choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{self.section}.{name}={getattr(self, name)!r}: "
                                  f"expected one of {list(allowed)}")

    def _check_fields(self):
        """Rules between fields, checked once the counts are (ModelConfig's)."""

    @classmethod
    def from_dict(cls, values):
        """A section from a mapping (e.g. `config.model`), rejecting unknown keys."""
        values = dict(values)
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.section} config keys {unknown}: expected fields "
                              f"of {cls.__name__}")
        return cls(**values)

    to_dict = dataclasses.asdict


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Architecture and numerics of a BERT encoder. `attention_dropout_rate` is 0, not the
    original 0.1: dropout on attention probabilities forbids fused (flash) kernels, and
    MosaicBERT and Cramming show BERT pretrains as well without it (0.1: the unfused path)."""

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
    attention_impl: str = "auto"  # a kernel of bert_jax.attention
    scan_layers: bool = False
    remat_policy: str = "none"
    layer_norm: str = "post"  # post: BERT's, after each residual add; pre: before each sub-layer
    hidden_act: str = "gelu"  # gelu: exact (erf); gelu_tanh: google-research/bert's modeling.py

    counts = dict.fromkeys(("vocab_size", "hidden_size", "num_layers", "num_heads",
                            "intermediate_size", "max_position_embeddings", "type_vocab_size"), 1)
    intervals = dict.fromkeys(("hidden_dropout_rate", "attention_dropout_rate"),
                              "a rate in [0, 1)")
    choices = {"dtype": DTYPES, "attention_impl": ATTENTION_IMPLEMENTATIONS,
               "remat_policy": REMAT_POLICIES, "layer_norm": ("post", "pre"),
               "hidden_act": ("gelu", "gelu_tanh")}

    def _check_fields(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}: expected a multiple of the head count")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where pretraining data comes from and how instances and masks are made. `corpus`: a
    file glob (commas for several), `builtin` (Python's documentation) or `tfds:NAME[:SPLIT]`.
    `vocab_file`: a WordPiece `vocab.txt` or SentencePiece `.model` (empty: one of `vocab_size`
    is trained). Defaults: google-research/bert's, but `dupe_factor` 1 (masking is dynamic)."""

    corpus: str = "builtin"
    vocab_file: str = ""
    vocab_size: int = 8192
    lowercase: bool = True
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_masking: bool = False
    objective: str = "nsp"
    dupe_factor: int = 1
    validation_fraction: float = 0.02
    seed: int = 12345
    data_dir: str = "runs/data"
    text_field: str = "text"
    tfds_data_dir: str = ""
    workers: int = 0  # processes for tokenization and instance creation; 0: one per core
    instances_per_row: int = 1  # > 1: up to that many instances packed in a row (data.packing)

    counts = dict.fromkeys(("vocab_size", "max_seq_length", "max_predictions_per_seq",
                            "dupe_factor", "instances_per_row"), 1)
    intervals = {"masked_lm_prob": "(0, 1)", "short_seq_prob": "[0, 1)",
                 "validation_fraction": "[0, 1)"}
    choices = {"objective": ("nsp", "sop")}


def check_int(name: str, value, least: int = 1) -> None:
    """A config integer (True is not one) of at least `least`, or an error naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        expected = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(f"{name}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """How a model is trained (pretraining and fine-tuning alike): steps and batch, optimizer
    and schedule, when to log and evaluate, what non-finite steps do. The optimizer is
    google-research/bert's: AdamW, epsilon 1e-6, decay 0.01, clipping at 1.0, a linear warmup
    then polynomial decay (power 1: linear) to `end_learning_rate`. A step with a non-finite
    loss or gradient norm skips its update; after `nonfinite_patience` in a row, "rollback"
    restores the last checkpoint and skips the offending batches (at most `max_rollbacks`
    times), "stop" ends the run. `rng_impl`, the dropout PRNG: threefry2x32 is the same under
    every sharding, rbg faster. `phases`: rows (start_step, max_seq_length, max_predictions,
    batch[, grad_accum_steps[, instances_per_row]]); empty: one of the data lengths and batch."""

    seed: int = 0
    num_steps: int = 10_000
    stop_at_step: int = 0  # 0: run to num_steps
    global_batch_size: int = 256
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    end_learning_rate: float = 0.0
    warmup_steps: int = 1000
    decay_power: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0
    log_every: int = 100
    eval_every: int = 0  # 0: at the last step only
    eval_steps: int = 0  # validation batches; 0: the whole split
    on_nonfinite: str = "rollback"
    nonfinite_patience: int = 10
    max_rollbacks: int = 3
    rng_impl: str = "threefry2x32"
    phases: tuple = ()
    init: str = ""  # pretraining's starting weights (bert_jax.init); empty: random
    init_step: int = 0  # a workdir init's checkpoint; 0: the latest

    counts = {"num_steps": 1, "global_batch_size": 1, "grad_accum_steps": 1, "log_every": 1,
              "eval_every": 0, "eval_steps": 0, "stop_at_step": 0, "warmup_steps": 0,
              "nonfinite_patience": 1, "max_rollbacks": 0, "init_step": 0}
    intervals = {"learning_rate": "a positive number"}
    choices = {"optimizer": ("adamw", "lamb"), "on_nonfinite": ("rollback", "stop")}

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "phases", as_tuples(self.phases))

    @property
    def stop(self) -> int:
        """The step this invocation stops at: `stop_at_step` (0: `num_steps`)."""
        return min(self.stop_at_step or self.num_steps, self.num_steps)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Orbax checkpoints: every `every_steps` steps (and at the end), the newest `keep`
    kept, written in the background with `async_save`."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh sizes (`bert_jax.sharding`); -1 fills the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of steps [start, end) at one sequence length and batch size."""

    start: int
    end: int
    max_seq_length: int
    max_predictions_per_seq: int
    global_batch_size: int
    grad_accum_steps: int
    instances_per_row: int

    def data(self, data: DataConfig) -> DataConfig:
        """The data config of this phase's rows."""
        return dataclasses.replace(data, max_seq_length=self.max_seq_length,
                                   max_predictions_per_seq=self.max_predictions_per_seq,
                                   instances_per_row=self.instances_per_row)


_PHASE_ROW = ("(start, max_seq_length, max_predictions, batch[, grad_accum_steps[, "
              "instances_per_row]])")


def phases(train: TrainConfig, data: DataConfig) -> tuple[Phase, ...]:
    """The phases of `train.phases`; a row may set its accumulation (long sequences need more
    micro-batches) and packing (BERT's 512-token phase gains from it), else the configs' own."""
    rows = train.phases or ((0, data.max_seq_length, data.max_predictions_per_seq,
                             train.global_batch_size),)
    for row in rows:  # checked before the rows are indexed, which would fail deep inside
        if not (isinstance(row, tuple) and 4 <= len(row) <= 6
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row)):
            raise ConfigError(f"train.phases={train.phases}: row {row!r}: expected "
                              f"{_PHASE_ROW} of integers")
    starts = [row[0] for row in rows]
    if starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= train.num_steps:
        raise ConfigError(f"train.phases={train.phases}: expected rows {_PHASE_ROW} with start "
                          f"steps rising from 0 and below train.num_steps={train.num_steps}")
    defaults = (train.grad_accum_steps, data.instances_per_row)
    result = []
    for row, end in zip(rows, starts[1:] + [train.num_steps]):
        for name, value in zip(("batch", "grad_accum_steps", "instances_per_row"), row[3:]):
            check_int(f"train.phases row {row}: {name}", value)
        result.append(Phase(row[0], end, *row[1:4], *row[4:], *defaults[len(row) - 4:]))
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A pretraining run's config, every section typed and validated, and its phases: what
    the command line's `ml_collections.ConfigDict` means, resolved once."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig
    phases: tuple[Phase, ...]

    @classmethod
    def from_dict(cls, config) -> RunConfig:
        sections = {kind.section: kind for kind in (ModelConfig, DataConfig, TrainConfig,
                                                    CheckpointConfig, MeshConfig)}
        unknown = sorted(set(config) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config sections {unknown}: expected {list(sections)}")
        typed = {name: kind.from_dict(config.get(name, {})) for name, kind in sections.items()}
        return cls(**typed, phases=phases(typed["train"], typed["data"]))

    def phase_of(self, step: int) -> Phase:
        """The phase a model that has taken `step` steps last trained in (the first at step
        0): the lengths to evaluate it at."""
        return next((p for p in self.phases if p.start < step <= p.end), self.phases[0])


def as_tuples(value):
    return tuple(as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def preset(name: str, **overrides) -> ModelConfig:
    """The model config of a named size (`tiny` ... `large`), with optional overrides."""
    if name not in PRESETS:
        raise ConfigError(f"model size {name!r}: expected one of {list(PRESETS)}")
    layers, hidden, heads = PRESETS[name]
    fields = dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                  intermediate_size=4 * hidden)
    return ModelConfig(**{**fields, **overrides})


def default_config(size: str = "tiny") -> ml_collections.ConfigDict:
    """The run config every file in `configs/` starts from: each section's defaults and a size
    preset's model, whose vocabulary is the tokenizer's unless a config says otherwise."""
    config = ml_collections.ConfigDict()
    config.data = DataConfig().to_dict()
    config.model = preset(size).to_dict()
    config.model.vocab_size = config.data.get_ref("vocab_size")
    config.train = TrainConfig().to_dict()
    config.checkpoint = CheckpointConfig().to_dict()
    config.mesh = MeshConfig().to_dict()
    return config


def default_run() -> ml_collections.ConfigDict:
    """What plain `bert-jax pretrain` runs: BERT-tiny (post-LN, MLM + NSP) on `builtin+packages`,
    to a validation MLM accuracy above 30% within 10 minutes on a 2-core CPU (README). The
    corpus is the larger built-in one so that NSP does not overfit and validation holds over
    1,000 sequences (3%); length 64, 2,048 pieces, no hidden dropout (as short Cramming-style
    runs; it saves the dropout RNG, costly on CPU), a high learning rate (3e-3: the MLM
    plateau breaks after step 1,000 instead of near 2,750 at 1e-3), Adam's beta2 0.98, and
    validation every 250 steps for a learning curve."""
    config = default_config("tiny")
    config.data.update(corpus="builtin+packages", vocab_size=2048, max_seq_length=64,
                       max_predictions_per_seq=10, validation_fraction=0.03)
    config.model.hidden_dropout_rate = 0.0
    config.train.update(num_steps=2500, global_batch_size=64, learning_rate=3e-3,
                        warmup_steps=200, adam_b2=0.98, log_every=100, eval_every=250)
    config.checkpoint.every_steps = 500
    return config


# Where pod configs run: chips (or GPUs) and the memory of each in GiB (GPUs: GB as sold, about
# what CUDA reports in GiB; JAX takes 90% of it: launch/gpu_env.sh).
POD_TARGETS = {"v4-32": (16, 32), "v5e-16": (16, 16), "v5e-64": (64, 16), "v5p-128": (64, 95),
               "8xh100": (8, 80), "8xh200": (8, 141), "64xh200": (64, 141)}
# GPU targets: one host of 8 GPUs (launch/gpu.sh or one SLURM node) or 8 nodes of 8 (SLURM).
GPU_TARGETS = ("8xh100", "8xh200", "64xh200")
# The global batch of each target: rows of LAMB's table (bigger slices, bigger batches), 256
# or 512 rows per chip.
_POD_BATCH = {"v4-32": 8192, "v5e-16": 4096, "v5e-64": 16384, "v5p-128": 32768,
              "8xh100": 4096, "8xh200": 4096, "64xh200": 32768}
# Rows of length 128 one chip holds per micro-batch, per 16 GiB (a quarter at length 512).
_ROWS_PER_16GIB = {"base": 256, "large": 64}


def lamb_schedule(global_batch_size: int) -> dict:
    """LAMB's BERT recipe (You et al. 2019, Table 4) at a batch size: 15,625 steps at 32,768, as
    many more as the batch is smaller, peak rate 5e-3 / sqrt(32,768 / batch), ~3,125 warmup."""
    ratio = 32768 / global_batch_size
    num_steps = round(15625 * ratio)
    return dict(num_steps=num_steps, learning_rate=5e-3 / ratio ** 0.5,
                warmup_steps=round(num_steps * 0.2 / ratio))


def pod_config(size: str, target: str) -> ml_collections.ConfigDict:
    """BERT-`size` with LAMB on English Wikipedia, phases 128 -> 512, sized for `target` (a key
    of POD_TARGETS): LAMB's global batch for the slice, accumulation so a micro-batch fits a
    chip, FSDP for large on TPUs, bfloat16 compute and rematerialized layers."""
    if target not in POD_TARGETS or size not in _ROWS_PER_16GIB:
        raise ConfigError(f"pod config {size}:{target}: expected a size in "
                          f"{list(_ROWS_PER_16GIB)} and a target in {list(POD_TARGETS)}")
    chips, memory_gib = POD_TARGETS[target]
    batch = _POD_BATCH[target]
    schedule = lamb_schedule(batch)
    config = default_config(size)
    config.data.update(corpus="tfds:wikipedia/20230601.en", vocab_size=30522)  # BERT's vocabulary
    rows_128 = _ROWS_PER_16GIB[size] * memory_gib // 16

    def accumulation(rows_per_chip):  # a power of two, so that it divides the batch
        return max(1, batch // (chips * 2 ** math.floor(math.log2(rows_per_chip))))

    num_steps = schedule["num_steps"]
    config.train.phases = ((0, 128, 20, batch, accumulation(rows_128)),
                           (num_steps * 9 // 10, 512, 80, batch, accumulation(rows_128 // 4)))
    # LAMB's settings: beta2 0.999, epsilon 1e-6, weight decay 0.01 (google-research/bert's).
    config.train.update(optimizer="lamb", global_batch_size=batch, **schedule)
    # Layers recomputed in the backward pass: without it, BERT-base's temporaries at 256 rows
    # of 128 outgrow a v5e chip (docs/scale-out.md has `bert-jax compile`'s figures).
    config.model.update(dtype="bfloat16", scan_layers=True, remat_policy="full")
    # BERT-large's state (parameters, LAMB's two moments, gradients: 5.4 GB) fills a third of a
    # 16 GiB TPU chip: sharded there (FSDP). A GPU of 80 GB or more holds it whole: GPU runs stay
    # data-parallel, sparing FSDP's weight all-gathers in every micro-batch's passes.
    if size == "large" and target not in GPU_TARGETS:
        config.mesh.update(data=1, fsdp=-1)
    config.checkpoint.every_steps = 500
    return config
