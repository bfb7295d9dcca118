"""A pretraining run's curves from `WORKDIR/metrics.jsonl`: `WORKDIR/report.html` (one
self-contained page, its PNGs inline, to open or mail without the workdir), `WORKDIR/curves.png`
(all panels in one figure) and the figures of a short summary.

matplotlib is imported here only, so the other commands do not pay for it; figures are drawn
on its Agg canvas (no display needed, and no pyplot state shared with a caller).
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics

from bert_jax import files
from bert_jax.config import ConfigError
from bert_jax.metrics import read_metrics

# (metric, panel title, drawn for validation too): the panels, in order.
CURVES = (("loss", "loss (MLM + NSP)", True), ("mlm_accuracy", "MLM accuracy", True),
          ("nsp_accuracy", "NSP accuracy", True), ("learning_rate", "learning rate", False),
          ("seq_per_s", "throughput (sequences/s)", False))


def load(workdir) -> tuple[list[dict], list[dict], dict]:
    """The train records, the validation records and the last run header (the step a run
    started or resumed at, its devices, num_steps; {} if none) of `workdir`.

    Raises:
      ConfigError: no metrics.jsonl, or no train record in it (a run stopped before its first
        log): nothing to draw.
    """
    path = files.path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: expected the workdir of a bert-jax pretrain "
                          f"run (its metrics.jsonl)")
    records = read_metrics(path.parent)
    train = [r for r in records if "split" not in r]
    if not train:
        raise ConfigError(f"{path} has no training record: expected a run that logged at least "
                          f"one step (every train.log_every steps)")
    headers = [r for r in records if r.get("split") == "run"]
    return train, [r for r in records if r.get("split") == "validation"], (headers or [{}])[-1]


def _number(value) -> float:
    """A record's value as a float; NaN for one that is missing, null (mfu where the peak is
    unknown) or non-finite (written as a string): a gap in a curve, not a spike."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def summarize(train: list[dict], validation: list[dict], header: dict) -> dict:
    """The figures `bert-jax report` prints: the last train step and the run's num_steps, the
    last train loss and MLM accuracy, the best validation MLM accuracy (the first step that
    reached it) and the last one, the last validation NSP accuracy, and the median seq/s (the
    median, as the first logged interval holds the compilation). Validation figures are None
    for a run without validation records."""
    last = train[-1]
    summary = {"step": last["step"], "num_steps": header.get("num_steps"),
               "loss": _number(last.get("loss")),
               "mlm_accuracy": _number(last.get("mlm_accuracy")),
               "seq_per_s": statistics.median(_number(r.get("seq_per_s")) for r in train),
               "best_mlm_accuracy": None, "best_step": None, "last_mlm_accuracy": None,
               "last_step": None, "nsp_accuracy": None}
    if validation:
        best = max(validation, key=lambda r: (_number(r.get("mlm_accuracy")), -r["step"]))
        summary.update(best_mlm_accuracy=_number(best.get("mlm_accuracy")),
                       best_step=best["step"],
                       last_mlm_accuracy=_number(validation[-1].get("mlm_accuracy")),
                       last_step=validation[-1]["step"],
                       nsp_accuracy=_number(validation[-1].get("nsp_accuracy")))
    return summary


def _draw(axes, curve: tuple, train: list[dict], validation: list[dict]) -> None:
    """One panel: the train curve and, for the metrics that validation measures, its points."""
    name, title, validated = curve
    axes.plot([r["step"] for r in train], [_number(r.get(name)) for r in train], label="train")
    if validated and validation:
        axes.plot([r["step"] for r in validation], [_number(r.get(name)) for r in validation],
                  "o-", label="validation")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if validated and validation:
        axes.legend()


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return out.getvalue()


def _page(workdir, summary: dict, pngs: list[bytes]) -> str:
    """The HTML page: the summary as a table, then one inline <img> per curve."""
    rows = [("steps", f"{summary['step']}" + (f" of {summary['num_steps']:.0f}"
                                              if summary["num_steps"] else "")),
            ("last train loss", f"{summary['loss']:.4f}"),
            ("last train MLM accuracy", f"{summary['mlm_accuracy']:.4f}"),
            ("median throughput", f"{summary['seq_per_s']:.1f} seq/s")]
    if summary["best_step"] is not None:
        rows += [("best validation MLM accuracy",
                  f"{summary['best_mlm_accuracy']:.4f} (step {summary['best_step']})"),
                 ("last validation MLM accuracy",
                  f"{summary['last_mlm_accuracy']:.4f} (step {summary['last_step']})"),
                 ("last validation NSP accuracy", f"{summary['nsp_accuracy']:.4f}")]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                      for k, v in rows)
    images = "\n".join(f'<img alt="{html.escape(title)}" src="data:image/png;base64,'
                       f'{base64.b64encode(png).decode()}">'
                       for (_, title, _), png in zip(CURVES, pngs))
    title = html.escape(f"bert-jax run {workdir}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>body{{font-family:sans-serif}} th{{text-align:left;padding-right:1em}} "
            f"img{{max-width:48%}}</style></head>\n<body><h1>{title}</h1>\n<table>\n{table}\n"
            f"</table>\n{images}\n</body></html>\n")


def write(workdir) -> tuple[str, dict]:
    """Writes `workdir`'s report.html and curves.png; returns the report's path and
    `summarize`'s figures. Raises a ConfigError where `load` does."""
    from matplotlib.figure import Figure

    train, validation, header = load(workdir)
    summary = summarize(train, validation, header)
    pngs = []
    for curve in CURVES:
        figure = Figure(figsize=(6, 4))
        _draw(figure.add_subplot(), curve, train, validation)
        pngs.append(_png(figure))
    rows = math.ceil(len(CURVES) / 3)
    panels = Figure(figsize=(18, 4 * rows), layout="constrained")
    grid = panels.subplots(rows, 3, squeeze=False).flat
    for axes, curve in zip(grid, CURVES):
        _draw(axes, curve, train, validation)
    for axes in grid[len(CURVES):]:  # the last row's empty places
        axes.set_visible(False)
    folder = files.path(workdir)
    files.write_atomically(folder / "curves.png", _png(panels))
    report = folder / "report.html"
    files.write_atomically(report, _page(workdir, summary, pngs).encode())
    return str(report), summary
