"""The FLOPs formula against hand counts and against XLA's own count, and `bert-jax
benchmark` end to end (no timing assertions: speed is measured side by side with the peers,
docs/performance.md)."""

import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import benchmark, flops
from bert_jax.config import ModelConfig, preset
from bert_jax.data.synthetic import synthetic_batch
from bert_jax.model import create
from bert_jax.pretrained import param_shapes


@pytest.mark.parametrize("size, seq, predictions, hand_count", [
    # BERT-base, 128 tokens, 20 predictions. Per layer and token: QKV 3*768^2, output 768^2,
    # MLP 2*768*3072 multiply-adds = 7,077,888; attention 2*128*768 = 196,608. x12 layers
    # x128 tokens = 11,173,625,856 MACs; MLM: 20*(768^2 + 768*30522) = 480,614,400; pooler and
    # NSP 768^2 + 2*768 = 591,360. Total 11,654,831,616 MACs; x2 FLOPs x3 (fwd + bwd).
    ("base", 128, 20, 6 * 11_654_831_616),
    # BERT-large, 512 tokens, 80 predictions: per layer and token 12*1024^2 = 12,582,912 +
    # 2*512*1024 = 1,048,576; x24 x512 = 167,503,724,544; MLM 80*(1024^2 + 1024*30522) =
    # 2,584,248,320; pooler and NSP 1,050,624. Total 170,089,023,488 MACs.
    ("large", 512, 80, 6 * 170_089_023_488),
])
def test_flops_formula_matches_a_hand_count(size, seq, predictions, hand_count):
    config = preset(size, vocab_size=30522)
    assert flops.train_flops_per_sequence(config, seq, predictions) == hand_count


def test_flops_formula_reads_the_mlp_width():
    # BERT-base with a 1024-wide MLP, 128 tokens, 20 predictions. Per layer and token: QKV
    # and output 4*768^2 = 2,359,296, MLP 2*768*1024 = 1,572,864, attention 196,608 MACs;
    # x12 x128 = 6,341,787,648; MLM 480,614,400 and pooler + NSP 591,360 as above.
    config = preset("base", vocab_size=30522, intermediate_size=1024)
    assert flops.train_flops_per_sequence(config, 128, 20) == 6 * 6_822_993_408


@pytest.mark.parametrize("layer_norm", ["post", "pre"])
def test_flops_are_six_per_weight_and_token_plus_attention_products(layer_norm):
    """An independent count from the model's parameter shapes: every weight matrix (a
    kernel; the word embeddings again as the tied decoder) costs 6 FLOPs per entry and token
    that passes it (encoder: every token; MLM head: the predictions; pooler and NSP: [CLS]),
    and attention's scores and weighted values 6 per query, key and heads x head_dim each.
    Norms are not counted, so pre-LN's final norm adds nothing."""
    config = ModelConfig(vocab_size=97, hidden_size=30, num_layers=3, num_heads=5,
                         intermediate_size=44, layer_norm=layer_norm)
    seq, predictions = 23, 7
    shapes = param_shapes(config)

    def weights(prefix):
        return sum(math.prod(shape) for path, shape in shapes.items()
                   if path.startswith(prefix) and path.endswith("/kernel"))

    heads_times_head_dim = math.prod(shapes["encoder/layers/attention/qkv/kernel"][-2:])
    attention_products = config.num_layers * 2 * seq * seq * heads_times_head_dim
    mlm = weights("mlm/") + math.prod(shapes["embeddings/word/embedding"])
    count = 6 * (seq * weights("encoder/layers/") + predictions * mlm + weights("pooler/")
                 + weights("nsp/") + attention_products)
    assert flops.train_flops_per_sequence(config, seq, predictions) == count


def test_forward_flops_are_within_5_percent_of_xlas_count():
    """XLA's cost analysis of the compiled forward pass is an outside count: the formula's
    forward third (matmuls only) must be close to it (XLA adds the elementwise work), less
    what the model skips: its last layer runs at [CLS] and the 20 masked positions only, so
    at the other 107 positions it does only the QKV projection (their keys and values), not
    the output projection and MLP (18 d^2 FLOPs) or attention (4 * 128 * d)."""
    config = preset("mini", vocab_size=30522)
    d = config.hidden_size
    model = create(config, seed=0)
    batch = synthetic_batch(0, 4, 128, 30522, 20)
    forward = jax.jit(lambda ids, types, mask, positions: model(ids, types, mask, positions))
    args = (batch["input_ids"], batch["segment_ids"], batch["input_mask"],
            batch["masked_lm_positions"])
    analysis = forward.lower(*map(jnp.asarray, args)).compile().cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    skipped = (128 - 21) * (18 * d * d + 4 * 128 * d)
    ours = 4 * (flops.train_flops_per_sequence(config, 128, 20) / 3 - skipped)
    assert ours == pytest.approx(xla_flops, rel=0.05)


