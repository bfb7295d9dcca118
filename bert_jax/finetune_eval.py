"""`bert-jax finetune-eval`: downstream quality during pretraining.

Each new checkpoint of a pretraining workdir (every `every` steps) is fine-tuned briefly on a
task (`bert_jax.finetune` with the run's fine-tuning config, in a scratch workdir deleted
after) and the task's validation scores are logged against the *pretraining* step to
`PRETRAIN_DIR/finetune-eval/TASK/metrics.jsonl` and TensorBoard, so a pretraining run shows
whether its checkpoints get better at a real task, as TF Model Garden's continuous
fine-tuning does. Steps already logged there are skipped, so the command can be run again,
or left running beside pretraining with `follow`.
"""

from __future__ import annotations

import tempfile
import time

import ml_collections
from etils.epath import Path

from bert_jax import export, finetune
from bert_jax.metrics import MetricsWriter, read_metrics

OUTPUT = "finetune-eval"


def output_dir(pretrain_workdir, task_name: str) -> Path:
    return Path(pretrain_workdir) / OUTPUT / task_name.replace("/", "-")


def evaluate_checkpoints(config: ml_collections.ConfigDict, pretrain_workdir, *,
                         every: int = 1, follow: bool = False, poll_seconds: float = 60.0,
                         log=print) -> list[dict]:
    """Fine-tunes and scores each checkpoint at a multiple of `every` steps not yet logged.

    With `follow`, waits for new checkpoints (polling every `poll_seconds`) until the
    pretraining run's last step is scored. Returns the records written by this call.
    """
    out = output_dir(pretrain_workdir, config.task.name)
    done = {record["step"] for record in read_metrics(out)} if (out / "metrics.jsonl").exists() \
        else set()
    writer = MetricsWriter(out, start_step=None)
    written = []
    try:
        while True:
            checkpointer = export.open_checkpoints(pretrain_workdir)
            steps = checkpointer.all_steps()
            last = checkpointer.restore_metadata()["config"]["train"]["num_steps"]
            checkpointer.close()
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
    finally:
        writer.close()


def _score_checkpoint(config, pretrain_workdir, step: int, log) -> dict | None:
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.init.update(path=str(pretrain_workdir), step=step, random=False)
    try:
        init = finetune.load_init(run_config.init)
    except FileNotFoundError:
        log(f"step {step}: checkpoint deleted before it was read; skipped")
        return None
    with tempfile.TemporaryDirectory(prefix="bert-jax-finetune-eval-") as scratch:
        summary = finetune.finetune(run_config, scratch, init=init, export=False,
                                    log=lambda *args: None)
    scores = {k: v for k, v in summary["validation"].items() if k != "step"}
    log(f"pretraining step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores
