"""A run's directory: `checkpoints/` (Orbax), `config.json`, `metrics.jsonl`, `tensorboard/`,
the vocabulary file (copied there so that export needs neither the dataset nor the corpus)
and, at the end of a run, `export/`. An export keeps the vocabulary file too, so the tokenizer
helpers here read either.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import ml_collections
from etils.epath import Path  # local paths and gs:// alike

from bert_jax import tokenizer as tokenization
from bert_jax.config import ConfigError, MeshConfig, RunConfig

if TYPE_CHECKING:  # imported where used: tokenizer look-ups need neither JAX nor Orbax
    from bert_jax.checkpoint import Checkpointer
    from bert_jax.pretrained import Pretrained

CHECKPOINTS = "checkpoints"
EXPORT = "export"
TOKENIZER_FILES = (tokenization.SENTENCEPIECE_FILE, tokenization.VOCAB_FILE)


def is_workdir(path) -> bool:
    return (Path(path) / CHECKPOINTS).is_dir()


def has_checkpoint(workdir) -> bool:
    """Whether a run in `workdir` resumes (nothing is created to find out)."""
    try:
        open_checkpoints(workdir).close()
    except ConfigError:
        return False
    return True


def write_config(workdir, values: dict) -> None:
    """`WORKDIR/config.json`: what the run was started with, for people and tools to read."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "config.json").write_text(json.dumps(values, indent=2) + "\n")


def keep_tokenizer(workdir, vocabulary_file) -> None:
    """Copies the vocabulary file of the training data into the workdir."""
    name = tokenization.kept_file_name(vocabulary_file)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / name).write_bytes(Path(vocabulary_file).read_bytes())


def lowercase_of(path) -> bool:
    """`do_lower_case` of a directory's tokenizer_config.json; without one (a Google
    checkpoint), whether its vocab.txt is uncased: no token but the `[...]` specials has an
    uppercase letter (google-research/bert's cased vocabularies have thousands)."""
    config_file = Path(path) / tokenization.TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        return bool(json.loads(config_file.read_text()).get("do_lower_case", True))
    vocab = Path(path) / tokenization.VOCAB_FILE
    if not vocab.is_file():
        return True
    return not any(not token.startswith("[") and token != token.lower()
                   for token in vocab.read_bytes().decode(errors="replace").split("\n"))


def tokenizer_file_of(path) -> Path:
    """The vocabulary file kept in a workdir or export (`TOKENIZER_FILES`)."""
    for name in TOKENIZER_FILES:
        if (Path(path) / name).is_file():
            return Path(path) / name
    raise ConfigError(f"{path} holds no {' or '.join(TOKENIZER_FILES)}: expected the "
                      f"tokenizer beside the weights")


def load_tokenizer_of(path, lowercase: bool | None = None) -> tokenization.Tokenizer:
    """The tokenizer kept in a workdir or export; `lowercase` None reads the export's."""
    lowercase = lowercase_of(path) if lowercase is None else lowercase
    return tokenization.load_tokenizer(tokenizer_file_of(path), lowercase=lowercase)


def open_checkpoints(workdir) -> Checkpointer:
    """The checkpoints of an existing workdir (nothing is created for a wrong path)."""
    from bert_jax.checkpoint import Checkpointer

    if is_workdir(workdir):
        checkpointer = Checkpointer(Path(workdir) / CHECKPOINTS)
        if checkpointer.latest_step() is not None:
            return checkpointer
        checkpointer.close()
    found = "has no checkpoint" if Path(workdir).exists() else "does not exist"
    raise ConfigError(f"{workdir} {found}: expected a workdir of bert-jax pretrain")


def pretraining_config(checkpointer: Checkpointer, workdir,
                       step: int | None = None) -> ml_collections.ConfigDict:
    """The run config saved with a pretraining checkpoint (a clear error for a fine-tuning
    workdir, whose checkpoints hold another model)."""
    config = ml_collections.ConfigDict(checkpointer.restore_metadata(step)["config"])
    if "task" in config:
        raise ConfigError(f"{workdir} is a fine-tuning workdir: expected a pretraining one (a "
                          f"fine-tuned model is in {Path(workdir) / EXPORT})")
    return config


def restore(workdir, step: int | None = None, mesh=None):
    """(config, run, state, step) of a pretraining workdir's checkpoint (default the latest),
    on `mesh` (default the run's own). The run has no checkpointer: nothing is written."""
    from bert_jax import run as runs

    checkpointer = open_checkpoints(workdir)
    try:
        config = RunConfig.from_dict(pretraining_config(checkpointer, workdir, step))
        run = runs.build(config.model, config.train, mesh or config.mesh)
        state, _, restored_step = checkpointer.restore(run.spec.abstract, step)
    finally:
        checkpointer.close()
    return config, run, state, restored_step


def load_weights(workdir, step: int | None = None) -> tuple[Pretrained, RunConfig]:
    """The parameters of a workdir's checkpoint (`step`, default the latest) on the host."""
    import jax
    import numpy as np

    from bert_jax import sharding
    from bert_jax.pretrained import Pretrained

    one_device = sharding.make_mesh(MeshConfig(data=1).to_dict(),
                                    devices=jax.local_devices()[:1])
    config, _, state, _ = restore(workdir, step, one_device)
    params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    return Pretrained(config.model, params), config
