"""`bert-jax` command line: parses arguments and calls library functions, nothing more.

Run configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`;
any field can be overridden as `--config.train.seed=1` (ml_collections' config flags).
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
BERT pretraining in JAX/Flax NNX.

subcommands:
  prepare-data  corpus -> tokenizer + TFDS dataset of NSP instances (cached), with a summary
  inspect-data  show masked batches as text; --out saves the exact batches of steps
  benchmark-data  time reading + masking batches (sequences per second)
  pretrain      train BERT with MLM + NSP (for now: a smoke run of AdamW steps on a
                synthetic batch; real-data training arrives with the training work)

Every subcommand takes --config=FILE (a Python file with get_config(); default: the
built-in tiny config on the built-in corpus) and overrides such as --config.data.corpus=GLOB.

Run `bert-jax SUBCOMMAND --help` for a subcommand's options.
"""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2 (as is any ValueError, which
    the library raises for bad input)."""


def _load_config(config_file: str | None, overrides: list[str]):
    """The run config from `config_file` (default: the built-in tiny config) plus overrides."""
    from absl import flags
    from ml_collections import config_flags

    from bert_jax.config import default_config

    bad = [arg for arg in overrides if not arg.startswith("--config.")]
    if bad:
        raise UsageError(f"unrecognized argument {bad[0]!r}: expected --config.FIELD=VALUE")
    if config_file and not os.path.isfile(config_file):
        raise UsageError(f"config file {config_file!r} does not exist: expected a Python file "
                         f"with get_config(), e.g. configs/tiny.py")
    argv = ["bert-jax", *overrides]
    flag_values = flags.FlagValues()
    try:
        if config_file:
            config_flags.DEFINE_config_file("config", config_file, flag_values=flag_values,
                                            sys_argv=argv)
        else:
            config_flags.DEFINE_config_dict("config", default_config(), flag_values=flag_values,
                                            sys_argv=argv)
        flag_values(argv)
        return flag_values.config
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (KeyError, AttributeError)):
            message = f"unknown field {message.strip(chr(34))}"
        raise UsageError(f"bad config ({config_file or 'built-in default'}): {message}") from e


def _pretrain(args, config) -> None:
    from bert_jax import train
    from bert_jax.config import ModelConfig

    model_config = ModelConfig.from_dict(config.model)
    print(f"bert-jax pretrain: smoke run of the {model_config.num_layers}-layer, "
          f"H={model_config.hidden_size} model on one synthetic batch "
          f"(real-data training is not implemented yet)")
    result = train.smoke_run(config, steps=args.steps)
    first, last = result["first"]["loss"], result["last"]["loss"]
    print(f"done: {args.steps} steps in {result['seconds']:.1f}s, loss {first:.3f} -> {last:.3f}")


def _prepare_data(args, config) -> None:
    from bert_jax.data import pipeline

    prepared = pipeline.prepare(config)
    summary = prepared.metadata["summary"]
    instances = ", ".join(f"{n:,} {split}" for split, n in summary["instances"].items())
    print(f"dataset: {prepared.path}\n"
          f"  documents {summary['documents']:,}  sentences {summary['sentences']:,}  "
          f"tokens {summary['tokens']:,}\n"
          f"  instances {instances}  fill ratio {summary['fill_ratio']:.3f}\n"
          f"  tokenizer {prepared.tokenizer.kind}, {prepared.tokenizer.vocab_size:,} tokens\n"
          f"  replaced non-UTF-8 bytes {summary['replaced_bytes']:,}  "
          f"built in {summary['seconds']}s")


def _inspect_data(args, config) -> None:
    import numpy as np

    from bert_jax.data import pipeline

    prepared = pipeline.prepare(config)
    loader = pipeline.loader(config, prepared, args.split)
    batches = [batch for _, batch in loader.iterate(args.start_step, args.steps)]
    for step, batch in zip(range(args.start_step, args.start_step + args.steps), batches):
        for row in range(min(args.rows, len(batch["input_ids"]))):
            print(f"step {step} row {row}: {pipeline.describe_row(batch, row, prepared.tokenizer)}")
    if args.out:
        stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
        np.savez(args.out, **stacked)
        print(f"saved {args.steps} steps of {len(batches[0]['input_ids'])} rows to {args.out}")


def _benchmark_data(args, config) -> None:
    import json

    from bert_jax.data import pipeline

    prepared = pipeline.prepare(config)
    loader = pipeline.loader(config, prepared)
    print(json.dumps(pipeline.measure_throughput(loader, args.steps)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    config_options = argparse.ArgumentParser(add_help=False)
    config_options.add_argument(
        "--config", metavar="FILE",
        help="Python config file with get_config() (default: built-in tiny); any field can be "
             "overridden as --config.FIELD=VALUE, e.g. --config.data.corpus='texts/*.txt'")

    def add(name, run, help_text, description):
        sub = subparsers.add_parser(name, parents=[config_options], help=help_text,
                                    description=description)
        sub.set_defaults(run=run)
        return sub

    pretrain = add("pretrain", _pretrain, "pretrain BERT (MLM + NSP)",
                   "Pretrain BERT. Today: AdamW steps on one synthetic batch (a smoke run that "
                   "proves forward, backward and update).")
    pretrain.add_argument("--steps", type=int, default=10, help="number of steps (default 10)")
    add("prepare-data", _prepare_data, "build the tokenizer and dataset of a corpus",
        "Reads config.data.corpus, trains a SentencePiece vocabulary unless "
        "config.data.vocab_file is set, creates NSP/SOP instances and writes them as a TFDS "
        "ArrayRecord dataset under config.data.data_dir (reused when it exists).")
    inspect = add("inspect-data", _inspect_data, "print masked batches as text",
                  "Prints the masked batches that training steps would see, decoded to text "
                  "([MASK] shown, labels in parentheses); --out saves them exactly.")
    inspect.add_argument("--steps", type=int, default=1, help="number of steps (default 1)")
    inspect.add_argument("--start-step", type=int, default=0, help="first step (default 0)")
    inspect.add_argument("--rows", type=int, default=2, help="rows printed per step (default 2)")
    inspect.add_argument("--split", default="train", help="train or validation")
    inspect.add_argument("--out", metavar="FILE.npz",
                         help="save the batches (features stacked over steps) to this file")
    benchmark = add("benchmark-data", _benchmark_data, "time masked batches from the dataset",
                    "Times reading and masking train batches in this process (no prefetch "
                    "thread), printing one JSON line with sequences per second.")
    benchmark.add_argument("--steps", type=int, default=50, help="batches timed (default 50)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        args.run(args, _load_config(args.config, overrides))
    except (UsageError, ValueError) as e:
        print(f"bert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
