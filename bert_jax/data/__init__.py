"""Pretraining data: corpora, instances, the TFDS dataset, loading and masking.

Submodules that need TensorFlow import it themselves; this package and `synthetic` do not,
so the model, the train step and the benchmark run where TensorFlow is absent.
"""
