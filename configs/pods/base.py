"""BERT-base with LAMB on English Wikipedia, phases 128 -> 512, sized for a TPU slice or GPUs:
pick the target after a colon (v4-32, v5e-16, v5e-64, v5p-128, 8xh100, 8xh200, 64xh200; see
`bert_jax.config.pod_config` for the batch, accumulation and mesh of each).

Build the data once where every worker reads it (gs:// for TPUs, a shared file system for a
GPU cluster), e.g.
  bert-jax prepare-data --config=configs/pods/base.py:v4-32 --config.data.data_dir=gs://B/data
Then, on a TPU v4-32 (spot capacity, restarted after preemptions):
  launch/tpu_vm.sh --name bert-base --zone us-central2-b --type v4-32 --spot --keep-alive \
      --workdir gs://B/runs/base -- --config=configs/pods/base.py:v4-32 \
      --config.data.data_dir=gs://B/data
on a v5e-64: --type v5litepod-64 --zone us-west4-a ... --config=configs/pods/base.py:v5e-64
on a v5p-128: --type v5p-128 --zone us-east5-a ... --config=configs/pods/base.py:v5p-128
on one host with 8 H100s (8xh200 for H200s):
  launch/gpu.sh --install -- --config=configs/pods/base.py:8xh100 --workdir=runs/base
on 8 SLURM nodes of 8 H200s, chained across time limits (docs/scale-out.md):
  sbatch --nodes=8 launch/slurm.sbatch -- --config=configs/pods/base.py:64xh200 \
      --config.data.data_dir=/shared/data --workdir=/shared/runs/base
"""

from bert_jax.config import pod_config


def get_config(target="v4-32"):
    return pod_config("base", target)
