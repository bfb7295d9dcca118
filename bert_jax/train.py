"""Pretraining: sharded train state, jitted MLM/NSP steps, the loop, evaluation, checkpoints.

The train state is a dict of arrays: `step`, `params` (the model's parameters as a nested
dict), `opt_state`, `rng` (the base key; each step's dropout key is `fold_in(rng, step)`) and
`nonfinite` (counts of skipped steps: in a row, and in all).
It is created already sharded by a jitted init, and the same abstract state is the Orbax
restore target, so unsharded state never exists. Steps are pure module-level functions,
jitted once per batch shape with explicit shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from etils.epath import Path  # local paths and gs:// alike

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from bert_jax import attention, distributed, flops, losses, preflight, sharding
from bert_jax.checkpoint import Checkpointer
from bert_jax.config import DataConfig, ModelConfig, check_train, default_config
from bert_jax.data import pipeline
from bert_jax.export import keep_tokenizer, open_checkpoints, pretraining_config
from bert_jax.metrics import MetricsWriter
from bert_jax.model import abstract, new_model
from bert_jax.optim import learning_rate_schedule, make_optimizer
from bert_jax.pretrained import Pretrained


# --- state ---------------------------------------------------------------------------------

_DROPOUT_STREAM = 0x64726F70  # "drop"

def _init_state(model_config: ModelConfig, tx: optax.GradientTransformation, seed: int,
                rng_impl: str, num_labels: int | None = None, encoder_params: dict | None = None):
    model = new_model(model_config, seed, num_labels)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if encoder_params is not None:  # fine-tuning: the pretrained encoder, a fresh head
        params = {**params, **encoder_params}
    # Dropout draws from its own stream: nnx derives initialization keys from key(seed) too.
    dropout_key = jax.random.fold_in(jax.random.key(seed, impl=rng_impl), _DROPOUT_STREAM)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": dropout_key,
            "nonfinite": {"consecutive": jnp.zeros((), jnp.int32),
                          "total": jnp.zeros((), jnp.int32)}}


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What a train state looks like: the model's graph, abstract arrays, and shardings."""

    graphdef: nnx.GraphDef
    abstract: dict  # jax.ShapeDtypeStruct leaves, each with its sharding
    shardings: dict
    attention: str  # the attention kernel the model runs (`attention.resolve`)

    def attention_kernel(self, dtype: str, packed: bool) -> str:
        """The kernel that runs for rows `packed` or not (see `attention.kernel`)."""
        return attention.kernel(self.attention, dtype, packed)


