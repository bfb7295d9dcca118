"""Fine-tuning: a pretrained encoder plus a classification (or regression) head, trained on a
task with the pretraining machinery (sharded state, the jitted train step with its objective
swapped, Orbax checkpoints, exact resume), evaluated on the task's validation split.

The run config (`default_config`) has `init` (where the encoder comes from), `task`, `data`
(the sequence length), `model` (settings applied over the pretrained architecture: dropout,
dtype, attention, scan, remat), `train`, `checkpoint` and `mesh`. `train.num_steps` 0 means
`train.num_epochs` passes over the training examples; warmup is `train.warmup_fraction` of the
steps. Both are resolved once the data is read and saved with the run, so a resumed run is
the same run.

Batches: step s of epoch e = s // steps_per_epoch takes rows of a permutation of the training
examples drawn from (seed, e), the last incomplete batch of each epoch dropped; so the batch of
any step is known without replaying the data, which is all that exact resume needs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils.epath import Path  # local paths and gs:// alike
from jax.experimental import multihost_utils
from tqdm import tqdm

from flax import nnx

from bert_jax import losses, preflight, scores, sharding, tasks, train
from bert_jax.checkpoint import Checkpointer
from bert_jax.config import ModelConfig, check_int
from bert_jax.data.checks import check_batch_topology
from bert_jax.export import keep_tokenizer, write_export
from bert_jax.metrics import MetricsWriter
from bert_jax.model import ENCODER_PARAMS
from bert_jax.optim import learning_rate_schedule, make_optimizer
from bert_jax.pretrained import Classifier


def default_config() -> ml_collections.ConfigDict:
    """`bert-jax finetune`'s defaults: BERT's fine-tuning recipe (AdamW, 10% warmup then linear
    decay, dropout 0.1, 3 epochs at batch 32) with a learning rate for the model's width."""
    config = ml_collections.ConfigDict()
    # A pretraining workdir (its checkpoint `step`, 0: the latest) or a Hugging Face directory;
    # `random` keeps its architecture and tokenizer but not its weights (a baseline).
    config.init = ml_collections.ConfigDict(dict(path="", step=0, random=False))
    config.task = ml_collections.ConfigDict(dict(
        name=tasks.BUILTIN, train_file="", validation_file="", labels="", tfds_data_dir=""))
    config.data = ml_collections.ConfigDict(dict(max_seq_length=128))
    config.model = ml_collections.ConfigDict(dict(
        hidden_dropout_rate=0.1, attention_dropout_rate=0.0, dtype="float32",
        attention_impl="auto", scan_layers=False, remat_policy="none"))
    config.train = ml_collections.ConfigDict(dict(
        seed=0, num_epochs=3, num_steps=0, stop_at_step=0, global_batch_size=32,
        grad_accum_steps=1,
        # 0: by model width (`LEARNING_RATES`)
        optimizer="adamw", learning_rate=0.0, end_learning_rate=0.0, warmup_fraction=0.1,
        warmup_steps=0, decay_power=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
        weight_decay=0.01, grad_clip_norm=1.0, rng_impl="threefry2x32",
        log_every=50, eval_every=0, eval_batch_size=64, nonfinite_patience=10))
    # Checkpoints at every evaluation (each epoch's end, or train.eval_every) and the end.
    config.checkpoint = ml_collections.ConfigDict(dict(keep=2, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config


# Default peak learning rates by hidden size (at most): BERT's 5e-5 and 3e-5 for base and
# large, larger for narrower models as Turc et al. (2019) found for the small BERTs (BERT-tiny
# on the built-in task: 0.73 accuracy at 1e-4, 0.89 at 3e-4).
LEARNING_RATES = ((128, 3e-4), (256, 2e-4), (512, 1e-4), (768, 5e-5), (None, 3e-5))


# What a resumed fine-tuning run must keep (every field of these sections but the listed).
_FIXED_ON_RESUME = {"init": None, "task": None, "data": None, "train": None}
_CHANGEABLE_ON_RESUME = {"tfds_data_dir", "log_every", "eval_batch_size", "stop_at_step",
                         "path"}


@dataclasses.dataclass(frozen=True)
class Init:
    """Where fine-tuning starts: an architecture, its tokenizer, and (unless random) the
    encoder's pretrained parameters (host arrays of the `ENCODER_PARAMS` subtrees)."""

    model_config: ModelConfig
    tokenizer: object
    tokenizer_file: Path
    lowercase: bool
    encoder_params: dict | None


def load_init(init_config) -> Init:
    """The encoder of `config.init`: a pretraining workdir's checkpoint or a Hugging Face
    directory (any BERT: pretraining, sequence classification or bare `BertModel`)."""
    from bert_jax import export, pretrained

    path = init_config.path
    if not path:
        raise ValueError("no --init: expected a pretraining workdir or a Hugging Face "
                         "directory to start from")
    if export.is_workdir(path):
        weights, config = export.load_workdir(path, init_config.step or None)
        model_config, params, lowercase = weights.config, weights.params, config.data.lowercase
    elif Path(path).is_dir():
        (model_config, params), lowercase = pretrained.load_encoder(path), export.lowercase_of(path)
    else:
        raise ValueError(f"--init={path!r} does not exist: expected a pretraining workdir or a "
                         f"Hugging Face directory")
    return Init(model_config, export.load_tokenizer_of(path, lowercase),
                export.tokenizer_file_of(path), lowercase,
                None if init_config.random else {k: params[k] for k in ENCODER_PARAMS})


def finetune(config: ml_collections.ConfigDict, workdir, *, init: Init | None = None,
             export: bool = True, log=print) -> dict:
    """Fine-tunes until the configured steps, resuming from the workdir's latest checkpoint,
    evaluating on the validation split, and exports a Hugging Face directory to
    WORKDIR/export. Returns a summary: the last and the best validation scores, the export.

    `init` (default: `load_init(config.init)`) lets a caller fine-tune weights it already
    holds (continuous evaluation). Every process of a multi-process run calls this.
    """
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *args: None)
    task, examples = tasks.load(config.task)
    init = init or load_init(config.init)
    model_config = dataclasses.replace(init.model_config, **config.model.to_dict())
    config = resolve(config, len(examples["train"]), model_config.hidden_size)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    _check_run(config, model_config, init.tokenizer, sharding.data_parallel_size(mesh))
    tx = make_optimizer(config.train)
    spec = train.state_spec(model_config, tx, config.train.seed, mesh, config.train.rng_impl,
                            num_labels=task.num_labels)
    preflight.check_workdir(workdir, preflight.state_bytes(spec.abstract),
                            config.checkpoint.keep)
    encoded = {split: tasks.encode(init.tokenizer, split_examples, config.data.max_seq_length)
               for split, split_examples in examples.items()}

    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                every_steps=config.train.eval_every,
                                async_save=config.checkpoint.async_save)
    if checkpointer.latest_step() is not None:
        train.check_resumable(checkpointer.restore_metadata()["config"], config,
                              _FIXED_ON_RESUME, _CHANGEABLE_ON_RESUME, default_config())
        state, _, start = checkpointer.restore(spec.abstract)
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    else:
        state = train.init_state(model_config, tx, config.train.seed, spec,
                                 config.train.rng_impl, task.num_labels, init.encoder_params)
        start = 0
    objective = losses.SequenceObjective(regression=task.regression)
    step_fn = train.jit_train_step(spec, tx, learning_rate_schedule(config.train), mesh,
                                   config.train.grad_accum_steps, objective)
    evaluate = _Evaluator(task, objective, spec, mesh, encoded["validation"],
                          config.train.eval_batch_size)
    writer = MetricsWriter(workdir, enabled=is_main, start_step=start)
    metadata = {"config": config.to_dict(), "model": model_config.to_dict(),
                "task": dataclasses.asdict(task), "lowercase": init.lowercase}
    if is_main:
        (workdir / "config.json").write_text(json.dumps(metadata, indent=2) + "\n")
        keep_tokenizer(workdir, init.tokenizer_file)
    preemption = train.Preemption()
    summary = {"task": task.name, "train": {}, "validation": {}, "best": {}, "export": None}
    started = time.perf_counter()
    try:
        state, step = _loop(config, state, start, step_fn, encoded["train"], mesh, evaluate,
                            writer, checkpointer, metadata, preemption, summary, is_main)
        if step == config.train.num_steps and not summary["validation"]:
            _log_validation(evaluate(state["params"]), step, writer, summary, task)
        checkpointer.save(step, state, metadata, force=True)
        checkpointer.wait()
        if step == config.train.num_steps and export:
            params = multihost_utils.process_allgather(state["params"], tiled=True)
            classifier = Classifier(model_config, jax.tree.map(np.asarray, params), task.labels)
            if is_main:
                summary["export"] = str(write_export(classifier, workdir, workdir / "export",
                                                     init.lowercase))
    finally:
        preemption.restore()
        writer.close()
        checkpointer.close()
    return {**summary, "step": step, "num_steps": config.train.num_steps,
            "preempted": preemption.requested, "seconds": time.perf_counter() - started,
            "examples": {split: len(split_examples) for split, split_examples in
                         examples.items()}}


def resolve(config: ml_collections.ConfigDict, train_examples: int,
            hidden_size: int) -> ml_collections.ConfigDict:
    """`config` with the schedule in steps: `train.num_steps` (0: `num_epochs` epochs),
    `warmup_steps` (0: `warmup_fraction` of the steps) and `eval_every` (0: each epoch), and
    `learning_rate` (0: `LEARNING_RATES` for `hidden_size`)."""
    config = ml_collections.ConfigDict(config.to_dict())
    train_config = config.train
    if not train_config.learning_rate:
        train_config.learning_rate = next(rate for width, rate in LEARNING_RATES
                                          if width is None or hidden_size <= width)
    batch = train_config.global_batch_size
    check_int("train.global_batch_size", batch)
    if train_examples < batch:
        raise ValueError(f"the task has {train_examples} training examples, fewer than "
                         f"train.global_batch_size={batch}: lower the batch size")
    steps_per_epoch = train_examples // batch
    if not train_config.num_steps:
        if not train_config.num_epochs > 0:
            raise ValueError(f"train.num_epochs={train_config.num_epochs!r}: expected a "
                             f"positive number (or set train.num_steps)")
        train_config.num_steps = max(1, round(train_config.num_epochs * steps_per_epoch))
    if not train_config.warmup_steps:
        train_config.warmup_steps = int(train_config.warmup_fraction * train_config.num_steps)
    if not train_config.eval_every:
        train_config.eval_every = min(steps_per_epoch, train_config.num_steps)
    for name in ("num_steps", "eval_every", "log_every", "eval_batch_size",
                 "grad_accum_steps", "nonfinite_patience"):
        check_int(f"train.{name}", train_config[name])
    return config


def _check_run(config, model_config: ModelConfig, tokenizer, data_parallel: int) -> None:
    length = config.data.max_seq_length
    if not 3 <= length <= model_config.max_position_embeddings:
        raise ValueError(f"data.max_seq_length={length}: expected 3 to the model's "
                         f"max_position_embeddings={model_config.max_position_embeddings}")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary {model_config.vocab_size}: expected the tokenizer the "
                         f"model was pretrained with")
    check_batch_topology(config.train.global_batch_size,
                         data_parallel * config.train.grad_accum_steps)
    if config.train.eval_batch_size % data_parallel:
        raise ValueError(f"train.eval_batch_size={config.train.eval_batch_size}: expected a "
                         f"multiple of the {data_parallel} data-parallel devices")


def _train_batch(data: dict, step: int, batch_size: int, seed: int, rows: slice) -> dict:
    """This process's rows of the batch of `step`: epoch e's permutation drawn from (seed, e)."""
    steps_per_epoch = len(data["labels"]) // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = _permutation(seed, epoch, len(data["labels"]))
    chosen = order[index * batch_size:(index + 1) * batch_size][rows]
    return {**{name: values[chosen] for name, values in data.items()},
            "weights": np.ones(len(chosen), np.float32)}


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def _loop(config, state, start, step_fn, train_data, mesh, evaluate, writer, checkpointer,
          metadata, preemption, summary, is_main):
    """Steps [start, num_steps): a step's metrics are read after the next step is dispatched,
    so the device never waits for the host (its non-finite count at every step, the rest at
    log steps); evaluations (and checkpoints) every `train.eval_every` steps."""
    train_config = config.train
    batch_size, num_steps = train_config.global_batch_size, train_config.num_steps
    stop = min(train_config.stop_at_step or num_steps, num_steps)
    rows = sharding.process_rows(mesh, batch_size)
    pending = watched = None
    timer = (start, time.perf_counter())
    done = start
    progress = tqdm(total=num_steps, initial=start, desc=f"finetune {summary['task']}",
                    unit="step", disable=not is_main)
    for step in range(start, stop):
        local = _train_batch(train_data, step, batch_size, train_config.seed, rows)
        state, metrics = step_fn(state, sharding.global_batch(local, mesh, batch_size))
        if watched is not None:
            _check_finite(*watched, train_config.nonfinite_patience)
        if pending is not None:
            summary["train"] = _log_train(*pending, timer, batch_size, writer, progress)
            timer, pending = (pending[0], time.perf_counter()), None
        done = step + 1
        watched = (done, metrics)
        progress.update(1)
        if done % train_config.log_every == 0 or done == stop:
            pending = (done, metrics)
        if done % train_config.eval_every == 0 or done == num_steps:
            if pending is not None:
                summary["train"] = _log_train(*pending, timer, batch_size, writer, progress)
                timer, pending = (pending[0], time.perf_counter()), None
            _log_validation(evaluate(state["params"]), done, writer, summary, evaluate.task)
            checkpointer.save(done, state, metadata)
            timer = (done, time.perf_counter())  # training speed leaves out the evaluation
        if preemption.reached(done):
            break
    if watched is not None:
        _check_finite(*watched, train_config.nonfinite_patience)
    if pending is not None:
        summary["train"] = _log_train(*pending, timer, batch_size, writer, progress)
    progress.close()
    return state, done


