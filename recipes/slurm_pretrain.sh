#!/bin/bash
# SimMIM pretraining on a SLURM cluster: 2 nodes × 8 GPUs.
# Submit from the simmim-cli checkout:   sbatch recipes/slurm_pretrain.sh
# Resubmitting the same script continues the run (--resume auto); SLURM's SIGTERM 5 minutes before the time
# limit makes every rank finish its step and rank 0 save a checkpoint.
#
# Two ways to start the processes; pick one with LAUNCH=srun (default) or LAUNCH=simmim:
#   srun    one SLURM task per GPU; each task joins the job from SLURM's variables (SLURM_PROCID, ...) and
#           takes GPU local_rank % visible GPUs, so --gpus-per-task=1 works as well as --gpus-per-node=8.
#   simmim  one SLURM task per node; `simmim pretrain --gpus 8 --nnodes 2` starts the 8 processes of each node
#           itself (explicit --gpus ignores SLURM's task variables).
#SBATCH --job-name=simmim-swin-b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
# Loader processes default to the task's cores minus one (11 here); --workers overrides.
ARGS=(--recipe recipes/pretrain_swin_base_192_w6_800ep.yaml --data /datasets/imagenet-shards/train
      --output runs/swin-b-192-800ep --resume auto)

if [ "${LAUNCH:-srun}" = srun ]; then
  srun python -m simmim_cli pretrain "${ARGS[@]}" --device cuda
else
  srun --ntasks-per-node=1 --cpus-per-task=96 bash -c \
    'python -m simmim_cli pretrain "$@" --gpus 8 --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
       --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"' _ "${ARGS[@]}"
fi
