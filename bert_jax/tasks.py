"""Fine-tuning tasks (classes or a score, from a text or a pair) and their train/validation
examples: `builtin`, `glue/NAME` (prepared in TFDS, never downloaded), or local CSV, TSV or
JSON Lines files (`FILE_TASKS`); docs/finetune.md has the table. Examples are read whole into
memory: fine-tuning sets are small (GLUE's largest, QQP, is 364k pairs).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from bert_jax import builtin_task
from bert_jax.config import ConfigError

BUILTIN = "builtin"
GLUE_PREFIX = "glue/"


@dataclasses.dataclass(frozen=True)
class Task:
    """`labels` names the classes (empty: regression, one score); `metrics` are reported on
    validation, the first being the headline."""

    name: str
    pair: bool
    labels: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


@dataclasses.dataclass(frozen=True)
class Examples:
    """Texts (and second texts of pairs) with labels: int32 class ids or float32 scores."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


CLASSIFICATION_METRICS = ("accuracy", "f1")
REGRESSION_METRICS = ("pearson", "spearman")

# Tasks of local files: name -> (pair, regression).
FILE_TASKS = {"classification": (False, False), "pair-classification": (True, False),
              "regression": (False, True), "pair-regression": (True, True)}

# GLUE in TFDS: config -> (text features, validation split, metrics). The metrics are GLUE's
# own (Matthews correlation for CoLA, F1 and accuracy for MRPC and QQP, ...).
GLUE = {
    "cola": (("sentence",), "validation", ("matthews", "accuracy")),
    "sst2": (("sentence",), "validation", ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), "validation", ("f1", "accuracy")),
    "qqp": (("question1", "question2"), "validation", ("f1", "accuracy")),
    "stsb": (("sentence1", "sentence2"), "validation", REGRESSION_METRICS),
    "mnli": (("premise", "hypothesis"), "validation_matched", ("accuracy",)),
    "qnli": (("question", "sentence"), "validation", ("accuracy",)),
    "rte": (("sentence1", "sentence2"), "validation", ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), "validation", ("accuracy",)),
}

TASK_NAMES = (BUILTIN, *(GLUE_PREFIX + name for name in GLUE), *FILE_TASKS)


def load(task_config) -> tuple[Task, dict[str, Examples]]:
    """The task of `config.task` and its examples by split ("train", "validation"); bad input
    raises a ConfigError naming it."""
    name = task_config.name
    if name == BUILTIN:
        task = Task(BUILTIN, False, builtin_task.LABELS, builtin_task.METRICS)
        return task, {split: Examples(texts, None, labels)
                      for split, (texts, labels) in builtin_task.splits().items()}
    if name.startswith(GLUE_PREFIX) and name[len(GLUE_PREFIX):] in GLUE:
        return _load_glue(name[len(GLUE_PREFIX):], task_config.tfds_data_dir or None)
    if name in FILE_TASKS:
        return _load_files(name, task_config)
    raise ConfigError(f"unknown task {name!r}: expected one of {list(TASK_NAMES)}")


def _load_glue(config_name: str, data_dir: str | None) -> tuple[Task, dict[str, Examples]]:
    import tensorflow_datasets as tfds

    fields, validation_split, metrics = GLUE[config_name]
    name = GLUE_PREFIX + config_name
    label = tfds.builder(name, data_dir=data_dir).info.features["label"]
    labels = tuple(label.names) if hasattr(label, "names") else ()
    task = Task(name, len(fields) == 2, labels, metrics)
    splits = {}
    for split, tfds_split in (("train", "train"), ("validation", validation_split)):
        try:
            dataset = tfds.load(name, split=tfds_split, data_dir=data_dir, download=False)
        except (AssertionError, FileNotFoundError) as e:  # TFDS asserts the data is there
            raise ConfigError(f"task {name} is not prepared in the TFDS data directory "
                              f"{data_dir or tfds.core.constants.DATA_DIR}: expected it built "
                              f"there (`tfds build {name}`; bert-jax never downloads), or set "
                              f"--config.task.tfds_data_dir") from e
        rows = list(tfds.as_numpy(dataset))
        texts = [[row[field].decode("utf-8") for row in rows] for field in fields]
        values = np.array([row["label"] for row in rows])
        splits[split] = Examples(texts[0], texts[1] if task.pair else None,
                                 values.astype(np.float32 if task.regression else np.int32))
    return task, splits


def _load_files(name: str, task_config) -> tuple[Task, dict[str, Examples]]:
    pair, regression = FILE_TASKS[name]
    files = {"train": task_config.train_file, "validation": task_config.validation_file}
    for split, path in files.items():
        if not path:
            raise ConfigError(f"task {name} reads local files: expected --{split}-file=PATH "
                              f"(CSV, TSV or JSON Lines with text{', text_pair' * pair}, label)")
    rows = {split: _read_rows(path, pair) for split, path in files.items()}
    declared = tuple(label.strip() for label in str(task_config.labels or "").split(",")
                     if label.strip())
    if regression:
        if declared:
            raise ConfigError(f"task.labels={task_config.labels!r} declares classes but task "
                              f"{name} predicts a score: expected no labels")
        labels = ()
    else:
        labels = declared or _sorted_labels({label for _, _, label, _ in rows["train"]})
        if len(labels) < 2:
            source = "task.labels" if declared else files["train"]
            raise ConfigError(f"task {name} has the one class {list(labels)} in {source}: "
                              f"expected at least 2 classes to tell apart")
    task = Task(name, pair, labels, REGRESSION_METRICS if regression else CLASSIFICATION_METRICS)
    return task, {split: _examples(task, rows[split], files[split], bool(declared))
                  for split in files}


