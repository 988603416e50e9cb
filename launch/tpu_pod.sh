#!/usr/bin/env bash
# Runs main.py on every worker of a Cloud TPU pod slice (or of several slices).
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=v5p-128 [--slices=N]
#       [--runtime=VERSION] [--spot | --reserved] [--project=PROJECT]
#       [--skip-create] [--skip-setup] [--stage-shards=SRC:DIR] [--python=3.11]
#       [--tail] [--dry-run]
#       -- --config=configs/vit_l_mae.py --workdir=gs://BUCKET/RUN [--config.x=y ...]
#       [--then-evaluate --config=configs/eval/medmnist_linear.py --checkpoint=... ...]
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--slices=N] --logs|--stop|--delete
#
# Steps, each printed before it runs:
#  1. create   the queued resource NAME (one node NAME, or with --slices=N N nodes
#              over DCN), or reuse it; one SUSPENDED or FAILED (preempted) is
#              deleted and created again. Waits until it is ACTIVE.
#              --skip-create: use an existing queued resource or TPU VM NAME.
#  2. setup    `git archive` of HEAD (commit first: uncommitted edits are not
#              shipped), copied to every worker and unpacked in ~/biovfm-jax;
#              a venv ~/biovfm-venv (Python --python, made by uv) gets
#              `pip install -e ".[tpu]"`. --skip-setup skips this step.
#              --stage-shards=SRC:DIR then copies shards to DIR (absolute, or
#              ~/...) on every worker (gcloud storage rsync, incremental; pass
#              --config.data.shards=DIR).
#  3. start    main.py with the flags after `--` on all workers at once, under
#              nohup, logging to ~/biovfm-logs/main-<time>.log (latest.log links
#              to it) on each worker. --slices=N adds --config.mesh.slices=N.
#              --then-evaluate (after main.py's flags): the words after it are
#              evaluate.py's flags, run on every worker once main.py exits 0
#              (main.pid stays main.py's, for --stop).
#  4. --tail   follow worker 0's log (Ctrl-C stops following, not the run).
# Other actions: --logs follows worker 0's log; --stop sends SIGTERM to main.py on
# every worker (it checkpoints and exits); --delete deletes the queued resource.
# Run the same command again after a preemption: it re-creates the queued
# resource and main.py resumes from the latest checkpoint in --workdir.
#
# --runtime defaults by accelerator: v5p v2-alpha-tpuv5, v5litepod
# v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base.
# --dry-run prints every command (shell-quoted, one per line) and runs none.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
warn() { echo "tpu_pod.sh: warning: $*" >&2; }

name="" zone="" project="" accelerator="" runtime="" slices=1 tier="" python_version=3.11
skip_create=0 skip_setup=0 stage="" tail_log=0 dry_run=0 action=launch
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --spot) [[ "$tier" != reserved ]] || die "--spot and --reserved exclude each other"; tier=spot ;;
    --reserved) [[ "$tier" != spot ]] || die "--spot and --reserved exclude each other"; tier=reserved ;;
    --python=*) python_version="${1#*=}" ;;
    --skip-create) skip_create=1 ;;
    --skip-setup) skip_setup=1 ;;
    --stage-shards=*) stage="${1#*=}" ;;
    --tail) tail_log=1 ;;
    --logs) action=logs ;;
    --stop) action=stop ;;
    --delete) action=delete ;;
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

[[ -n "$name" ]] || die "--name=NAME is required (the queued resource / TPU VM)"
[[ -n "$zone" ]] || die "--zone=ZONE is required (e.g. us-east5-a for v5p)"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices=$slices: a positive integer"

# Commands: printed in --dry-run, echoed to stderr and run otherwise.
run() {
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    echo "+ $(printf '%q ' "$@")" >&2
    "$@"
  fi
}
project_flag=()
[[ -z "$project" ]] || project_flag=("--project=$project")
qr=(gcloud compute tpus queued-resources)
# ssh/scp to every worker: one slice is the TPU VM NAME; several slices are the
# nodes of queued resource NAME (--node=all).
if (( slices == 1 )); then
  ssh=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone" "${project_flag[@]}")
  scp=(gcloud compute tpus tpu-vm scp --zone="$zone" "${project_flag[@]}")
  all=(--worker=all)
  first=(--worker=0)
else
  ssh=("${qr[@]}" ssh "$name" "--zone=$zone" "${project_flag[@]}")
  scp=("${qr[@]}" scp --zone="$zone" "${project_flag[@]}")
  all=(--node=all --worker=all)
  first=(--node=0 --worker=0)
