"""BERT-large (google-research/bert sizes).

Run: bert-jax pretrain --config=configs/large.py
"""

from bert_jax.config import default_config


def get_config():
    return default_config("large")
