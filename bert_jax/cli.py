"""`bert-jax` command line: a table of subcommands (`COMMANDS`), each parsing its options and
calling a library function. A user's mistake (a `ConfigError`, a `UsageError`, an argparse
error) exits with code 2, any other failure (a full disk, a crash inside JAX, a diverged run)
with 1; either way with one line naming the cause.
"""

from __future__ import annotations

import argparse
import collections
import errno
import io
import json
import logging
import os
import re
import sys
import threading
import traceback

from etils.epath import Path  # local paths and gs:// alike

from bert_jax import malloc
from bert_jax.config import (ATTENTION_IMPLEMENTATIONS, DTYPES, PRESETS, REMAT_POLICIES,
                             ConfigError, RunConfig, default_run)
from bert_jax.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2 (as is a `ConfigError`)."""


# `run(args, config)`: `config` is the run config of --config and overrides where the command
# has a `DefaultConfig`, else None (it reads its workdir's). `distributed`: one of many processes.
Command = collections.namedtuple("Command", "name run help description config distributed "
                                 "options", defaults=(None, False, ()))
DefaultConfig = collections.namedtuple("DefaultConfig", "name make")  # `name`: for --help
# Options under a heading of their own in --help; `exactly_one`: a command needs one of them.
Group = collections.namedtuple("Group", "title description options exactly_one", defaults=(False,))


def option(*flags, **kwargs) -> tuple:
    """One `add_argument` call as data: a row of a command's options."""
    return flags, kwargs


def finetune_default():
    from bert_jax.finetune import default_config

    return default_config()