fi
logs="tail -n 200 -F ~/biovfm-logs/latest.log"

case "$action" in
  logs) run "${ssh[@]}" "${first[@]}" "--command=$logs"; exit ;;
  stop)
    run "${ssh[@]}" "${all[@]}" \
      '--command=if [ -f ~/biovfm-logs/main.pid ]; then kill -TERM "$(cat ~/biovfm-logs/main.pid)" 2>/dev/null || true; fi'
    exit ;;
  delete) run "${qr[@]}" delete "$name" "--zone=$zone" "${project_flag[@]}" --force --quiet; exit ;;
esac

# main.py's flags: --config and --workdir are required; the workdir must be one
# directory every worker sees (gs://), for orbax's collective checkpoints.
config="" workdir="" mesh_slices=""
for (( i = 0; i < ${#main_args[@]}; i++ )); do
  arg="${main_args[$i]}"
  case "$arg" in
    --config=*) config="${arg#*=}" ;;
    --config) config="${main_args[$((i + 1))]:-}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --workdir) workdir="${main_args[$((i + 1))]:-}" ;;
    --config.mesh.slices=*) mesh_slices="${arg#*=}" ;;
  esac
done
[[ -n "$config" ]] || die "main.py needs --config=configs/...py (after --)"
[[ -n "$workdir" ]] || die "main.py needs --workdir=gs://BUCKET/RUN (after --)"
if [[ "$workdir" != gs://* ]]; then
  warn "--workdir=$workdir is not a gs:// path: every worker would write to its own disk" \
       "(orbax needs one directory all hosts share) and it goes when the VMs go"
fi
if (( slices > 1 )); then
  if [[ -z "$mesh_slices" ]]; then
    main_args+=("--config.mesh.slices=$slices")
  elif [[ "$mesh_slices" != "$slices" ]]; then
    die "--slices=$slices but --config.mesh.slices=$mesh_slices"
  fi
elif [[ -n "$mesh_slices" && "$mesh_slices" != 1 ]]; then
  die "--config.mesh.slices=$mesh_slices needs --slices=$mesh_slices (the queued resource's node count)"
fi
# On TPU VMs jax.distributed.initialize() reads the workers (and slices) from the
# VM metadata. main.py's auto mode detects a multi-host slice there too;
# --distributed=on also covers a slice whose metadata server is slow to answer.
[[ " ${main_args[*]} " == *" --distributed"* ]] || main_args+=(--distributed=on)
stage_src="" stage_dir=""
if [[ -n "$stage" ]]; then
  stage_src="${stage%:*}" stage_dir="${stage##*:}"
  [[ "$stage" == *:* && -n "$stage_src" && "$stage_dir" =~ ^(/[^/]|~/). ]] ||
    die "--stage-shards=$stage: SRC:DIR with DIR an absolute path or ~/... on the workers"
fi
remote_path() {  # quoted for the workers' shell, a leading ~/ left to expand there
  if [[ "$1" == "~/"* ]]; then printf '~/%q' "${1#\~/}"; else printf '%q' "$1"; fi
}

# 1. The queued resource.
if [[ $skip_create == 0 ]]; then
  [[ -n "$accelerator" ]] || die "--accelerator=TYPE is required to create (e.g. v5p-128), or pass --skip-create"
  if [[ -z "$runtime" ]]; then
    case "$accelerator" in
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      v4-*) runtime=tpu-ubuntu2204-base ;;
      *) die "no default runtime for --accelerator=$accelerator: pass --runtime=VERSION" ;;
    esac
  fi
  if (( slices == 1 )); then nodes=("--node-id=$name"); else nodes=("--node-count=$slices"); fi
  create=("${qr[@]}" create "$name" "${nodes[@]}" "--zone=$zone" "--accelerator-type=$accelerator"
          "--runtime-version=$runtime" "${project_flag[@]}")
  [[ -z "$tier" ]] || create+=("--$tier")
  describe=("${qr[@]}" describe "$name" "--zone=$zone" "${project_flag[@]}" "--format=value(state.state)")
  if [[ $dry_run == 1 ]]; then
    run "${describe[@]}"  # exists? then reuse (or re-create when SUSPENDED / FAILED)
    run "${create[@]}"
    run "${describe[@]}"  # polled every 30 s until ACTIVE
  else
    echo "+ $(printf '%q ' "${describe[@]}")" >&2
    state=$("${describe[@]}" 2>/dev/null) || state=""
    case "$state" in
      "") run "${create[@]}" ;;
      SUSPENDED|SUSPENDING|FAILED)
        echo "tpu_pod.sh: queued resource $name is $state (preempted?): re-creating it" >&2
        run "${qr[@]}" delete "$name" "--zone=$zone" "${project_flag[@]}" --force --quiet
        run "${create[@]}" ;;
      DELETING)
        echo "tpu_pod.sh: queued resource $name is being deleted; waiting to re-create it" >&2
        while "${describe[@]}" >/dev/null 2>&1; do sleep 30; done
        run "${create[@]}" ;;
      *) echo "tpu_pod.sh: reusing queued resource $name ($state)" >&2 ;;
    esac
    last=""
    while true; do
      state=$("${describe[@]}") || die "cannot describe queued resource $name"
      [[ "$state" == "$last" ]] || echo "tpu_pod.sh: $name is $state" >&2
      last="$state"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $name is $state (gcloud compute tpus queued-resources describe $name --zone=$zone)" ;;
      esac
      sleep 30
    done
  fi
