"""BERT-tiny on the built-in corpus (the Python standard library's documentation): the default
run, about 8 minutes on a 2-core laptop CPU.

Run: bert-jax pretrain --config=configs/tiny.py   (the same as plain `bert-jax pretrain`)
"""

from bert_jax.config import default_run


def get_config():
    return default_run()
