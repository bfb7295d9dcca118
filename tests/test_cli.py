import json
import subprocess
import sys
from pathlib import Path

import pytest

PODS = Path(__file__).parents[1] / "configs" / "pods"


def _bert_jax(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_explains_every_subcommand():
    result = _bert_jax("--help")
    assert result.returncode == 0
    subcommands = ["pretrain", "prepare-data", "inspect-data", "benchmark-data", "eval",
                   "export", "fill-mask", "compile"]
    for name in subcommands:
        assert name in result.stdout
        sub = _bert_jax(name, "--help")
        assert sub.returncode == 0 and len(sub.stdout.splitlines()) > 4, name


@pytest.mark.parametrize("name, default, other", [
    ("prepare-data", "(default: the built-in one: BERT-tiny", "fine-tuning"),
    ("finetune", "(default: the fine-tuning defaults)", "BERT-tiny"),
])
def test_config_help_names_the_subcommands_own_default(capsys, name, default, other):
    from bert_jax import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert default in text and other not in text


@pytest.mark.parametrize("args, words", [
    (["pretrain", "--config.model.num_heads=3"], ["hidden_size=128", "num_heads=3"]),
    (["pretrain", "--config.model.bogus=1"], ["bogus"]),
    (["pretrain", "--config.model.num_layers=two"], ["num_layers", "two"]),
    (["pretrain", "--config=missing.py"], ["missing.py", "does not exist"]),
    (["pretrain", f"--config={PODS}/base.py:v9-8"], ["v9-8", "v4-32"]),
    (["pretrain", "--num-processes=2", "--config.train.num_steps=1"],
     ["missing ['coordinator_address', 'process_id']", "--coordinator-address"]),
    (["pretrain", "--verbose"], ["--verbose"]),
    (["pretrain", "--config.train.optimizer=sgd"], ["train.optimizer='sgd'", "adamw"]),
    (["prepare-data", "--config.data.corpus=/nowhere/*.txt"], ["/nowhere/*.txt"]),
    (["prepare-data", "--config.data.masked_lm_prob=1.5"], ["masked_lm_prob=1.5"]),
    (["prepare-data", "--config.data.corpus=tfds:no_such_dataset"],
     ["TFDS has no dataset 'no_such_dataset'"]),
    (["eval", "--workdir=/nowhere"], ["/nowhere does not exist", "bert-jax pretrain"]),
    (["eval", f"--workdir={PODS}"], [f"{PODS} has no checkpoint", "bert-jax pretrain"]),
    (["export", "--workdir=/nowhere", "--out=/tmp/x", "--config.data.seed=1"],
     ["--config.data.seed=1", "saved in the workdir"]),
    (["fill-mask", "/nowhere", "a [MASK]"], ["/nowhere does not exist", "workdir"]),
    (["inspect-data", "--steps=0"], ["--steps", "'0'", "positive integer"]),
    (["inspect-data", "--config.train.phases=((0, 64, 10, 8), (5, 128, 20, 8))",
      "--config.train.num_steps=10", "--start-step=3", "--steps=4"],
     ["cross the phase boundary at step 5"]),
    (["inspect-data", "--config.train.num_steps=10", "--start-step=10"],
     ["--start-step=10", "below train.num_steps=10"]),
    (["inspect-data", "--rows=-1"], ["--rows", "'-1'", "positive integer"]),
    (["inspect-data", "--out=/nowhere/x.npz"], ["--out=/nowhere/x.npz", "does not exist"]),
    (["fill-mask", "/nowhere", "a [MASK]", "--top-k=0"], ["--top-k", "'0'"]),
    (["pretrain", "--workdir=/tmp/bert-jax-never-created", "--config.train.grad_accum_steps=0"],
     ["train.grad_accum_steps=0: expected a positive integer"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["pretrain", f"--workdir={__file__}/run"], ["is not writable", "Not a directory",
                                                 "--workdir"]),
    (["pretrain", "--workdir=/tmp/bert-jax-never-created", "--config.checkpoint.keep=1000000000"],
     ["/tmp/bert-jax-never-created", "GiB free", "checkpoint.keep=1000000000"]),
    (["pretrain", "--workdir=/tmp/bert-jax-never-created", "--config.train.global_batch_size=12"],
     ["train.global_batch_size=12", "data-parallel size 8"]),  # 8 CPU devices (conftest)
    (["pretrain", "--workdir=/tmp/bert-jax-never-created", "--config.train.on_nonfinite=ignore"],
     ["train.on_nonfinite='ignore'", "'rollback', 'stop'"]),
    (["pretrain", "--workdir=/tmp/bert-jax-never-created", "--config.train.phases=((),)"],
     ["train.phases=((),)", "row ()", "expected (start, max_seq_length"]),
    (["compile"], ["one of the arguments --tpu --platform is required"]),
    (["compile", "--tpu=v9-8"], ["TPU type 'v9-8'", "expected e.g. v4-32"]),
])
def test_bad_input_is_one_line_and_exit_code_2(args, words):
    result = _bert_jax(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def test_benchmark_data_reads_the_first_phase_as_training_does(tmp_path):
    result = _bert_jax("benchmark-data", "--config.train.phases=((0, 32, 5, 16),)",
                       "--config.train.num_steps=10", f"--config.data.data_dir={tmp_path}",
                       "--steps=2")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["max_seq_length"], figures["global_batch_size"]) == (32, 16)
    assert [p.name[:6] for p in (tmp_path / "bert_pretraining").iterdir()] == ["seq32_"]


def test_preflight_refuses_a_model_vocabulary_unlike_the_tokenizer_before_writing(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                *"abcdefghijklmnopqrstuvwxyz"]) + "\n")
    result = _bert_jax("pretrain", f"--workdir={tmp_path / 'run'}",
                       f"--config.data.vocab_file={vocab}",
                       f"--config.data.data_dir={tmp_path / 'data'}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "bert-jax pretrain: error: the tokenizer has 31 tokens but model.vocab_size=4096: set "
        "--config.data.vocab_size=31"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.txt"]  # nothing written


def test_a_corpus_that_cannot_be_read_fails_before_anything_is_written(tmp_path):
    result = _bert_jax("pretrain", f"--workdir={tmp_path / 'run'}",
                       "--config.data.corpus=/nowhere/*.txt",
                       f"--config.data.data_dir={tmp_path / 'data'}")
    assert result.returncode == 2, result.stderr
    assert "/nowhere/*.txt" in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_whose_export_holds_other_files_is_refused_before_training(tmp_path):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "notes.txt").write_text("mine")
    result = _bert_jax("pretrain", f"--workdir={tmp_path / 'run'}",
                       f"--config.data.data_dir={tmp_path / 'data'}")
    assert result.returncode == 2, result.stderr
    assert f"export directory {export} holds 'notes.txt'" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no data built either
    assert (export / "notes.txt").read_text() == "mine"


def test_debug_shows_the_traceback():
    result = _bert_jax("pretrain", "--debug", "--config.train.optimizer=sgd")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "train.optimizer='sgd'" in result.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_training_stopped_on_nonfinite_values_ends_in_one_line_unless_debugging(debug):
    from bert_jax import cli, loop

    def run():
        raise loop.NonFiniteError("non-finite loss in 2 steps in a row")

    with pytest.raises(loop.NonFiniteError if debug else SystemExit) as stopped:
        cli._stop_on_nonfinite("finetune", debug, run)
    if not debug:  # SystemExit with a message: printed to stderr, exit code 1
        assert stopped.value.code == "bert-jax finetune: error: non-finite loss in 2 steps in a row"
    assert cli._stop_on_nonfinite("pretrain", debug, lambda: 7) == 7
