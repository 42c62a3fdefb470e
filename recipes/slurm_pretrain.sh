#!/bin/bash
# SimMIM pretraining on a SLURM cluster: 2 nodes × 8 GPUs, one task per GPU.
# Submit from the simmim-cli checkout:   sbatch recipes/slurm_pretrain.sh
# Resubmitting the same script continues the run (--resume auto); SLURM's SIGTERM before the time limit
# makes every rank finish its step and rank 0 save a checkpoint.
#SBATCH --job-name=simmim-swin-b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
# every task joins one process group: rank and world size come from SLURM, the rendezvous from node 0
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}

srun python -m simmim_cli pretrain \
  --recipe recipes/pretrain_swin_base_192_w6_800ep.yaml \
  --data /datasets/imagenet-shards/train \
  --output runs/swin-b-192-800ep \
  --resume auto \
  --workers 8