def _read_rows(path: str, pair: bool) -> list[tuple[str, str | None, str, int]]:
    """(text, text_pair, label as text, line number) of each row of a CSV/TSV/JSONL file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path} does not exist: expected a CSV, TSV or JSON Lines file")
    wanted = ["text", "label"] + (["text_pair"] if pair else [])
    if file.suffix in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not JSON ({e.msg}): expected one object "
                                  f"per line") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object with "
                                  f"{', '.join(wanted)}")
            records.append((number, record))
    else:
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if file.suffix == ".tsv" else ",")
            records = list(enumerate(reader, 2))  # line 1 is the header
            columns = reader.fieldnames or []
        _check_columns(path, columns, wanted, pair)
    if not records:
        raise ConfigError(f"{path} has no examples: expected a header and rows with "
                          f"{', '.join(wanted)}")
    rows = []
    for number, record in records:
        _check_columns(f"{path}:{number}", list(record), wanted, pair)
        text_pair = record["text_pair"] if pair else None
        label = record["label"]
        if isinstance(label, float) and label.is_integer():
            label = int(label)  # JSON's 1.0 is the class "1"
        rows.append((str(record["text"]), None if text_pair is None else str(text_pair),
                     str(label).strip(), number))
    return rows


def _check_columns(where: str, columns: list[str], wanted: list[str], pair: bool) -> None:
    missing = [column for column in wanted if column not in columns]
    if missing == ["text_pair"]:
        raise ConfigError(f"{where} has single texts (columns {columns}): a pair task expects a "
                          f"text_pair column too, or use a single-text task")
    if missing:
        raise ConfigError(f"{where} has no {missing[0]!r} column (columns {columns}): expected "
                          f"{', '.join(wanted)}")
    if not pair and "text_pair" in columns:
        raise ConfigError(f"{where} has a text_pair column but the task takes single texts: use "
                          f"pair-classification or pair-regression")


def _sorted_labels(values: set[str]) -> tuple[str, ...]:
    """Numerically when all labels are integers (so 10 comes after 9), else as text."""
    try:
        return tuple(sorted(values, key=int))
    except ValueError:
        return tuple(sorted(values))


def _examples(task: Task, rows, path: str, declared: bool) -> Examples:
    if task.regression:
        labels = []
        for _, _, label, number in rows:
            try:
                labels.append(float(label))
            except ValueError:
                raise ConfigError(f"{path}:{number}: label {label!r} is not a number: task "
                                  f"{task.name} expects a score") from None
        values = np.array(labels, np.float32)
    else:
        index = {label: i for i, label in enumerate(task.labels)}
        for _, _, label, number in rows:
            if label not in index:
                source = "the declared classes" if declared else "the training file's classes"
                raise ConfigError(f"{path}:{number}: label {label!r} is not one of {source} "
                                  f"{list(task.labels)}" + ("" if declared else
                                                           ": declare all with --labels"))
        values = np.array([index[label] for _, _, label, _ in rows], np.int32)
    return Examples([text for text, _, _, _ in rows],
                    [text_pair for _, text_pair, _, _ in rows] if task.pair else None, values)


def encode(tokenizer, examples: Examples, max_seq_length: int) -> dict[str, np.ndarray]:
    """Model inputs (input_ids, segment_ids, input_mask: int32) and labels of the examples:
    `[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]` (segment 1), truncated longest-first
    to `max_seq_length` as `transformers`' fast tokenizers do, padded with [PAD]."""
    firsts = [ids for ids, _ in tokenizer.encode_batch(examples.texts)]
    seconds = ([ids for ids, _ in tokenizer.encode_batch(examples.pairs)]
               if examples.pairs is not None else [None] * len(firsts))
    input_ids = np.full((len(firsts), max_seq_length), tokenizer.pad_id, np.int32)
    segment_ids, input_mask = (np.zeros_like(input_ids) for _ in range(2))
    for row, (a, b) in enumerate(zip(firsts, seconds)):
        a, b = _truncate(a, b, max_seq_length - (2 if b is None else 3))
        first = [tokenizer.cls_id, *a, tokenizer.sep_id]
        second = [] if b is None else [*b, tokenizer.sep_id]
        input_ids[row, :len(first) + len(second)] = first + second
        segment_ids[row, len(first):len(first) + len(second)] = 1
        input_mask[row, :len(first) + len(second)] = 1
    return {"input_ids": input_ids, "segment_ids": segment_ids, "input_mask": input_mask,
            "labels": examples.labels}


def _truncate(a, b, budget: int):
    """Longest-first, as Hugging Face `tokenizers`: the shorter text keeps up to half the budget
    (rounded down; on ties the second counts as the longer), the longer one the rest."""
    if b is None:
        return a[:budget], None
    if len(a) > len(b):
        b = b[:budget // 2]
        return a[:budget - len(b)], b
    a = a[:budget // 2]
    return a, b[:budget - len(a)]