def _integer(least: int, expected: str):
    """An argparse type: a whole number >= `least`, else the error 'expected `expected`'."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return int(text)
    return parse


def _dropout(text: str):
    """An argparse type: a rate in [0, 1), or the word 'pretraining'."""
    try:
        if text == "pretraining" or 0.0 <= float(text) < 1.0:
            return text if text == "pretraining" else float(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected a rate in [0, 1) or 'pretraining'")


PRETRAINING = DefaultConfig("the built-in one: BERT-tiny on the built-in corpus", default_run)
FINETUNING = DefaultConfig("the fine-tuning defaults", finetune_default)
_positive, _non_negative = _integer(1, "a positive integer"), _integer(0, "an integer >= 0")
DISTRIBUTED = Group("multi-process runs", "One process per host, all with the same arguments. "
                    "SLURM, Open MPI and Cloud TPU are detected; elsewhere give all three (or "
                    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).", (
    option("--coordinator-address", "--coordinator_address", metavar="HOST:PORT",
           help="address of process 0, which runs the coordination service"),
    option("--num-processes", "--num_processes", type=_positive, metavar="N",
           help="number of processes in the run (1: no distributed runtime)"),
    option("--process-id", "--process_id", type=_non_negative, metavar="I",
           help="this process's index, 0 <= I < N"),
    option("--heartbeat-timeout", type=_positive, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
           metavar="SECONDS", help="fail if a process is silent this long (default %(default)s)")))
TASK = Group("task", "builtin (from the built-in corpus), glue/NAME (TFDS, prepared in "
             "--config.task.tfds_data_dir), or classification, pair-classification, regression, "
             "pair-regression on CSV/TSV/JSON Lines files with columns text, [text_pair,] label", (
    option("--task", dest="task.name", metavar="NAME", help="task name (default builtin)"),
    option("--train-file", dest="task.train_file", metavar="FILE", help="training examples"),
    option("--validation-file", dest="task.validation_file", metavar="FILE", help="validation set"),
    option("--labels", dest="task.labels", metavar="A,B,...", help="a local-file classification "
           "task's classes (default: the training file's, sorted); others are an error")))
DEFAULT_WORKDIR = "runs/default"  # pretrain's, and so where the other commands look
PRETRAINING_WORKDIR = option("--workdir", default=DEFAULT_WORKDIR,
                             help="a bert-jax pretrain workdir (default %(default)s)")
CHECKPOINT_STEP = option("--step", type=int, help="checkpoint step (default: latest)")
# benchmark's synthetic run, in `benchmark_config`'s order; applied in `_benchmark`, not by
# argparse, so that a flag given with --config is seen (and refused), not ignored.
SYNTHETIC_RUN = {"model": "small", "batch": 16, "seq": 128, "dtype": "float32",
                 "attention": "auto", "scan": False, "remat": "none", "instances_per_row": 1}
# A run stopped by SIGTERM, in its summary's first line: the launchers look for it
# (launch/tpu_vm.sh, launch/gke/entrypoint.sh).
PREEMPTED = " (preempted: checkpoint saved, run again to resume)"
INTERRUPTED = " (Ctrl-C: checkpoint saved, run the same command again to resume)"


def _start_distributed(args) -> None:
    from bert_jax import distributed

    how = distributed.initialize(distributed.Options.from_env(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, heartbeat_timeout_s=args.heartbeat_timeout))
    if how:
        import jax

        print(f"process {jax.process_index()} of {jax.process_count()} ({how}), "
              f"{jax.local_device_count()} of {jax.device_count()} devices", file=sys.stderr)


def _load_config(config_file: str | None, overrides: list[str], default=None):
    """`config_file`'s run config (else `default()`'s) and overrides; any failure is the user's."""
    from absl import flags
    from ml_collections import config_flags

    if bad := [arg for arg in overrides if not arg.startswith("--config.")]:
        raise UsageError(f"unrecognized argument {bad[0]!r}: expected --config.FIELD=VALUE")
    path = (config_file or "").split(":")[0]  # FILE:ARGUMENT passes ARGUMENT to get_config
    if path and not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist: expected a Python file with "
                         f"get_config(), e.g. configs/tiny.py")
    argv, flag_values = ["bert-jax", *overrides], flags.FlagValues()
    try:
        if config_file:
            config_flags.DEFINE_config_file("config", config_file, flag_values=flag_values,
                                            sys_argv=argv)
        else:
            config_flags.DEFINE_config_dict("config", (default or default_run)(),
                                            flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        return flag_values.config
    except Exception as e:  # noqa: BLE001 (a config file may raise anything)
        unknown = next((c for c in _chain(e) if isinstance(c, KeyError)), None)
        if isinstance(e, (KeyError, AttributeError)) and unknown is not None:  # ml_collections
            message = _unknown_field(unknown, overrides)
        else:
            message, cause = _first_line(e), _first_line(_chain(e)[-1])
            if cause not in message:  # e.g. the config file's own error
                message = f"{message.rstrip(':')}: {cause}"
        raise UsageError(f"bad config ({config_file or 'built-in default'}): {message}") from e


def _unknown_field(error: KeyError, overrides: list[str]) -> str:
    """`unknown field 'num_step' in config.train: did you mean 'num_steps'?` from
    ml_collections' KeyError, whose text is `'num_step'\\nDid you mean "num_steps" ...`."""
    key, _, hint = str(error.args[0] if error.args else "").partition("\n")
    key = key.strip("'\"")
    paths = [arg.partition("=")[0].removeprefix("--config.").split(".") for arg in overrides]
    section = next((path[:path.index(key)] for path in paths if key in path), [])
    guess = re.search(r'Did you mean "([^"]+)"', hint)
    return (f"unknown field {key!r} in {'.'.join(['config', *section])}"
            + (f": did you mean {guess[1]!r}?" if guess else ""))


def _stopped_early(summary: dict) -> str:
    if summary["interrupted"]:
        return INTERRUPTED
    return PREEMPTED if summary["preempted"] else ""


def _pretrain(args, config) -> None:
    import jax

    from bert_jax import report, train, workdir

    summary = train.train_and_evaluate(config, args.workdir)
    if jax.process_index() != 0:
        return
    print(f"\nstopped at step {summary['step']} after {summary['seconds']:.0f}s"
          f"{_stopped_early(summary)}")
    if metrics := summary["train"]:
        print("  train       loss {loss:.3f}  mlm_accuracy {mlm_accuracy:.3f}  {seq_per_s:.0f} "
              "seq/s  {real_tokens_per_s:.0f} tokens/s (padding not counted)".format(**metrics))
        if metrics["nonfinite_total"] or summary["rollbacks"]:
            print(f"  non-finite  {metrics['nonfinite_total']:.0f} steps skipped, "
                  f"{summary['rollbacks']} rollbacks")
    if summary["validation"]:
        print("  validation  loss {loss:.3f}  mlm_accuracy {mlm_accuracy:.3f}  "
              "nsp_accuracy {nsp_accuracy:.3f}".format(**summary["validation"]))
    if summary["train"]:  # else no step was logged: maybe no curve to draw
        print(f"  report: {report.write(args.workdir)[0]}")
    if (out := summary["export"]) is None:
        return
    print(f"  exported to {out} (transformers.BertForPreTraining.from_pretrained loads it)")
    _fill_mask_probe(summary["pretrained"], workdir.load_tokenizer_of(out), config)


def _fill_mask_probe(pretrained, tokenizer, config) -> None:
    """The end of a run's summary: fill-mask on a sentence of the run's own validation split
    (the first with a one-token word to mask), the masked word and the model's guesses."""
    from bert_jax import inference
    from bert_jax.data import pipeline

    prepared = pipeline.prepare(RunConfig.from_dict(config))
    probe = inference.masked_sentence(tokenizer, inference.validation_segments(prepared))
    if probe is None:
        print("  fill-mask: no validation sentence with a one-token word to mask")
        return
    text, word = probe
    guesses = inference.fill_mask(pretrained, tokenizer, text)[0]
    print(f"  fill-mask (validation): {text!r}, masked {word!r} -> " +
          ", ".join(f"{inference.shown(token)} ({p:.2f})" for token, p in guesses))


def _eval(args, config) -> None:
    import jax

    from bert_jax import train

    metrics = train.evaluate_workdir(args.workdir, args.step)
    if jax.process_index() == 0:
        print(json.dumps(metrics))


def _report(args, config) -> None:
    from bert_jax import report

    path, figures = report.write(args.workdir)
    of = f" of {figures['num_steps']:.0f}" if figures["num_steps"] else ""
    print(f"step {figures['step']}{of}: train loss {figures['loss']:.4f}  mlm_accuracy "
          f"{figures['mlm_accuracy']:.4f}  median {figures['seq_per_s']:.1f} seq/s")
    if figures["best_step"] is not None:
        print(f"  validation mlm_accuracy best {figures['best_mlm_accuracy']:.4f} (step "
              f"{figures['best_step']}), last {figures['last_mlm_accuracy']:.4f} (step "
              f"{figures['last_step']}); nsp_accuracy {figures['nsp_accuracy']:.4f}")
    print(f"  report: {path}")


def _finetune(args, config) -> None:
    import jax

    from bert_jax import finetune, scores

    summary = finetune.finetune(config, args.workdir)
    if jax.process_index() != 0:
        return
    examples = ", ".join(f"{n:,} {split}" for split, n in summary["examples"].items())
    print(f"\n{summary['task']}: stopped at step {summary['step']} of {summary['num_steps']} "
          f"after {summary['seconds']:.0f}s ({examples} examples)"
          f"{_stopped_early(summary)}")
    for name in ("train", "validation", "best"):
        if values := summary[name]:
            shown = [f"{k} {v:.4f}" for k, v in values.items() if k == "loss" or k in scores.SCORES]
            at = f"  (step {values['step']})" if "step" in values else ""
            print(f"  {name:<10}  " + "  ".join(shown) + at)
    if summary["export"]:
        print(f"  exported to {summary['export']} "
              f"(transformers.BertForSequenceClassification.from_pretrained loads it)")


def _finetune_eval(args, config) -> None:
    from bert_jax import finetune_eval

    records = finetune_eval.evaluate_checkpoints(
        config, args.workdir, every=args.every, follow=args.follow, poll_seconds=args.poll_seconds)
    out = finetune_eval.output_dir(args.workdir, config.task.name)
    print(f"scored {len(records)} new checkpoints; all scores: {out / 'metrics.jsonl'}")


def _on_host() -> None:
    """Runs JAX on the CPU unless JAX_PLATFORMS says otherwise: export and fill-mask need no
    accelerator (one may be busy training), and looking for a TPU costs seconds at start."""
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _export(args, config) -> None:
    _on_host()
    from bert_jax import export

    dropout = {None: export.FINETUNING_DROPOUT, "pretraining": None}.get(args.dropout,
                                                                          args.dropout)
    out = export.export(args.workdir, args.out, args.step, dropout)
    step = "" if args.step is None else f" (step {args.step})"
    print(f"exported {args.workdir}{step} to {out}")


def _convert(args, config) -> None:
    from bert_jax import export

    if not Path(args.source).is_dir():
        raise UsageError(f"--from={args.source!r} is not a directory: expected a "
                         f"google-research/bert checkpoint directory")
    print(f"converted {args.source} to {export.convert(args.source, args.out)}")


def _compile(args, config) -> None:
    import importlib.util

    if args.tpu and importlib.util.find_spec("libtpu") is None:
        raise UsageError("compiling for a TPU slice needs the libtpu package: pip install "
                         "'bert-jax[tpu]' (it runs on a CPU machine too)")
    from bert_jax import aot

    too_big = []
    for index, phase in enumerate(RunConfig.from_dict(config).phases):
        compiled = aot.compile_train_step(config, args.tpu or args.platform, index)
        line = {"target": compiled.target, "devices": compiled.devices, "phase": index,
                "length": phase.max_seq_length, "batch": phase.global_batch_size,
                "micro_batches": phase.grad_accum_steps,
                "instances_per_row": phase.instances_per_row, "attention": compiled.attention,
                "fused_attention": compiled.fused_attention, "seconds": round(compiled.seconds, 1)}
        if compiled.bytes_per_chip:
            line["gib_per_chip"] = {k: round(v / 2**30, 2)
                                    for k, v in compiled.bytes_per_chip.items()}
        if compiled.out_of_memory:
            too_big.append(index)
            line["does_not_fit"] = compiled.out_of_memory
        print(json.dumps(line))
    if too_big:
        raise ConfigError(f"phases {too_big} do not fit {args.tpu}: raise their gradient "
                          f"accumulation (the 5th value of a train.phases row) or set "
                          f"--config.model.remat_policy=full")


def _benchmark(args, config) -> None:
    from bert_jax import benchmark, files

    if args.suite:
        _check_out_folder(args.out)
        figures = benchmark.run_suite(log=lambda line: print(line, flush=True))
        files.write_atomically(args.out, (json.dumps(figures, indent=1) + "\n").encode())
        print(f"wrote {args.out}")
        return
    given = {name: vars(args)[name] for name in SYNTHETIC_RUN if vars(args)[name] is not None}
    if args.config is None and not args.overrides:  # the synthetic run of the flags
        settings = {**SYNTHETIC_RUN, **given}.values()
        print(json.dumps(benchmark.run(benchmark.benchmark_config(*settings), args.steps)))
        return
    if given:
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} with --config or --config.FIELD "
                         f"overrides: the config sets the model and batch; give one or the other")
    first = RunConfig.from_dict(config).phases[0]  # the steps a run of the config starts with
    config.data.update(max_seq_length=first.max_seq_length,
                       max_predictions_per_seq=first.max_predictions_per_seq,
                       instances_per_row=first.instances_per_row)
    config.train.update(global_batch_size=first.global_batch_size,
                        grad_accum_steps=first.grad_accum_steps, phases=())
    print(json.dumps(benchmark.run(config, args.steps)))


