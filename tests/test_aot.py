"""Ahead-of-time lowering and compilation for TPUs and GPUs on this CPU machine: accelerator
types to JAX topologies, and the fused attention kernels each lowered step runs (the test
extra installs libtpu for the TPU topologies and compiler)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bert_jax.aot import fused_attention_calls, lower_train_step, topology_name
from bert_jax.config import default_config

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("accelerator_type, topology", [
    ("v5e-16", "v5e:4x4"), ("v5litepod-64", "v5e:8x8"), ("v4-32", "v4:2x2x4"),
    ("v4-8", "v4:2x2x1"), ("v5p-128", "v5p:4x4x4"), ("v6e-256", "v6e:16x16"),
])
def test_accelerator_types_map_to_topologies_with_their_chip_count(accelerator_type, topology):
    assert topology_name(accelerator_type) == topology


@pytest.mark.parametrize("accelerator_type, words", [
    ("v9-8", "expected e.g. v4-32"), ("v5e-12", "12 chips"), ("v4-3", "1 chips"),
])
def test_unknown_types_and_shapes_are_refused(accelerator_type, words):
    with pytest.raises(ValueError, match=words):
        topology_name(accelerator_type)


def _base(instances_per_row: int):
    """BERT-base in bfloat16 at length 128, rows packed with up to `instances_per_row`."""
    config = default_config("base")
    config.model.dtype = "bfloat16"
    config.data.update(vocab_size=30522, max_seq_length=128, max_predictions_per_seq=20,
                       instances_per_row=instances_per_row)
    config.train.global_batch_size = 32
    return config


@pytest.mark.parametrize("instances_per_row", [1, 3], ids=["unpacked", "packed"])
def test_the_cuda_lowering_of_base_runs_the_pallas_gpu_kernel_without_cudnn(instances_per_row):
    lowered, kernel, _ = lower_train_step(_base(instances_per_row), "cuda")
    assert kernel == "pallas"  # this machine has no cuDNN for JAX to find
    assert fused_attention_calls(lowered.as_text()) == [
        "__gpu$xla.gpu.triton:mha_backward", "__gpu$xla.gpu.triton:mha_forward",
        "__gpu$xla.gpu.triton:mha_preprocess_backward"]


@pytest.mark.parametrize("instances_per_row, kernel, calls", [
    (1, "cudnn", ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]),
    (3, "pallas", ["__gpu$xla.gpu.triton:mha_backward", "__gpu$xla.gpu.triton:mha_forward",
                   "__gpu$xla.gpu.triton:mha_preprocess_backward"]),
], ids=["unpacked", "packed"])
def test_where_jax_finds_cudnn_the_cuda_lowering_of_base_runs_it_unpacked(
        monkeypatch, instances_per_row, kernel, calls):
    # The one fake: JAX's cuDNN version check (this machine has no cuDNN library to ask).
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    lowered, lowered_kernel, _ = lower_train_step(_base(instances_per_row), "cuda")
    assert lowered_kernel == kernel
    assert fused_attention_calls(lowered.as_text()) == calls


@pytest.mark.parametrize("instances_per_row", [1, 3], ids=["unpacked", "packed"])
def test_the_tpu_lowering_of_base_runs_splash_on_every_chip(instances_per_row):
    lowered, kernel, devices = lower_train_step(_base(instances_per_row), "v5e-16")
    assert kernel == "splash" and len(devices) == 16
    assert fused_attention_calls(lowered.as_text()) == [
        "tpu_custom_call:splash_mha_dkv_segmented_no_residuals",
        "tpu_custom_call:splash_mha_dq_segmented_no_residuals",
        "tpu_custom_call:splash_mha_fwd_segmented_residuals"]


def test_the_xla_path_lowers_no_fused_attention():
    config = _base(1)
    config.model.attention_impl = "xla"
    lowered, kernel, _ = lower_train_step(config, "cuda")
    assert kernel == "xla" and fused_attention_calls(lowered.as_text()) == []


def _compile_command(*args):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", "compile", *args],
                          capture_output=True, text=True, timeout=900)


def test_compile_for_cuda_prints_the_kernel_and_its_calls_for_each_phase():
    result = _compile_command("--platform=cuda", "--config.model.dtype=bfloat16",
                              "--config.train.phases=((0, 128, 20, 32), (5, 512, 80, 8, 1, 3))",
                              "--config.train.num_steps=10")
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert (first["target"], first["length"], first["attention"]) == ("cuda", 128, "pallas")
    assert (second["length"], second["instances_per_row"]) == (512, 3)
    for line in (first, second):
        assert "__gpu$xla.gpu.triton:mha_forward" in line["fused_attention"]
        assert "gib_per_chip" not in line  # lowered, not compiled: no memory figures


@pytest.mark.slow
def test_the_aot_table_compiles_splash_and_writes_memory_per_chip(tmp_path):
    """bench/aot_table.py, as docs/scale-out.md's table is made, on one small case: libtpu
    compiles the step, Splash's Mosaic kernels included, for a v5e-4 (BERT-tiny with 1 layer,
    packed at length 128, in bfloat16), and the table gets its row."""
    config = tmp_path / "tiny_packed.py"
    config.write_text(
        "from bert_jax.config import default_config\n\n\ndef get_config():\n"
        "    config = default_config('tiny')\n    config.model.dtype = 'bfloat16'\n"
        "    config.model.num_layers = 1\n"
        "    config.train.update(num_steps=10, phases=((0, 128, 20, 32, 1, 3),))\n"
        "    return config\n")
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- aot-table: bench/aot_table.py -->\nold\n<!-- /aot-table -->\n"
                   "after\n")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "aot_table.py"), "--case",
                             str(config), "v5e-4", "--write", str(doc)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.splitlines()[0])
    assert (line["target"], line["devices"], line["attention"]) == ("v5e:2x2", 4, "splash")
    assert "tpu_custom_call:splash_mha_fwd_segmented_residuals" in line["fused_attention"]
    total = line["gib_per_chip"]["total"]
    assert 0 < total < 16
    # 32 rows over 4 chips; the memory as compiled; then the rest of the file as it was.
    assert doc.read_text().splitlines()[4:] == [
        f"| {config} | v5e-4 | 128 | 8 | {total:.2f} ({line['gib_per_chip']['arguments']:.2f}, "
        f"{line['gib_per_chip']['temporaries']:.2f}) | splash | {line['seconds']:.0f} s |",
        "<!-- /aot-table -->", "after"]
