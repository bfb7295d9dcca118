"""Checkpoints: a thin layer over `orbax.checkpoint.CheckpointManager` for one workdir.

Each checkpoint is `<directory>/<step>/` with two items: `state`, a pytree of (sharded)
`jax.Array`s written through TensorStore, and `metadata`, a JSON dict (the config, the loader's
step, ...). Local paths and `gs://` take the same code. Orbax commits a checkpoint only once
every process has written it (a rename locally, `commit_success.txt` on GCS) and never lists
an uncommitted one, so an interrupted save is invisible.

Restore reads onto an abstract state whose shardings may differ from those at save time:
Orbax reads each device's slice, so nothing is ever gathered unsharded. A newest checkpoint
that cannot be read (a data file truncated or deleted) is reported, skipped for the newest
readable one, and then deleted, because the resumed run writes those steps again. The
restore itself is the check (a failed read is the damage), so a good checkpoint costs
nothing extra; Orbax keeps no checksums of array data, so bytes altered in place may pass.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bert_jax import files
from bert_jax.config import ConfigError, check_int

STATE = "state"
METADATA = "metadata"

_T = TypeVar("_T")


class Checkpointer:
    """Thin layer over `orbax.checkpoint.CheckpointManager` for one workdir.

    Every process of a multi-process run makes the same calls; Orbax decides which process
    writes what. Usable as a context manager (closing waits for pending saves).

    Args:
      directory: local path (`~` expanded, relative ones made absolute: TensorStore wants
        absolute paths) or `gs://...`; created if missing.
      keep: how many of the newest checkpoints to keep.
      every_steps: `should_save` is true at multiples of this.
      async_save: False blocks in `save` until the checkpoint is committed.
    """

    def __init__(self, directory, *, keep: int = 3, every_steps: int = 1000,
                 async_save: bool = True):
        for name, value in (("keep", keep), ("every_steps", every_steps)):
            check_int(f"checkpoint.{name}", value)
        self._name_format = ocp.step.standard_name_format()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            step_name_format=self._name_format,
            enable_async_checkpointing=async_save,
            # Orbax's default also saves the first step of a run with no checkpoint, and at
            # JAX's preemption sync point; ours saves at multiples of `every_steps` only (the
            # training loop saves on preemption itself, asking JAX once per step).
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps))
        self._manager = ocp.CheckpointManager(
            files.path(directory), options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(),
                           METADATA: ocp.JsonCheckpointHandler()})
        # Restores bypass the manager (see `_read_newest`); these handlers read one item each.
        self._state_reader = ocp.StandardCheckpointHandler()
        self._metadata_reader = ocp.JsonCheckpointHandler()

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def latest_step(self) -> int | None:
        """The newest committed step (or one this object is saving), None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True at multiples of `every_steps` not saved yet."""
        return self._manager.should_save(step)

    def save(self, step: int, state, metadata: dict, *, force: bool = False) -> bool:
        """Starts saving `state` and the JSON dict `metadata` as step `step`.

        Returns once the arrays are copied off the devices (so `state` may then be donated);
        the write continues in the background unless `async_save=False`. `force` saves even
        where `should_save` says no. Returns whether a save started: False when not due, or
        when `step` is already saved (a preemption right after a periodic save).
        """
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        # Serialized now, not in the background writer: bad values fail here, and later
        # changes to the caller's dict cannot leak into the checkpoint.
        metadata = json.loads(json.dumps(metadata))
        return self._manager.save(step, force=True, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(metadata)}))

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
        """Reads a checkpoint onto `abstract_state`; returns (state, metadata, step).

        Args:
          abstract_state: the saved pytree's structure as `jax.ShapeDtypeStruct`s, each with
            the `sharding` to restore onto (any mesh: arrays are resharded while read).
          step: None for the newest readable step. A damaged newer step is named in a
            warning, skipped, and deleted once an older one restores (the run writes those
            steps again, and a stale step would block saving them).

        Raises:
          FileNotFoundError: the directory holds no committed checkpoint, or not `step`.
          ValueError: no candidate step could be read (the last error is chained).
        """
        def read(candidate):
            path = self._step_path(candidate)
            state = self._state_reader.restore(
                path / STATE, args=ocp.args.StandardRestore(abstract_state))
            return state, self._metadata_reader.restore(path / METADATA)

        (state, metadata), restored, damaged = self._read_newest(read, step, collective=True)
        for bad in damaged:
            self._manager.delete(bad)
        if damaged:
            warnings.warn(f"deleted damaged checkpoint steps {damaged} in {self.directory}: "
                          f"training resumes from step {restored} and writes them again",
                          stacklevel=2)
        return state, metadata, restored

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON item alone (cheap: no arrays are read), e.g. the saved config.

        With `step` None, the newest step whose JSON reads; its arrays are not checked, so
        `restore` may still fall back to an older step (whose metadata it returns).
        Raises like `restore`. Needs no other process: any process may call it alone.
        """
        metadata, _, _ = self._read_newest(
            lambda candidate: self._metadata_reader.restore(self._step_path(candidate) / METADATA),
            step, collective=False)
        return metadata

    def delete_after(self, step: int) -> None:
        """Deletes the checkpoints of steps after `step` (a rollback rewrites them)."""
        self.wait()
        for later in self.all_steps():
            if later > step:
                self._manager.delete(later)

    def wait(self) -> None:
        """Blocks until pending saves are committed (and old steps beyond `keep` deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads."""
        self._manager.close()
        self._state_reader.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _step_path(self, step: int) -> epath.Path:
        return self.directory / self._name_format.build_name(step)

    def _read_newest(self, read: Callable[[int], _T], step: int | None, *,
                     collective: bool) -> tuple[_T, int, list[int]]:
        """`read(step)` for `step`, or for each committed step from the newest until one reads.

        Returns (what `read` returned, its step, the newer steps that failed). With
        `collective`, every process must call this: a step counts as read only if it read on
        every process, so all processes agree on it even where only some hit the damage.
        (This is why restores go through Orbax's handlers, not `CheckpointManager.restore`,
        whose barrier a process that failed to read would never reach.)
        """
        self.wait()  # a step still being written is listed but not readable yet
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}: "
                                    f"expected one of {steps}")
        candidates = [step] if step is not None else steps[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed = []
        for candidate in candidates:
            try:
                result, error = read(candidate), None
            except Exception as e:  # noqa: BLE001 - any failure to read marks the step damaged
                result, error = None, e
            readable = error is None
            if collective:
                readable = _on_every_process(readable)
            if readable:
                return result, candidate, failed
            failed.append(candidate)
            warnings.warn(f"checkpoint step {candidate} in {self.directory} is damaged or "
                          f"unreadable: {_describe(error)}", stacklevel=3)
        raise ConfigError(f"no readable checkpoint among steps {candidates} in "
                          f"{self.directory}: see the warnings for each") from error


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process; a collective that every process must call."""
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _describe(error: Exception | None) -> str:
    """A one-line account of a read error (TensorStore's run to pages of spec JSON)."""
    if error is None:
        return "it could not be read on another process"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"
