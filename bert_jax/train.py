"""Pretraining: a run (`bert_jax.run`) of MLM + NSP steps through the loop (`bert_jax.loop`),
phase by phase, on each phase's prepared dataset; validation, checkpoints, exact resume.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils.epath import Path  # local paths and gs:// alike
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bert_jax import attention, distributed, flops, losses, loop, preflight, progress, sharding
from bert_jax import init as inits
from bert_jax import run as runs
from bert_jax import workdir as workdirs
from bert_jax.config import MODEL_RUN_SETTINGS, ConfigError, Phase, RunConfig, default_config
from bert_jax.data import pipeline
from bert_jax.data.checks import check_data_against_model
from bert_jax.export import export_run
from bert_jax.pretrained import Pretrained

# What a resumed run must keep: the architecture, the data and its order, the schedule.
# Numerics, execution, logging and where files live may change.
_FIXED_ON_RESUME = {
    "model": None,  # every field but those below
    "data": None,
    "train": ("seed", "global_batch_size", "phases", "optimizer", "learning_rate",
              "end_learning_rate", "warmup_steps", "decay_power", "rng_impl"),
}
_CHANGEABLE_ON_RESUME = {*MODEL_RUN_SETTINGS, "data_dir", "tfds_data_dir", "workers"}
# The validation metrics of the log line after each evaluation.
VALIDATION_SHOWN = ("loss", "mlm_accuracy", "nsp_accuracy", "nsp_loss")


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> None:
    """A pretraining checkpoint resumes only under its own architecture, data and schedule,
    but for `train.num_steps`, which may rise: a finished or stopped run continues for longer,
    its learning rate from then on the new schedule's (decaying to the new end)."""
    runs.check_resumable(saved, config, _FIXED_ON_RESUME, _CHANGEABLE_ON_RESUME,
                         default_config())
    before, now = saved["train"]["num_steps"], config.train.num_steps
    if now < before:
        raise ConfigError(f"the workdir's checkpoint has train.num_steps={before} but the config "
                          f"has {now}: expected at least {before} (a run continues for longer; "
                          f"train.stop_at_step stops it earlier)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, log=progress.write) -> dict:
    """Trains until `train.num_steps` (or `train.stop_at_step`), resuming from the workdir's
    latest checkpoint, evaluating on the validation split, and returns a summary.

    Every process of a multi-process run calls this; only process 0 writes logs, metrics and
    files other than checkpoints. A finished run is exported to WORKDIR/export, and its
    summary carries the trained weights (`pretrained`, gathered on every process).
    """
    workdir = Path(workdir)
    source = inits.follow(config)
    settings = RunConfig.from_dict(config)
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *args: None)
    run = _build(settings, workdir)
    try:
        preflight.check_run(settings, workdir, run.spec.abstract,
                            sharding.data_parallel_size(run.mesh))
        log("== preparing data")
        # A tied model.vocab_size takes the tokenizer's (trained here, once, by process 0): a
        # corpus too small for data.vocab_size gets a smaller vocabulary, not an error.
        followed = pipeline.follow_tokenizer(config) if is_main else None
        distributed.barrier("tokenizer")
        followed = followed if is_main else pipeline.follow_tokenizer(config)
        if followed is not config:
            config, settings = followed, RunConfig.from_dict(followed)
            run.close()
            run = _build(settings, workdir)
        # The init's weights and every phase's data before the workdir is touched: a bad
        # checkpoint, a corpus that cannot be read or a vocabulary that cannot be trained
        # fail a run that has written nothing.
        initial = (inits.load(source, log) if source and not workdirs.has_checkpoint(workdir)
                   else None)
        datasets = {phase: prepare_data(settings, phase, f"phase-{phase.start}")
                    for phase in settings.phases}
        return _train(config, settings, run, datasets, initial, log)
    finally:
        run.close()


def _build(settings: RunConfig, workdir) -> runs.Run:
    return runs.build(settings.model, settings.train, settings.mesh, workdir=workdir,
                      checkpoint=settings.checkpoint)


