"""Domain-adaptive pretraining: continue a released BERT on your own corpus, as BioBERT, FinBERT
and LegalBERT were made, with BERT's recipe (MLM + NSP, AdamW, warmup then linear decay) at a
continued-pretraining learning rate (5e-5; 2e-5 for long runs or a large batch).

The architecture and tokenizer come from the init (a Hugging Face BERT directory, a
google-research/bert checkpoint directory or a bert-jax workdir); the optimizer and schedule
start fresh. docs/continued-pretraining.md has the whole flow.

Run: bert-jax pretrain --config=configs/continue.py:PATH/TO/BERT \\
       --config.data.corpus='my_corpus/*.txt' --workdir=runs/continued
"""

from bert_jax.config import default_config

# What train.init reads when no PATH is given: an error that says what to give.
MISSING = "<give PATH in --config=configs/continue.py:PATH or --config.train.init=PATH>"


def get_config(init: str = MISSING):
    config = default_config()  # the model follows the init (bert_jax.init.follow)
    config.data.update(max_seq_length=128, max_predictions_per_seq=20)
    config.model.hidden_dropout_rate = 0.1  # BERT's
    config.train.update(init=init, num_steps=10_000, global_batch_size=64, learning_rate=5e-5,
                        warmup_steps=1_000, log_every=100, eval_every=1_000)
    config.checkpoint.every_steps = 1_000
    return config
