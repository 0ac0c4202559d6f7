#!/usr/bin/env bash
# Runs a jaxkd config on a Cloud TPU VM, on every host of the slice at once.
#
#   launch/tpu_vm.sh my-tpu us-central2-b configs/cifar_kd.py /mnt/runs/r32x4_r8x4 \
#       --config.teacher.checkpoint=/mnt/teachers/resnet32x4 --config.data.dir=/mnt/tfds
#
# Copies this checkout to ~/jaxkd on every host, installs it with jax[tpu], and starts
# `python -m jaxkd.main` there in the background (log: ~/jaxkd/run.log on each host). The
# TPU VM must exist (`gcloud compute tpus tpu-vm create`). On a multi-host slice, JAX finds
# its peers itself (`--config.distributed=auto`); WORKDIR and the data directory must then be
# on storage every host sees (a Filestore / GCS FUSE mount). Running the script again resumes
# from WORKDIR's latest checkpoint.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
cd "$(dirname "$0")/.."
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
tar czf "$archive" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ .
ssh() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }
gcloud compute tpus tpu-vm scp "$archive" "$tpu":jaxkd.tar.gz --zone="$zone" --worker=all
ssh "mkdir -p ~/jaxkd && tar xzf ~/jaxkd.tar.gz -C ~/jaxkd && pip install -q -e ~/jaxkd'[tpu]'"
ssh "cd ~/jaxkd && nohup python -m jaxkd.main --config=$config --workdir=$workdir \
  --config.distributed=auto $* > run.log 2>&1 &"
echo "started on every host of $tpu; follow with: gcloud compute tpus tpu-vm ssh $tpu" \
  "--zone=$zone --worker=0 --command='tail -f ~/jaxkd/run.log'"