def state_spec(model_config: ModelConfig, tx, seed: int, mesh,
               rng_impl: str = "threefry2x32", num_labels: int | None = None,
               platform: str | None = None) -> StateSpec:
    """The state of a pretraining model, or with `num_labels` of a sequence classifier.

    The model's graph runs the attention kernel `model_config.attention_impl` means on
    `platform` (default: the mesh's devices'; another one to lower for it from here)."""
    kernel = attention.resolve(model_config.attention_impl,
                               platform or attention.platform_of(mesh.devices.flat))
    graphdef, abstract_params = nnx.split(abstract(
        dataclasses.replace(model_config, attention_impl=kernel), num_labels))
    shapes = jax.eval_shape(lambda: _init_state(model_config, tx, seed, rng_impl, num_labels))
    params = sharding.param_shardings(shapes["params"], sharding.logical_names(abstract_params),
                                      mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = {"step": replicated, "params": params,
                 "opt_state": sharding.like_params(shapes["opt_state"], params, mesh),
                 "rng": replicated, "nonfinite": {"consecutive": replicated, "total": replicated}}
    shapes = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
    return StateSpec(graphdef, shapes, shardings, kernel)


def init_state(model_config: ModelConfig, tx, seed: int, spec: StateSpec,
               rng_impl: str = "threefry2x32", num_labels: int | None = None,
               encoder_params: dict | None = None) -> dict:
    """A fresh train state, each array created directly in its shards.

    `rng_impl` is the dropout keys' PRNG: threefry2x32 (default) gives the same dropout masks
    under every sharding; rbg is much faster on CPU but its bits may depend on the sharding.
    `encoder_params` (host arrays of `ENCODER_PARAMS` subtrees) replace the fresh ones: a
    fine-tuning state starts from a pretrained encoder.
    """
    return jax.jit(lambda encoder: _init_state(model_config, tx, seed, rng_impl, num_labels,
                                               encoder),
                   out_shardings=spec.shardings)(encoder_params)


# --- steps ---------------------------------------------------------------------------------

PRETRAINING = losses.PretrainingObjective()


def _micro_batches(batch: dict, count: int) -> dict:
    """[B, ...] -> [count, B / count, ...], micro-batch i taking rows i, i + count, ...: every
    device's rows spread evenly over the micro-batches."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:])
                        .swapaxes(0, 1), batch)


def train_step(state: dict, batch: dict, *, graphdef, tx, schedule, accum_steps: int = 1,
               objective=PRETRAINING):
    """One optimizer step on `batch`, accumulating gradients over `accum_steps` micro-batches.

    The loss is the objective's summed losses over the whole batch's denominators (for
    pretraining: the sum of MLM losses / the MLM weight of the batch + the sum of NSP losses
    / its NSP instances), so the micro-batches' gradients add up to the whole batch's.
    A non-finite loss or gradient norm skips the update (parameters and optimizer state are
    kept; the step and the data move on) and is counted in `state["nonfinite"]`. The rate is
    `schedule(state["step"])`, given to the optimizer (`make_optimizer`) rather than counted
    by it, so skipped steps delay neither the schedule nor the rate applied, which is the one
    logged.
    Returns the new state and the step's metrics (float32 scalars).
    """
    denominators = objective.denominators(batch)
    step_key = jax.random.fold_in(state["rng"], state["step"])

    def loss(params, micro, key):
        sums = objective.sums(nnx.merge(graphdef, params), micro, key)
        return sum(sums[name] / total for name, total in denominators.items()), sums

    grad_fn = jax.grad(loss, has_aux=True)
    if accum_steps == 1:
        grads, sums = grad_fn(state["params"], batch, step_key)
    else:
        def accumulate(carry, micro_and_index):
            micro, index = micro_and_index
            grads, sums = grad_fn(state["params"], micro, jax.random.fold_in(step_key, index))
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        micro = _micro_batches(batch, accum_steps)
        shapes = jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro),
                                step_key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum_steps)))
    learning_rate = schedule(state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"],
                                   learning_rate=learning_rate)
    metrics = objective.metrics(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

    def if_finite(new, old):  # elementwise, so it fuses into the update itself
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    counts = state["nonfinite"]
    nonfinite = {"consecutive": jnp.where(finite, 0, counts["consecutive"] + 1),
                 "total": counts["total"] + jnp.where(finite, 0, 1)}
    metrics.update({f"nonfinite_{k}": v.astype(jnp.float32) for k, v in nonfinite.items()})
    new_state = {"step": state["step"] + 1,
                 "params": if_finite(optax.apply_updates(state["params"], updates),
                                     state["params"]),
                 "opt_state": if_finite(opt_state, state["opt_state"]), "rng": state["rng"],
                 "nonfinite": nonfinite}
    return new_state, metrics


def jit_train_step(spec: StateSpec, tx, schedule, mesh, accum_steps: int,
                   objective=PRETRAINING):
    """`train_step` jitted for `mesh`: state in its shardings (donated), batch rows split over
    the batch axes."""
    return sharding.MeshJit(functools.partial(train_step, graphdef=spec.graphdef, tx=tx,
                                              schedule=schedule, accum_steps=accum_steps,
                                              objective=objective), mesh,
                            in_shardings=(spec.shardings, sharding.batch_sharding(mesh)),
                            out_shardings=(spec.shardings, None), donate_argnums=0)


def eval_step(params: dict, batch: dict, *, graphdef) -> dict:
    """Summed MLM/NSP losses and hits of a batch (no dropout); add them over batches."""
    return PRETRAINING.sums(nnx.merge(graphdef, params), batch, None)


def jit_eval_step(spec: StateSpec, mesh):
    """`eval_step` jitted for `mesh`: parameters in their shardings, batch rows split."""
    return sharding.MeshJit(functools.partial(eval_step, graphdef=spec.graphdef), mesh,
                            in_shardings=(spec.shardings["params"],
                                          sharding.batch_sharding(mesh)))


# --- the loop ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of steps at one sequence length and batch size."""

    start: int
    end: int
    max_seq_length: int
    max_predictions_per_seq: int
    global_batch_size: int
    grad_accum_steps: int
    instances_per_row: int


def phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """`config.train.phases`: ((start_step, max_seq_length, max_predictions, batch[,
    grad_accum_steps[, instances_per_row]]), ...); empty means one phase of `config.data`
    lengths and `train.global_batch_size`. Accumulation defaults to `train.grad_accum_steps`
    (long sequences often need more micro-batches than short ones), packing to
    `data.instances_per_row` (BERT's 512-token phase gains from it, the 128 one hardly)."""
    train = config.train
    check_train(train)
    rows = tuple(train.phases) or ((0, config.data.max_seq_length,
                                    config.data.max_predictions_per_seq,
                                    train.global_batch_size),)
    for row in rows:
        _check_phase_row(train.phases, row)
    starts = [row[0] for row in rows]
    if starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= train.num_steps:
        raise ValueError(f"train.phases={tuple(train.phases)}: expected rows {_PHASE_ROW} "
                         f"with start steps rising from 0 and below "
                         f"train.num_steps={train.num_steps}")
    ends = starts[1:] + [train.num_steps]
    defaults = (train.grad_accum_steps, config.data.instances_per_row)
    result = []
    for row, end in zip(rows, ends):
        accumulation, per_row = (*row[4:], *defaults[len(row) - 4:])  # given, else defaults
        for name, value in zip(("batch", "grad_accum_steps", "instances_per_row"), row[3:]):
            if value < 1:  # (the defaults: by check_train and DataConfig)
                raise ValueError(f"train.phases row {tuple(row)}: {name}={value}: expected a "
                                 f"positive integer")
        result.append(Phase(row[0], end, *row[1:4], accumulation, per_row))
    return result


_PHASE_ROW = ("(start, max_seq_length, max_predictions, batch[, grad_accum_steps[, "
              "instances_per_row]])")


def _check_phase_row(value, row) -> None:
    """A row of `train.phases` (`value`) is 4 to 6 integers: anything else is a one-line
    error naming it, before the rows are indexed (which would fail deep inside instead)."""
    if not (isinstance(row, (tuple, list)) and 4 <= len(row) <= 6
            and all(isinstance(v, int) and not isinstance(v, bool) for v in row)):
        raise ValueError(f"train.phases={tuple(value)}: row {row!r}: expected {_PHASE_ROW} "
                         f"of integers")


def phase_of(train_phases: list[Phase], step: int) -> Phase:
    """The phase a model that has taken `step` steps last trained in (the first at step 0):
    the lengths to evaluate it at."""
    return next((p for p in train_phases if p.start < step <= p.end), train_phases[0])


def phase_config(config: ml_collections.ConfigDict, phase: Phase) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.max_seq_length = phase.max_seq_length
    config.data.max_predictions_per_seq = phase.max_predictions_per_seq
    config.data.instances_per_row = phase.instances_per_row
    config.train.global_batch_size = phase.global_batch_size
    config.train.grad_accum_steps = phase.grad_accum_steps
    return config


class Preemption:
    """SIGTERM (the preemption notice of Cloud TPU, GCE and SLURM) as a stop after a step that
    every process agrees on, so all of them save the same checkpoint.

    One process: a Python handler sets a flag. Several: JAX's preemption service, which
    catches SIGTERM itself and tells all processes of a notice on any of them, names the sync
    step (the first one every process can still reach); `reached` must then be called by
    every process after every step.
    """

    def __init__(self):
        self.requested = False
        self._shared = jax.process_count() > 1
        if not self._shared:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._shared and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True
        return self.requested

    def restore(self):
        if not self._shared:
            signal.signal(signal.SIGTERM, self._previous)


# What a resumed run must keep: the architecture, the data and its order, the schedule.
# Numerics, execution, logging and where files live may change.
_FIXED_ON_RESUME = {
    "model": None,  # every field but those below
    "data": None,
    "train": ("seed", "num_steps", "global_batch_size", "phases", "optimizer", "learning_rate",
              "end_learning_rate", "warmup_steps", "decay_power", "rng_impl"),
}
_CHANGEABLE_ON_RESUME = {"dtype", "attention_impl", "scan_layers", "remat_policy",
                         "hidden_dropout_rate", "attention_dropout_rate", "data_dir",
                         "tfds_data_dir", "workers"}


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradients (`train.on_nonfinite`)."""


class _Diverged(Exception):
    """Inside the loop: step `step` (counted from 1, as in the metrics) was the
    `train.nonfinite_patience`-th non-finite step in a row."""

    def __init__(self, step: int, phase_start: int):
        super().__init__(step, phase_start)
        self.step, self.phase_start = step, phase_start


def _check_finite(step: int, metrics: dict, patience: int, phase: Phase) -> None:
    if int(metrics["nonfinite_consecutive"]) >= patience:
        raise _Diverged(step, phase.start)


def _roll_back(diverged: _Diverged, train_config, checkpointer: Checkpointer, spec: StateSpec,
               skipped: dict, rollbacks: int, log) -> tuple[dict, int]:
    """The state of the newest checkpoint before the run of non-finite steps, with the data of
    its phase moved past the batches that gave them (`skipped` is updated); or
    `NonFiniteError` where the config says stop, the rollbacks are spent, or no checkpoint
    comes before those steps."""
    patience = train_config.nonfinite_patience
    what = (f"non-finite loss or gradients in {patience} steps in a row (steps "
            f"{diverged.step - patience + 1}-{diverged.step}; their updates were skipped)")
    advice = ("lower train.learning_rate, raise train.warmup_steps or check the data; the "
              "workdir resumes from its last checkpoint")
    if train_config.on_nonfinite == "stop":
        raise NonFiniteError(f"{what}: stopped as train.on_nonfinite='stop' asks; {advice}")
    if rollbacks >= train_config.max_rollbacks:
        raise NonFiniteError(f"{what} after {rollbacks} rollbacks (train.max_rollbacks): "
                             f"{advice}")
    first_bad = diverged.step - patience + 1
    before = [step for step in checkpointer.all_steps() if step < first_bad]
    if not before:
        raise NonFiniteError(f"{what} and no checkpoint before step {first_bad} to roll back "
                             f"to: {advice}")
    checkpointer.delete_after(before[-1])  # saved during the run of bad steps: rewritten
    state, _, restored = checkpointer.restore(spec.abstract, before[-1])
    key = str(diverged.phase_start)
    skipped[key] = skipped.get(key, 0) + diverged.step - max(restored, diverged.phase_start)
    log(f"{what}: rolled back to step {restored}; the data of the phase starting at step "
        f"{diverged.phase_start} now skips {skipped[key]} batches")
    return state, restored


def check_resumable(saved: dict, config: ml_collections.ConfigDict, fixed=_FIXED_ON_RESUME,
                    changeable=_CHANGEABLE_ON_RESUME, defaults=None) -> None:
    """A resumed run must be the saved run continued: a clear error otherwise, rather than a
    shape mismatch or a silently different data order or schedule. `fixed` names the fields
    that must not change by section (None: all of the section's but those in `changeable`).
    A field that a checkpoint lacks (saved before the field existed) had its value in
    `defaults` (default: pretraining's `default_config()`)."""
    def kind(run_config) -> str:
        return "fine-tuning" if "task" in run_config else "pretraining"

    if kind(saved) != kind(config):
        raise ValueError(f"the workdir holds a {kind(saved)} run, not a {kind(config)} one: "
                         f"use another workdir")
    defaults = default_config() if defaults is None else defaults
    for section, keys in fixed.items():
        for key in keys or {*saved[section], *config[section]}:
            if key in changeable:
                continue
            value = saved[section].get(key, defaults[section].get(key))
            now = config[section].get(key)
            if isinstance(now, (tuple, list)) or isinstance(value, (tuple, list)):
                value, now = _as_tuples(value), _as_tuples(now)
            if now != value:
                raise ValueError(f"the workdir's checkpoint has {section}.{key}={value!r} but "
                                 f"the config has {now!r}: use another workdir or the same "
                                 f"config")


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, log=print) -> dict:
    """Trains until `train.num_steps` (or `train.stop_at_step`), resuming from the workdir's
    latest checkpoint, evaluating on the validation split, and returns a summary.

    Every process of a multi-process run calls this; only process 0 writes logs, metrics and
    files other than checkpoints. The summary of a finished run carries the trained weights
    (`pretrained`, gathered to the host on every process) for the export.
    """
    workdir = Path(workdir)
    model_config = ModelConfig.from_dict(config.model)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *args: None)
    tx = make_optimizer(config.train)
    schedule = learning_rate_schedule(config.train)
    spec = state_spec(model_config, tx, config.train.seed, mesh, config.train.rng_impl)
    train_phases = phases(config)
    preflight.check_run(config, workdir, spec.abstract,
                        [phase_config(config, p) for p in train_phases],
                        sharding.data_parallel_size(mesh))
    # Every phase's data before the workdir is touched: a corpus that cannot be read or a
    # vocabulary that cannot be trained fails a run that has written nothing.
    datasets = {phase: prepare_data(phase_config(config, phase), f"phase-{phase.start}")
                for phase in train_phases}

    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                every_steps=config.checkpoint.every_steps,
                                async_save=config.checkpoint.async_save)
    if checkpointer.latest_step() is not None:
        check_resumable(checkpointer.restore_metadata()["config"], config)
        state, metadata, start = checkpointer.restore(spec.abstract)
        skipped = metadata.get("skipped_batches", {})
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    else:
        state = init_state(model_config, tx, config.train.seed, spec, config.train.rng_impl)
        start, skipped = 0, {}
    stop = min(config.train.stop_at_step or config.train.num_steps, config.train.num_steps)

    step_fns = {accum: jit_train_step(spec, tx, schedule, mesh, accum)
                for accum in {phase.grad_accum_steps for phase in train_phases}}
    eval_fn = jit_eval_step(spec, mesh)
    writer = MetricsWriter(workdir, enabled=is_main, start_step=start)
    header = run_header(spec, mesh, model_config.dtype, train_phases)
    log(f"{header['devices']} {header['platform']} devices, mesh {header['mesh']}, attention "
        f"{header['attention']}")
    writer.write(start, header, split="run")
    if is_main:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    preemption = Preemption()
    summary = {"train": {}, "validation": {}, "pretrained": None, "rollbacks": 0}
    started = time.perf_counter()

    def run_phases(state, step):
        for phase in train_phases:
            if step >= min(phase.end, stop):
                continue
            run_config = phase_config(config, phase)
            prepared = datasets[phase]
            if is_main:
                keep_tokenizer(workdir, prepared.path / prepared.metadata["tokenizer_file"])
            loader = pipeline.loader(run_config, prepared, "train",
                                     sharding.process_rows(mesh, phase.global_batch_size))
            state, step, summary["train"] = _train_phase(
                run_config, phase, step, min(phase.end, stop), state,
                step_fns[phase.grad_accum_steps], loader, skipped, mesh,
                model_config, writer, checkpointer, preemption, is_main)
            if preemption.requested:
                break
        return state, step

    try:
        step = start
        while True:
            try:
                state, step = run_phases(state, step)
                break
            except _Diverged as e:
                diverged = _Diverged(e.step, e.phase_start)  # no traceback holding old states
            state = None  # released before the checkpoint is read
            state, step = _roll_back(diverged, config.train, checkpointer, spec, skipped,
                                     summary["rollbacks"], log)
            summary["rollbacks"] += 1
            writer.rewind(step)
            writer.write(step, {"rollbacks": summary["rollbacks"]}, split="events")
        if not preemption.requested and step == stop:
            summary["validation"] = evaluate(config, phase_of(train_phases, step), state,
                                             eval_fn, mesh)
            writer.write(step, summary["validation"], split="validation")
        checkpointer.save(step, state, _checkpoint_metadata(config, skipped), force=True)
        checkpointer.wait()
        if step == config.train.num_steps:
            params = multihost_utils.process_allgather(state["params"], tiled=True)
            summary["pretrained"] = Pretrained(model_config, params)
    finally:
        preemption.restore()
        writer.close()
        checkpointer.close()
    return {"step": step, "preempted": preemption.requested, **summary,
            "seconds": time.perf_counter() - started, "workdir": str(workdir)}


