"""Configuration: the model's typed schema, the size presets, and the run config.

The run config is an `ml_collections.ConfigDict` (overridable on the command line as
`--config.model.num_layers=4`); its `model` part is validated by turning it into a frozen
`ModelConfig`, so a bad value fails once, early, with a message naming it.
"""

from __future__ import annotations

import dataclasses
import math

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
# Attention kernels (bert_jax.attention); auto: the fused kernel of the platform.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "splash")
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
    attention_impl: str = "auto"  # a kernel of bert_jax.attention
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            check_int(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}: expected a multiple of the head count")
        for name in ("hidden_dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name}={value!r}: expected a rate in [0, 1)")
        _check_choice("model", "dtype", self.dtype, DTYPES)
        _check_choice("model", "attention_impl", self.attention_impl, ATTENTION_IMPLEMENTATIONS)
        _check_choice("model", "remat_policy", self.remat_policy, REMAT_POLICIES)

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
            raise ValueError(f"data.masked_lm_prob={self.masked_lm_prob!r}: expected (0, 1)")
        for name in ("short_seq_prob", "validation_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"data.{name}={getattr(self, name)!r}: expected [0, 1)")
        _check_choice("data", "objective", self.objective, ("nsp", "sop"))

    from_dict = classmethod(lambda cls, values: _from_dict(cls, "data", values))
    to_dict = dataclasses.asdict


def _from_dict(cls, section: str, values):
    """A config dataclass from a mapping (e.g. `config.model`), rejecting unknown keys."""
    values = dict(values)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {section} config keys {unknown}: expected fields of "
                         f"{cls.__name__}")
    return cls(**values)


def _check_choice(section, name, value, choices):
    if value not in choices:
        raise ValueError(f"{section}.{name}={value!r}: expected one of {list(choices)}")


NONFINITE_POLICIES = ("rollback", "stop")


def check_int(name: str, value, least: int = 1) -> None:
    """A config integer (True is not one) of at least `least`, or a one-line error naming
    the field."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        expected = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name}={value!r}: expected {expected}")


def check_train(train: ml_collections.ConfigDict) -> None:
    """The `train` counts, and fields a run reads only after hours (the non-finite policy),
    checked up front."""
    _check_choice("train", "on_nonfinite", train.on_nonfinite, NONFINITE_POLICIES)
    for name, least in (("num_steps", 1), ("global_batch_size", 1), ("grad_accum_steps", 1),
                        ("log_every", 1), ("eval_steps", 0), ("stop_at_step", 0),
                        ("warmup_steps", 0), ("nonfinite_patience", 1), ("max_rollbacks", 0)):
        check_int(f"train.{name}", train[name], least)
    if not train.learning_rate > 0:
        raise ValueError(f"train.learning_rate={train.learning_rate!r}: expected a positive "
                         f"number")


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
    config.data = DataConfig().to_dict()
    config.model = preset(size).to_dict()
    # The model's vocabulary is the tokenizer's unless a config says otherwise.
    config.model.vocab_size = config.data.get_ref("vocab_size")
    config.train = ml_collections.ConfigDict(dict(
        seed=0, num_steps=10_000, stop_at_step=0, global_batch_size=256, grad_accum_steps=1,
        # google-research/bert's optimizer: AdamW, eps 1e-6, decay 0.01, clipping at 1.0.
        optimizer="adamw", learning_rate=1e-4, end_learning_rate=0.0, warmup_steps=1000,
        decay_power=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
        grad_clip_norm=1.0,
        log_every=100, eval_steps=0,
        # A step with a non-finite loss or gradient norm skips its update. After
        # `nonfinite_patience` such steps in a row, "rollback" restores the last checkpoint and
        # moves the data past the offending batches (at most `max_rollbacks` times); "stop"
        # ends the run with an error naming the step.
        on_nonfinite="rollback", nonfinite_patience=10, max_rollbacks=3,
        # Dropout PRNG: threefry2x32 is the same under every sharding; rbg is faster.
        rng_impl="threefry2x32",
        # ((start_step, max_seq_length, max_predictions_per_seq, global_batch_size[,
        # grad_accum_steps[, instances_per_row]]), ...); empty: one phase with the data
        # lengths and train.global_batch_size (`train.phases`).
        phases=()))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3,
                                                       async_save=True))
    # Device mesh sizes; -1 fills the remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config


def default_run() -> ml_collections.ConfigDict:
    """What plain `bert-jax pretrain` runs: BERT-tiny on the built-in corpus in about 8 minutes
    on a 2-core CPU. Chosen for that budget: length 64, no hidden dropout (as short
    Cramming-style runs do; it also saves the dropout RNG, costly on CPU), a 4,096-piece
    vocabulary, learning rate 1e-3 with Adam's beta2 at 0.98."""
    config = default_config("tiny")
    config.data.vocab_size = 4096
    config.data.max_seq_length = 64
    config.data.max_predictions_per_seq = 10
    config.model.hidden_dropout_rate = 0.0
    config.train.update(num_steps=1500, global_batch_size=64, learning_rate=1e-3,
                        warmup_steps=150, adam_b2=0.98, log_every=100)
    config.checkpoint.every_steps = 500
    return config


def wikipedia_two_phase(size: str, *, num_steps: int, learning_rate: float, warmup_steps: int,
                        global_batch_size: int = 256) -> ml_collections.ConfigDict:
    """BERT's recipe on English Wikipedia from the TFDS catalog: a 30,522-piece vocabulary,
    90% of the steps at length 128 (20 predictions), the last 10% at length 512 (80)."""
    config = default_config(size)
    config.data.corpus = "tfds:wikipedia/20230601.en"
    config.data.vocab_size = 30522
    config.train.update(num_steps=num_steps, learning_rate=learning_rate,
                        warmup_steps=warmup_steps, global_batch_size=global_batch_size)
    config.train.phases = ((0, 128, 20, global_batch_size),
                           (num_steps * 9 // 10, 512, 80, global_batch_size))
    return config


# Where pod configs run: chips (or GPUs) and the memory of each in GiB (GPUs: GB as sold; CUDA
# reports about as many GiB, 79.6 of an H100, 140.4 of an H200, of which JAX takes 90%:
# launch/gpu_env.sh).
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
        raise ValueError(f"pod config {size}:{target}: expected a size in "
                         f"{list(_ROWS_PER_16GIB)} and a target in {list(POD_TARGETS)}")
    chips, memory_gib = POD_TARGETS[target]
    batch = _POD_BATCH[target]
    schedule = lamb_schedule(batch)
    config = wikipedia_two_phase(size, global_batch_size=batch, **schedule)
    rows_128 = _ROWS_PER_16GIB[size] * memory_gib // 16

    def accumulation(rows_per_chip):  # a power of two, so that it divides the batch
        return max(1, batch // (chips * 2 ** math.floor(math.log2(rows_per_chip))))

    num_steps = schedule["num_steps"]
    config.train.phases = ((0, 128, 20, batch, accumulation(rows_128)),
                           (num_steps * 9 // 10, 512, 80, batch, accumulation(rows_128 // 4)))
    # LAMB's settings: beta2 0.999, epsilon 1e-6, weight decay 0.01 (google-research/bert's).
    config.train.update(optimizer="lamb", log_every=100)
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    # Recompute each layer in the backward pass: without it BERT-base at 256 rows of 128 per
    # v5e chip needs 25.5 GiB of temporaries; with it 3.3 (`bert-jax compile`).
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
