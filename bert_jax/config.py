"""Configuration: typed sections, phases, size presets and pod sizing.

The run config is an `ml_collections.ConfigDict` (overridable on the command line as
`--config.model.num_layers=4`); `RunConfig.from_dict` turns it into frozen sections once,
so a bad value fails early, with a message naming it, and later code reads typed fields.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections


class ConfigError(ValueError):
    """A user's mistake (a config value, a path, a file's content): the command line prints
    its one-line message and exits with code 2. Anything else that stops a command is not
    the user's fault (exit code 1)."""

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
# Attention kernels (bert_jax.attention); auto: the fused kernel of the platform.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "splash")
# Rematerialization policies, by the name of the `jax.checkpoint_policies` entry they use.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a BERT encoder; each architecture choice is one field.

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
    attention_impl: str = "auto"  # a kernel of bert_jax.attention
    scan_layers: bool = False
    remat_policy: str = "none"
    layer_norm: str = "post"  # post: BERT's, after each residual add; pre: before each sub-layer

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            check_int(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}: expected a multiple of the head count")
        for name in ("hidden_dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name}={value!r}: expected a rate in [0, 1)")
        _check_choice("model", "dtype", self.dtype, DTYPES)
        _check_choice("model", "attention_impl", self.attention_impl, ATTENTION_IMPLEMENTATIONS)
        _check_choice("model", "remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("model", "layer_norm", self.layer_norm, ("post", "pre"))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    from_dict = classmethod(lambda cls, values: _from_dict(cls, "model", values))
    to_dict = dataclasses.asdict


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where pretraining data comes from and how instances and masks are made.

    `corpus`: a file glob (commas for several), `builtin` (the Python standard library's
    documentation), or `tfds:NAME[:SPLIT]`. `vocab_file`: a WordPiece `vocab.txt` or a
    SentencePiece `.model`; empty means "train a SentencePiece vocabulary of `vocab_size`".
    Defaults follow google-research/bert except `dupe_factor` (1, since masking is dynamic).
    `instances_per_row` > 1 packs up to that many instances into each row (`data.packing`):
    for long sequences, where many instances are short.
    """

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
    instances_per_row: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_length", "max_predictions_per_seq", "dupe_factor",
                     "instances_per_row"):
            check_int(f"data.{name}", getattr(self, name))
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ConfigError(f"data.masked_lm_prob={self.masked_lm_prob!r}: expected (0, 1)")
        for name in ("short_seq_prob", "validation_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name}={getattr(self, name)!r}: expected [0, 1)")
        _check_choice("data", "objective", self.objective, ("nsp", "sop"))

    from_dict = classmethod(lambda cls, values: _from_dict(cls, "data", values))
    to_dict = dataclasses.asdict


def _from_dict(cls, section: str, values):
    """A config dataclass from a mapping (e.g. `config.model`), rejecting unknown keys."""
    values = dict(values)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {section} config keys {unknown}: expected fields of "
                          f"{cls.__name__}")
    return cls(**values)


def _check_choice(section, name, value, choices):
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r}: expected one of {list(choices)}")


def check_int(name: str, value, least: int = 1) -> None:
    """A config integer (True is not one) of at least `least`, or a one-line error naming
    the field."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        expected = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(f"{name}={value!r}: expected {expected}")


OPTIMIZERS = ("adamw", "lamb")
NONFINITE_POLICIES = ("rollback", "stop")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a model is trained: steps and batch, optimizer and schedule, when to log and
    evaluate, and what non-finite steps do. Pretraining and fine-tuning share it.

    google-research/bert's optimizer: AdamW, epsilon 1e-6, decay 0.01, clipping at 1.0, a
    linear warmup then polynomial decay (power 1: linear) to `end_learning_rate`.
    A step with a non-finite loss or gradient norm skips its update. After
    `nonfinite_patience` such steps in a row, "rollback" restores the last checkpoint and
    moves the data past the offending batches (at most `max_rollbacks` times); "stop" ends
    the run with an error naming the steps. The dropout PRNG `rng_impl`: threefry2x32 is
    the same under every sharding; rbg is faster. `phases`: ((start_step, max_seq_length,
    max_predictions_per_seq, global_batch_size[, grad_accum_steps[, instances_per_row]]),
    ...); empty: one phase of the data lengths and `global_batch_size` (`Phase`).
    """

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

    def __post_init__(self):
        for name, least in (("num_steps", 1), ("global_batch_size", 1), ("grad_accum_steps", 1),
                            ("log_every", 1), ("eval_every", 0), ("eval_steps", 0),
                            ("stop_at_step", 0), ("warmup_steps", 0), ("nonfinite_patience", 1),
                            ("max_rollbacks", 0)):
            check_int(f"train.{name}", getattr(self, name), least)
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate={self.learning_rate!r}: expected a positive "
                              f"number")
        _check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train", "on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        object.__setattr__(self, "phases", as_tuples(self.phases))

    @property
    def stop(self) -> int:
        """The step this invocation stops at: `stop_at_step` (0: `num_steps`)."""
        return min(self.stop_at_step or self.num_steps, self.num_steps)

    from_dict = classmethod(lambda cls, values: _from_dict(cls, "train", values))
    to_dict = dataclasses.asdict


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: every `every_steps` steps (and at the end), the newest `keep`
    kept, written in the background with `async_save`."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    from_dict = classmethod(lambda cls, values: _from_dict(cls, "checkpoint", values))
    to_dict = dataclasses.asdict


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (`bert_jax.sharding`); -1 fills the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    from_dict = classmethod(lambda cls, values: _from_dict(cls, "mesh", values))
    to_dict = dataclasses.asdict


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
    """The phases of `train.phases`. Accumulation defaults to `train.grad_accum_steps` (long
    sequences often need more micro-batches than short ones), packing to
    `data.instances_per_row` (BERT's 512-token phase gains from it, the 128 one hardly)."""
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
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                    "checkpoint": CheckpointConfig, "mesh": MeshConfig}
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
    """The run config every file in `configs/` starts from: each section's defaults, the
    model of a size preset, whose vocabulary is the tokenizer's unless a config says
    otherwise."""
    config = ml_collections.ConfigDict()
    config.data = DataConfig().to_dict()
    config.model = preset(size).to_dict()
    config.model.vocab_size = config.data.get_ref("vocab_size")
    config.train = TrainConfig().to_dict()
    config.checkpoint = CheckpointConfig().to_dict()
    config.mesh = MeshConfig().to_dict()
    return config


def default_run() -> ml_collections.ConfigDict:
    """What plain `bert-jax pretrain` runs: BERT-tiny on the built-in corpus, sized to finish
    within 10 minutes on a 2-core CPU (README has the time). Chosen for that budget: length
    64, no hidden dropout (as short Cramming-style runs do; it also saves the dropout RNG,
    costly on CPU), a 4,096-piece vocabulary, learning rate 1e-3 with Adam's beta2 at 0.98."""
    config = default_config("tiny")
    config.data.vocab_size = 4096
    config.data.max_seq_length = 64
    config.data.max_predictions_per_seq = 10
    config.model.hidden_dropout_rate = 0.0
    config.train.update(num_steps=1500, global_batch_size=64, learning_rate=1e-3,
                        warmup_steps=150, adam_b2=0.98, log_every=100)
    config.checkpoint.every_steps = 500
    return config


# Where pod configs run: chips (or GPUs) and the memory of each in GiB (GPUs: GB as sold, about
# what CUDA reports in GiB; JAX takes 90% of it: launch/gpu_env.sh).
POD_TARGETS = {"v4-32": (16, 32), "v5e-16": (16, 16), "v5e-64": (64, 16),
               "v5p-128": (64, 95),
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
    """LAMB's BERT recipe at a batch size (You et al. 2019, Table 4, square-root scaling):
    15,625 steps at batch 32,768, as many more as the batch is smaller; peak learning rate
    5e-3 / sqrt(32,768 / batch); warmup over 0.2 x batch / 32,768 of the steps."""
    ratio = 32768 / global_batch_size
    num_steps = round(15625 * ratio)
    return dict(num_steps=num_steps, learning_rate=5e-3 / ratio ** 0.5,
                warmup_steps=round(num_steps * 0.2 / ratio))


def pod_config(size: str, target: str) -> ml_collections.ConfigDict:
    """BERT-`size` with LAMB on English Wikipedia, phases 128 -> 512, sized for `target`
    (a key of POD_TARGETS): the global batch of LAMB's table for the slice, gradient
    accumulation so a micro-batch fits each chip's memory, parameters and optimizer state
    sharded (FSDP) for large on TPUs, bfloat16 compute and rematerialized layers."""
    if target not in POD_TARGETS or size not in _ROWS_PER_16GIB:
        raise ConfigError(f"pod config {size}:{target}: expected a size in "
                          f"{list(_ROWS_PER_16GIB)} and a target in {list(POD_TARGETS)}")
    chips, memory_gib = POD_TARGETS[target]
    batch = _POD_BATCH[target]
    schedule = lamb_schedule(batch)
    config = default_config(size)
    config.data.corpus = "tfds:wikipedia/20230601.en"
    config.data.vocab_size = 30522  # BERT's
    rows_128 = _ROWS_PER_16GIB[size] * memory_gib // 16

    def accumulation(rows_per_chip):  # a power of two, so that it divides the batch
        return max(1, batch // (chips * 2 ** math.floor(math.log2(rows_per_chip))))

    num_steps = schedule["num_steps"]
    config.train.phases = ((0, 128, 20, batch, accumulation(rows_128)),
                           (num_steps * 9 // 10, 512, 80, batch, accumulation(rows_128 // 4)))
    # LAMB's settings: beta2 0.999, epsilon 1e-6, weight decay 0.01 (google-research/bert's).
    config.train.update(optimizer="lamb", global_batch_size=batch, **schedule)
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    # Recompute each layer in the backward pass: without it, BERT-base's temporaries at 256
    # rows of 128 outgrow a v5e chip (docs/scale-out.md has `bert-jax compile`'s figures).
    config.model.remat_policy = "full"
    # BERT-large's state (parameters, LAMB's two moments, gradients: 5.4 GB) fills a third of a
    # 16 GiB TPU chip: sharded there (FSDP). A GPU of 80 GB or more holds it whole, so GPU runs
    # stay data-parallel: one gradient all-reduce per step and no parameter all-gathers (FSDP
    # gathers each layer's weights in the forward and again in the backward of every
    # micro-batch).
    if size == "large" and target not in GPU_TARGETS:
        config.mesh.update(data=1, fsdp=-1)
    config.checkpoint.every_steps = 500
    return config