def run_header(spec: StateSpec, mesh: Mesh, dtype: str, train_phases) -> dict:
    """What a run runs on, for its log and the first record of its metrics: the devices,
    the mesh and the attention kernel of each phase's rows (one name when they agree)."""
    kernels = [spec.attention_kernel(dtype, phase.instances_per_row > 1)
               for phase in train_phases]
    return {"platform": attention.platform_of(mesh.devices.flat),
            "devices": int(mesh.devices.size),
            "mesh": ", ".join(f"{axis} {size}" for axis, size in mesh.shape.items()),
            "attention": kernels[0] if len(set(kernels)) == 1 else " then ".join(kernels)}


def prepare_data(config: ml_collections.ConfigDict, name: str):
    """The dataset of `config`, built by process 0 while the others wait, then opened by all.

    A process that cannot see process 0's copy (a data_dir on a host's own disk) builds its
    own: the build is deterministic, so every copy holds the same examples.
    """
    if jax.process_index() == 0:
        prepared = pipeline.prepare(config)
    distributed.barrier(f"prepared-{name}")
    return pipeline.prepare(config) if jax.process_index() else prepared


def _checkpoint_metadata(config, skipped: dict) -> dict:
    # The loader's state is the step, which the state holds, plus the batches skipped by
    # rollbacks in each phase (keyed by the phase's first step).
    return {"config": config.to_dict(), "skipped_batches": dict(skipped)}


