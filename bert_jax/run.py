"""One way to build a run (`build`): the mesh, the train state's spec, the optimizer and
schedule, the jitted steps and, with a workdir, its checkpoints and metrics.

The train state is a dict: `step`, `params`, `opt_state`, `rng` (each step's dropout key is
`fold_in(rng, step)`) and `nonfinite` (skipped steps: in a row, and in all). A jitted init
creates it sharded, and its abstract twin is the Orbax restore target, so unsharded state
never exists.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils.epath import Path  # local paths and gs:// alike
from flax import nnx

from bert_jax import attention, losses, sharding
from bert_jax.checkpoint import Checkpointer
from bert_jax.config import (CheckpointConfig, ConfigError, MeshConfig, ModelConfig, TrainConfig,
                             as_tuples)
from bert_jax.metrics import MetricsWriter
from bert_jax.model import abstract, new_model
from bert_jax.optim import learning_rate_schedule, make_optimizer

PRETRAINING = losses.PretrainingObjective()
_DROPOUT_STREAM = 0x64726F70  # "drop"


def _init_state(model_config: ModelConfig, tx: optax.GradientTransformation, seed: int,
                rng_impl: str, num_labels: int | None = None, initial: dict | None = None):
    model = new_model(model_config, seed, num_labels)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if initial is not None:  # an init's subtrees (a pretrained encoder); the others fresh
        params = {**params, **initial}
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


def _state_spec(model_config: ModelConfig, tx, seed: int, mesh, rng_impl: str,
                num_labels: int | None, platform: str | None) -> StateSpec:
    """The model's graph runs the attention kernel `model_config.attention_impl` means on
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


class Run:
    """A built run: its mesh, state spec, optimizer and schedule, jitted steps (each built on
    first use) and, with a workdir, its checkpointer and (after `start`) metrics writer."""

    def __init__(self, model: ModelConfig, train: TrainConfig, mesh, spec: StateSpec, tx,
                 objective, num_labels: int | None, workdir: Path | None,
                 checkpoint: CheckpointConfig):
        self.model, self.train, self.mesh, self.spec, self.tx = model, train, mesh, spec, tx
        self.objective, self.num_labels = objective, num_labels
        self.workdir, self._checkpoint = workdir, checkpoint
        self.schedule, self.writer = learning_rate_schedule(train), None
        self.is_main = jax.process_index() == 0

    @functools.cached_property
    def checkpointer(self) -> Checkpointer:
        """The workdir's checkpoints, opened (and the folder made) on first use: after the
        preflight checks, so a run they stop leaves no folder behind."""
        checkpoint = self._checkpoint
        return Checkpointer(self.workdir / "checkpoints", keep=checkpoint.keep,
                            every_steps=checkpoint.every_steps, async_save=checkpoint.async_save)

    @functools.cache
    def train_step(self, accum_steps: int | None = None) -> sharding.MeshJit:
        """`train_step` jitted for the mesh, accumulating over `accum_steps` micro-batches
        (default `train.grad_accum_steps`): state in its shardings (donated), batch rows
        split over the batch axes."""
        step = functools.partial(train_step, graphdef=self.spec.graphdef, tx=self.tx,
                                 schedule=self.schedule,
                                 accum_steps=accum_steps or self.train.grad_accum_steps,
                                 objective=self.objective)
        return sharding.MeshJit(step, self.mesh,
                                in_shardings=(self.spec.shardings,
                                              sharding.batch_sharding(self.mesh)),
                                out_shardings=(self.spec.shardings, None), donate_argnums=0)

    def jit_eval(self, forward) -> sharding.MeshJit:
        """`forward(model, batch)` jitted for the mesh: (parameters, batch) -> its outputs."""
        graphdef = self.spec.graphdef
        return sharding.MeshJit(lambda params, batch: forward(nnx.merge(graphdef, params), batch),
                                self.mesh, in_shardings=(self.spec.shardings["params"],
                                                         sharding.batch_sharding(self.mesh)))

    @functools.cached_property
    def eval_sums(self) -> sharding.MeshJit:
        """The objective's summed losses and hits of a batch (no dropout); add them over
        batches."""
        return self.jit_eval(lambda model, batch: self.objective.sums(model, batch, None))

    def init_state(self, initial: dict | None = None) -> dict:
        """A fresh train state, each array created directly in its shards. `initial`
        parameters (host arrays of top-level subtrees, `bert_jax.init`) replace the fresh
        ones: a fine-tuning state starts from a pretrained encoder, continued pretraining from
        a whole model. The optimizer state and schedule start fresh."""
        train, tx = self.train, self.tx
        return jax.jit(lambda params: _init_state(self.model, tx, train.seed, train.rng_impl,
                                                  self.num_labels, params),
                       out_shardings=self.spec.shardings)(initial)

    def start(self, config: ml_collections.ConfigDict, guard, log,
              initial: dict | None = None) -> tuple[dict, int, dict]:
        """The workdir's latest checkpoint if it has one (its saved config checked by
        `guard(saved, config)`), else a fresh state (from `initial` parameters); opens the
        metrics writer at that step.
        Returns (state, step, the checkpoint's metadata)."""
        if self.checkpointer.latest_step() is not None:
            guard(self.checkpointer.restore_metadata()["config"], config)
            state, metadata, start = self.checkpointer.restore(self.spec.abstract)
            log(f"resumed from {self.workdir / 'checkpoints'} at step {start}")
        else:
            state, metadata, start = self.init_state(initial), {}, 0
        self.writer = MetricsWriter(self.workdir, enabled=self.is_main, start_step=start)
        return state, start, metadata

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if "checkpointer" in self.__dict__:  # opened
            self.checkpointer.close()