fi

# 2. Code and environment on every worker.
running_check='if [ -f ~/biovfm-logs/main.pid ] && kill -0 "$(cat ~/biovfm-logs/main.pid)" 2>/dev/null; then echo "main.py is running on $(hostname): launch/tpu_pod.sh --stop first" >&2; exit 1; fi'
if [[ $skip_setup == 0 ]]; then
  sha=$(git rev-parse --short HEAD 2>/dev/null) || die "not a git checkout: step 2 ships git HEAD"
  if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    warn "uncommitted changes are not shipped: the workers get HEAD ($sha)"
  fi
  tarball="${TMPDIR:-/tmp}/biovfm-jax-$sha.tar.gz"
  run git archive --format=tar.gz --prefix=biovfm-jax/ -o "$tarball" HEAD
  run "${scp[@]}" "$tarball" "$name:biovfm-jax.tar.gz" "${all[@]}"
  setup="$running_check; rm -rf ~/biovfm-jax && tar -xzf ~/biovfm-jax.tar.gz -C ~"
  setup+=" && cd ~/biovfm-jax && { [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  setup+=" && ~/.local/bin/uv venv --allow-existing --python=$(printf %q "$python_version") ~/biovfm-venv"
  setup+=" && ~/.local/bin/uv pip install --python=\$HOME/biovfm-venv/bin/python -e '.[tpu]'"
  run "${ssh[@]}" "${all[@]}" "--command=$setup"
fi
if [[ -n "$stage" ]]; then
  run "${ssh[@]}" "${all[@]}" \
    "--command=mkdir -p $(remote_path "$stage_dir") && gcloud storage rsync --recursive $(printf %q "$stage_src") $(remote_path "$stage_dir")"
fi

# 3. Start on all workers together (jax.distributed.initialize() finds its peers).
log="main-$(date -u +%Y%m%d-%H%M%S).log"
start="$running_check; cd ~/biovfm-jax && mkdir -p ~/biovfm-logs"
if [[ $then_evaluate == 0 ]]; then
  start+=" && { nohup ~/biovfm-venv/bin/python main.py $(printf '%q ' "${main_args[@]}")"
  start+="> ~/biovfm-logs/$log 2>&1 < /dev/null & echo \$! > ~/biovfm-logs/main.pid; }"
else  # main.py, then evaluate.py if it exited 0; the pid file names main.py
  chain="~/biovfm-venv/bin/python main.py $(printf '%q ' "${main_args[@]}")"
  chain+="& echo \$! > ~/biovfm-logs/main.pid"
  chain+="; wait \$! && exec ~/biovfm-venv/bin/python evaluate.py $(printf '%q ' "${eval_args[@]}")"
  start+=" && { nohup bash -c $(printf %q "$chain") > ~/biovfm-logs/$log 2>&1 < /dev/null & }"
fi
start+=" && ln -sfn $log ~/biovfm-logs/latest.log"
run "${ssh[@]}" "${all[@]}" "--command=$start"

# 4. Worker 0's log.
if [[ $tail_log == 1 ]]; then
  run "${ssh[@]}" "${first[@]}" "--command=$logs"
elif [[ $dry_run == 0 ]]; then
  echo "tpu_pod.sh: started; follow worker 0 with: launch/tpu_pod.sh --name=$name --zone=$zone" \
       "$( (( slices == 1 )) || echo "--slices=$slices ")--logs" >&2
fi