def _train(config, settings: RunConfig, run: runs.Run, datasets: dict, initial, log) -> dict:
    state, start, metadata = run.start(config, check_resumable, log, initial)
    skipped = metadata.get("skipped_batches", {})
    extended = _extensions(metadata, settings.train.num_steps, start, log)
    header = run_header(run.spec, run.mesh, settings.model.dtype, settings.phases)
    log(f"{header['devices']} {header['platform']} devices, mesh {header['mesh']}, attention "
        f"{header['attention']}")
    run.writer.write(start, {**header, "num_steps": settings.train.num_steps}, split="run")
    if run.is_main:
        workdirs.write_config(run.workdir, config.to_dict())
    stop = settings.train.stop
    log(f"== training from step {start} to {stop} (the first step compiles)")
    preemption = loop.Preemption()
    summary = {"train": {}, "validation": {}, "pretrained": None, "export": None}

    def save(step, state, force=False):
        # The loader's state is the step, which the state holds, plus the batches skipped by
        # rollbacks in each phase (keyed by the phase's first step).
        run.checkpointer.save(step, state, {"config": config.to_dict(),
                                            "skipped_batches": dict(skipped),
                                            "num_steps_raised": extended}, force=force)

    def evaluate_at(state, step):
        summary["validation"] = evaluate(settings, settings.phase_of(step), state,
                                         run.eval_sums, run.mesh)
        run.writer.write(step, summary["validation"], split="validation")
        log(f"validation at step {step}: " + "  ".join(
            f"{name} {summary['validation'][name]:.3f}" for name in VALIDATION_SHOWN))

    def every_phase(state, step):
        for phase in settings.phases:
            if step >= min(phase.end, stop):
                continue
            prepared = datasets[phase]
            if run.is_main:
                workdirs.keep_tokenizer(run.workdir,
                                        prepared.path / prepared.metadata["tokenizer_file"])
            hooks = _hooks(settings, phase, run, preemption, save, evaluate_at, stop)
            state, step, summary["train"] = loop.train_loop(
                state, _batches(settings, phase, prepared, run.mesh, step, skipped),
                run.train_step(phase.grad_accum_steps), hooks, step, min(phase.end, stop))
            if preemption.requested:
                break
        return state, step

    started = time.perf_counter()
    try:
        state, step, summary["rollbacks"] = loop.recovering(every_phase, state, start, run,
                                                            skipped, log)
        if step == stop and not summary["validation"]:  # (resumed at its last step)
            evaluate_at(state, step)
        save(step, state, force=True)
        run.checkpointer.wait()
        if step == settings.train.num_steps:
            params = multihost_utils.process_allgather(state["params"], tiled=True)
            summary["pretrained"] = Pretrained(settings.model, params)
            if run.is_main:
                log("== exporting")
                summary["export"] = export_run(summary["pretrained"], run.workdir,
                                               settings.data.lowercase, log)
    finally:
        preemption.restore()
    return {"step": step, "preempted": preemption.requested,
            "interrupted": preemption.interrupted, **summary,
            "seconds": time.perf_counter() - started, "workdir": str(run.workdir)}


def _extensions(metadata: dict, num_steps: int, step: int, log) -> list[dict]:
    """The times a run's `train.num_steps` was raised on resume (`{"step", "from", "to"}`), as
    its checkpoints record them, with this resume's."""
    raised = list(metadata.get("num_steps_raised", []))
    before = metadata["config"]["train"]["num_steps"] if metadata else num_steps
    if before != num_steps:
        raised.append({"step": step, "from": before, "to": num_steps})
        log(f"train.num_steps raised from {before} to {num_steps} at step {step}: the learning "
            f"rate now decays to step {num_steps}")
    return raised


def _hooks(settings: RunConfig, phase: Phase, run: runs.Run, preemption, save, evaluate_at,
           stop: int) -> loop.Hooks:
    train = settings.train
    return loop.Hooks(
        writer=run.writer, preemption=preemption, log_every=train.log_every,
        patience=train.nonfinite_patience, phase_start=phase.start,
        rows=phase.global_batch_size, row_length=phase.max_seq_length,
        flops_per_row=flops.train_flops_per_sequence(settings.model, phase.max_seq_length,
                                                     phase.max_predictions_per_seq),
        evaluate=evaluate_at, eval_every=train.eval_every, evaluate_at=stop,
        should_save=run.checkpointer.should_save, save=save,
        description=f"train (length {phase.max_seq_length})")


