#!/usr/bin/env bash
# bert-jax pretrain on one host with all its GPUs: one process drives every GPU (JAX's
# single-controller mode within a host), so no distributed runtime is involved.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [OPTIONS] [-- BERT_JAX_PRETRAIN_ARGS...]

Runs `bert-jax pretrain ARGS` as one process on this host's GPUs, e.g.
  launch/gpu.sh --install -- --config=configs/pods/base.py:8xh100 --workdir=runs/base
(8xh200 on a host with 8 H200s.) The run resumes from its workdir when started again.

Sets the environment of launch/gpu_env.sh (shared with launch/slurm.sbatch): XLA's GPU flags
for throughput as MaxText sets them (latency-hiding scheduler, pipelined collectives, larger
combined collectives, cuBLAS matmuls), 90% of each GPU's memory for JAX, NCCL_DEBUG=WARN;
XLA_FLAGS and the others already set in the environment win.

options:
  --gpus LIST   GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
  --install     first pip-install this checkout with JAX's CUDA 12 wheels (.[cuda])
  --dry-run     print the commands and exit
  -h, --help    show this help
EOF
}

die() {
  echo "gpu.sh: error: $*" >&2
  exit 2
}

gpus=""
install=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) gpus=${2:-}; shift 2 || die "--gpus needs a value" ;;
    --install) install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
if [[ -n $gpus && ! $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus $gpus: expected comma-separated GPU indices, e.g. 0,1,2,3"
fi

launch=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$launch")
gpu_environment=()
# shellcheck source=gpu_env.sh disable=SC1091  # followed with shellcheck -x
source "$launch/gpu_env.sh"
[[ -n $gpus ]] && gpu_environment+=("CUDA_VISIBLE_DEVICES=$gpus")

run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

((install)) && run python3 -m pip install "${repo}[cuda]"
run env "${gpu_environment[@]}" bert-jax pretrain "$@"
