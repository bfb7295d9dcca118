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
  pretrain   train BERT with MLM + NSP (for now: a smoke run of AdamW steps on a
             synthetic batch; real data and checkpoints arrive with the data and
             training work)

Run `bert-jax SUBCOMMAND --help` for a subcommand's options.
"""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


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


def _pretrain(args, overrides: list[str]) -> None:
    from bert_jax import train
    from bert_jax.config import ModelConfig

    config = _load_config(args.config, overrides)
    try:
        model_config = ModelConfig.from_dict(config.model)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(f"bert-jax pretrain: smoke run of the {model_config.num_layers}-layer, "
          f"H={model_config.hidden_size} model on one synthetic batch "
          f"(real-data training is not implemented yet)")
    result = train.smoke_run(config, steps=args.steps)
    first, last = result["first"]["loss"], result["last"]["loss"]
    print(f"done: {args.steps} steps in {result['seconds']:.1f}s, loss {first:.3f} -> {last:.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    pretrain = subparsers.add_parser(
        "pretrain", help="pretrain BERT (MLM + NSP)",
        description="Pretrain BERT. Today: AdamW steps on one synthetic batch (a smoke run "
                    "that proves forward, backward and update). Overrides: --config.FIELD=VALUE, "
                    "e.g. --config.model.num_layers=4.")
    pretrain.add_argument("--config", metavar="FILE",
                          help="Python config file with get_config() (default: built-in tiny)")
    pretrain.add_argument("--steps", type=int, default=10, help="number of steps (default 10)")
    pretrain.set_defaults(run=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        args.run(args, overrides)
    except UsageError as e:
        print(f"bert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
