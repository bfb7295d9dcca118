"""Preflight: what can be wrong with a run, found before anything is compiled or written,
costs a second and a one-line error naming the value and the fix rather than hours."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np

from bert_jax import files
from bert_jax.config import ConfigError, RunConfig
from bert_jax.data.checks import check_batch_topology, check_data_against_model, vocab_file
from bert_jax.data.pipeline import follows_tokenizer
from bert_jax.export import check_export_dir
from bert_jax.tokenizer import load_tokenizer


def check_run(config: RunConfig, workdir, abstract_state, data_parallel: int) -> None:
    """Raises ConfigError for the first problem: the model against the tokenizer and each
    phase's lengths, each phase's batch against the devices, and the workdir (writable, room
    for the checkpoints kept)."""
    data = config.data
    if follows_tokenizer(config.model, data):  # it takes the tokenizer's size, known later
        tokens = config.model.vocab_size
    else:
        tokens = (load_tokenizer(vocab_file(data), lowercase=data.lowercase).vocab_size
                  if data.vocab_file else data.vocab_size)
    for phase in config.phases:
        check_data_against_model(phase.data(data), config.model, tokens)
        check_batch_topology(phase.global_batch_size, data_parallel * phase.grad_accum_steps)
    check_workdir(workdir, state_bytes(abstract_state), config.checkpoint.keep)


def state_bytes(abstract_state) -> int:
    """The bytes of a (train) state: what one checkpoint of it holds."""
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract_state))


def check_workdir(workdir, checkpoint_bytes: int, keep: int) -> None:
    """A local workdir must be writable (or creatable) with room for `keep` checkpoints plus
    the one being written, and `WORKDIR/export` something the run's export may replace.
    Object stores (`gs://...`) have no disk to fill; their first write checks them."""
    check_export_dir(files.path(workdir) / "export")
    if files.is_url(workdir):
        return
    path = Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    needed = checkpoint_bytes * (keep + 1)
    try:
        free = shutil.disk_usage(existing).free
        if existing.is_dir() and free < needed:
            raise ConfigError(
                f"workdir {workdir} has {free / 2**30:.2f} GiB free but its checkpoints need "
                f"about {needed / 2**30:.2f} GiB (checkpoint.keep={keep} + 1 being written, "
                f"{checkpoint_bytes / 2**30:.2f} GiB each): free space, lower checkpoint.keep "
                f"or choose another --workdir")
        # Probed in the deepest folder that exists: nothing is left behind, and a workdir
        # that a failed check never got to start is not created.
        probe = existing / f".bert-jax-write-test-{jax.process_index()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror or e}): choose "
                          f"another --workdir or fix its permissions") from None
