"""Metrics output of process 0: `WORKDIR/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
from etils.epath import Path  # local paths and gs:// alike


class MetricsWriter:
    """Appends one JSON object per call to metrics.jsonl and the same scalars to TensorBoard
    (under `train/` or `validation/`). Disabled writers (processes other than 0) do nothing.

    Records after `start_step`, the step a run starts or resumes at, are dropped (and a line
    cut short by a kill), so metrics.jsonl holds each step once, as an uninterrupted run
    would; None keeps every record (a log that is not a run's, e.g. continuous evaluation)."""

    def __init__(self, workdir, enabled: bool = True, start_step: int | None = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes

        self._path = Path(workdir) / "metrics.jsonl"
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = None
        self.rewind(start_step)
        self._tensorboard = SummaryWriter(str(self._path.parent / "tensorboard"))

    def rewind(self, step: int | None) -> None:
        """Drops the records after `step` (the run goes back there: resume, rollback); None
        keeps them all."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
        if step is not None and self._path.exists():
            kept = [line for line in self._path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= step]
            partial = self._path.with_name(self._path.name + ".rewind")
            partial.write_text("".join(line + "\n" for line in kept))
            partial.replace(self._path)  # atomic: a kill now leaves the old or the new file
        self._jsonl = self._path.open("a")

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **({"split": split} if split != "train" else {}),
                  **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain(value):
    """A JSON-able value: numbers (NaN and infinities as strings, which JSON lacks) and
    words (a run's header: its devices and kernels)."""
    if value is None or isinstance(value, str):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(workdir) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