def _check_finite(step: int, metrics: dict, patience: int) -> None:
    if int(metrics["nonfinite_consecutive"]) >= patience:
        raise train.NonFiniteError(
            f"non-finite loss or gradients in {patience} steps in a row up to step {step}: "
            f"lower train.learning_rate or check the data")


def _log_train(step, metrics, timer, batch_size, writer, progress) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    seconds = max(time.perf_counter() - timer[1], 1e-9)
    values.update(step_ms=1000 * seconds / (step - timer[0]),
                  seq_per_s=(step - timer[0]) * batch_size / seconds)
    writer.write(step, values)
    progress.set_postfix(loss=f"{values['loss']:.3f}")
    return values


def _log_validation(metrics: dict, step: int, writer, summary: dict, task) -> None:
    """Logs a validation result; keeps it as the last and, when its headline score (the
    task's first metric; all are higher-is-better) is the best so far, the best."""
    writer.write(step, metrics, split="validation")
    summary["validation"] = {"step": step, **metrics}
    headline = task.metrics[0]
    if not summary["best"] or metrics[headline] > summary["best"][headline]:
        summary["best"] = {"step": step, **metrics}


class _Evaluator:
    """Validation of parameters: the loss (and accuracy) from summed batches, and the task's
    scores from every example's logits. The last batch is filled with weight-0 rows."""

    def __init__(self, task, objective, spec, mesh, data: dict, batch_size: int):
        self.task, self._objective, self._mesh = task, objective, mesh
        self._data, self._batch_size = data, batch_size
        self._rows = sharding.process_rows(mesh, batch_size)

        def forward(params, batch):
            logits = objective.logits(nnx.merge(spec.graphdef, params), batch)
            return logits, objective.sums_of_logits(logits, batch)

        self._forward = sharding.MeshJit(forward, mesh, in_shardings=(
            spec.shardings["params"], sharding.batch_sharding(mesh)))

    def __call__(self, params) -> dict:
        count = len(self._data["labels"])
        all_logits, totals = [], None
        for first in range(0, count, self._batch_size):
            index = np.arange(first, first + self._batch_size)
            real = index < count
            local = {name: values[np.where(real, index, 0)][self._rows]
                     for name, values in self._data.items()}
            local["weights"] = real[self._rows].astype(np.float32)
            logits, sums = self._forward(params, sharding.global_batch(local, self._mesh,
                                                                        self._batch_size))
            all_logits.append(np.asarray(multihost_utils.process_allgather(logits, tiled=True))
                              [real])
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        metrics = {k: float(v) for k, v in
                   jax.device_get(self._objective.metrics(totals)).items()}
        metrics.update(scores.score(self.task.metrics, np.concatenate(all_logits),
                                    self._data["labels"], self.task.regression))
        return metrics
