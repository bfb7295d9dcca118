# shellcheck shell=bash
# The environment of a bert-jax run on NVIDIA GPUs, shared by launch/gpu.sh and
# launch/slurm.sbatch: sourced (not run), it appends NAME=VALUE words for `env` to the
# caller's array `gpu_environment`. What the caller's environment already sets wins:
# XLA_FLAGS of its own come after these (XLA takes a flag's last value), the other variables
# are kept as they are.

# XLA's GPU flags for throughput, the ones MaxText's GPU configs set (src/maxtext/configs/gpu/,
# e.g. a3/llama_2_7b/8vm.sh), in the spelling of jax 0.10's XLA (MaxText's newer
# --xla_gpu_pipeline_all_gather=on and its kin do not exist there). Every one changes a default
# of jax 0.10; tests/test_launch.py checks that XLA knows each and takes it.
gpu_xla_flags=(
  # Schedule for overlap: the async collectives (gradient all-reduce, FSDP's gathers) run
  # while independent compute does. Off by default.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Let the collective pipeliner move a scanned layer's collectives into the neighbouring
  # iteration, where they overlap that layer's compute (reduce-scatter already is by
  # default) ...
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # ... and unroll the layer loop in pairs, so that there is a neighbouring iteration.
  --xla_gpu_enable_while_loop_double_buffering=true
  # Fewer, larger collectives (the defaults combine up to 30 MiB): BERT-base's float32
  # gradients (440 MB) go in one all-reduce. MaxText's values.
  --xla_gpu_all_reduce_combine_threshold_bytes=1073741824
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  # Matmuls by cuBLAS, not autotuned Triton GEMM fusions, and no CUDA graphs (command
  # buffers): MaxText's settings for its GPU runs.
  --xla_gpu_enable_triton_gemm=false
  --xla_gpu_enable_command_buffer=
)
# Left out of MaxText's list: --xla_disable_hlo_passes=rematerialization (the pod configs
# recompute layers themselves; XLA's pass stays as the fallback that fits a too-large
# micro-batch, more slowly, instead of failing to compile), and flags that only restate jax
# 0.10's defaults (--xla_gpu_enable_highest_priority_async_stream=true,
# --xla_gpu_enable_pipelined_reduce_scatter=true, --xla_gpu_enable_*_combine_by_dim=false).

# shellcheck disable=SC2034  # read by the scripts that source this file
gpu_environment+=(
  "XLA_FLAGS=${gpu_xla_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
  # JAX takes 90% of each GPU's memory up front (its default: 75%); the rest holds NCCL's
  # buffers (NVLink SHARP's too), cuDNN and cuBLAS workspaces and the CUDA context. Lower it
  # if NCCL or cuDNN run out of memory outside JAX's pool. (XLA_PYTHON_CLIENT_PREALLOCATE=false
  # allocates on demand instead: for debugging memory only, it fragments and is slower.)
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  # NCCL's warnings only. NCCL_DEBUG=INFO prints the topology, the rings and trees, the NICs
  # and transports NCCL picked: the first thing to read when a run hangs in its first
  # collective or is slower than it should be.
  "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
)
