"""Validation scores of a fine-tuned model's predictions, computed as GLUE computes them
(scikit-learn's F1 and Matthews correlation, SciPy's Pearson and Spearman correlations)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as sk

SCORES = ("accuracy", "f1", "matthews", "pearson", "spearman")


def score(names, logits: np.ndarray, labels: np.ndarray, regression: bool) -> dict[str, float]:
    """The scores `names` of logits [N, num_labels] against labels [N].

    F1 is of class 1 for two classes (GLUE's MRPC and QQP), else the macro average over
    classes. A correlation of constant predictions (an untrained model may give them) is 0."""
    predictions = logits[:, 0].astype(np.float64) if regression else logits.argmax(-1)
    average = "binary" if logits.shape[-1] == 2 else "macro"
    functions = {
        "accuracy": lambda: sk.accuracy_score(labels, predictions),
        "f1": lambda: sk.f1_score(labels, predictions, average=average, zero_division=0.0),
        "matthews": lambda: sk.matthews_corrcoef(labels, predictions),
        "pearson": lambda: _correlation(stats.pearsonr, predictions, labels),
        "spearman": lambda: _correlation(stats.spearmanr, predictions, labels),
    }
    return {name: float(functions[name]()) for name in names}


def _correlation(function, predictions, labels) -> float:
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return function(predictions, labels)[0]
