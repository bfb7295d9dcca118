"""Kill -9 at random moments, restart, repeat: nothing may be lost.

`kill_loop` starts `bert-jax pretrain` in a subprocess, SIGKILLs it at a random moment after
it has logged a step (checkpoints are written asynchronously every 2 steps, so many kills land
during a write), checks that the restart resumes from the newest complete checkpoint, and
repeats; the last start runs to the end. The test suite runs a short loop against its
reference run; the full loop, with its own reference, is

    python tests/kill_loop.py --kills 20 --steps 60

which exits non-zero unless every restart resumed from the newest complete checkpoint and the
final weights and every logged metric equal an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pretrain_runs import PRETRAIN, assert_same_run, one_process_env, overrides  # noqa: E402


def complete_checkpoints(workdir: Path) -> list[int]:
    """Committed steps: Orbax writes into a temporary name and renames it to the step."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.is_dir() else []


def _logged_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_loop(workdir: Path, args: list[str], kills: int, seed: int = 0,
              max_delay_s: float = 1.0, log=print) -> list[dict]:
    """Runs pretraining in `workdir` with `args`, killed `kills` times. Returns one record per
    start: the newest complete checkpoint before it, the step it resumed at, how it ended."""
    rng = random.Random(seed)
    # Restarts reuse compiled steps, as a preempted job on a persistent disk would.
    env = {**one_process_env(), "JAX_COMPILATION_CACHE_DIR": str(workdir) + ".jax-cache",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    records = []
    for attempt in range(kills + 1):
        newest = (complete_checkpoints(workdir) or [None])[-1]
        logged = _logged_steps(workdir)
        process = subprocess.Popen([*PRETRAIN, f"--workdir={workdir}", *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = False
        if attempt < kills:
            while process.poll() is None and _logged_steps(workdir) <= logged:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, max_delay_s))
            killed = process.poll() is None
            if killed:
                process.send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
        resumed = re.search(r"resumed from .* at step (\d+)", stdout)
        record = {"attempt": attempt, "newest_checkpoint": newest,
                  "resumed_at": int(resumed.group(1)) if resumed else None,
                  "killed": killed, "returncode": process.returncode}
        log(record)
        records.append(record)
        if not killed:
            if process.returncode != 0:
                raise AssertionError(f"start {attempt} failed:\n{stderr[-3000:]}")
            break
    return records


def check(records: list[dict]) -> None:
    """Every start resumed from the newest complete checkpoint before it; the last finished."""
    for record in records:
        assert record["resumed_at"] == record["newest_checkpoint"], record
    assert records[-1]["returncode"] == 0 and not records[-1]["killed"], records[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60, help="steps of the tiny run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=1.0,
                        help="kill up to this many seconds after the start's first logged step")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kill-loop-"))
    args = overrides(root / "data", **{"train.num_steps": options.steps,
                                       "checkpoint.every_steps": 2})
    print(f"reference run in {root / 'reference'}")
    reference = subprocess.run([*PRETRAIN, f"--workdir={root / 'reference'}", *args],
                               env=one_process_env(), capture_output=True, text=True)
    if reference.returncode:
        print(reference.stderr, file=sys.stderr)
        return 1
    records = kill_loop(root / "killed", args, options.kills, options.seed, options.max_delay)
    check(records)
    assert_same_run(root / "reference", root / "killed")
    kills = sum(r["killed"] for r in records)
    print(f"{kills} kills, {len(records)} starts: every restart resumed from the newest "
          f"complete checkpoint; weights and metrics equal the uninterrupted run's ({root})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
