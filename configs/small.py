"""BERT-small on English Wikipedia (TFDS catalog), BERT's two phases: length 128, then 512.

Prepare the corpus once where the run can read it (`tfds build wikipedia/20230601.en`, or
point --config.data.tfds_data_dir at a copy), then:
Run: bert-jax pretrain --config=configs/small.py --workdir=runs/small
"""

from bert_jax.config import wikipedia_two_phase


def get_config():
    return wikipedia_two_phase("small", num_steps=100_000, learning_rate=5e-4, warmup_steps=2_000)
