#!/usr/bin/env bash
# jaxkd on a Cloud TPU VM: create it, copy this checkout to every host, install, run, follow,
# resume, stop, delete. Every command runs on all hosts of the slice (--worker=all).
#
#   launch/tpu_vm.sh create  --name=kd --zone=us-central2-b --accelerator-type=v4-32 [--spot]
#   launch/tpu_vm.sh sync    --name=kd --zone=us-central2-b     # this checkout → ~/jaxkd, all hosts
#   launch/tpu_vm.sh install --name=kd --zone=us-central2-b     # Python 3.11 venv + jaxkd[tpu]
#   launch/tpu_vm.sh run     --name=kd --zone=us-central2-b configs/cifar_kd.py /mnt/runs/kd \
#       --config.data.dir=/mnt/tfds '--config.student.kwargs.widths=(16, 32, 64)'
#   launch/tpu_vm.sh logs    --name=kd --zone=us-central2-b     # follow worker 0's log to the end
#   launch/tpu_vm.sh stop    --name=kd --zone=us-central2-b     # SIGTERM: it checkpoints, exits
#   launch/tpu_vm.sh resume  --name=kd --zone=us-central2-b     # the last `run` again: continues
#   launch/tpu_vm.sh delete  --name=kd --zone=us-central2-b [--queued]
#
# Options: --name (required), --zone and --project (default: gcloud's configuration),
# --accelerator-type (v4-8), --version (runtime; default by TPU generation), --spot, --queued
# (create through `gcloud compute tpus queued-resources`, which waits for capacity),
# --python (3.11), --worker (logs: 0 or all), --wait (run, resume: follow the log until the run
# ends, exit with its status), --dry-run (print the commands, one per line, instead of running
# them). `run CONFIG WORKDIR`: they and the --config.* overrides (and anything after `--`) reach
# `python -m jaxkd.main` unchanged, each quoted for the remote shell.
#
# The run starts in the background on every host (log ~/jaxkd-run.log, exit status
# ~/jaxkd-run.rc) with --config.distributed=auto, so the hosts find each other; WORKDIR and the
# data must be on storage all hosts see (a Filestore or GCS FUSE mount). `resume` replays
# the command `run` recorded on this machine (~/.local/state/jaxkd/tpu_vm/NAME.cmd), also on a
# VM re-created after a spot preemption (create, sync, install, resume): jaxkd continues from
# WORKDIR's last checkpoint.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "error: $0 needs bash 4.4 or newer (macOS: brew install bash)" >&2
  exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
state_dir=${XDG_STATE_HOME:-$HOME/.local/state}/jaxkd/tpu_vm

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
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

subcommand="" name="" zone="" project="" accelerator_type="v4-8" version="" python="3.11"
worker=0 spot=0 queued=0 wait=0 dry_run=0
positional=() overrides=()
while (($#)); do
  case $1 in
    --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --python=* | \
      --worker=*)
      option=${1%%=*} value=${1#*=} ;;
    --name | --zone | --project | --accelerator-type | --version | --python | --worker)
      (($# >= 2)) || die "$1 needs a value"
      option=$1 value=$2
      shift ;;
    --spot) spot=1 option="" ;;
    --queued) queued=1 option="" ;;
    --wait) wait=1 option="" ;;
    --dry-run) dry_run=1 option="" ;;
    -h | --help) usage; exit 0 ;;
    --config.*) overrides+=("$1") option="" ;;
    --) shift; overrides+=("$@"); break ;;
    -*) die "unknown option $1 (jaxkd.main's own flags go after --)" ;;
    *)
      if [[ -z $subcommand ]]; then subcommand=$1; else positional+=("$1"); fi
      option="" ;;
  esac
  case $option in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --project) project=$value ;;
    --accelerator-type) accelerator_type=$value ;;
    --version) version=$value ;;
    --python) python=$value ;;
    --worker) worker=$value ;;
  esac
  shift
done

[[ -n $subcommand ]] || { usage >&2; exit 2; }
[[ -n $name ]] || die "--name=TPU_NAME is required"
scope=()  # gcloud's defaults (gcloud config, CLOUDSDK_*) where not given
[[ -z $zone ]] || scope+=(--zone="$zone")
[[ -z $project ]] || scope+=(--project="$project")
if [[ -z $version ]]; then  # The runtime each TPU generation boots with.
  case $accelerator_type in
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

on_hosts() {  # on_hosts WORKER REMOTE_COMMAND
  execute gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker="$1" --command="$2"
}

# Remote side: command text for the hosts' shell, whose `$HOME`, `$(...)` and `$!` these are.
# The run is a session of its own (setsid), so `stop` signals the trainer and its wrapper
# together; the wrapper waits for the trainer and records its exit status.
# shellcheck disable=SC2016  # Expanded on the hosts.
remote_home='$HOME'
venv=$remote_home/jaxkd-venv
pid_file=$remote_home/jaxkd-run.pid
rc_file=$remote_home/jaxkd-run.rc
log_file=$remote_home/jaxkd-run.log
is_running="[ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null"
follow="[ -f $pid_file ] || { echo \"no jaxkd run on \$(hostname)\" >&2; exit 1; }; \
tail -n +1 -F --pid=\"\$(cat $pid_file)\" $log_file; \
exit \"\$(cat $rc_file 2>/dev/null || echo 1)\""

