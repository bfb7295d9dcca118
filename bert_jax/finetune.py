"""Fine-tuning: a pretrained encoder plus a classification (or regression) head, trained on a
task by the pretraining run and loop with the objective swapped, evaluated on the task's
validation split.

The schedule is resolved in steps once the data is read (`resolve`) and saved with the run,
so a resumed run is the same run. Step s of epoch e = s // steps_per_epoch takes rows of a
permutation drawn from (seed, e), the last incomplete batch of each epoch dropped: the batch
of any step is known without replaying the data, which is all that exact resume needs.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils.epath import Path  # local paths and gs:// alike
from jax.experimental import multihost_utils

from bert_jax import init as inits
from bert_jax import loop, losses, preflight, scores, sharding, tasks
from bert_jax import run as runs
from bert_jax import tokenizer as tokenization
from bert_jax import workdir as workdirs
from bert_jax.config import (MODEL_RUN_SETTINGS, CheckpointConfig, ConfigError, MeshConfig,
                             ModelConfig, TrainConfig, check_int)
from bert_jax.data.checks import check_batch_topology
from bert_jax.export import export_run
from bert_jax.model import ENCODER_PARAMS
from bert_jax.pretrained import Classifier

# Fine-tuning's own train fields, resolved into TrainConfig's (`resolve`).
_SCHEDULE_FIELDS = ("num_epochs", "warmup_fraction", "eval_batch_size")


def default_config() -> ml_collections.ConfigDict:
    """`bert-jax finetune`'s defaults: BERT's fine-tuning recipe (AdamW, 10% warmup then linear
    decay, dropout 0.1, 3 epochs at batch 32) with a learning rate for the model's width.
    `train.num_steps` 0: `num_epochs` epochs; `learning_rate` 0: by width (`LEARNING_RATES`);
    `warmup_steps` 0: `warmup_fraction` of the steps; `eval_every` 0: each epoch. Checkpoints
    come at every evaluation and the end."""
    config = ml_collections.ConfigDict()
    # A pretraining workdir (its checkpoint `step`, 0: the latest) or a Hugging Face directory;
    # `random` keeps its architecture and tokenizer but not its weights (a baseline).
    config.init = ml_collections.ConfigDict(dict(path="", step=0, random=False))
    config.task = ml_collections.ConfigDict(dict(
        name=tasks.BUILTIN, train_file="", validation_file="", labels="", tfds_data_dir=""))
    config.data = ml_collections.ConfigDict(dict(max_seq_length=128))
    defaults = ModelConfig()
    config.model = {name: getattr(defaults, name) for name in MODEL_RUN_SETTINGS}
    train = {k: v for k, v in TrainConfig().to_dict().items()
             if k not in ("phases", "eval_steps", "init", "init_step")}
    config.train = ml_collections.ConfigDict({
        **train, "num_steps": 0, "global_batch_size": 32, "learning_rate": 0.0,
        "warmup_steps": 0, "log_every": 50, "on_nonfinite": "stop",
        "num_epochs": 3, "warmup_fraction": 0.1, "eval_batch_size": 64})
    checkpoint = CheckpointConfig(keep=2).to_dict()
    del checkpoint["every_steps"]  # each evaluation
    config.checkpoint = checkpoint
    config.mesh = MeshConfig().to_dict()
    return config


# Default peak learning rates by hidden size (at most): BERT's 5e-5 and 3e-5 for base and
# large, larger for narrower models as Turc et al. (2019) found for the small BERTs (BERT-tiny
# on the built-in task: docs/finetune.md).
LEARNING_RATES = ((128, 3e-4), (256, 2e-4), (512, 1e-4), (768, 5e-5), (None, 3e-5))


# What a resumed fine-tuning run must keep (every field of these sections but the listed).
_FIXED_ON_RESUME = {"init": None, "task": None, "data": None, "train": None}
_CHANGEABLE_ON_RESUME = {"tfds_data_dir", "log_every", "eval_batch_size", "stop_at_step",
                         "path"}


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> None:
    """A fine-tuning checkpoint resumes only under its own task, data and schedule."""
    runs.check_resumable(saved, config, _FIXED_ON_RESUME, _CHANGEABLE_ON_RESUME,
                         default_config())


@dataclasses.dataclass(frozen=True)
class Init:
    """Where fine-tuning starts: an architecture, its tokenizer, and (unless random) the
    encoder's pretrained parameters (host arrays of the `ENCODER_PARAMS` subtrees it has; a
    pooler it lacks starts fresh)."""

    model_config: ModelConfig
    tokenizer: object
    tokenizer_file: Path
    lowercase: bool
    encoder_params: dict | None


def load_init(init_config) -> Init:
    """The encoder of `config.init` (`bert_jax.init`: a pretraining workdir's checkpoint, a
    Hugging Face or Google directory of any BERT)."""
    source = inits.describe(init_config.path, init_config.step or None, name="--init")
    params = None if init_config.random else inits.load(source)
    return Init(source.model_config,
                tokenization.load_tokenizer(source.tokenizer_file, lowercase=source.lowercase),
                source.tokenizer_file, source.lowercase,
                params and {k: params[k] for k in ENCODER_PARAMS if k in params})


def finetune(config: ml_collections.ConfigDict, workdir, *, init: Init | None = None,
             export: bool = True, log=print) -> dict:
    """Fine-tunes until the configured steps, resuming from the workdir's latest checkpoint,
    evaluating on the validation split, and exports a Hugging Face directory to
    WORKDIR/export. Returns a summary: the last and the best validation scores, the export.

    `init` (default: `load_init(config.init)`) lets a caller fine-tune weights it already
    holds (continuous evaluation). Every process of a multi-process run calls this.
    """
    workdir = Path(workdir)
    log = log if jax.process_index() == 0 else (lambda *args: None)
    task, examples = tasks.load(config.task)
    init = init or load_init(config.init)
    model_config = dataclasses.replace(init.model_config, **config.model.to_dict())
    config = resolve(config, len(examples["train"]), model_config.hidden_size)
    train = TrainConfig.from_dict({k: v for k, v in config.train.items()
                                   if k not in _SCHEDULE_FIELDS})
    checkpoint = CheckpointConfig(every_steps=train.eval_every, **config.checkpoint)
    run = runs.build(model_config, train, MeshConfig.from_dict(config.mesh), workdir=workdir,
                     checkpoint=checkpoint, num_labels=task.num_labels,
                     objective=losses.SequenceObjective(regression=task.regression))
    try:
        _check_run(config, model_config, init.tokenizer, sharding.data_parallel_size(run.mesh))
        preflight.check_workdir(workdir, preflight.state_bytes(run.spec.abstract),
                                checkpoint.keep)
        encoded = {split: tasks.encode(init.tokenizer, split_examples,
                                       config.data.max_seq_length)
                   for split, split_examples in examples.items()}
        summary = _train(config, run, task, init, encoded, export, log)
    finally:
        run.close()
    return {**summary, "num_steps": train.num_steps,
            "examples": {split: len(split_examples) for split, split_examples in
                         examples.items()}}


def _train(config, run: runs.Run, task, init: Init, encoded: dict, export: bool, log) -> dict:
    state, start, saved = run.start(config, check_resumable, log, init.encoder_params)
    skipped = saved.get("skipped_batches", {})
    train = run.train
    metadata = {"config": config.to_dict(), "model": run.model.to_dict(),
                "task": dataclasses.asdict(task), "lowercase": init.lowercase}
    if run.is_main:
        workdirs.write_config(run.workdir, metadata)
        workdirs.keep_tokenizer(run.workdir, init.tokenizer_file)
    evaluator = _evaluator(task, run, encoded["validation"], config.train.eval_batch_size)
    summary = {"task": task.name, "train": {}, "validation": {}, "best": {}, "export": None}

    def save(step, state, force=False):
        run.checkpointer.save(step, state, {**metadata, "skipped_batches": dict(skipped)},
                              force=force)

    def evaluate_at(state, step):
        _log_validation(evaluator(state["params"]), step, run.writer, summary, task)

    preemption = loop.Preemption()
    hooks = loop.Hooks(
        writer=run.writer, preemption=preemption, log_every=train.log_every,
        patience=train.nonfinite_patience, phase_start=0, rows=train.global_batch_size,
        row_length=config.data.max_seq_length, evaluate=evaluate_at,
        eval_every=train.eval_every, evaluate_at=train.num_steps,
        should_save=run.checkpointer.should_save, save=save, description=f"finetune {task.name}")
    rows = sharding.process_rows(run.mesh, train.global_batch_size)

    def steps(state, step):
        offset = skipped.get("0", 0)
        batches = ((s, sharding.global_batch(
            _train_batch(encoded["train"], s + offset, train.global_batch_size, train.seed, rows),
            run.mesh, train.global_batch_size)) for s in range(step, train.stop))
        state, step, summary["train"] = loop.train_loop(state, batches, run.train_step(), hooks,
                                                        step, train.stop)
        return state, step

    started = time.perf_counter()
    try:
        state, step, _ = loop.recovering(steps, state, start, run, skipped, log)
        if step == train.num_steps and not summary["validation"]:  # (resumed at its end)
            evaluate_at(state, step)
        save(step, state, force=True)
        run.checkpointer.wait()
        if step == train.num_steps and export:
            params = multihost_utils.process_allgather(state["params"], tiled=True)
            classifier = Classifier(run.model, jax.tree.map(np.asarray, params), task.labels)
            if run.is_main:
                summary["export"] = export_run(classifier, run.workdir, init.lowercase, log)
    finally:
        preemption.restore()
    return {**summary, "step": step, "preempted": preemption.requested,
            "interrupted": preemption.interrupted,
            "seconds": time.perf_counter() - started}


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
        raise ConfigError(f"the task has {train_examples} training examples, fewer than "
                          f"train.global_batch_size={batch}: lower the batch size")
    steps_per_epoch = train_examples // batch
    if not train_config.num_steps:
        if not train_config.num_epochs > 0:
            raise ConfigError(f"train.num_epochs={train_config.num_epochs!r}: expected a "
                              f"positive number (or set train.num_steps)")
        train_config.num_steps = max(1, round(train_config.num_epochs * steps_per_epoch))
    if not train_config.warmup_steps:
        train_config.warmup_steps = int(train_config.warmup_fraction * train_config.num_steps)
    if not train_config.eval_every:
        train_config.eval_every = min(steps_per_epoch, train_config.num_steps)
    check_int("train.eval_batch_size", train_config.eval_batch_size)
    return config


def _check_run(config, model_config: ModelConfig, tokenizer, data_parallel: int) -> None:
    length = config.data.max_seq_length
    if not 3 <= length <= model_config.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={length}: expected 3 to the model's "
                          f"max_position_embeddings={model_config.max_position_embeddings}")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary {model_config.vocab_size}: expected the tokenizer the "
                          f"model was pretrained with")
    check_batch_topology(config.train.global_batch_size,
                         data_parallel * config.train.grad_accum_steps)
    if config.train.eval_batch_size % data_parallel:
        raise ConfigError(f"train.eval_batch_size={config.train.eval_batch_size}: expected a "
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


def _log_validation(metrics: dict, step: int, writer, summary: dict, task) -> None:
    """Logs a validation result; keeps it as the last and, when its headline score (the
    task's first metric; all are higher-is-better) is the best so far, the best."""
    writer.write(step, metrics, split="validation")
    summary["validation"] = {"step": step, **metrics}
    headline = task.metrics[0]
    if not summary["best"] or metrics[headline] > summary["best"][headline]:
        summary["best"] = {"step": step, **metrics}


def _evaluator(task, run: runs.Run, data: dict, batch_size: int):
    """Validation of parameters: the loss (and accuracy) from summed batches, and the task's
    scores from every example's logits. The last batch is filled with weight-0 rows."""
    objective, count = run.objective, len(data["labels"])
    rows = sharding.process_rows(run.mesh, batch_size)

    def forward(model, batch):
        logits = objective.logits(model, batch)
        return logits, objective.sums_of_logits(logits, batch)

    forward = run.jit_eval(forward)

    def evaluate(params) -> dict:
        all_logits, totals = [], None
        for first in range(0, count, batch_size):
            index = np.arange(first, first + batch_size)
            real = index < count
            local = {name: values[np.where(real, index, 0)][rows]
                     for name, values in data.items()}
            local["weights"] = real[rows].astype(np.float32)
            logits, sums = forward(params, sharding.global_batch(local, run.mesh, batch_size))
            all_logits.append(np.asarray(multihost_utils.process_allgather(logits, tiled=True))
                              [real])
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        metrics = {k: float(v) for k, v in jax.device_get(objective.metrics(totals)).items()}
        metrics.update(scores.score(task.metrics, np.concatenate(all_logits), data["labels"],
                                    task.regression))
        return metrics

    return evaluate