def _fill_mask(args, config) -> None:
    _on_host()
    from bert_jax import inference

    pretrained, tokenizer = inference.load_with_tokenizer(args.path)
    guesses = inference.fill_mask(pretrained, tokenizer, args.text, args.top_k)
    for number, top in enumerate(guesses, 1):
        print(f"[MASK] {number}: " + ", ".join(f"{inference.shown(t)} ({p:.3f})"
                                               for t, p in top))


def _prepare_data(args, config) -> None:
    from bert_jax.data import pipeline

    # Every phase's dataset (BERT's 128 and 512 have one each): a run finds them all built.
    settings, printed = RunConfig.from_dict(config), set()
    for phase in settings.phases:
        prepared = pipeline.prepare(settings, phase)
        if prepared.path in printed:
            continue
        printed.add(prepared.path)
        print(pipeline.describe(prepared))


def _check_out_folder(out: str | None) -> None:
    if out and not Path(out).absolute().parent.is_dir():
        raise UsageError(f"--out={out}: its folder does not exist: create it first")


def _inspect_data(args, config) -> None:
    import numpy as np

    from bert_jax.data import pipeline

    _check_out_folder(args.out)
    # The phase of the first step decides lengths and batch size, as in training.
    settings = RunConfig.from_dict(config)
    phase = next((p for p in settings.phases if p.start <= args.start_step < p.end), None)
    if phase is None:
        raise UsageError(f"--start-step={args.start_step}: expected a step below "
                         f"train.num_steps={config.train.num_steps}")
    if args.start_step + args.steps > phase.end:
        raise UsageError(f"steps {args.start_step}..{args.start_step + args.steps - 1} cross the "
                         f"phase boundary at step {phase.end}: inspect one phase at a time")
    prepared = pipeline.prepare(settings, phase)
    loader = pipeline.loader(settings, prepared, args.split, phase)
    batches = [batch for _, batch in loader.iterate(args.start_step - phase.start, args.steps)]
    for step, batch in enumerate(batches, args.start_step):
        for row in range(min(args.rows, len(batch["input_ids"]))):
            print(f"step {step} row {row}: {pipeline.describe_row(batch, row, prepared.tokenizer)}")
    if args.out:
        np.savez(args.out, **{name: np.stack([b[name] for b in batches]) for name in batches[0]})
        print(f"saved {args.steps} steps of {len(batches[0]['input_ids'])} rows to {args.out}")


