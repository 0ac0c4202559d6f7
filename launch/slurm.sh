#!/usr/bin/env bash
# jaxkd on a SLURM GPU cluster: one process per node (driving all its GPUs) or per GPU, joined by
# jax.distributed through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
#
#   launch/slurm.sh --nodes=4 CONFIG WORKDIR [--config.field=value ...]   # submits with sbatch
#   launch/slurm.sh --nodes=2 --per-gpu --chain=3 --dry-run configs/cifar_kd.py /shared/runs/kd \
#       --config.data.dir=/shared/tfds '--config.student.kwargs.widths=(16, 32, 64)'
#   sbatch --nodes=2 launch/slurm.sh CONFIG WORKDIR [...]                # or submit it yourself
#
# Outside an allocation the script submits itself (sbatch); inside one (SLURM_JOB_ID is set: the
# batch job, or salloc) it starts the processes with srun. Submission options: --nodes (1),
# --gpus-per-node (8), --per-gpu (one process per GPU instead of per node), --cpus-per-node (32),
# --time (24:00:00), --partition, --account, --job-name (jaxkd), --chain=K (K jobs one after
# another, --dependency=singleton: each resumes where the previous one's time limit stopped it),
# --sbatch=OPTION (any other sbatch option, repeatable). Both modes: --port (coordinator port;
# default 20000 + job id mod 20000), --python (the interpreter; default python: activate the
# environment before submitting, sbatch passes it on), --dry-run (print the sbatch, or the
# export and srun commands, one per line, instead of running them).
#
# The coordinator is the job's first node. SLURM sends SIGTERM 120 s before the time limit
# (--signal=TERM@120): the trainer checkpoints and exits, and the next job of a --chain (or the
# same command submitted again) continues from WORKDIR's last checkpoint. WORKDIR and the data
# must be on storage every node sees.
#SBATCH --job-name=jaxkd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "error: $0 needs bash 4.4 or newer" >&2
  exit 2
fi

usage() {
  sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# A word the shell reads back unchanged (as Python's shlex.quote).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local escaped="'\\''"
    printf "'%s'" "${1//\'/$escaped}"
  fi
}

quote_all() {
  local separator="" word
  for word in "$@"; do
    printf '%s%s' "$separator" "$(quote "$word")"
    separator=" "
  done
}

# Runs a command, or under --dry-run prints it, quoted, on one line.
execute() {
  if ((dry_run)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

nodes=1 gpus_per_node=8 per_gpu=0 cpus_per_node=32 time_limit=24:00:00 partition="" account=""
job_name=jaxkd chain=1 port="" python=python dry_run=0
extra_sbatch=() submit_options=() positional=() overrides=()
while (($#)); do
  case $1 in
    --nodes=* | --gpus-per-node=* | --cpus-per-node=* | --time=* | --partition=* | --account=* | \
      --job-name=* | --chain=* | --sbatch=* | --port=* | --python=*)
      option=${1%%=*} value=${1#*=} ;;
    --nodes | --gpus-per-node | --cpus-per-node | --time | --partition | --account | --job-name | \
      --chain | --sbatch | --port | --python)
      (($# >= 2)) || die "$1 needs a value"
      option=$1 value=$2
      shift ;;
    --per-gpu) per_gpu=1 option="" submit_options+=("$1") ;;
    --dry-run) dry_run=1 option="" ;;
    -h | --help) usage; exit 0 ;;
    --config.*) overrides+=("$1") option="" ;;
    --) shift; overrides+=("$@"); break ;;
    -*) die "unknown option $1 (jaxkd.main's own flags go after --)" ;;
    *) positional+=("$1") option="" ;;
  esac
  case $option in
    --port) port=$value ;;
    --python) python=$value ;;
    "") ;;
    *) submit_options+=("$option") ;;
  esac
  case $option in
    --nodes) nodes=$value ;;
    --gpus-per-node) gpus_per_node=$value ;;
    --cpus-per-node) cpus_per_node=$value ;;
    --time) time_limit=$value ;;
    --partition) partition=$value ;;
    --account) account=$value ;;
    --job-name) job_name=$value ;;
    --chain) chain=$value ;;
    --sbatch) extra_sbatch+=("$value") ;;
  esac
  shift
done
((${#positional[@]} == 2)) || { usage >&2; exit 2; }
config=${positional[0]} workdir=${positional[1]}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  # Submit: this script again, as the batch job, with the options that apply inside it.
  tasks_per_node=$((per_gpu ? gpus_per_node : 1))
  sbatch_args=(
    --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
    --gpus-per-node="$gpus_per_node" --cpus-per-task=$((cpus_per_node / tasks_per_node))
    --time="$time_limit" --signal=TERM@120 --output=%x-%j.out
  )
  [[ -z $partition ]] || sbatch_args+=(--partition="$partition")
  [[ -z $account ]] || sbatch_args+=(--account="$account")
  ((chain == 1)) || sbatch_args+=(--dependency=singleton)
  job_args=()
  [[ -z $port ]] || job_args+=(--port="$port")
  [[ $python == python ]] || job_args+=(--python="$python")
  for ((job = 0; job < chain; job++)); do
    execute sbatch "${sbatch_args[@]}" "${extra_sbatch[@]}" "${BASH_SOURCE[0]}" "${job_args[@]}" \
      "$config" "$workdir" "${overrides[@]}"
  done
  exit 0
fi

# Inside the allocation: the allocation says how many processes run where.
((${#submit_options[@]} == 0)) ||
  die "${submit_options[*]}: submission options; inside an allocation, pass them to sbatch/salloc"
num_processes=${SLURM_NTASKS:-1}
# Each process's environment, set by its own shell: its rank, and under one process per GPU, its
# GPU (SLURM_PROCID, SLURM_LOCALID are per task).
# shellcheck disable=SC2016  # Expanded in each task.
task_setup='export JAX_PROCESS_ID=$SLURM_PROCID'
if ((num_processes > ${SLURM_JOB_NUM_NODES:-1})); then
  # shellcheck disable=SC2016
  task_setup+='; export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID'
fi
if ((num_processes > 1)); then
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  coordinator=${hosts%%$'\n'*}:${port:-$((20000 + SLURM_JOB_ID % 20000))}
  execute export JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$num_processes"
else
  task_setup=:  # One process: no jax.distributed.
fi
srun_args=(--kill-on-bad-exit=1)
# srun does not inherit the job's --cpus-per-task (SLURM ≥ 22.05).
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
execute srun "${srun_args[@]}" bash -c "$task_setup; exec \"\$@\"" jaxkd \
  "$python" -m jaxkd.main --config="$config" --workdir="$workdir" "${overrides[@]}"
