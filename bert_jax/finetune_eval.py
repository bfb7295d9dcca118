"""`bert-jax finetune-eval`: downstream quality during pretraining, as TF Model Garden's
continuous fine-tuning shows it. Each checkpoint is fine-tuned briefly in a scratch workdir and
its validation scores logged against the pretraining step in `PRETRAIN_DIR/finetune-eval/TASK`.
Steps logged there are skipped, so the command can run again or beside pretraining (`follow`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time

import ml_collections
from etils.epath import Path

from bert_jax import finetune
from bert_jax import workdir as workdirs
from bert_jax.checkpoint import MissingStep
from bert_jax.metrics import MetricsWriter, read_metrics
from bert_jax.config import ConfigError

SETTINGS = "config.json"  # the fine-tuning config the scores in a task's folder came from


def output_dir(pretrain_workdir, task_name: str) -> Path:
    return Path(pretrain_workdir) / "finetune-eval" / task_name.replace("/", "-")


def evaluate_checkpoints(config: ml_collections.ConfigDict, pretrain_workdir, *,
                         every: int = 1, follow: bool = False, poll_seconds: float = 60.0,
                         log=print) -> list[dict]:
    """Fine-tunes and scores each checkpoint at a multiple of `every` steps not yet logged
    and, with `follow`, new ones until the run's last step. Returns the records written."""
    steps, last = _checkpoints(pretrain_workdir)  # a wrong workdir: nothing written
    out = output_dir(pretrain_workdir, config.task.name)
    _check_same_settings(out, config)
    logged = read_metrics(out) if (out / "metrics.jsonl").exists() else []
    done = {record["step"] for record in logged}
    writer = MetricsWriter(out, start_step=None)
    (out / SETTINGS).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    written = []
    with contextlib.closing(writer):
        while True:
            todo = [s for s in steps if s not in done and (s % every == 0 or s == last)]
            for step in todo:
                record = _score_checkpoint(config, pretrain_workdir, step, log)
                if record is None:  # deleted (checkpoint.keep) before it could be read
                    continue
                writer.write(step, record, split="validation")
                done.add(step)
                written.append({"step": step, **record})
            if not follow or last in done:
                return written
            time.sleep(poll_seconds)
            steps, last = _checkpoints(pretrain_workdir)


def _checkpoints(pretrain_workdir) -> tuple[list[int], int]:
    """The steps of a pretraining workdir's checkpoints, and its run's last step."""
    checkpointer = workdirs.open_checkpoints(pretrain_workdir)
    try:
        run_config = workdirs.pretraining_config(checkpointer, pretrain_workdir)
        return checkpointer.all_steps(), run_config.train.num_steps
    finally:
        checkpointer.close()


def _check_same_settings(out, config: ml_collections.ConfigDict) -> None:
    """Other fine-tuning settings give other scores, which one log must not mix."""
    if not (out / SETTINGS).exists():
        return
    saved = _flat(json.loads((out / SETTINGS).read_text()))
    now = _flat(json.loads(json.dumps(config.to_dict())))  # tuples as JSON gives them back
    changed = next((key for key in sorted({*saved, *now}) if saved.get(key) != now.get(key)),
                   None)
    if changed is not None:
        raise ConfigError(f"{out} holds scores of {changed}={saved.get(changed)!r}, not "
                          f"{now.get(changed)!r}: use the same settings, or move {out} away "
                          f"to score with new ones")


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _score_checkpoint(config, pretrain_workdir, step: int, log) -> dict | None:
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.init.update(path=str(pretrain_workdir), step=step, random=False)
    try:
        init = finetune.load_init(run_config.init)
    except (MissingStep, FileNotFoundError):
        log(f"step {step}: checkpoint deleted before it was read; skipped")
        return None
    with tempfile.TemporaryDirectory(prefix="bert-jax-finetune-eval-") as scratch:
        summary = finetune.finetune(run_config, scratch, init=init, export=False,
                                    log=lambda *args: None)
    scores = {k: v for k, v in summary["validation"].items() if k != "step"}
    log(f"pretraining step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores
