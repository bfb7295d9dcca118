"""The one training loop, shared by pretraining and fine-tuning, and its hooks: log, evaluate,
checkpoint, preemption and non-finite steps, each at the steps `due` names.

A step's metrics are read after the next step is dispatched, so the device never waits for
the host; that is also when too many non-finite steps in a row raise `Diverged`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable

import jax
from jax.experimental import multihost_utils
from bert_jax import flops, progress
from bert_jax.metrics import MetricsWriter


def due(step: int, every: int) -> bool:
    """Whether something done every `every` steps (0: never) is done after `step` steps."""
    return every > 0 and step % every == 0


class Preemption:
    """SIGTERM (the preemption notice of Cloud TPU, GCE and SLURM) and Ctrl-C (SIGINT) as a
    stop after a step that every process agrees on, so all of them save the same checkpoint; a
    second Ctrl-C aborts at once (`KeyboardInterrupt`), saving nothing more.

    One process: a Python handler sets a flag. Several: JAX's preemption service, which
    catches SIGTERM itself and tells all processes of a notice on any of them, names the sync
    step (the first one every process can still reach); `reached` must then be called by
    every process after every step, and Ctrl-C is passed on to it as a SIGTERM.
    """

    def __init__(self):
        self.requested = self.interrupted = False
        self._shared = jax.process_count() > 1
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if not self._shared:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def _interrupt(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        progress.write("Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again "
                       "aborts without saving)", file=sys.stderr)
        if self._shared:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def reached(self, step: int) -> bool:
        if self._shared and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True
        return self.requested

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradients (`train.on_nonfinite`)."""


class Diverged(Exception):
    """Step `step` (counted from 1, as in the metrics) was the `train.nonfinite_patience`-th
    non-finite step in a row, in the stretch of steps whose data starts at `phase_start`."""

    def __init__(self, step: int, phase_start: int):
        super().__init__(step, phase_start)
        self.step, self.phase_start = step, phase_start


@dataclasses.dataclass
class Hooks:
    """What the loop does besides stepping, and when. `evaluate(state, step)` evaluates and
    logs, after every `eval_every` steps and after step `evaluate_at`; `save(step, state)`
    writes a checkpoint after the steps `should_save` names (the last one is the caller's)."""

    writer: MetricsWriter
    preemption: Preemption
    log_every: int
    patience: int  # non-finite steps in a row that raise `Diverged`
    phase_start: int  # the first step of the data being read (rollbacks skip batches in it)
    rows: int  # sequences per step, for the speed
    row_length: int
    flops_per_row: float | None = None  # for the MFU
    evaluate: Callable[[dict, int], None] | None = None
    eval_every: int = 0
    evaluate_at: int = -1
    should_save: Callable[[int], bool] = lambda step: False
    save: Callable[[int, dict], None] | None = None
    description: str = "train"


def train_loop(state: dict, batches: Iterable[tuple[int, dict]], step_fn, hooks: Hooks,
               start: int, stop: int) -> tuple[dict, int, dict]:
    """Steps [start, stop) over `batches` ((step, global batch) pairs), stopping early at a
    preemption. Returns the state, the steps done, and the last logged train metrics.

    The real token counts of the steps (devices' scalars, in `tokens` where the objective
    counts them) are summed at the log, without waiting on each step."""
    pending = watched = None
    last, tokens = {}, []
    timer = (start, time.perf_counter())
    with progress.bar(total=stop - start, desc=hooks.description, unit="step",
                      disable=not hooks.writer.enabled) as bar:  # closed on errors too

        def log(entry):
            nonlocal timer
            values = _log_train(*entry, timer, hooks, bar)
            timer = (entry[0], time.perf_counter())
            return values

        done = start
        for step, batch in batches:
            state, metrics = step_fn(state, batch)
            if "tokens" in metrics:
                tokens.append(metrics["tokens"])
            if watched is not None:
                _check_finite(*watched, hooks)
            if pending is not None:
                last, pending = log(pending), None
            done = step + 1
            watched = (done, metrics)
            if done == start + 1:  # the first step compiled: the rate counts from here
                bar.reset()
            bar.update(1)
            if due(done, hooks.log_every) or done == stop:
                pending, tokens = (done, metrics, tokens), []
            if hooks.evaluate is not None and (due(done, hooks.eval_every)
                                               or done == hooks.evaluate_at):
                _check_finite(*watched, hooks)
                if pending is not None:
                    last, pending = log(pending), None
                hooks.evaluate(state, done)
                timer = (done, time.perf_counter())  # training speed leaves out the evaluation
            if hooks.should_save(done) and done != stop:
                hooks.save(done, state)
            if hooks.preemption.reached(done):
                break
        if watched is not None:
            _check_finite(*watched, hooks)
        if pending is not None:
            last = log(pending)
    return state, done, last