def _train_phase(config, phase: Phase, start: int, stop: int, state: dict, step_fn,
                 loader, skipped: dict, mesh, model_config: ModelConfig, writer: MetricsWriter,
                 checkpointer: Checkpointer, preemption: Preemption, is_main: bool):
    """Steps [start, stop) of one phase, on the phase's batches from `start` on plus those
    skipped by rollbacks. A step's metrics are read after the next step is dispatched, so the
    device never waits for the host; that is also when too many non-finite steps in a row
    raise `_Diverged`. The steps' real token counts (devices' scalars) are summed at the
    log."""
    data = DataConfig.from_dict(config.data)
    flops_per_sequence = flops.train_flops_per_sequence(model_config, data.max_seq_length,
                                                        data.max_predictions_per_seq)
    device = jax.devices()[0]
    log_every = config.train.log_every
    pending = watched = None
    last, tokens = {}, []
    timer = (start, time.perf_counter())
    progress = tqdm(total=stop - start, initial=0, desc=f"train (length {phase.max_seq_length})",
                    unit="step", disable=not is_main)
    offset = skipped.get(str(phase.start), 0)
    patience = config.train.nonfinite_patience
    for index, local in loader.iterate(start - phase.start + offset, stop - start):
        step = index - offset + phase.start
        batch = sharding.global_batch(local, mesh, phase.global_batch_size)
        state, metrics = step_fn(state, batch)
        tokens.append(metrics["tokens"])
        if watched is not None:
            _check_finite(*watched, patience, phase)
        if pending is not None:
            last = _log_train(*pending, timer, writer, progress, phase, flops_per_sequence,
                              device)
            timer, pending = (pending[0], time.perf_counter()), None
        done = step + 1
        watched = (done, metrics)
        progress.update(1)
        if done % log_every == 0 or done == stop:
            pending, tokens = (done, metrics, tokens), []
        if checkpointer.should_save(done) and done != stop:
            checkpointer.save(done, state, _checkpoint_metadata(config, skipped))
        if preemption.reached(done):
            stop = done
            break
    if watched is not None:
        _check_finite(*watched, patience, phase)
    if pending is not None:
        last = _log_train(*pending, timer, writer, progress, phase, flops_per_sequence, device)
    progress.close()
    return state, stop, last


