#!/usr/bin/env bash
# Submits main.py to a SLURM GPU cluster: one task per node, owning all the
# node's GPUs; jax.distributed.initialize() finds its peers from SLURM's
# environment (SLURM_NTASKS, SLURM_PROCID, SLURM_STEP_NODELIST).
#
#   launch/slurm.sh --nodes=N [--gpus-per-node=8] [--cpus-per-task=C] [--partition=P]
#       [--time=D-HH:MM:SS] [--account=A] [--job-name=biovfm] [--log-dir=slurm-logs]
#       [--stage-shards=SRC:DIR] [--sbatch-arg=ARG ...] [--dry-run]
#       -- --config=configs/vit_l_mae.py --workdir=/shared/runs/vit_l [--config.x=y ...]
#       [--then-evaluate --config=configs/eval/medmnist_linear.py --checkpoint=... ...]
#
# Writes the batch script to LOG_DIR/JOB_NAME-<time>.sbatch and submits it with
# sbatch; the job's output goes to LOG_DIR/JOB_NAME-<job id>.out. --dry-run
# prints the script, then the sbatch command, and writes and submits nothing.
#
# The script asks for --ntasks-per-node=1 --gpus-per-node=G --cpus-per-task=C
# (default 8 per GPU, for grain's decoding) and --exclusive, and runs
# `srun python main.py ...` from this checkout (it must be on a file system
# the nodes share; so must --workdir, or use gs://). It sets, unless already set
# in the submitting shell (sbatch passes its environment on):
#   JAX_LOCAL_DEVICE_IDS=0,...,G-1  the one process per node drives every GPU
#                                   (jax's SLURM detection would otherwise give
#                                   each process only GPU number SLURM_LOCALID)
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90  preallocate 90% of GPU memory (jax: 75%)
#   XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true  overlap
#                                   collectives with compute
#   NCCL_DEBUG=WARN                 NCCL problems reach the log
# Network choices are the cluster's: export NCCL_SOCKET_IFNAME, NCCL_IB_HCA ...
# before submitting when its documentation asks for them.
# --stage-shards=SRC:DIR copies shards to DIR on every node first (rsync -a from
# a shared path, or gcloud storage rsync from gs://); pass --config.data.shards=DIR.
# Time limit and preemption: SLURM sends SIGTERM 300 s before --time (main.py
# checkpoints and exits); the job is requeueable and resumes from --workdir.
# --then-evaluate (after main.py's flags): the words after it are evaluate.py's
# flags; the job runs it on one node once main.py exits 0 (a sweep's jobs pass
# --config.results.finished_only=True, so a preempted run is not scored).
# PYTHON: the interpreter on the nodes (default: python, from the submitting
# shell's PATH, e.g. its venv).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "slurm.sh: $*" >&2; exit 2; }
warn() { echo "slurm.sh: warning: $*" >&2; }

