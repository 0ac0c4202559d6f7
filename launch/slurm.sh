#!/usr/bin/env bash
# Runs a jaxkd config under SLURM: one process per node, each driving all of its GPUs.
#
#   sbatch launch/slurm.sh configs/cifar_kd.py /shared/runs/r32x4_r8x4 \
#       --config.teacher.checkpoint=/shared/teachers/resnet32x4 --config.data.dir=/shared/tfds
#   sbatch --nodes=4 launch/slurm.sh CONFIG WORKDIR [--config.x=y ...]   # multi-node
#
# WORKDIR must be on a filesystem every node sees. Submitting the same command again resumes
# from WORKDIR's latest checkpoint (e.g. after the time limit); a finished run only re-evaluates.
# With several nodes, `--config.distributed=auto` lets jax.distributed.initialize read the SLURM
# environment (coordinator = first node of the job).
#SBATCH --job-name=jaxkd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# sbatch runs a copy of this script from a spool directory: start from where it was submitted.
cd "${SLURM_SUBMIT_DIR:-.}"
srun python -m jaxkd.main --config="$config" --workdir="$workdir" \
  --config.distributed=auto "$@"
