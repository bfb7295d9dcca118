"""The ahead-of-time table of docs/scale-out.md, made by `bert-jax compile` itself.

    python bench/aot_table.py          # compiles every case, prints the table (about 20
                                       # minutes on 2 cores)
    python bench/aot_table.py --write docs/scale-out.md   # and puts it between the markers

Each case is a config compiled for a TPU slice on this machine (libtpu, no TPU); each of its
phases is a row: micro-batch rows per chip, XLA's memory per chip, the attention kernel and
the compile time. The compile's own JSON lines are printed too, as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = (("configs/pods/base.py:v5e-16", "v5e-16"), ("configs/pods/large.py:v5e-16", "v5e-16"),
         ("configs/pods/base.py:v4-32", "v4-32"), ("configs/pods/large.py:v4-32", "v4-32"))
BEGIN, END = "<!-- aot-table: bench/aot_table.py -->", "<!-- /aot-table -->"
HEADER = ("| config | slice | phase length | micro-batch rows / chip | GiB per chip (state, "
          "temporaries) | attention | compile |\n| --- | --- | --- | --- | --- | --- | --- |")


def compile_lines(config: str, tpu: str) -> list[dict]:
    """`bert-jax compile`'s JSON line of each phase of `config` on `tpu`."""
    result = subprocess.run(
        [sys.executable, "-m", "bert_jax.cli", "compile", f"--config={config}", f"--tpu={tpu}"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if result.returncode != 0:
        sys.exit(f"aot_table: bert-jax compile --config={config} --tpu={tpu} failed: "
                 f"{result.stderr.strip().splitlines()[-1]}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def row(config: str, tpu: str, line: dict) -> str:
    rows_per_chip = line["batch"] // line["micro_batches"] // line["devices"]
    if "does_not_fit" in line:
        memory = f"does not fit: {line['does_not_fit']}"
    else:
        gib = line["gib_per_chip"]
        memory = f"{gib['total']:.2f} ({gib['arguments']:.2f}, {gib['temporaries']:.2f})"
    return (f"| {config} | {tpu} | {line['length']} | {rows_per_chip} | {memory} | "
            f"{line['attention']} | {line['seconds']:.0f} s |")


def write_between_markers(path: Path, table: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"aot_table: {path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=2, action="append", metavar=("CONFIG", "TPU"),
                        help="compile this config for this slice (repeatable; default: the "
                             "docs' cases)")
    parser.add_argument("--write", type=Path, metavar="DOC.md",
                        help="replace the table between the markers of this file")
    args = parser.parse_args()
    rows = [HEADER]
    for config, tpu in args.case or CASES:
        for line in compile_lines(config, tpu):
            print(json.dumps(line), flush=True)
            rows.append(row(config, tpu, line))
    table = "\n".join(rows)
    print(table)
    if args.write:
        write_between_markers(args.write, table)


if __name__ == "__main__":
    main()