def _check_finite(step: int, metrics: dict, hooks: Hooks) -> None:
    if int(metrics["nonfinite_consecutive"]) >= hooks.patience:
        raise Diverged(step, hooks.phase_start)


_SHOWN = {"loss": "loss", "mlm_acc": "mlm_accuracy"}  # the bar's postfix: names, metrics


def _log_train(step, metrics, tokens, timer, hooks: Hooks, bar) -> dict:
    """Logs the metrics of `step` and the speed since the last log: `tokens_per_s` counts
    row positions, padding included; `real_tokens_per_s` the tokens that are not padding,
    in all the steps since the last log (packing raises this one, not `tokens_per_s`)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
    steps = step - timer[0]
    seconds = max(time.perf_counter() - timer[1], 1e-9)
    seq_per_s = steps * hooks.rows / seconds
    values.update(step_ms=1000 * seconds / steps, seq_per_s=seq_per_s,
                  tokens_per_s=seq_per_s * hooks.row_length)
    if tokens:
        values["real_tokens_per_s"] = float(sum(jax.device_get(tokens))) / seconds
    if hooks.flops_per_row is not None:
        values["mfu"] = flops.mfu(seq_per_s, hooks.flops_per_row, jax.devices()[0].device_kind,
                                  jax.device_count())
    hooks.writer.write(step, values)
    bar.set_postfix({name: f"{values[key]:.3f}" for name, key in _SHOWN.items()
                     if key in values})
    return values


def recovering(steps: Callable[[dict, int], tuple[dict, int]], state: dict, step: int, run,
               skipped: dict, log) -> tuple[dict, int, int]:
    """`steps(state, step) -> (state, step)` (the loop over every phase), run again after
    each rollback of `run.train.on_nonfinite` (`_roll_back`). Returns the state, the step
    reached and the rollbacks made."""
    rollbacks = 0
    while True:
        try:
            state, step = steps(state, step)
            return state, step, rollbacks
        except Diverged as e:
            diverged = Diverged(e.step, e.phase_start)  # no traceback holding old states
        state = None  # released before the checkpoint is read
        state, step = _roll_back(diverged, run, skipped, rollbacks, log)
        rollbacks += 1
        run.writer.rewind(step)
        run.writer.write(step, {"rollbacks": rollbacks}, split="events")


def _roll_back(diverged: Diverged, run, skipped: dict, rollbacks: int, log) -> tuple[dict, int]:
    """The state of the newest checkpoint before the run of non-finite steps, with the data of
    its phase moved past the batches that gave them (`skipped`, by the phase's first step,
    is updated); or `NonFiniteError` where the config says stop, the rollbacks are spent, or
    no checkpoint comes before those steps."""
    train, checkpointer = run.train, run.checkpointer
    patience = train.nonfinite_patience
    what = (f"non-finite loss or gradients in {patience} steps in a row (steps "
            f"{diverged.step - patience + 1}-{diverged.step}; their updates were skipped)")
    advice = ("lower train.learning_rate, raise train.warmup_steps or check the data; the "
              "workdir resumes from its last checkpoint")
    if train.on_nonfinite == "stop":
        raise NonFiniteError(f"{what}: stopped as train.on_nonfinite='stop' asks; {advice}")
    if rollbacks >= train.max_rollbacks:
        raise NonFiniteError(f"{what} after {rollbacks} rollbacks (train.max_rollbacks): "
                             f"{advice}")
    first_bad = diverged.step - patience + 1
    before = [step for step in checkpointer.all_steps() if step < first_bad]
    if not before:
        raise NonFiniteError(f"{what} and no checkpoint before step {first_bad} to roll back "
                             f"to: {advice}")
    checkpointer.delete_after(before[-1])  # saved during the run of bad steps: rewritten
    state, _, restored = checkpointer.restore(run.spec.abstract, before[-1])
    key = str(diverged.phase_start)
    skipped[key] = skipped.get(key, 0) + diverged.step - max(restored, diverged.phase_start)
    log(f"{what}: rolled back to step {restored}; the data of the phase starting at step "
        f"{diverged.phase_start} now skips {skipped[key]} batches")
    return state, restored
