"""`bert-jax report`: the curves of a real run's metrics.jsonl as HTML and PNG, its printed
figures against those of metrics.jsonl, and a workdir without metrics as a one-line error."""

import base64
import io
import json
import re
import shutil
import statistics
import subprocess
import sys

import pytest
from matplotlib import image

from bert_jax import report
from bert_jax.config import ConfigError
from bert_jax.metrics import MetricsWriter

SUMMARY = re.compile(r"step (\d+) of (\d+): train loss (\S+)  mlm_accuracy (\S+)  median (\S+) "
                     r"seq/s\n  validation mlm_accuracy best (\S+) \(step (\d+)\), last (\S+) "
                     r"\(step (\d+)\); nsp_accuracy (\S+)\n  report: (.+)\n")


def _report(workdir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", "report", f"--workdir={workdir}"],
                          capture_output=True, text=True, timeout=120)


def _decoded(png: bytes):
    pixels = image.imread(io.BytesIO(png), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    return pixels


@pytest.fixture
def run_dir(straight_run, tmp_path):
    """The metrics of the 20-step reference run, in a workdir of this test's own."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(straight_run[0] / "metrics.jsonl", workdir)
    return workdir


def test_pretrain_writes_the_report(straight_run):
    workdir, _, stdout = straight_run
    assert f"\n  report: {workdir / 'report.html'}\n" in stdout
    assert (workdir / "report.html").is_file() and (workdir / "curves.png").is_file()


def test_report_draws_every_curve_and_prints_the_figures_of_metrics_jsonl(run_dir):
    result = _report(run_dir)
    assert result.returncode == 0, result.stderr

    page = (run_dir / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert len(images) == len(report.CURVES) == page.count("<img")
    for encoded in images:
        _decoded(base64.b64decode(encoded))
    panels = _decoded((run_dir / "curves.png").read_bytes())
    assert panels.shape[1] > panels.shape[0]  # 3 panels a row

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    validation = [r for r in records if r.get("split") == "validation"]
    header = [r for r in records if r.get("split") == "run"][-1]
    best = max(validation, key=lambda r: r["mlm_accuracy"])
    expected = (str(train[-1]["step"]), f"{header['num_steps']:.0f}",
                f"{train[-1]['loss']:.4f}", f"{train[-1]['mlm_accuracy']:.4f}",
                f"{statistics.median(r['seq_per_s'] for r in train):.1f}",
                f"{best['mlm_accuracy']:.4f}", str(best["step"]),
                f"{validation[-1]['mlm_accuracy']:.4f}", str(validation[-1]["step"]),
                f"{validation[-1]['nsp_accuracy']:.4f}", str(run_dir / "report.html"))
    summary = SUMMARY.fullmatch(result.stdout)
    assert summary, result.stdout
    assert summary.groups() == expected
    assert train[-1]["step"] == 20


@pytest.mark.parametrize("metrics", [None, ['{"step": 0, "split": "run", "num_steps": 20}']])
def test_a_workdir_without_metrics_is_one_line_exit_2(tmp_path, metrics):
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    result = _report(tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert str(tmp_path / "metrics.jsonl") in result.stderr and "expected" in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_summary_takes_the_first_best_validation_step_and_draws_a_non_finite_loss(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(0, {"num_steps": 30}, split="run")
    for step, loss, seq_per_s in ((10, 3.0, 50.0), (20, float("nan"), 300.0), (30, 2.0, 100.0)):
        writer.write(step, {"loss": loss, "mlm_accuracy": step / 100, "nsp_accuracy": 0.5,
                            "learning_rate": 1e-4, "seq_per_s": seq_per_s, "mfu": None})
    for step, accuracy in ((10, 0.3), (20, 0.4), (30, 0.4)):
        writer.write(step, {"loss": 2.5, "mlm_accuracy": accuracy, "nsp_accuracy": step / 40},
                     split="validation")
    writer.write(30, {"rollbacks": 1}, split="events")
    writer.close()

    path, summary = report.write(tmp_path)
    assert path == str(tmp_path / "report.html")
    assert summary == {"step": 30, "num_steps": 30, "loss": 2.0, "mlm_accuracy": 0.3,
                       "seq_per_s": 100.0, "best_mlm_accuracy": 0.4, "best_step": 20,
                       "last_mlm_accuracy": 0.4, "last_step": 30, "nsp_accuracy": 0.75}
    _decoded((tmp_path / "curves.png").read_bytes())


def test_a_run_without_validation_has_no_validation_figures(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(5, {"loss": 3.0, "mlm_accuracy": 0.1, "seq_per_s": 10.0})
    writer.close()
    summary = report.summarize(*report.load(tmp_path))
    assert summary["num_steps"] is None and summary["best_step"] is None
    assert summary["nsp_accuracy"] is None
    with pytest.raises(ConfigError, match="does not exist"):
        report.load(tmp_path / "elsewhere")