def test_benchmark_prints_one_json_line_with_every_figure():
    # As on a GPU image without TensorFlow: the benchmark must never import it.
    program = ("import sys; from bert_jax import cli; code = cli.main(sys.argv[1:]); "
               "assert 'tensorflow' not in sys.modules, 'imported tensorflow'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", program, "benchmark", "--model=tiny",
                             "--batch=8", "--seq=32", "--steps=2", "--scan",
                             "--instances-per-row=3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("step_ms", "seq_per_s", "tokens_per_s", "compile_s", "peak_memory_bytes"):
        assert figures[name] > 0, name
    assert figures["tokens_per_s"] == pytest.approx(figures["seq_per_s"] * 32, rel=0.01)
    # The two batches' tokens that are not padding, over the median step.
    real = np.mean([np.count_nonzero(synthetic_batch(seed, 8, 32, 30522, 5, instances_per_row=3)
                                     ["input_mask"]) for seed in (0, 1)])
    assert figures["real_tokens_per_s"] == pytest.approx(real / figures["step_ms"] * 1000,
                                                         rel=0.01)
    assert figures["mfu"] is None and figures["device"] == "cpu"  # no known CPU peak
    assert (figures["batch"], figures["seq"], figures["predictions"], figures["scan"],
            figures["instances_per_row"]) == (8, 32, 5, True, 3)
    assert figures["attention"] == "xla"  # what `auto` runs on a CPU


def _fusions(hlo: str) -> list[tuple[str, set[str], bool]]:
    """(operands, ops, in the forward pass?) of every fusion of the compiled module's entry
    computation (backward ones carry `transpose(jvp(...))` in their op names)."""
    bodies = dict(re.findall(r"^%([\w.\-]+) \(.*?\) -> [^\n]*?\{\n(.*?)\n\}", hlo, re.M | re.S))
    entry = hlo[hlo.index("\nENTRY"):]
    shape = r"(?:\([^=]*?\)|\S+)"  # a tuple for multi-output fusions
    return [(operands, set(re.findall(r"= \S+ (\w+)\(", bodies[called])),
             "jvp(" in op_name and "transpose(" not in op_name)
            for operands, called, op_name in re.findall(
                rf"= {shape} fusion\((.*?)\), kind=\w+, calls=%([\w.\-]+)(?:.*?op_name=\"([^\"]*)\")?",
                entry)]


def test_compiled_train_step_fuses_what_the_model_intends():
    """The CPU train step's HLO: in the forward pass the up-projection's bias add and GELU
    are one fusion (not split into several passes), and each sub-layer's output bias,
    dropout and residual add are one fusion (LayerNorm's reductions follow in their own)."""
    config = benchmark.benchmark_config("tiny", 4, 32)
    step, state, batches, _ = benchmark.train_step_and_inputs(config, jax.local_devices()[:1])
    fusions = _fusions(step.lower(state, batches[0]).compile().as_text())

    # One forward pass over each layer's largest activation: bias add and all of GELU.
    reads_up_bias = [ops for operands, ops, forward in fusions
                     if forward and "mlp____up____bias" in operands]
    assert len(reads_up_bias) == config.model.num_layers
    assert all({"add", "erf", "multiply"} <= ops for ops in reads_up_bias)
    for sublayer in ("mlp____down", "attention____out"):
        bias_dropout_residual = [ops for operands, ops, forward in fusions
                                 if forward and f"{sublayer}____bias" in operands
                                 and {"select", "add", "compare"} <= ops]
        assert len(bias_dropout_residual) == config.model.num_layers, sublayer


def test_the_device_suite_records_each_kernels_figures_profile_and_failure():
    """The device check's code path on this CPU, on tiny cases, in a process of its own (as
    the command runs; TensorFlow's profiler, loaded by other tests, would share the trace):
    a run's figures and the top operations of its profile; a kernel that cannot run here
    (cuDNN) is recorded with its error and the suite goes on."""
    program = ("import json; from bert_jax import benchmark; print(json.dumps("
               "benchmark.run_suite(cases=(('tiny@64 packed', 'tiny', 8, 64, 3), "
               "('tiny@64', 'tiny', 8, 64, 1)), attentions=('cudnn',), steps=2, "
               "profile_steps=2)))")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    *progress, last = result.stdout.strip().splitlines()
    figures = json.loads(last)
    assert figures["device"] == "cpu" and len(progress) == 2  # a line per run, as it goes
    packed, unpacked = figures["results"]
    # cuDNN takes no segment ids in JAX 0.10: packed rows run the Pallas GPU kernel.
    assert (packed["case"], packed["asked"], packed["attention"]) == (
        "tiny@64 packed", "cudnn", "pallas")
    assert packed["step_ms"] > 0 and packed["real_tokens_per_s"] > 0
    assert 1 <= len(packed["profile"]) <= 12
    assert all(op["ms_per_step"] > 0 for op in packed["profile"])
    assert sum(op["share"] for op in packed["profile"]) <= 1.0
    assert unpacked["asked"] == "cudnn" and "cuDNN" in unpacked["error"]