def _benchmark_data(args, config) -> None:
    from bert_jax.data import pipeline

    settings = RunConfig.from_dict(config)  # the first phase's length and batch
    loader = pipeline.loader(settings, pipeline.prepare(settings))
    print(json.dumps(pipeline.measure_throughput(loader, args.steps)))


COMMANDS = (
    Command(
        "pretrain", _pretrain, "train BERT with MLM + NSP, checkpointing, evaluating and exporting",
        "Exports to WORKDIR/export. Resumes a workdir with a checkpoint, on any mesh with the "
        "same global batch; SIGTERM saves a checkpoint and exits 0.", PRETRAINING, distributed=True,
        options=(option("--workdir", default="runs/default",
                        help="checkpoints, metrics and export (default %(default)s)"),)),
    Command(
        "eval", _eval, "evaluate a workdir's checkpoint on the validation split",
        "Prints MLM/NSP loss and accuracy as one JSON line.", distributed=True,
        options=(PRETRAINING_WORKDIR, CHECKPOINT_STEP)),
    Command(
        "report", _report, "draw a run's curves from metrics.jsonl into WORKDIR/report.html",
        "Loss, MLM and NSP accuracy (train and validation), learning rate and seq/s: one "
        "self-contained HTML page and WORKDIR/curves.png; prints a summary.", options=(
            option("--workdir", default="runs/default",
                   help="a bert-jax pretrain workdir (default %(default)s)"),)),
    Command(
        "export", _export, "write a Hugging Face directory (weights + tokenizer) from a workdir",
        "Loaded by transformers' BertForPreTraining and AutoTokenizer.from_pretrained.", options=(
            PRETRAINING_WORKDIR, CHECKPOINT_STEP,
            option("--out", required=True, help="a new or empty folder, or an earlier export "
                   "of bert-jax to replace"),
            option("--dropout", type=_dropout, metavar="P", help="config.json's hidden and "
                   "attention-probs dropout, what transformers fine-tunes with (default 0.1, "
                   "BERT's; 'pretraining': the run's own, recorded in bert_jax_export.json "
                   "either way)"))),
    Command(
        "convert", _convert, "a google-research/bert checkpoint -> a Hugging Face directory",
        "Reads bert_config.json, bert_model.ckpt.* and vocab.txt; writes what export writes.",
        options=(option("--from", dest="source", required=True, metavar="DIR",
                        help="a google-research/bert checkpoint directory"),
                 option("--out", required=True, help="a new or empty folder, or an export to "
                        "replace"))),
    Command(
        "fill-mask", _fill_mask, "predict the [MASK] tokens of a text with a workdir or export",
        "Prints the likeliest tokens of each [MASK] in TEXT, with probabilities.", options=(
            option("path", nargs="?", default=DEFAULT_WORKDIR, help="a workdir or an exported "
                   "Hugging Face directory (default %(default)s)"),
            option("text", help='text with [MASK], e.g. "Return a new [MASK]."'),
            option("--top-k", type=_positive, default=5, help="guesses per [MASK] (default 5)"))),
    Command(
        "prepare-data", _prepare_data, "corpus -> tokenizer + cached TFDS dataset of NSP instances",
        "A SentencePiece vocabulary unless config.data.vocab_file is set, and an ArrayRecord "
        "dataset under config.data.data_dir for each phase's lengths and packing.", PRETRAINING),
    Command(
        "inspect-data", _inspect_data, "show the masked batches of steps as text; --out saves them",
        "As training steps see them: [MASK] shown, labels in parentheses.", PRETRAINING, options=(
            option("--steps", type=_positive, default=1, help="number of steps (default 1)"),
            option("--start-step", type=_non_negative, default=0, help="first step (default 0)"),
            option("--rows", type=_positive, default=2, help="rows printed per step (default 2)"),
            option("--split", default="train", help="train or validation"),
            option("--out", metavar="FILE.npz", help="save the batches, stacked, to this file"))),
    Command(
        "benchmark-data", _benchmark_data, "time reading + masking batches (sequences per second)",
        "In this process, without a prefetch thread; prints one JSON line.", PRETRAINING,
        options=(option("--steps", type=_positive, default=50, help="batches (default 50)"),)),
    Command(
        "benchmark", _benchmark, "time full train steps on synthetic batches (one JSON line)",
        "On all local devices, no dataset needed: median step_ms, seq/s, tokens/s (with and "
        "without padding), mfu, compile_s, peak_memory_bytes. Runs BERT-MODEL as the flags set "
        "it or, with --config or overrides, that config's first phase.", PRETRAINING, options=(
            option("--model", choices=list(PRESETS), help="model size (default small)"),
            option("--batch", type=_positive, help="global batch (default 16)"),
            option("--seq", type=_positive, help="sequence length (default 128)"),
            option("--dtype", choices=list(DTYPES), help="compute dtype (default float32)"),
            option("--steps", type=_positive, default=10, help="timed steps (default 10)"),
            option("--attention", choices=list(ATTENTION_IMPLEMENTATIONS), help="kernel (default "
                   "auto: Splash on TPU, cuDNN on GPU, XLA on CPU, where Pallas is interpreted)"),
            option("--scan", action="store_true", default=None, help="lax.scan the layers"),
            option("--remat", choices=list(REMAT_POLICIES), help="remat policy (default none)"),
            option("--instances-per-row", type=_positive,
                   help="pack up to this many instances into a row (default 1: unpacked)"),
            option("--suite", choices=["device"], help="instead, the device check: base@128, "
                   "large@128, large@512, packed, bfloat16, cuDNN and XLA attention, profiled"),
            option("--out", default="device_check.json", metavar="FILE.json",
                   help="where --suite writes (default %(default)s)"))),
    Command(
        "finetune", _finetune, "fine-tune a pretrained model on a classification or regression "
        "task", "A head on the pooled [CLS] output; evaluates every epoch, resumes a workdir and "
        "exports to WORKDIR/export for transformers.", FINETUNING, distributed=True, options=(
            TASK,
            option("--init", dest="init.path", metavar="PATH", help="pretraining workdir (its "
                   "latest checkpoint, or --config.init.step=N) or Hugging Face BERT directory"),
            option("--random-init", dest="init.random", action="store_true", default=None,
                   help="random weights of --init's architecture (a baseline)"),
            option("--workdir", default="runs/finetune",
                   help="checkpoints, metrics and export (default %(default)s)"))),
    Command(
        "finetune-eval", _finetune_eval, "fine-tune every checkpoint briefly: task score vs step",
        "With the finetune settings; scores go to WORKDIR/finetune-eval/TASK (metrics.jsonl, "
        "TensorBoard). Scored checkpoints are skipped.", FINETUNING, options=(
            TASK, PRETRAINING_WORKDIR,
            option("--every", type=_positive, default=1, metavar="STEPS",
                   help="score checkpoints at multiples of this step (and the last)"),
            option("--follow", action="store_true", help="wait for new ones until the last step"),
            option("--poll-seconds", type=_positive, default=60,
                   help="how often --follow looks (default 60)"))),
    Command(
        "compile", _compile, "compile the train step for a TPU slice, or lower it for CUDA, here",
        "One JSON line per phase: the attention kernel, the fused-attention calls in the step "
        "and, for a TPU, XLA's memory per chip: does the config fit?", PRETRAINING, options=(Group(
            None, None, exactly_one=True, options=(
                option("--tpu", metavar="TYPE", help="TPU type, e.g. v4-32, v5e-16, v5p-128"),
                option("--platform", choices=["cuda"], help="lower for CUDA instead"))),)),
)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_options(parser, options) -> None:
    for entry in options:
        if isinstance(entry, Group):
            _add_options(parser.add_mutually_exclusive_group(required=True) if entry.exactly_one
                         else parser.add_argument_group(entry.title, entry.description),
                         entry.options)
        else:
            parser.add_argument(*entry[0], **entry[1])


