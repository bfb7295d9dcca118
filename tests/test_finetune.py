"""`bert-jax finetune` and `finetune-eval`: Hugging Face parity of the classifier (the outside
oracle, `transformers.BertForSequenceClassification`), encoders from any BERT directory,
sharded + resumed runs equal to one straight run, continuous evaluation, bad input."""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import bert_jax
from bert_jax import cli, finetune, finetune_eval, hf, tasks
from bert_jax.workdir import load_tokenizer_of
from bert_jax.metrics import read_metrics
from bert_jax.model import abstract, create
from bert_jax.pretrained import Classifier, load_classifier, load_params
from bert_jax.tasks import encode
from test_hf import _assert_logits_equal, _inputs, _random_hf_config


def _hf_classifier_logits(model, ids, types, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                     attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("labels", [("neg", "neutral", "pos"), ()])
def test_classifier_export_equals_transformers(tmp_path, labels):
    hf_config = _random_hf_config(7)
    config = hf.config_from_hf(hf_config.to_dict())
    model = create(config, seed=3, num_labels=len(labels) or 1)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ours = Classifier(config, params, labels)
    ours.save_hf(tmp_path)
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.num_labels == (len(labels) or 1)
    if labels:
        assert [theirs.config.id2label[i] for i in range(len(labels))] == list(labels)
    else:
        assert theirs.config.problem_type == "regression"
    ids, types, mask = _inputs(hf_config, 7)
    logits = ours.logits(ids, types, mask)
    assert np.abs(logits - _hf_classifier_logits(theirs, ids, types, mask)).max() <= 1e-4
    again = load_classifier(tmp_path)
    assert again.labels == tuple(labels)
    np.testing.assert_array_equal(again.logits(ids, types, mask), logits)
    with pytest.raises(ValueError, match="holds a sequence classifier: load it with "
                                         "bert_jax.load_classifier"):
        bert_jax.load(tmp_path)  # as fill-mask does


@pytest.mark.parametrize("architecture", ["BertModel", "BertForSequenceClassification"])
def test_encoder_loads_from_any_hugging_face_bert(tmp_path, architecture):
    torch.manual_seed(0)
    hf_config = _random_hf_config(5)
    model = getattr(transformers, architecture)(hf_config).eval()
    model.save_pretrained(tmp_path)
    bert = model if architecture == "BertModel" else model.bert
    config, params, missing = load_params(tmp_path)
    assert missing == ("mlm", "nsp")  # no heads there: a run starts them fresh
    encoder = {k: params[k] for k in ("embeddings", "encoder", "pooler")}
    ids, types, mask = _inputs(hf_config, 5)
    with torch.no_grad():
        out = bert(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                   attention_mask=torch.tensor(mask))
    graphdef, state = nnx.split(abstract(config, num_labels=2))
    params = nnx.to_pure_dict(nnx.state(create(config, num_labels=2), nnx.Param))
    nnx.replace_by_pure_dict(state, {**params, **encoder})
    sequence, pooled = nnx.merge(graphdef, state).encode(ids, types, mask)
    _assert_logits_equal((np.asarray(sequence), np.asarray(pooled)),
                         (out.last_hidden_state.numpy(), out.pooler_output.numpy()), mask)


# --- runs ----------------------------------------------------------------------------------

def _pair_files(tmp_path):
    """A pair task a tiny model can learn a little of: is the pair's second text the first
    one's words reversed?"""
    rng = np.random.default_rng(0)
    words = "the list of values returns a new object with each item in order".split()
    rows = []
    for i in range(48):
        first = " ".join(rng.choice(words, 6))
        same = i % 2 == 0
        second = " ".join(first.split()[::-1]) if same else " ".join(rng.choice(words, 6))
        rows.append({"text": first, "text_pair": second, "label": "yes" if same else "no"})
    for name, part in (("train.jsonl", rows[:32]), ("validation.jsonl", rows[32:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path / "train.jsonl", tmp_path / "validation.jsonl"


def _finetune(workdir, init, files, *extra):
    train, validation = files
    return cli.main(["finetune", f"--init={init}", "--task=pair-classification",
                     f"--train-file={train}", f"--validation-file={validation}",
                     f"--workdir={workdir}", "--config.data.max_seq_length=32",
                     "--config.train.global_batch_size=8", "--config.train.num_steps=8",
                     "--config.train.eval_every=4", "--config.train.log_every=1",
                     "--config.train.eval_batch_size=8", "--config.train.learning_rate=1e-3",
                     *extra])


def test_sharded_and_resumed_finetuning_equals_one_run_and_exports_for_transformers(
        tmp_path, straight_run, capsys, monkeypatch):
    init = straight_run[0]
    monkeypatch.chdir(tmp_path)  # the resumed run's workdir is relative, as users type it
    files = _pair_files(tmp_path)
    assert _finetune(tmp_path / "straight", init, files) == 0
    summary = capsys.readouterr().out
    assert "validation" in summary and "exported to" in summary
    # Another sharding (tensor-parallel), stopped at step 3 and resumed.
    assert _finetune("split", init, files, "--config.mesh.data=2",
                     "--config.mesh.tensor=4", "--config.train.stop_at_step=3") == 0
    assert not (tmp_path / "split" / "export").exists()
    assert _finetune("split", init, files, "--config.mesh.data=2",
                     "--config.mesh.tensor=4") == 0
    assert "resumed from split/checkpoints at step 3" in capsys.readouterr().out
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in straight] == [m["step"] for m in split]
    assert [m["step"] for m in straight if m.get("split") == "validation"] == [4, 8]
    for a, b in zip(straight, split):
        for name in ("loss", "accuracy", "f1", "grad_norm"):
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), (a["step"], name)
    # 10% warmup of 8 steps is none; then linear decay to 0 at step 8.
    assert [m["learning_rate"] for m in straight if "learning_rate" in m][:2] == \
        pytest.approx([1e-3, 1e-3 * 7 / 8])

    # The export: the same logits in transformers and here, and the workdir's own weights.
    export = tmp_path / "straight" / "export"
    ours = load_classifier(export)
    assert ours.labels == ("no", "yes")
    np.testing.assert_allclose(ours.logits(np.zeros((1, 4), np.int32)),
                               load_classifier(tmp_path / "split" / "export").logits(
                                   np.zeros((1, 4), np.int32)), rtol=1e-5, atol=1e-6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    theirs = transformers.BertForSequenceClassification.from_pretrained(export).eval()
    texts = ["returns a new list", "the values of each item"]
    batch = tokenizer(texts, ["a new list returns", "object order"], padding=True,
                      return_tensors="np")
    logits = ours.logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    expected = _hf_classifier_logits(theirs, batch["input_ids"], batch["token_type_ids"],
                                     batch["attention_mask"])
    assert np.abs(logits - expected).max() <= 1e-4
    # The last validation accuracy is that of the exported model on the validation file.
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    _, splits = tasks.load(ml_collections.ConfigDict(config["config"]["task"]))
    inputs = encode(load_tokenizer_of(export), splits["validation"], 32)
    predicted = ours.logits(inputs["input_ids"], inputs["segment_ids"],
                            inputs["input_mask"]).argmax(-1)
    accuracy = [m for m in straight if m.get("split") == "validation"][-1]["accuracy"]
    assert np.mean(predicted == inputs["labels"]) == pytest.approx(accuracy)


def test_nonfinite_steps_stop_finetuning_at_once_not_at_the_next_log(tmp_path, straight_run,
                                                                     capsys):
    # A learning rate of 1e30 makes step 2's loss non-finite, and every one after it.
    code = _finetune(tmp_path / "run", straight_run[0], _pair_files(tmp_path),
                     "--config.train.learning_rate=1e30", "--config.train.nonfinite_patience=2",
                     "--config.train.log_every=8")
    assert code == 1  # the CLI's one line: not the user's input
    assert "non-finite loss or gradients in 2 steps in a row (steps 2-3;" in \
        capsys.readouterr().err


def test_random_init_keeps_the_architecture_but_not_the_weights(straight_run):
    config = finetune.default_config()
    config.init.path = str(straight_run[0])
    pretrained = finetune.load_init(config.init)
    config.init.random = True
    random = finetune.load_init(config.init)
    assert random.model_config == pretrained.model_config and random.encoder_params is None
    assert pretrained.encoder_params["embeddings"]["word"]["embedding"].shape[0] == \
        pretrained.model_config.vocab_size


def test_finetune_eval_scores_each_checkpoint_once(tmp_path, straight_run, capsys):
    workdir = tmp_path / "pretrain"
    shutil.copytree(straight_run[0], workdir)
    files = _pair_files(tmp_path)
    args = ["finetune-eval", f"--workdir={workdir}", "--task=pair-classification",
            f"--train-file={files[0]}", f"--validation-file={files[1]}", "--every=10",
            "--config.data.max_seq_length=32", "--config.train.global_batch_size=8",
            "--config.train.num_steps=2", "--config.train.eval_batch_size=8"]
    assert cli.main(args) == 0
    out = finetune_eval.output_dir(workdir, "pair-classification")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [10, 20]  # checkpoints 5 and 15 are not multiples
    assert all(0.0 <= r["accuracy"] <= 1.0 and "f1" in r for r in records)
    assert "pretraining step 20: " in capsys.readouterr().out
    assert cli.main(args) == 0  # nothing new to score
    assert read_metrics(out) == records
    assert (out / "tensorboard").is_dir()
    # Other settings would give other scores: refused, not mixed into the same log.
    assert cli.main([*args, "--config.train.learning_rate=0.5"]) == 2
    assert "holds scores of train.learning_rate=" in capsys.readouterr().err
    assert read_metrics(out) == records
    # Not a pretraining workdir: refused before anything is written there.
    assert cli.main(["finetune-eval", f"--workdir={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("args, message", [
    (["--task=sentiment"], "unknown task 'sentiment'"),
    (["--task=pair-classification"], "has single texts"),
    (["--task=classification", "--labels=yes,maybe"], "label 'no' is not one of the declared"),
    (["--task=classification", "--train-file=UNLABELED"], "has no 'label' column"),
    (["--init=/nonexistent"], "does not exist"),
    (["--task=classification", "--labels=yes"], "has the one class ['yes'] in task.labels"),
    (["--train-file=ONECLASS"], "has the one class ['yes'] in "),
    (["--config.train.global_batch_size=0"],
     "train.global_batch_size=0: expected a positive integer"),
])
def test_bad_finetune_input_is_one_line_exit_2(tmp_path, straight_run, capsys, args, message):
    good = tmp_path / "good.csv"
    good.write_text("text,label\na b c,yes\nd e f,no\n")
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text\na b c\n")
    one_class = tmp_path / "one_class.csv"
    one_class.write_text("text,label\na b c,yes\nd e f,yes\n")
    argv = ["finetune", f"--init={straight_run[0]}", f"--workdir={tmp_path / 'run'}",
            f"--train-file={good}", f"--validation-file={good}",
            *[a.replace("UNLABELED", str(unlabeled)).replace("ONECLASS", str(one_class))
              for a in args]]
    if not any(a.startswith("--task") for a in args):
        argv.append("--task=classification")
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("regression", [False, True])
def test_sequence_objective_step_weighs_rows_and_accumulates_exactly(regression):
    import functools

    import optax

    from bert_jax import run as runs
    from bert_jax.config import preset
    from bert_jax.losses import SequenceObjective

    config = preset("tiny", vocab_size=64, max_position_embeddings=16, hidden_dropout_rate=0.0)
    labels_count = 1 if regression else 3
    tx = optax.sgd(0.1)
    state = jax.jit(lambda: runs._init_state(config, tx, 0, "threefry2x32", labels_count))()
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 64, (8, 16)).astype(np.int32),
             "segment_ids": np.zeros((8, 16), np.int32), "input_mask": np.ones((8, 16), np.int32),
             "labels": (rng.normal(size=8).astype(np.float32) if regression
                        else rng.integers(0, 3, 8).astype(np.int32)),
             "weights": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}
    objective = SequenceObjective(regression=regression)
    graphdef = nnx.graphdef(abstract(config, labels_count))

    def step(accum):
        return jax.jit(functools.partial(runs.train_step, graphdef=graphdef, tx=tx,
                                         schedule=lambda _: 0.1, accum_steps=accum,
                                         objective=objective))(state, batch)

    (one, metrics), (two, metrics_two) = step(1), step(2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 one["params"], two["params"])
    # The loss is the mean over rows of weight 1, from the model's own logits.
    logits = np.asarray(jax.jit(lambda params: objective.logits(
        nnx.merge(graphdef, params), batch))(state["params"]), np.float64)[:6]
    if regression:
        expected = np.mean((logits[:, 0] - batch["labels"][:6]) ** 2)
    else:
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        expected = -np.mean(log_probs[np.arange(6), batch["labels"][:6]])
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics_two["loss"]) == pytest.approx(expected, rel=1e-5)
