"""Fine-tuning tasks: local files, GLUE from TFDS (mock data), the built-in task, encoding
against `transformers`' tokenizer, and the scores against SciPy/scikit-learn definitions."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bert_jax import builtin_task, scores, tasks


def _task_config(name, **fields):
    values = dict(name=name, train_file="", validation_file="", labels="", tfds_data_dir="")
    return ml_collections.ConfigDict({**values, **fields})


def _write(path, rows, header=("text", "label")):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        separator = "\t" if path.suffix == ".tsv" else ","
        lines = [separator.join(header)] + [separator.join(str(row[k]) for k in header)
                                            for row in rows]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_file_tasks_read_texts_pairs_and_labels(tmp_path, suffix):
    rows = [{"text": f"first {i}", "text_pair": f"second {i}", "label": ["yes", "no"][i % 2]}
            for i in range(5)]
    header = ("text", "text_pair", "label")
    train = _write(tmp_path / f"train{suffix}", rows, header)
    validation = _write(tmp_path / f"validation{suffix}", rows[:2], header)
    task, splits = tasks.load(_task_config("pair-classification", train_file=train,
                                           validation_file=validation))
    assert task.pair and task.labels == ("no", "yes") and task.num_labels == 2
    assert splits["train"].texts == [f"first {i}" for i in range(5)]
    assert splits["train"].pairs == [f"second {i}" for i in range(5)]
    assert splits["train"].labels.tolist() == [1, 0, 1, 0, 1]
    assert len(splits["validation"]) == 2


def test_declared_labels_set_the_class_order_and_integers_sort_numerically(tmp_path):
    rows = [{"text": "t", "label": label} for label in (10, 9, 2)]
    train = _write(tmp_path / "train.jsonl", rows)
    task, _ = tasks.load(_task_config("classification", train_file=train, validation_file=train))
    assert task.labels == ("2", "9", "10")
    task, splits = tasks.load(_task_config("classification", train_file=train,
                                           validation_file=train, labels="10,9,2,5"))
    assert task.labels == ("10", "9", "2", "5")
    assert splits["train"].labels.tolist() == [0, 1, 2]


def test_regression_reads_scores(tmp_path):
    train = _write(tmp_path / "train.csv", [{"text": "a", "label": 0.5}, {"text": "b", "label": 4}])
    task, splits = tasks.load(_task_config("regression", train_file=train, validation_file=train))
    assert task.regression and task.num_labels == 1 and task.metrics[0] == "pearson"
    np.testing.assert_array_equal(splits["train"].labels, np.array([0.5, 4.0], np.float32))


@pytest.mark.parametrize("case, message", [
    ("unknown task", "unknown task 'sentiment': expected one of"),
    ("no label column", "has no 'label' column"),
    ("label outside the declared classes", "label 'maybe' is not one of the declared classes"),
    ("validation label unseen in training", "label 'maybe' is not one of the training file's"),
    ("pair task given single texts", "has single texts"),
    ("single task given pairs", "has a text_pair column but the task takes single texts"),
    ("score that is no number", "label 'high' is not a number"),
    ("missing file", "does not exist"),
    ("no file given", "expected --train-file=PATH"),
])
def test_bad_task_input_raises_one_clear_error(tmp_path, case, message):
    good = _write(tmp_path / "good.csv", [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}])
    maybe = _write(tmp_path / "maybe.csv", [{"text": "a", "label": "maybe"}])
    pairs = _write(tmp_path / "pairs.csv", [{"text": "a", "text_pair": "b", "label": "yes"}],
                   ("text", "text_pair", "label"))
    unlabeled = _write(tmp_path / "unlabeled.csv", [{"text": "a"}], ("text",))
    scored = _write(tmp_path / "scored.csv", [{"text": "a", "label": "high"}])
    config = {
        "unknown task": _task_config("sentiment"),
        "no label column": _task_config("classification", train_file=unlabeled,
                                        validation_file=good),
        "label outside the declared classes": _task_config(
            "classification", train_file=good, validation_file=maybe, labels="yes,no"),
        "validation label unseen in training": _task_config(
            "classification", train_file=good, validation_file=maybe),
        "pair task given single texts": _task_config("pair-classification", train_file=good,
                                                     validation_file=good),
        "single task given pairs": _task_config("classification", train_file=pairs,
                                                validation_file=pairs),
        "score that is no number": _task_config("regression", train_file=scored,
                                                validation_file=scored),
        "missing file": _task_config("classification", train_file=str(tmp_path / "nope.csv"),
                                     validation_file=good),
        "no file given": _task_config("classification", validation_file=good),
    }[case]
    with pytest.raises(ValueError, match=message) as error:
        tasks.load(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, pair, regression", [
    ("glue/mrpc", True, False), ("glue/sst2", False, False), ("glue/stsb", True, True)])
def test_glue_tasks_read_from_tfds(name, pair, regression):
    with tfds.testing.mock_data(num_examples=7):
        task, splits = tasks.load(_task_config(name))
    assert task.pair == pair and task.regression == regression
    assert len(splits["train"]) == 7 and len(splits["validation"]) == 7
    assert isinstance(splits["train"].texts[0], str)
    assert (splits["train"].pairs is not None) == pair
    if not regression:
        assert task.labels == tuple(tfds.builder(name).info.features["label"].names)
        assert splits["train"].labels.dtype == np.int32
        assert splits["train"].labels.max() < task.num_labels


def test_unprepared_glue_task_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ValueError, match="not prepared in the TFDS data directory") as error:
        tasks.load(_task_config("glue/rte", tfds_data_dir=str(tmp_path)))
    assert "`tfds build glue/rte`" in str(error.value)


def test_builtin_task_is_balanced_deterministic_and_shuffles_words():
    task, splits = tasks.load(_task_config(tasks.BUILTIN))
    again, splits_again = tasks.load(_task_config(tasks.BUILTIN))
    assert task == again and splits["train"].texts == splits_again["train"].texts
    assert not task.pair and task.labels == ("original", "shuffled")
    train, validation = splits["train"], splits["validation"]
    assert (len(train), len(validation)) == (builtin_task.TRAIN_EXAMPLES,
                                             builtin_task.VALIDATION_EXAMPLES)
    for split in (train, validation):
        assert np.bincount(split.labels).tolist() == [len(split) // 2] * 2
    originals = set(builtin_task._sentences())
    for text, label in zip(train.texts[:200], train.labels[:200]):
        # An original is a corpus sentence; a shuffled one is not (its words in a new order).
        assert (text in originals) == (label == 0)
    assert not set(train.texts) & set(validation.texts)


def test_encoding_equals_transformers_tokenizer(straight_run):
    from transformers import AutoTokenizer

    workdir = straight_run[0]
    from bert_jax.workdir import load_tokenizer_of

    tokenizer = load_tokenizer_of(workdir / "export")
    theirs = AutoTokenizer.from_pretrained(workdir / "export")
    long = " ".join(["the list of values"] * 20)
    sized = [" ".join(["list"] * n) for n in (3, 9, 10, 11, 12, 17)]
    firsts = ["A short text.", long, "Another one here.", long] + sized + sized[::-1]
    seconds = ["A pair.", "short", long, long] + sized * 2
    examples = tasks.Examples(firsts, seconds, np.zeros(len(firsts), np.int32))
    for pairs in (None, examples.pairs):
        ours = tasks.encode(tokenizer, tasks.Examples(examples.texts, pairs, examples.labels), 24)
        expected = theirs(examples.texts, pairs, truncation="longest_first", max_length=24,
                          padding="max_length", return_tensors="np")
        np.testing.assert_array_equal(ours["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(ours["segment_ids"], expected["token_type_ids"])
        np.testing.assert_array_equal(ours["input_mask"], expected["attention_mask"])


def test_scores_follow_glue_definitions():
    from scipy import stats
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2))
    labels = rng.integers(0, 2, 50)
    predicted = logits.argmax(-1)
    result = scores.score(("accuracy", "f1", "matthews"), logits, labels, regression=False)
    assert result == pytest.approx({"accuracy": np.mean(predicted == labels),
                                    "f1": f1_score(labels, predicted),
                                    "matthews": matthews_corrcoef(labels, predicted)})
    three = rng.normal(size=(50, 3))
    labels3 = rng.integers(0, 3, 50)
    assert scores.score(("f1",), three, labels3, False)["f1"] == pytest.approx(
        f1_score(labels3, three.argmax(-1), average="macro"))
    values = rng.normal(size=50)
    result = scores.score(("pearson", "spearman"), logits[:, :1], values, regression=True)
    assert result["pearson"] == pytest.approx(stats.pearsonr(logits[:, 0], values)[0])
    assert result["spearman"] == pytest.approx(stats.spearmanr(logits[:, 0], values)[0])
    constant = scores.score(("pearson",), np.zeros((50, 1)), values, regression=True)
    assert constant == {"pearson": 0.0}
