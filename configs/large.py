"""BERT-large on English Wikipedia (TFDS catalog), BERT's two phases: length 128, then 512.

Prepare the corpus once where the run can read it (`tfds build wikipedia/20230601.en`, or
point --config.data.tfds_data_dir at a copy), then:
Run: bert-jax pretrain --config=configs/large.py --workdir=runs/large
"""

from bert_jax.config import default_config


def get_config():
    config = default_config("large")
    config.data.corpus = "tfds:wikipedia/20230601.en"
    config.data.vocab_size = 30522  # BERT's
    config.train.update(num_steps=1_000_000, learning_rate=1e-4, warmup_steps=10_000)
    # (start step, length, predictions, batch): 90% of the steps at 128, the rest at 512.
    config.train.phases = ((0, 128, 20, 256), (900_000, 512, 80, 256))
    return config
