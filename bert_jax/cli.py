"""`bert-jax` command line: parses arguments and calls library functions, nothing more.

Run configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`;
any field can be overridden as `--config.train.seed=1` (ml_collections' config flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from etils.epath import Path  # local paths and gs:// alike

from bert_jax import malloc
from bert_jax.config import ATTENTION_IMPLEMENTATIONS, DTYPES, PRESETS, REMAT_POLICIES
from bert_jax.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S

DESCRIPTION = """\
BERT pretraining in JAX/Flax NNX.

pretrain and the data subcommands take --config=FILE (a Python file with get_config();
default: the built-in tiny config on the built-in corpus) and overrides such as
--config.data.corpus=GLOB; finetune and finetune-eval take the same, over the fine-tuning
defaults (e.g. --config.train.learning_rate=5e-5); eval, export and fill-mask use the config
saved in the workdir.

Run `bert-jax SUBCOMMAND --help` for a subcommand's options.
"""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2 (as is any ValueError, which
    the library raises for bad input)."""


def _start_distributed(args) -> None:
    from bert_jax import distributed

    options = distributed.Options.from_env(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id)
    options = dataclasses.replace(options, heartbeat_timeout_s=args.heartbeat_timeout)
    how = distributed.initialize(options)
    if how:
        import jax

        print(f"process {jax.process_index()} of {jax.process_count()} ({how}), "
              f"{jax.local_device_count()} of {jax.device_count()} devices", file=sys.stderr)


def _load_config(config_file: str | None, overrides: list[str], default=None):
    """The run config from `config_file` (default: `default()`, else the built-in tiny
    config) plus overrides."""
    from absl import flags
    from ml_collections import config_flags

    from bert_jax.config import default_run

    bad = [arg for arg in overrides if not arg.startswith("--config.")]
    if bad:
        raise UsageError(f"unrecognized argument {bad[0]!r}: expected --config.FIELD=VALUE")
    # FILE:ARGUMENT passes ARGUMENT to get_config (e.g. configs/pods/base.py:v4-32).
    if config_file and not os.path.isfile(config_file.split(":")[0]):
        raise UsageError(f"config file {config_file.split(':')[0]!r} does not exist: expected a "
                         f"Python file with get_config(), e.g. configs/tiny.py")
    argv = ["bert-jax", *overrides]
    flag_values = flags.FlagValues()
    try:
        if config_file:
            config_flags.DEFINE_config_file("config", config_file, flag_values=flag_values,
                                            sys_argv=argv)
        else:
            config_flags.DEFINE_config_dict("config", (default or default_run)(),
                                            flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        return flag_values.config
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (KeyError, AttributeError)):
            message = f"unknown field {message.strip(chr(34))}"
        cause = e
        while cause.__cause__ or cause.__context__:  # e.g. the config file's own error
            cause = cause.__cause__ or cause.__context__
        if cause is not e and str(cause).strip() and str(cause) not in message:
            message = f"{message.rstrip(':')}: {str(cause).strip().splitlines()[0]}"
        raise UsageError(f"bad config ({config_file or 'built-in default'}): {message}") from e


FILL_MASK_EXAMPLE = "Return a new [MASK] containing the items of the list."


def _stop_on_nonfinite(command: str, debug: bool, run):
    """Returns what `run` returns. Training stopped on non-finite values is not bad input:
    it exits with code 1 and one line (the traceback with `debug`)."""
    from bert_jax import loop

    try:
        return run()
    except loop.NonFiniteError as e:
        if debug:
            raise
        raise SystemExit(f"bert-jax {command}: error: {e}") from None


