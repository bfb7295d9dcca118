"""Checkpoints: a thin layer over `orbax.checkpoint.CheckpointManager` for one workdir.

Each checkpoint is `<directory>/<step>/` with two items: `state`, a pytree of (sharded)
`jax.Array`s written through TensorStore, and `metadata`, a JSON dict (the config, the loader's
step, ...), on local paths and `gs://` alike. Orbax commits a checkpoint once every process
has written it and lists only committed ones, so an interrupted save is invisible.

Restore reads each device's slice onto an abstract state of any sharding, never gathering it
whole. Reading is the damage check (a data file truncated or deleted), free for a good
checkpoint; Orbax keeps no checksums of array data, so bytes altered in place may pass.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bert_jax import files
from bert_jax.config import ConfigError, check_int

STATE = "state"
METADATA = "metadata"


class MissingStep(ConfigError):
    """A step asked for (`--step`, `train.init_step`) that the checkpoints lack: the user's
    to fix, or a step the keep policy deleted while another process read the list."""


class Checkpointer:
    """The checkpoints of one directory (local, `~` expanded, or `gs://...`; created if
    missing): the newest `keep` kept, `should_save` at multiples of `every_steps`, and with
    `async_save=False` each save blocks until it is committed.

    Every process of a multi-process run makes the same calls; Orbax decides which process
    writes what. Usable as a context manager (closing waits for pending saves)."""

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
        self.directory: epath.Path = self._manager.directory
        # Restores bypass the manager (see `_read_newest`); these handlers read one item each.
        self._state_reader = ocp.StandardCheckpointHandler()
        self._metadata_reader = ocp.JsonCheckpointHandler()

    def latest_step(self) -> int | None:
        """The newest committed step (or one this object is saving), None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True at multiples of `every_steps` not saved yet."""
        return self._manager.should_save(step)

    def save(self, step: int, state, metadata: dict, *, force: bool = False) -> bool:
        """Starts saving `state` and the JSON dict `metadata` as step `step`, where due (or
        `force`) and not saved yet (a preemption right after a periodic save); returns whether
        it started. Returns once the arrays are copied off the devices (so `state` may then be
        donated); the write continues in the background unless `async_save=False`."""
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        # Serialized now, not in the background writer: bad values fail here, and later
        # changes to the caller's dict cannot leak into the checkpoint.
        metadata = json.loads(json.dumps(metadata))
        return self._manager.save(step, force=True, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(metadata)}))

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
        """Reads `step` (None: the newest readable one) onto `abstract_state`, the saved
        pytree's `jax.ShapeDtypeStruct`s, each with the sharding to restore onto (any mesh);
        returns (state, metadata, step).

        A damaged newer step is named in a warning, skipped, and deleted once an older one
        restores (the run writes those steps again, and a stale step would block saving them).
        Raises FileNotFoundError when there is no committed checkpoint, MissingStep when not
        `step`, and ConfigError when none of the candidates reads (the last error chained)."""
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
        """The JSON item alone (no arrays are read), e.g. the saved config; with `step` None,
        the newest step whose JSON reads (its arrays unchecked: `restore` may still fall back
        to an older step). Raises like `restore`; any process may call it alone."""
        return self._read_newest(
            lambda candidate: self._metadata_reader.restore(self._step_path(candidate) / METADATA),
            step, collective=False)[0]

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

    def _read_newest(self, read: Callable[[int], Any], step: int | None, *,
                     collective: bool) -> tuple[Any, int, list[int]]:
        """`read(step)` for `step`, or for each committed step from the newest until one reads;
        returns (what `read` returned, its step, the newer steps that failed).

        With `collective` (every process calls it), a step counts as read only if it read on
        every process, so all agree even where only some hit the damage: hence Orbax's
        handlers, not `CheckpointManager.restore`, whose barrier a failed process never reaches."""
        self.wait()  # a step still being written is listed but not readable yet
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise MissingStep(f"no checkpoint for step {step} in {self.directory}: expected "
                              f"one of {steps}")
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
                readable = bool(np.all(multihost_utils.process_allgather(np.int32(readable))))
            if readable:
                return result, candidate, failed
            failed.append(candidate)
            if error is None:
                why = "it could not be read on another process"
            else:  # its first line: TensorStore's errors run to pages of spec JSON
                first_line = (str(error).strip().splitlines() or [""])[0]
                why = f"{type(error).__name__}: {first_line[:300]}"
            warnings.warn(f"checkpoint step {candidate} in {self.directory} is damaged or "
                          f"unreadable: {why}", stacklevel=3)
        raise ConfigError(f"no readable checkpoint among steps {candidates} in "
                          f"{self.directory}: see the warnings for each") from error
