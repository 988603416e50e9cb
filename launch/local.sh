#!/usr/bin/env bash
# Runs the pretraining binary on this machine.
#
#   launch/local.sh [--cpu-devices=N] [--dry-run] -- --config=configs/quickstart.py --workdir=/tmp/qs [--config.x=y ...]
#
# --cpu-devices=N splits the CPU into N XLA devices, to try a data x fsdp x tensor
# mesh on a laptop exactly as it will run on a pod (e.g. --config.mesh.fsdp=4).
set -euo pipefail
cd "$(dirname "$0")/.."
devices="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-devices=*) devices="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
env_prefix=()
if [[ -n "$devices" ]]; then
  env_prefix=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}")
fi
cmd=("${env_prefix[@]}" python main.py "$@")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
