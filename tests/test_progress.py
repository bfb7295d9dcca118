"""Progress where stderr is not a terminal: plain lines with counts, rate and ETA."""

import re

from bert_jax import progress


def test_a_log_gets_plain_lines_with_the_rate_counted_after_reset(capsys):
    bar = progress.Lines(total=4, desc="train", unit="step", every_s=0.0)
    bar.reset()
    bar.update(1)
    bar.set_postfix({"loss": "1.000"})
    bar.update(1)
    bar.close()
    bar.close()  # once
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train: 1/4 step (25%), ") and "eta " in lines[0]
    assert re.fullmatch(r"train: 2/4 step \(50%\), [\d.]+ step/s, eta \d+:\d\d, loss=1.000",
                        lines[1])
    assert len(lines) == 3 and lines[2].startswith("train: 2/4 step (50%)")


def test_wrapping_an_iterable_prints_one_line_at_the_end_when_lines_are_rare(capsys):
    assert list(progress.bar(range(3), desc="reading", unit="file")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"reading: 3/3 file \(100%\), [\d.]+ file/s",
                                            lines[0])