nodes="" gpus=8 cpus="" partition="" time_limit="" account="" job_name=biovfm
log_dir=slurm-logs stage="" dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --cpus-per-task=*) cpus="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --log-dir=*) log_dir="${1#*=}" ;;
    --stage-shards=*) stage="${1#*=}" ;;
    --sbatch-arg=*) extra+=("${1#*=}") ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown flag $1 (main.py's flags go after --; see --help)" ;;
  esac
  shift
done
main_args=("$@")
eval_args=() then_evaluate=0
for (( i = 0; i < ${#main_args[@]}; i++ )); do
  if [[ "${main_args[$i]}" == --then-evaluate ]]; then
    eval_args=("${main_args[@]:$((i + 1))}") main_args=("${main_args[@]:0:$i}") then_evaluate=1
    break
  fi
done

is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
[[ -n "$nodes" ]] || die "--nodes=N is required"
is_int "$nodes" || die "--nodes=$nodes: a positive integer"
is_int "$gpus" || die "--gpus-per-node=$gpus: a positive integer"
[[ -n "$cpus" ]] || cpus=$(( 8 * gpus ))
is_int "$cpus" || die "--cpus-per-task=$cpus: a positive integer"
[[ "$job_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job-name=$job_name: letters, digits, . _ -"
config="" workdir=""
for (( i = 0; i < ${#main_args[@]}; i++ )); do
  case "${main_args[$i]}" in
    --config=*) config="${main_args[$i]#*=}" ;;
    --config) config="${main_args[$((i + 1))]:-}" ;;
    --workdir=*) workdir="${main_args[$i]#*=}" ;;
    --workdir) workdir="${main_args[$((i + 1))]:-}" ;;
  esac
done
[[ -n "$config" ]] || die "main.py needs --config=configs/...py (after --)"
[[ -n "$workdir" ]] || die "main.py needs --workdir=DIR (after --), on a file system all nodes share"
if [[ "$workdir" != /* && "$workdir" != *://* ]]; then
  warn "--workdir=$workdir is relative: it is taken from $(pwd) on every node, which must be shared"
fi
stage_src="" stage_dir=""
if [[ -n "$stage" ]]; then
  stage_src="${stage%:*}" stage_dir="${stage##*:}"
  [[ "$stage" == *:* && -n "$stage_src" && "$stage_dir" == /* && "$stage_dir" != //* ]] ||
    die "--stage-shards=$stage: SRC:DIR with DIR an absolute path on the nodes"
fi

repo=$(pwd)
[[ "$log_dir" == /* ]] || log_dir="$repo/$log_dir"
device_ids=$(seq -s, 0 $(( gpus - 1 )))
q() { printf '%q' "$1"; }

script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$gpus"
  echo "#SBATCH --cpus-per-task=$cpus"
  echo "#SBATCH --exclusive"
  [[ -z "$partition" ]] || echo "#SBATCH --partition=$partition"
  [[ -z "$account" ]] || echo "#SBATCH --account=$account"
  [[ -z "$time_limit" ]] || echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$log_dir/%x-%j.out"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --signal=TERM@300"
  echo "#SBATCH --requeue"
  local arg
  for arg in "${extra[@]}"; do echo "#SBATCH $arg"; done
  echo "set -euo pipefail"
  echo "cd $(q "$repo")"
  echo "export JAX_LOCAL_DEVICE_IDS=\${JAX_LOCAL_DEVICE_IDS:-$device_ids}"
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
  echo "export XLA_FLAGS=\"--xla_gpu_enable_latency_hiding_scheduler=true \${XLA_FLAGS:-}\""
  echo "export NCCL_DEBUG=\${NCCL_DEBUG:-WARN}"
  echo "echo \"job \$SLURM_JOB_ID: \$SLURM_NNODES nodes (\$SLURM_JOB_NODELIST), $gpus GPUs each\""
  if [[ -n "$stage" ]]; then
    local copy
    if [[ "$stage_src" == gs://* ]]; then
      copy="gcloud storage rsync --recursive $(q "$stage_src") $(q "$stage_dir")"
    else
      copy="rsync -a $(q "${stage_src%/}/") $(q "$stage_dir/")"
    fi
    echo "srun --ntasks-per-node=1 bash -c $(q "mkdir -p $(q "$stage_dir") && $copy")"
  fi
  echo "srun --ntasks-per-node=1 --gpus-per-node=$gpus --cpus-per-task=$cpus --gpu-bind=none" \
       "--kill-on-bad-exit=1 $(q "${PYTHON:-python}") main.py $(printf '%q ' "${main_args[@]}")"
  if [[ $then_evaluate == 1 ]]; then
    echo "srun --nodes=1 --ntasks=1 --gpus-per-node=$gpus --cpus-per-task=$cpus --gpu-bind=none" \
         "$(q "${PYTHON:-python}") evaluate.py $(printf '%q ' "${eval_args[@]}")"
  fi
}

file="$log_dir/$job_name-$(date -u +%Y%m%d-%H%M%S).sbatch"
submit=(sbatch --parsable "$file")
if [[ $dry_run == 1 ]]; then
  echo "# $file"
  script
  echo "# end of $file"
  printf '%q ' "${submit[@]}"; echo
  exit 0
fi
mkdir -p "$log_dir"
script > "$file"
echo "slurm.sh: wrote $file" >&2
job=$("${submit[@]}")
echo "slurm.sh: submitted job $job; follow it with: tail -F $log_dir/$job_name-$job.out" >&2
echo "$job"
