"""Training FLOPs per sequence and MFU, shared by every report here."""

from __future__ import annotations

from bert_jax.config import ModelConfig

# Dense bf16 peaks, FLOP/s, by the start of `jax.Device.device_kind`.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6": 918e12,
}


def train_flops_per_sequence(config: ModelConfig, seq_length: int, predictions: int) -> float:
    """Forward + backward FLOPs of one sequence, the usual count: 6 per weight-matrix entry and
    token it multiplies (2 forward, 2 each for the input's and the weight's gradient), as many
    for attention's weightless products, and no elementwise work. Each component reads its
    own config fields, so a variant counts as it is, not as BERT (ARCHITECTURE.md's formula)."""
    d, attention_width = config.hidden_size, config.num_heads * config.head_dim
    attention = 3 * d * attention_width + attention_width * d  # QKV, output projection
    mlp = 2 * d * config.intermediate_size  # up, down
    scores_and_values = 2 * seq_length * attention_width  # per query: all keys, twice
    per_token = config.num_layers * (attention + mlp + scores_and_values)
    mlm = d * d + d * config.vocab_size  # transform, tied decoder: at the predictions only
    pooler_and_nsp = d * d + d * 2  # at [CLS] only
    return 6 * (seq_length * per_token + predictions * mlm + pooler_and_nsp)


def mfu(sequences_per_second: float, flops_per_sequence: float, device_kind: str,
        device_count: int) -> float | None:
    """The fraction of the devices' peak dense bf16 FLOP/s achieved; None when the peak is
    unknown (e.g. CPU)."""
    peak = next((p for kind, p in PEAK_FLOPS.items() if device_kind.startswith(kind)), None)
    if peak is None:
        return None
    return sequences_per_second * flops_per_sequence / (peak * device_count)