def _pretrain(args, config) -> None:
    import jax

    from bert_jax import export, inference, train, workdir

    summary = _stop_on_nonfinite("pretrain", args.debug,
                                 lambda: train.train_and_evaluate(config, args.workdir))
    if jax.process_index() != 0:
        return
    train_metrics, validation = summary["train"], summary["validation"]
    print(f"\nstopped at step {summary['step']} after {summary['seconds']:.0f}s"
          f"{' (preempted: checkpoint saved, run again to resume)' if summary['preempted'] else ''}")
    if train_metrics:
        print(f"  train       loss {train_metrics['loss']:.3f}  "
              f"mlm_accuracy {train_metrics['mlm_accuracy']:.3f}  "
              f"{train_metrics['seq_per_s']:.0f} seq/s  "
              f"{train_metrics['real_tokens_per_s']:.0f} tokens/s (padding not counted)")
        if train_metrics["nonfinite_total"] or summary["rollbacks"]:
            print(f"  non-finite  {train_metrics['nonfinite_total']:.0f} steps skipped, "
                  f"{summary['rollbacks']} rollbacks")
    if validation:
        print(f"  validation  loss {validation['loss']:.3f}  "
              f"mlm_accuracy {validation['mlm_accuracy']:.3f}  "
              f"nsp_accuracy {validation['nsp_accuracy']:.3f}")
    pretrained = summary["pretrained"]
    if pretrained is None:
        return
    out = export.write_export(pretrained, args.workdir, Path(args.workdir) / "export",
                              config.data.lowercase)
    print(f"  exported to {out} (transformers.BertForPreTraining.from_pretrained loads it)")
    tokenizer = workdir.load_tokenizer_of(out)
    guesses = inference.fill_mask(pretrained, tokenizer, FILL_MASK_EXAMPLE)[0]
    print(f"  fill-mask: {FILL_MASK_EXAMPLE!r} -> " +
          ", ".join(f"{token} ({p:.2f})" for token, p in guesses))


def _eval(args, config) -> None:
    import json

    import jax

    from bert_jax import train

    metrics = train.evaluate_workdir(args.workdir, args.step)
    if jax.process_index() == 0:
        print(json.dumps(metrics))


def _task_options(args, config) -> None:
    """The task flags of finetune and finetune-eval, over the config (flags win)."""
    for flag, field in (("task", "name"), ("train_file", "train_file"),
                        ("validation_file", "validation_file"), ("labels", "labels")):
        if getattr(args, flag) is not None:
            config.task[field] = getattr(args, flag)


def _finetune(args, config) -> None:
    import jax

    from bert_jax import finetune, scores

    _task_options(args, config)
    if args.init is not None:
        config.init.path = args.init
    if args.random_init:
        config.init.random = True
    summary = _stop_on_nonfinite("finetune", args.debug,
                                 lambda: finetune.finetune(config, args.workdir))
    if jax.process_index() != 0:
        return
    examples = ", ".join(f"{n:,} {split}" for split, n in summary["examples"].items())
    print(f"\n{summary['task']}: stopped at step {summary['step']} of {summary['num_steps']} "
          f"after {summary['seconds']:.0f}s ({examples} examples)"
          f"{' (preempted: checkpoint saved, run again to resume)' if summary['preempted'] else ''}")
    for name in ("train", "validation", "best"):
        values = summary[name]
        if values:
            at = f"  (step {values['step']})" if "step" in values else ""
            print(f"  {name:<10}  " + "  ".join(
                f"{k} {v:.4f}" for k, v in values.items()
                if k == "loss" or k in scores.SCORES) + at)
    if summary["export"]:
        print(f"  exported to {summary['export']} "
              f"(transformers.BertForSequenceClassification.from_pretrained loads it)")


def _finetune_eval(args, config) -> None:
    from bert_jax import finetune_eval

    _task_options(args, config)
    records = finetune_eval.evaluate_checkpoints(config, args.workdir, every=args.every,
                                                 follow=args.follow,
                                                 poll_seconds=args.poll_seconds)
    out = finetune_eval.output_dir(args.workdir, config.task.name)
    print(f"scored {len(records)} new checkpoints; all scores: {out / 'metrics.jsonl'}")


def _export(args, config) -> None:
    from bert_jax import export

    out = export.export(args.workdir, args.out, args.step)
    step = "" if args.step is None else f" (step {args.step})"
    print(f"exported {args.workdir}{step} to {out}")


