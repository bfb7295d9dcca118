import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from etils import epath

from bert_jax import cli, loop
from pretrain_runs import overrides

CONFIGS = Path(__file__).parents[1] / "configs"
PODS = CONFIGS / "pods"


def _bert_jax(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_help_explains_every_subcommand_of_the_table():
    result = _bert_jax("--help")
    assert result.returncode == 0
    assert {"pretrain", "prepare-data", "inspect-data", "benchmark-data", "benchmark", "eval",
            "export", "convert", "fill-mask", "finetune", "finetune-eval", "compile", "report"} == {
        command.name for command in cli.COMMANDS}
    for command in cli.COMMANDS:
        listed = re.search(rf"^    {command.name}\s+(.*?)(?=\n    \S|\n\n)", result.stdout,
                           re.M | re.S)
        assert listed and _words(listed[1]) == _words(command.help), command.name
        sub = _bert_jax(command.name, "--help")
        assert sub.returncode == 0 and _words(command.description) in _words(sub.stdout)
        assert ("--config FILE" in sub.stdout) == (command.config is not None), command.name
        assert ("--num-processes" in sub.stdout) == command.distributed, command.name


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
    (["pretrain", "--config.model.bogus=1"], ["unknown field 'bogus' in config.model"]),
    (["pretrain", "--config.train.num_step=3"],  # ml_collections' own text has \n and quotes
     ["bad config (built-in default): unknown field 'num_step' in config.train: did you mean "
      "'num_steps'?"]),
    (["pretrain", "--config.modl.x=1"], ["unknown field 'modl' in config: did you mean 'model'?"]),
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
    (["benchmark", f"--config={CONFIGS}/tiny.py", "--batch=8"], ["--batch with --config"]),
    (["benchmark", "--seq=64", "--config.train.num_steps=5"], ["--seq with --config"]),
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
    config = tmp_path / "untied.py"  # model.vocab_size set apart from the tokenizer's
    config.write_text("import ml_collections\nfrom bert_jax.config import default_run\n\n\n"
                      "def get_config():\n    config = default_run()\n    config.model = "
                      "ml_collections.ConfigDict({**config.model.to_dict(), 'vocab_size': "
                      "999})\n    return config\n")
    result = _bert_jax("pretrain", f"--workdir={tmp_path / 'run'}", f"--config={config}",
                       f"--config.data.vocab_file={vocab}",
                       f"--config.data.data_dir={tmp_path / 'data'}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "bert-jax pretrain: error: the tokenizer has 31 tokens but model.vocab_size=999: "
        "expected model.vocab_size=31 (equal to data.vocab_size, it follows the tokenizer)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["untied.py", "vocab.txt"]


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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The data of a 20-step tiny run (`pretrain_runs.overrides`), prepared once: the runs
    below then fail within seconds, where they first write to the workdir."""
    data_dir = tmp_path_factory.mktemp("data")
    result = _bert_jax("prepare-data", *overrides(data_dir))
    assert result.returncode == 0, result.stderr
    return overrides(data_dir)


@pytest.mark.parametrize("debug", [False, True])
def test_a_full_disk_is_one_line_naming_it_and_exit_code_1(tmp_path, prepared, debug):
    # The kernel answers every write to /dev/full with ENOSPC, as a full disk does.
    (tmp_path / "config.json").symlink_to("/dev/full")
    debugging = ["--debug"] if debug else []
    result = _bert_jax("pretrain", f"--workdir={tmp_path}", *prepared, *debugging)
    assert result.returncode == 1, result.stderr
    if debug:
        assert "Traceback" in result.stderr and "[Errno 28]" in result.stderr
        return
    assert result.stderr.splitlines() == [
        f"bert-jax pretrain: error: disk full writing {tmp_path / 'config.json'}: free space "
        f"there or write elsewhere (a run resumes from its last checkpoint)"]


def test_a_failure_that_is_not_the_users_mistake_is_one_line_and_exit_code_1(tmp_path, prepared):
    (tmp_path / "config.json").mkdir()  # where the run writes its config
    result = _bert_jax("pretrain", f"--workdir={tmp_path}", *prepared)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"bert-jax pretrain: error: IsADirectoryError: [Errno 21] Is a directory: "
        f"'{tmp_path / 'config.json'}' (a bug or a problem of this machine, not of the input: "
        f"run again with --debug for the traceback)"]


def test_pretraining_validates_every_eval_every_steps_and_at_the_end(tmp_path, prepared):
    result = _bert_jax("pretrain", f"--workdir={tmp_path}", *prepared,
                       "--config.train.num_steps=12", "--config.train.eval_every=5")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [r["step"] for r in records if r.get("split") == "validation"]
    assert validated == [5, 10, 12] and all("mlm_accuracy" in r for r in records
                                            if r.get("split") == "validation")


def test_a_model_hugging_face_cannot_hold_trains_and_says_it_is_not_exported(tmp_path, prepared):
    result = _bert_jax("pretrain", f"--workdir={tmp_path}", *prepared,
                       "--config.train.num_steps=2", "--config.model.layer_norm=pre")
    assert result.returncode == 0, result.stderr
    assert "  not exported: model.layer_norm='pre': Hugging Face BertForPreTraining has " \
        "post-LayerNorm layers only" in result.stdout
    assert (tmp_path / "checkpoints").is_dir() and not (tmp_path / "export").exists()


def _raised(function):
    try:
        function()
    except Exception as e:  # noqa: BLE001
        return e
    pytest.fail("nothing raised")


def test_the_cause_behind_a_librarys_own_error_is_named(tmp_path):
    full = tmp_path / "metadata"
    full.symlink_to("/dev/full")

    def save():  # as Orbax re-raises its save thread's error: the OSError is only the context
        try:
            epath.Path(full).write_text("{}")  # the error of close() names no file
        except OSError:
            raise RuntimeError("checkpoint save failed")

    assert cli.failure(_raised(save)) == (f"disk full writing {full}: free space there or write "
                                          f"elsewhere (a run resumes from its last checkpoint)")

    def denied():
        try:
            raise PermissionError(13, "Permission denied", str(tmp_path / "run"))
        except PermissionError as e:
            raise ValueError("RESOURCE_EXHAUSTED: could not write") from e

    assert cli.failure(_raised(denied)) == (f"permission denied on {tmp_path / 'run'}: fix its "
                                            f"permissions or write elsewhere")
    assert cli.failure(loop.NonFiniteError("non-finite loss in 2 steps in a row: lower "
                                           "train.learning_rate")) == (
        "non-finite loss in 2 steps in a row: lower train.learning_rate")  # already one line


def test_benchmark_times_the_first_phase_of_a_config():
    result = _bert_jax("benchmark", f"--config={CONFIGS}/tiny.py", "--steps=1",
                       "--config.train.phases=((0, 32, 5, 8),)", "--config.model.num_layers=1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["batch"], figures["seq"], figures["predictions"]) == (8, 32, 5)
    assert figures["model"] == {"num_layers": 1, "hidden_size": 128, "num_heads": 2}


@pytest.mark.parametrize("setting", [None, ""])
def test_compilations_are_kept_under_the_users_cache_unless_turned_off(tmp_path, setting):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
    if setting is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = setting
    program = ("from bert_jax import cli; cli.use_compilation_cache(); import jax; "
               "jax.jit(lambda x: x * 2)(1.0).block_until_ready()")
    subprocess.run([sys.executable, "-c", program], env=env, check=True, timeout=120)
    kept = tmp_path / "bert-jax" / "jax"
    assert (sorted(kept.iterdir()) != []) if setting is None else not kept.exists()
