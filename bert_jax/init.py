"""Where a run's weights start (pretraining's `train.init`, fine-tuning's `init.path`): a
bert-jax workdir's checkpoint, a Hugging Face BERT directory or a google-research/bert
checkpoint directory. Each brings its architecture and tokenizer: `describe` reads them
without the weights, `follow` makes a pretraining config take them, `load` reads the weights.
"""

from __future__ import annotations

import dataclasses

from etils.epath import Path  # local paths and gs:// alike

from bert_jax import google, hf
from bert_jax import workdir as workdirs
from bert_jax.config import MODEL_RUN_SETTINGS, ConfigError, ModelConfig, RunConfig
from bert_jax.pretrained import load_params

EXPECTED = "a bert-jax workdir, a Hugging Face BERT directory or a google-research/bert checkpoint"


@dataclasses.dataclass(frozen=True)
class Source:
    """An init without its weights: what kind it is, its architecture and tokenizer."""

    path: str
    step: int | None  # a workdir's checkpoint (None: the latest)
    kind: str  # "workdir", "Hugging Face" or "Google"
    model_config: ModelConfig
    tokenizer_file: Path
    lowercase: bool

    @property
    def architecture(self) -> dict:
        """The ModelConfig fields the init decides (not the run's numerics and regularization)."""
        return {k: v for k, v in self.model_config.to_dict().items()
                if k not in MODEL_RUN_SETTINGS}


def describe(path: str, step: int | None = None, name: str = "train.init") -> Source:
    """The init at `path`; `name` is the option that gave it, for error messages."""
    if not path or not Path(path).is_dir():
        found = " is empty" if not path else f"={path!r} does not exist"
        raise ConfigError(f"{name}{found}: expected {EXPECTED} directory")
    if workdirs.is_workdir(path):
        checkpointer = workdirs.open_checkpoints(path)
        try:
            config = RunConfig.from_dict(workdirs.pretraining_config(checkpointer, path, step))
        finally:
            checkpointer.close()
        return Source(path, step, "workdir", config.model, workdirs.tokenizer_file_of(path),
                      config.data.lowercase)
    if google.is_checkpoint_dir(path):
        kind, model_config = "Google", google.read_config(path)
    else:
        kind, model_config = "Hugging Face", hf.read_config(path)
    return Source(path, step, kind, model_config, workdirs.tokenizer_file_of(path),
                  workdirs.lowercase_of(path))


def load(source: Source, log=print) -> dict:
    """The init's parameters (host arrays, a nested dict of the subtrees it holds), said in
    one line of `log` with the subtrees it lacks, which start fresh."""
    if source.kind == "workdir":
        params, missing = workdirs.load_weights(source.path, source.step)[0].params, ()
    else:
        _, params, missing = load_params(source.path)
    fresh = f" ({', '.join(missing)}: none there, they start fresh)" if missing else ""
    log(f"starting from the {source.kind} weights of {source.path}{fresh}")
    return params


def follow(config, explicit: set[str] = frozenset()) -> Source | None:
    """Makes a pretraining config (`ml_collections.ConfigDict`) take the architecture and
    tokenizer of its `train.init` (None when it has none): the model fields the init decides,
    `data.vocab_file`, `data.vocab_size` and `data.lowercase`. `explicit` holds the dotted
    fields the user set ("model.num_layers"): one that contradicts the init is an error naming
    both values."""
    if not config.train.get("init"):
        return None
    source = describe(config.train.init, config.train.init_step or None)
    wanted = {**{f"model.{k}": v for k, v in source.architecture.items()},
              "data.vocab_file": str(source.tokenizer_file),
              "data.vocab_size": source.model_config.vocab_size,
              "data.lowercase": source.lowercase}
    for key in explicit & wanted.keys():  # all checked before any is set: fields may share
        section, field = key.split(".")    # a value (model.vocab_size is data.vocab_size's)
        if config[section][field] != wanted[key]:
            raise ConfigError(f"--config.{key}={config[section][field]!r} contradicts "
                              f"train.init={source.path!r}, whose {key} is {wanted[key]!r}: "
                              f"leave it out (the architecture and tokenizer come from the init)")
    for key, value in wanted.items():
        section, field = key.split(".")
        config[section][field] = value
    return source
