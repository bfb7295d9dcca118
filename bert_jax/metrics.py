"""Metrics output of process 0: `WORKDIR/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
from etils.epath import Path  # local paths and gs:// alike


class MetricsWriter:
    """Appends one JSON object per call to metrics.jsonl and the same scalars to TensorBoard
    (under `train/` or `validation/`). Disabled writers (processes other than 0) do nothing."""

    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

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


def _plain(value):
    """A JSON-able number (NaN and infinities as strings, which JSON lacks)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(workdir) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