def build_parser() -> argparse.ArgumentParser:
    """The parser of `COMMANDS`."""
    saved = ", ".join(command.name for command in COMMANDS if command.config is None)
    parser = _Parser(prog="bert-jax", description="BERT pretraining in JAX/Flax NNX. --config=FILE "
                     f"and --config.FIELD=VALUE overrides set the run config; {saved} use the one "
                     "saved in the workdir. `bert-jax SUBCOMMAND --help` lists the options.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help,
                                    description=command.description)
        sub.set_defaults(subcommand=command)
        sub.add_argument("--debug", action="store_true", help="show an error's full traceback")
        if command.config:
            sub.add_argument("--config", metavar="FILE", help="Python config file with "
                             f"get_config() (default: {command.config.name}); override any "
                             "field as --config.FIELD=VALUE")
        _add_options(sub, ((DISTRIBUTED,) if command.distributed else ()) + command.options)
    return parser


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors behind it (`raise ... from`, or raised while handling one)."""
    chain = [error]
    while (behind := chain[-1].__cause__ or chain[-1].__context__) and behind not in chain:
        chain.append(behind)
    return chain


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _file_of(error: OSError) -> str:
    """The file `error` is about; where it names none (write, flush and close, where a full
    disk shows), the innermost frame's open file."""
    if error.filename:
        return str(error.filename)
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        owner = frame.f_locals.get("self")  # e.g. a writer flushing its file
        for value in [*frame.f_locals.values(), *getattr(owner, "__dict__", {}).values()]:
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, str) and not name.startswith("<"):  # not <stdout>
                return name
    return "a file"