def build(model: ModelConfig, train: TrainConfig, mesh: MeshConfig | jax.sharding.Mesh, *,
          workdir=None, checkpoint: CheckpointConfig | None = None, objective=PRETRAINING,
          num_labels: int | None = None, devices=None, platform: str | None = None) -> Run:
    """The run of `model` trained as `train` says, on a mesh of `mesh`'s sizes over `devices`
    (default: all; or a mesh already made). `platform` lowers for another platform than the
    devices' (AOT compilation). With `workdir`, its checkpoints as `checkpoint` says."""
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = sharding.make_mesh(mesh.to_dict(), devices=devices)
    tx = make_optimizer(train)
    spec = _state_spec(model, tx, train.seed, mesh, train.rng_impl, num_labels, platform)
    return Run(model, train, mesh, spec, tx, objective, num_labels,
               None if workdir is None else Path(workdir), checkpoint or CheckpointConfig())


def check_resumable(saved: dict, config: ml_collections.ConfigDict, fixed: dict,
                    changeable=(), defaults=None) -> None:
    """A resumed run must be the saved run continued: a clear error otherwise, rather than a
    shape mismatch or a silently different data order or schedule. `fixed` names the fields
    that must not change by section (None: all of the section's but those in `changeable`).
    A field that a checkpoint lacks (saved before the field existed) had its value in
    `defaults`."""
    def kind(run_config) -> str:
        return "fine-tuning" if "task" in run_config else "pretraining"

    if kind(saved) != kind(config):
        raise ConfigError(f"the workdir holds a {kind(saved)} run, not a {kind(config)} one: "
                          f"use another workdir")
    for section, keys in fixed.items():
        for key in keys or {*saved[section], *config[section]}:
            if key in changeable:
                continue
            value = saved[section].get(key, defaults[section].get(key))
            now = config[section].get(key)
            value, now = as_tuples(value), as_tuples(now)  # JSON gives lists back
            if now != value:
                raise ConfigError(f"the workdir's checkpoint has {section}.{key}={value!r} but "
                                  f"the config has {now!r}: use another workdir or the same "
                                  f"config")
