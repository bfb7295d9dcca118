"""BERT-medium (google-research/bert sizes).

Run: bert-jax pretrain --config=configs/medium.py
"""

from bert_jax.config import default_config


def get_config():
    return default_config("medium")