def failure(error: Exception) -> str:
    """One line for a failure that is not the user's mistake: its cause (the OSError behind a
    library's own error, as Orbax re-raises its save thread's) and what to do."""
    from bert_jax.loop import NonFiniteError

    if isinstance(error, NonFiniteError):  # its message says what happened and what to do
        return str(error)
    cause = next((c for c in _chain(error) if isinstance(c, OSError)), error)
    if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full writing {_file_of(cause)}: free space there or write elsewhere "
                f"(a run resumes from its last checkpoint)")
    if getattr(cause, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{cause.strerror.lower()} on {_file_of(cause)}: fix its permissions or write "
                f"elsewhere")
    return (f"{type(cause).__name__}: {_first_line(cause)} (a bug or a problem of this machine, "
            f"not of the input: run again with --debug for the traceback)")


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    args.overrides, command, config = overrides, args.subcommand, None
    try:
        if command.config:
            config = _load_config(args.config, overrides, command.config.make)
            config.update_from_flattened_dict(  # options whose dest is a field: finetune's --task
                {field: value for field, value in vars(args).items()
                 if "." in field and value is not None})
            if command.config is PRETRAINING and config.train.get("init"):
                from bert_jax import init

                init.follow(config, {arg.partition("=")[0].removeprefix("--config.")
                                     for arg in overrides})
        elif overrides:
            raise UsageError(f"unrecognized argument {overrides[0]!r}: {command.name} uses "
                             f"the config saved in the workdir")
        if command.distributed:
            _start_distributed(args)
        command.run(args, config)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one before it (nothing to save)
        if args.debug:
            raise
        print(f"bert-jax {command.name}: interrupted: what the last checkpoint holds is kept "
              f"(the same command resumes from it)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (whatever stops a command: one line)
        if args.debug:
            raise
        mistake = isinstance(e, (UsageError, ConfigError))
        print(f"bert-jax {command.name}: error: {e if mistake else failure(e)}", file=sys.stderr)
        return 2 if mistake else 1
    return 0


def use_compilation_cache() -> None:
    """Keeps what XLA compiles for the next command (JAX's persistent compilation cache): a
    resumed run skips compiling its step, and `eval` or `fill-mask` their forward. In
    `$XDG_CACHE_HOME/bert-jax/jax` (default `~/.cache/...`) unless JAX_COMPILATION_CACHE_DIR
    names another folder (a shared one for a cluster) or is empty (no cache); none where the
    folder cannot be made (JAX would fail at the first compile)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "bert-jax/jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    # JAX's default keeps only compilations over 1 s: not the small commands' forwards.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def run() -> None:
    """The `bert-jax` command: `main` with a malloc that suits XLA:CPU (it re-executes once)
    and the compilation cache."""
    def without_traceback(record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True

    malloc.reexec_with_huge_pages()
    use_compilation_cache()
    if "--debug" not in sys.argv:  # the error's one line, not Orbax's traceback per save thread
        logging.getLogger("absl").addFilter(without_traceback)
    code = main()
    if code:  # nor the failure's echoes from threads and exit handlers
        sys.unraisablehook = threading.excepthook = lambda *_: None
    sys.exit(code)


if __name__ == "__main__":
    run()