start_command() {  # The remote command of `run CONFIG WORKDIR OVERRIDES...`
  local config=$1 workdir=$2
  shift 2
  local main
  main=$(quote_all -m jaxkd.main --config="$config" --workdir="$workdir" \
    --config.distributed=auto "$@")
  printf '%s' "if $is_running; then \
echo \"a jaxkd run is running on \$(hostname): stop it first\" >&2; exit 1; fi; \
cd ~/jaxkd && rm -f $rc_file && \
{ setsid nohup bash -c 'trap : TERM; \"\$@\"; echo \$? > $rc_file' jaxkd-run \
\"$venv/bin/python\" $main > $log_file 2>&1 < /dev/null & echo \$! > $pid_file; }"
}

source_record() {  # The checkout's git state, as jaxkd.provenance.git_state records it.
  local toplevel commit dirty=false diff=null
  toplevel=$(git -C "$repo" rev-parse --show-toplevel 2> /dev/null) || return 0
  [[ $toplevel == "$repo" ]] || return 0  # Not a checkout of its own.
  commit=$(git -C "$repo" rev-parse --verify -q HEAD) || return 0
  if [[ -n $(git -C "$repo" status --porcelain) ]]; then
    dirty=true
    diff=\"$(git -C "$repo" diff HEAD | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-12)\"
  fi
  printf '{"commit": "%s", "dirty": %s, "diff": %s}' "$commit" "$dirty" "$diff"
}

case $subcommand in
  create)
    spot_flag=()
    ((spot)) && spot_flag=(--spot)
    if ((queued)); then
      execute gcloud compute tpus queued-resources create "$name" "${scope[@]}" --node-id="$name" \
        --accelerator-type="$accelerator_type" --runtime-version="$version" "${spot_flag[@]}"
    else
      execute gcloud compute tpus tpu-vm create "$name" "${scope[@]}" \
        --accelerator-type="$accelerator_type" --version="$version" "${spot_flag[@]}"
    fi ;;
  sync)
    archive=${TMPDIR:-/tmp}/jaxkd-$name.tar.gz
    execute tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis --exclude=.ruff_cache \
      -C "$repo" .
    execute gcloud compute tpus tpu-vm scp "$archive" "$name:jaxkd.tar.gz" "${scope[@]}" \
      --worker=all
    unpack='rm -rf ~/jaxkd && mkdir -p ~/jaxkd && tar -xzf ~/jaxkd.tar.gz -C ~/jaxkd'
    unpack+=' && rm ~/jaxkd.tar.gz'
    record=$(source_record)
    if [[ -n $record ]]; then  # The copy has no .git: provenance reads the commit from here.
      unpack+=" && printf '%s\\n' $(quote "$record") > ~/jaxkd/.jaxkd_source.json"
    fi
    on_hosts all "$unpack"
    execute rm -f "$archive" ;;
  install)
    # TPU VM images ship an older Python: uv provides $python beside it, in its own venv.
    on_hosts all "export PATH=\"\$HOME/.local/bin:\$PATH\" && \
{ command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } && \
uv python install $(quote "$python") && \
uv venv --allow-existing --python $(quote "$python") $venv && \
uv pip install --python $venv/bin/python -e \"\$HOME/jaxkd[tpu]\"" ;;
  run)
    ((${#positional[@]} == 2)) || die "run needs CONFIG and WORKDIR (then --config.field=value ...)"
    command=$(start_command "${positional[@]}" "${overrides[@]}")
    on_hosts all "$command"
    if ((!dry_run)); then
      mkdir -p "$state_dir"
      printf '%s\n' "$command" > "$state_dir/$name.cmd"
    fi
    ((!wait)) || on_hosts 0 "$follow" ;;
  resume)
    [[ -f $state_dir/$name.cmd ]] || die "no run of $name recorded in $state_dir: start it with run"
    on_hosts all "$(< "$state_dir/$name.cmd")"
    ((!wait)) || on_hosts 0 "$follow" ;;
  logs)
    on_hosts "$worker" "$follow" ;;
  stop)
    on_hosts all "if $is_running; then kill -TERM -- -\"\$(cat $pid_file)\"; \
for _ in \$(seq 600); do $is_running || break; sleep 1; done; \
if $is_running; then echo \"still running on \$(hostname) after 600 s\" >&2; exit 1; fi; \
echo \"stopped on \$(hostname)\"; else echo \"no jaxkd run on \$(hostname)\"; fi" ;;
  delete)
    if ((queued)); then
      execute gcloud compute tpus queued-resources delete "$name" "${scope[@]}" --force
    else
      execute gcloud compute tpus tpu-vm delete "$name" "${scope[@]}"
    fi ;;
  *) die "unknown subcommand $subcommand: create, sync, install, run, resume, logs, stop, delete" ;;
esac
