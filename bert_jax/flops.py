"""Training FLOPs per sequence and MFU: the usual count (6 FLOPs per weight and token for
forward + backward, plus attention's two s x s products), shared by every report here. It is
ARCHITECTURE.md's formula with the MLP's width read from the config (4 d there)."""

from __future__ import annotations

from bert_jax.config import ModelConfig

# Dense bf16 peaks, FLOP/s, by the start of `jax.Device.device_kind`.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6": 918e12,
}


def train_flops_per_sequence(config: ModelConfig, seq_length: int, predictions: int) -> float:
    """Forward + backward FLOPs of one sequence: encoder, MLM head at `predictions` masked
    positions (transform + tied decoder), pooler and NSP."""
    layers, d, vocab = config.num_layers, config.hidden_size, config.vocab_size
    weights_per_layer = 4 * d * d + 2 * d * config.intermediate_size  # QKV, output, MLP
    encoder = seq_length * layers * (6 * weights_per_layer + 12 * seq_length * d)
    mlm = predictions * 6 * (d * d + d * vocab)
    return encoder + mlm + 6 * (d * d + 2 * d)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (e.g. CPU)."""
    for prefix, peak in PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return peak
    return None


def mfu(sequences_per_second: float, flops_per_sequence: float, device_kind: str,
        device_count: int) -> float | None:
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return sequences_per_second * flops_per_sequence / (peak * device_count)
