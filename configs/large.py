"""BERT-large on English Wikipedia (TFDS catalog), BERT's two phases: length 128, then 512.

Prepare the corpus once where the run can read it (`tfds build wikipedia/20230601.en`, or
point --config.data.tfds_data_dir at a copy), then:
Run: bert-jax pretrain --config=configs/large.py --workdir=runs/large
"""

from bert_jax.config import wikipedia_two_phase


def get_config():
    return wikipedia_two_phase("large", num_steps=1_000_000, learning_rate=1e-4, warmup_steps=10_000)
