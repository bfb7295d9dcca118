"""Kill -9 at random moments (a short loop; `python tests/kill_loop.py` runs the full 20)."""

import pytest

from kill_loop import check, kill_loop
from pretrain_runs import assert_same_run, overrides


@pytest.mark.slow
def test_killed_and_restarted_runs_lose_nothing(straight_run, tmp_path):
    reference, data_dir, _ = straight_run
    workdir = tmp_path / "run"
    records = kill_loop(workdir, overrides(data_dir, **{"checkpoint.every_steps": 2}),
                        kills=2, seed=1, max_delay_s=0.5, log=lambda record: None)
    check(records)
    assert sum(r["killed"] for r in records) >= 1, records  # a kill did land mid-run
    assert_same_run(reference, workdir)