def _compile(args, config) -> None:
    import importlib.util
    import json

    if args.tpu and importlib.util.find_spec("libtpu") is None:
        raise UsageError("compiling for a TPU slice needs the libtpu package: pip install "
                         "'bert-jax[tpu]' (it runs on a CPU machine too)")
    from bert_jax import aot
    from bert_jax.config import RunConfig

    target = args.tpu or args.platform
    too_big = []
    for index, phase in enumerate(RunConfig.from_dict(config).phases):
        compiled = aot.compile_train_step(config, target, index)
        line = {"target": compiled.target, "devices": compiled.devices, "phase": index,
                "length": phase.max_seq_length, "batch": phase.global_batch_size,
                "micro_batches": phase.grad_accum_steps,
                "instances_per_row": phase.instances_per_row,
                "attention": compiled.attention, "fused_attention": compiled.fused_attention,
                "seconds": round(compiled.seconds, 1)}
        if compiled.bytes_per_chip:
            line["gib_per_chip"] = {k: round(v / 2**30, 2)
                                    for k, v in compiled.bytes_per_chip.items()}
        if compiled.out_of_memory:
            too_big.append(index)
            line["does_not_fit"] = compiled.out_of_memory
        print(json.dumps(line))
    if too_big:
        raise ValueError(f"phases {too_big} do not fit {args.tpu}: raise their gradient "
                         f"accumulation (the 5th value of a train.phases row) or set "
                         f"--config.model.remat_policy=full")


def _benchmark(args, config) -> None:
    import json

    from bert_jax import benchmark

    if args.suite:
        from bert_jax.files import write_atomically

        _check_out_folder(args.out)
        figures = benchmark.run_suite(log=lambda line: print(line, flush=True))
        write_atomically(args.out, (json.dumps(figures, indent=1) + "\n").encode())
        print(f"wrote {args.out}")
        return
    run_config = benchmark.benchmark_config(args.model, args.batch, args.seq, args.dtype,
                                            args.attention, args.scan, args.remat,
                                            args.instances_per_row)
    print(json.dumps(benchmark.run(run_config, args.steps)))


def _fill_mask(args, config) -> None:
    from bert_jax import inference

    pretrained, tokenizer = inference.load_with_tokenizer(args.path)
    for number, guesses in enumerate(inference.fill_mask(pretrained, tokenizer, args.text,
                                                      args.top_k)):
        print(f"[MASK] {number + 1}: " + ", ".join(f"{t} ({p:.3f})" for t, p in guesses))


def _prepare_data(args, config) -> None:
    from bert_jax.config import RunConfig
    from bert_jax.data import pipeline

    # Each phase's dataset (BERT's 128 and 512 phases have one each), so that a run, or a
    # pod's workers, find them all built.
    printed = set()
    settings = RunConfig.from_dict(config)
    for phase in settings.phases:
        prepared = pipeline.prepare(settings, phase)
        if prepared.path not in printed:
            printed.add(prepared.path)
            _print_dataset(prepared)


def _print_dataset(prepared) -> None:
    summary = prepared.metadata["summary"]
    instances = ", ".join(f"{n:,} {split}" for split, n in summary["instances"].items())
    per_row = prepared.metadata["identity"].get("instances_per_row", 1)
    if per_row > 1:
        rows = ", ".join(f"{n:,} {split}" for split, n in summary["examples"].items())
        instances += f" packed into rows of up to {per_row}: {rows}"
    print(f"dataset: {prepared.path}\n"
          f"  documents {summary['documents']:,}  sentences {summary['sentences']:,}  "
          f"tokens {summary['tokens']:,}\n"
          f"  instances {instances}  fill ratio {summary['fill_ratio']:.3f}\n"
          f"  tokenizer {prepared.tokenizer.kind}, {prepared.tokenizer.vocab_size:,} tokens\n"
          f"  replaced non-UTF-8 bytes {summary['replaced_bytes']:,}  "
          f"built in {summary['seconds']}s")


def _check_out_folder(out) -> None:
    if not Path(out).absolute().parent.is_dir():
        raise UsageError(f"--out={out}: its folder does not exist: create it first")


def _inspect_data(args, config) -> None:
    import numpy as np

    from bert_jax.config import RunConfig
    from bert_jax.data import pipeline

    if args.out:
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
    first = args.start_step - phase.start
    batches = [batch for _, batch in loader.iterate(first, args.steps)]
    for step, batch in zip(range(args.start_step, args.start_step + args.steps), batches):
        for row in range(min(args.rows, len(batch["input_ids"]))):
            print(f"step {step} row {row}: {pipeline.describe_row(batch, row, prepared.tokenizer)}")
    if args.out:
        stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
        np.savez(args.out, **stacked)
        print(f"saved {args.steps} steps of {len(batches[0]['input_ids'])} rows to {args.out}")


def _benchmark_data(args, config) -> None:
    import json

    from bert_jax.config import RunConfig
    from bert_jax.data import pipeline

    settings = RunConfig.from_dict(config)  # the first phase's length and batch
    prepared = pipeline.prepare(settings)
    loader = pipeline.loader(settings, prepared)
    print(json.dumps(pipeline.measure_throughput(loader, args.steps)))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return int(text)


_PRETRAINING_DEFAULT = "the built-in one: BERT-tiny on the built-in corpus"
_FINETUNING_DEFAULT = "the fine-tuning defaults"


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bert-jax", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def config_options(default: str) -> argparse.ArgumentParser:
        """--config, its help naming the subcommand's `default` config."""
        options = _Parser(add_help=False)
        options.add_argument(
            "--config", metavar="FILE",
            help=f"Python config file with get_config() (default: {default}); any field can be "
                 "overridden as --config.FIELD=VALUE, e.g. --config.train.seed=1")
        return options

    distributed_options = _Parser(add_help=False)
    group = distributed_options.add_argument_group(
        "multi-process runs",
        "One process per host, all started with the same arguments. SLURM, Open MPI and Cloud "
        "TPU are detected; elsewhere give all three (or set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, as launch/local_multihost.sh does).")
    group.add_argument("--coordinator-address", "--coordinator_address", metavar="HOST:PORT",
                       help="address of process 0, which runs the coordination service")
    group.add_argument("--num-processes", "--num_processes", type=_positive, metavar="N",
                       help="number of processes in the run (1: no distributed runtime)")
    group.add_argument("--process-id", "--process_id", type=_non_negative, metavar="I",
                       help="this process's index, 0 <= I < N")
    group.add_argument("--heartbeat-timeout", type=_positive, metavar="SECONDS",
                       default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                       help="when a process stops responding for this long, the others exit "
                            f"with an error (default {DEFAULT_HEARTBEAT_TIMEOUT_S})")

    common_options = _Parser(add_help=False)
    common_options.add_argument("--debug", action="store_true",
                                help="on an error, show the full traceback, not one line")

    def add(name, run, help_text, description, config_default=_PRETRAINING_DEFAULT,
            distributed=False, more_options=()):
        parents = [common_options] + ([config_options(config_default)] if config_default
                                      else []) + (
            [distributed_options] if distributed else []) + list(more_options)
        sub = subparsers.add_parser(name, parents=parents, help=help_text,
                                    description=description)
        sub.set_defaults(run=run, distributed=distributed)
        return sub

    pretrain = add("pretrain", _pretrain,
                   "train BERT with MLM + NSP, checkpointing, evaluating and exporting",
                   "Pretrain BERT on config.data.corpus: prepares the data (once), trains with "
                   "checkpoints every config.checkpoint.every_steps, evaluates, and exports to "
                   "WORKDIR/export. A workdir with a checkpoint is resumed, on any number of "
                   "processes and any mesh with the same global batch. SIGTERM saves a "
                   "checkpoint and exits 0. Stop early with --config.train.stop_at_step=N.",
                   distributed=True)
    pretrain.add_argument("--workdir", default="runs/default",
                          help="checkpoints, metrics and export (default runs/default)")
    evaluate = add("eval", _eval, "evaluate a workdir's checkpoint on the validation split",
                   "Prints MLM/NSP loss and accuracy of a checkpoint on the validation split as "
                   "one JSON line (the run's own config, from the checkpoint).", None,
                   distributed=True)
    evaluate.add_argument("--workdir", required=True, help="a bert-jax pretrain workdir")
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    export_parser = add("export", _export,
                        "write a Hugging Face directory (weights + tokenizer) from a workdir",
                        "Writes config.json, model.safetensors and tokenizer files that "
                        "transformers.BertForPreTraining.from_pretrained and "
                        "AutoTokenizer.from_pretrained load.", None)
    export_parser.add_argument("--workdir", required=True, help="a bert-jax pretrain workdir")
    export_parser.add_argument("--out", required=True,
                               help="output directory: new, empty or an earlier export (which "
                                    "it replaces)")
    export_parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    fill = add("fill-mask", _fill_mask,
               "predict the [MASK] tokens of a text with a workdir or export",
               "Prints the most likely tokens for each [MASK] in TEXT, with probabilities.",
               None)
    fill.add_argument("path", help="a workdir or an exported Hugging Face directory")
    fill.add_argument("text", help='text with [MASK], e.g. "Return a new [MASK]."')
    fill.add_argument("--top-k", type=_positive, default=5,
                      help="predictions shown per [MASK] (default 5)")
    add("prepare-data", _prepare_data,
        "corpus -> tokenizer + TFDS dataset of NSP instances (cached), with a summary",
        "Reads config.data.corpus, trains a SentencePiece vocabulary unless "
        "config.data.vocab_file is set, creates NSP/SOP instances and writes them as a TFDS "
        "ArrayRecord dataset under config.data.data_dir (reused when it exists): one for each "
        "phase of config.train.phases whose lengths or packing differ.")
    inspect = add("inspect-data", _inspect_data,
                  "show masked batches as text; --out saves the exact batches of steps",
                  "Prints the masked batches that training steps would see, decoded to text "
                  "([MASK] shown, labels in parentheses); --out saves them exactly.")
    inspect.add_argument("--steps", type=_positive, default=1, help="number of steps (default 1)")
    inspect.add_argument("--start-step", type=_non_negative, default=0,
                         help="first step (default 0)")
    inspect.add_argument("--rows", type=_positive, default=2,
                         help="rows printed per step (default 2)")
    inspect.add_argument("--split", default="train", help="train or validation")
    inspect.add_argument("--out", metavar="FILE.npz",
                         help="save the batches (features stacked over steps) to this file")
    benchmark = add("benchmark-data", _benchmark_data,
                    "time reading + masking batches (sequences per second)",
                    "Times reading and masking train batches in this process (no prefetch "
                    "thread), printing one JSON line with sequences per second.")
    benchmark.add_argument("--steps", type=_positive, default=50,
                           help="batches timed (default 50)")
    bench = add("benchmark", _benchmark,
                "time full train steps on synthetic batches (one JSON line)",
                "Times full train steps (forward, backward, AdamW) of BERT-SIZE with BERT's "
                "vocabulary and dropout on synthetic batches with 15% of the tokens masked, on "
                "all local devices, and prints one JSON line: median step_ms, seq_per_s, "
                "tokens_per_s (row positions), real_tokens_per_s (padding not counted), mfu "
                "(null where the peak is unknown, e.g. CPU), compile_s, "
                "peak_memory_bytes, the device and the settings. Needs no dataset.", None)
    bench.add_argument("--model", default="small", choices=list(PRESETS),
                       help="model size (default small)")
    bench.add_argument("--batch", type=_positive, default=16, help="global batch (default 16)")
    bench.add_argument("--seq", type=_positive, default=128, help="sequence length (default 128)")
    bench.add_argument("--dtype", default="float32", choices=list(DTYPES),
                       help="compute dtype (parameters stay float32)")
    bench.add_argument("--steps", type=_positive, default=10, help="timed steps (default 10)")
    bench.add_argument("--attention", default="auto", choices=list(ATTENTION_IMPLEMENTATIONS),
                       help="attention kernel (default auto: Splash on TPU, cuDNN on GPU, XLA "
                            "on CPU; splash and pallas run interpreted on CPU); the JSON's "
                            "'attention' names the kernel that ran")
    bench.add_argument("--scan", action="store_true", help="run the layers with lax.scan")
    bench.add_argument("--remat", default="none", choices=list(REMAT_POLICIES),
                       help="rematerialization policy (default none)")
    bench.add_argument("--suite", choices=["device"],
                       help="instead, the device check: base@128, large@128 and large@512 "
                            "packed in bfloat16, each with cuDNN and XLA attention, with a "
                            "profile of each; one JSON file (--out), a line per run as it goes")
    bench.add_argument("--out", default="device_check.json", metavar="FILE.json",
                       help="where --suite writes its figures (default device_check.json)")
    bench.add_argument("--instances-per-row", type=_positive, default=1,
                       help="pack up to this many instances into each row, cutting rows of the "
                            "unpacked rows' lengths (default 1: unpacked)")
    task_options = _Parser(add_help=False)
    group = task_options.add_argument_group(
        "task", "builtin (made from the built-in corpus), glue/NAME (TFDS, prepared in "
                "--config.task.tfds_data_dir), or classification, pair-classification, "
                "regression, pair-regression on local CSV/TSV/JSON Lines files with columns "
                "text, [text_pair,] label")
    group.add_argument("--task", help="task name (default builtin)")
    group.add_argument("--train-file", help="training examples of a local-file task")
    group.add_argument("--validation-file", help="validation examples of a local-file task")
    group.add_argument("--labels", metavar="A,B,...",
                       help="the classes of a local-file classification task (default: the "
                            "training file's labels, sorted); a label outside them is an error")

    tune = add(
        "finetune", _finetune,
        "fine-tune a pretrained model on a classification or regression task",
        "Fine-tunes a pretrained BERT (a pretraining workdir or a Hugging Face directory) with "
        "a classification (or regression) head on the pooled [CLS] output: AdamW with warmup "
        "and linear decay, sharded like pretraining; evaluates every epoch (accuracy, F1, "
        "Matthews, Pearson/Spearman as the task asks), checkpoints, resumes a workdir, and "
        "exports WORKDIR/export for transformers.BertForSequenceClassification.",
        _FINETUNING_DEFAULT, distributed=True, more_options=[task_options])
    tune.add_argument("--init", metavar="PATH",
                      help="pretraining workdir (latest checkpoint; --config.init.step=N for "
                           "another) or Hugging Face BERT directory, with its tokenizer")
    tune.add_argument("--random-init", action="store_true",
                      help="random weights of --init's architecture (a baseline)")
    tune.add_argument("--workdir", default="runs/finetune",
                      help="checkpoints, metrics and export (default runs/finetune)")
    tune_eval = add(
        "finetune-eval", _finetune_eval,
        "fine-tune each checkpoint of a pretraining run briefly: task score vs step",
        "Fine-tunes each checkpoint of a pretraining workdir briefly on a task (the finetune "
        "settings, in a scratch directory) and logs the validation scores against the "
        "pretraining step to WORKDIR/finetune-eval/TASK (metrics.jsonl, TensorBoard). "
        "Checkpoints already scored are skipped; --follow waits for new ones until the run's "
        "last step.", _FINETUNING_DEFAULT, more_options=[task_options])
    tune_eval.add_argument("--workdir", required=True, help="the pretraining workdir")
    tune_eval.add_argument("--every", type=_positive, default=1, metavar="STEPS",
                           help="score checkpoints at multiples of this step (and the last)")
    tune_eval.add_argument("--follow", action="store_true",
                           help="keep waiting for new checkpoints until the last step")
    tune_eval.add_argument("--poll-seconds", type=_positive, default=60,
                           help="how often --follow looks for new checkpoints (default 60)")
    compile_parser = add("compile", _compile,
                         "compile the train step for a TPU slice, or lower it for CUDA, here "
                         "(no accelerator needed): memory per chip, attention kernels",
                         "Prints one JSON line per phase: the attention kernel its rows run "
                         "and the fused-attention calls in the lowered step. --tpu compiles "
                         "each phase's train step for a Cloud TPU slice on this machine (needs "
                         "the libtpu package, the 'tpu' extra) and adds XLA's memory per chip: "
                         "whether a config fits before renting the slice. --platform=cuda "
                         "lowers it for NVIDIA GPUs (XLA's GPU compiler needs a GPU, so no "
                         "memory figures), on this machine's devices as stand-ins.")
    target = compile_parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tpu", metavar="TYPE",
                        help="accelerator type, e.g. v4-32, v5e-16, v5p-128")
    target.add_argument("--platform", choices=["cuda"],
                        help="lower for this platform instead (cuda)")
    return parser


def finetune_default():
    from bert_jax.finetune import default_config

    return default_config()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        if "config" not in args and overrides:
            raise UsageError(f"unrecognized argument {overrides[0]!r}: {args.command} uses the "
                             f"config saved in the workdir")
        default = finetune_default if args.command.startswith("finetune") else None
        config = _load_config(args.config, overrides, default) if "config" in args else None
        if args.distributed:
            _start_distributed(args)
        args.run(args, config)
    except (UsageError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"bert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The `bert-jax` command: `main` on this process's arguments, in a process whose malloc
    suits XLA:CPU (`bert_jax.malloc`; it re-executes the command once)."""
    malloc.reexec_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    run()