def _batches(settings: RunConfig, phase: Phase, prepared, mesh: Mesh, start: int,
             skipped: dict):
    """(step, global batch) of `phase` from `start` on, past the batches skipped by rollbacks
    (the data of step s is the phase's batch s - phase.start + skipped)."""
    loader = pipeline.loader(settings, prepared, "train", phase,
                             sharding.process_rows(mesh, phase.global_batch_size))
    offset = skipped.get(str(phase.start), 0)
    stop = min(phase.end, settings.train.stop)
    for index, local in loader.iterate(start - phase.start + offset, stop - start):
        yield (index - offset + phase.start,
               sharding.global_batch(local, mesh, phase.global_batch_size))


def run_header(spec: runs.StateSpec, mesh: Mesh, dtype: str, train_phases) -> dict:
    """What a run runs on, for its log and the first record of its metrics: the devices,
    the mesh and the attention kernel of each phase's rows (one name when they agree)."""
    kernels = [spec.attention_kernel(dtype, phase.instances_per_row > 1)
               for phase in train_phases]
    return {"platform": attention.platform_of(mesh.devices.flat),
            "devices": int(mesh.devices.size),
            "mesh": ", ".join(f"{axis} {size}" for axis, size in mesh.shape.items()),
            "attention": kernels[0] if len(set(kernels)) == 1 else " then ".join(kernels)}


def prepare_data(settings: RunConfig, phase: Phase, name: str):
    """The dataset of a phase, built by process 0 while the others wait, then opened by all.

    A process that cannot see process 0's copy (a data_dir on a host's own disk) builds its
    own: the build is deterministic, so every copy holds the same examples. Process 0 prints
    the summary `prepare-data` prints, once a run: for a training phase's name (`phase-...`)
    whose data no earlier phase has. The model must have the tokenizer's vocabulary
    (`pipeline.follow_tokenizer` gives it that).
    """
    if jax.process_index() == 0:
        prepared = pipeline.prepare(settings, phase)
        data = phase.data(settings.data)
        if name.startswith("phase-") and data not in [
                earlier.data(settings.data) for earlier in settings.phases
                if earlier.start < phase.start]:
            print(pipeline.describe(prepared))
    distributed.barrier(f"prepared-{name}")
    prepared = pipeline.prepare(settings, phase) if jax.process_index() else prepared
    check_data_against_model(phase.data(settings.data), settings.model, prepared.vocab_size)
    return prepared


def evaluate(settings: RunConfig, phase: Phase, state: dict, eval_sums, mesh: Mesh) -> dict:
    """MLM/NSP loss and accuracy over the validation split at a phase's lengths
    (`train.eval_steps` batches; 0: the whole split, the last batch wrapping around)."""
    prepared = prepare_data(settings, phase, f"validation-{phase.start}")
    loader = pipeline.loader(settings, prepared, "validation", phase,
                             sharding.process_rows(mesh, phase.global_batch_size))
    steps = settings.train.eval_steps or max(1, int(np.ceil(loader.steps_per_epoch)))
    totals = None
    for _, local in loader.iterate(0, steps):
        sums = eval_sums(state["params"], sharding.global_batch(local, mesh,
                                                               phase.global_batch_size))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {k: float(v) for k, v in jax.device_get(losses.metrics_from_sums(totals)).items()}


def evaluate_workdir(workdir, step: int | None = None) -> dict:
    """Validation metrics of a workdir's checkpoint, under the config it was trained with."""
    settings, run, state, restored_step = workdirs.restore(workdir, step)
    metrics = evaluate(settings, settings.phase_of(restored_step), state, run.eval_sums,
                       run.mesh)
    return {"step": restored_step, "split": "validation", **metrics}