def _log_train(step, metrics, tokens, timer, writer, progress, phase: Phase,
               flops_per_sequence, device) -> dict:
    """Logs the metrics of `step` and the speed since the last log: `tokens_per_s` counts
    row positions, padding included; `real_tokens_per_s` the tokens that are not padding,
    in all the steps since the last log (packing raises this one, not `tokens_per_s`)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
    steps = step - timer[0]
    seconds = max(time.perf_counter() - timer[1], 1e-9)
    seq_per_s = steps * phase.global_batch_size / seconds
    values.update(
        step_ms=1000 * seconds / steps, seq_per_s=seq_per_s,
        tokens_per_s=seq_per_s * phase.max_seq_length,
        real_tokens_per_s=float(sum(jax.device_get(tokens))) / seconds,
        mfu=flops.mfu(seq_per_s, flops_per_sequence, device.device_kind, jax.device_count()))
    writer.write(step, values)
    progress.set_postfix(loss=f"{values['loss']:.3f}", mlm_acc=f"{values['mlm_accuracy']:.3f}")
    return values


def evaluate(config, phase: Phase, state: dict, eval_fn, mesh) -> dict:
    """MLM/NSP loss and accuracy over the validation split (`train.eval_steps` batches; 0:
    the whole split, the last batch wrapping around)."""
    run_config = phase_config(config, phase)
    prepared = prepare_data(run_config, f"validation-{phase.start}")
    loader = pipeline.loader(run_config, prepared, "validation",
                             sharding.process_rows(mesh, phase.global_batch_size))
    steps = config.train.eval_steps or max(1, int(np.ceil(loader.steps_per_epoch)))
    totals = None
    for _, local in loader.iterate(0, steps):
        sums = eval_fn(state["params"], sharding.global_batch(local, mesh,
                                                             phase.global_batch_size))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {k: float(v) for k, v in jax.device_get(losses.metrics_from_sums(totals)).items()}


def restore_workdir(workdir, step: int | None = None, mesh: Mesh | None = None):
    """A workdir's checkpoint (`step`, default the latest) under the config it was trained
    with, on `mesh` (default: the run's own mesh over every device): (config, spec, mesh,
    state, the step restored)."""
    checkpointer = open_checkpoints(workdir)
    try:
        config = pretraining_config(checkpointer, workdir, step)
        if mesh is None:
            mesh = sharding.make_mesh(config.mesh.to_dict())
        spec = state_spec(ModelConfig.from_dict(config.model), make_optimizer(config.train),
                          config.train.seed, mesh, config.train.rng_impl)
        state, _, restored_step = checkpointer.restore(spec.abstract, step)
    finally:
        checkpointer.close()
    return config, spec, mesh, state, restored_step


def evaluate_workdir(workdir, step: int | None = None) -> dict:
    """Validation metrics of a workdir's checkpoint, under the config it was trained with."""
    config, spec, mesh, state, restored_step = restore_workdir(workdir, step)
    metrics = evaluate(config, phase_of(phases(config), restored_step), state,
                       jit_eval_step(spec, mesh), mesh)
    return {"step": restored_step, "split": "validation", **metrics}
