"""bert-jax: BERT pretraining in JAX/Flax NNX, from one GPU to Cloud TPU pods."""

__version__ = "0.1.0"


def load(path):
    """Loads trained BERT weights; see `bert_jax.inference.load`."""
    from bert_jax.inference import load as _load  # keeps `import bert_jax` light

    return _load(path)


def load_classifier(path):
    """Loads a fine-tuned classifier; see `bert_jax.pretrained.load_classifier`."""
    from bert_jax.pretrained import load_classifier as _load_classifier

    return _load_classifier(path)
