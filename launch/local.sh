#!/usr/bin/env bash
# Runs the pretraining binary on this machine: one process, or several joined
# by jax.distributed exactly as the hosts of a pod are.
#
#   launch/local.sh [--cpu-devices=D] [--processes=P [--port=PORT]] [--dry-run]
#       -- --config=configs/quickstart.py --workdir=/tmp/qs [--config.x=y ...]
#
# --cpu-devices=D  split the CPU into D XLA devices, to try a data x fsdp x tensor
#                  mesh on a laptop exactly as it will run on a pod
#                  (e.g. --config.mesh.fsdp=4).
# --processes=P    start P processes of main.py (P > 1 needs --cpu-devices), each
#                  with D devices, joined with --coordinator_address=127.0.0.1:PORT
#                  --num_processes=P --process_id=i --cpu_collectives=gloo; every
#                  output line is prefixed with "[i] ". Waits for all; if one fails
#                  the others are stopped and the script exits with its status.
# --port=PORT      the coordinator's port (default: a free one).
# --dry-run        print the command(s), one per line, and run nothing.
# PYTHON           the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "local.sh: $*" >&2; exit 2; }

devices="" processes=1 port="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-devices=*) devices="${1#*=}"; shift ;;
    --processes=*) processes="${1#*=}"; shift ;;
    --port=*) port="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
[[ -z "$devices" ]] || is_int "$devices" || die "--cpu-devices=$devices: a positive integer"
is_int "$processes" || die "--processes=$processes: a positive integer"
[[ -z "$port" ]] || { is_int "$port" && (( port < 65536 )); } || die "--port=$port: a TCP port"
if (( processes > 1 )) && [[ -z "$devices" ]]; then
  die "--processes=$processes needs --cpu-devices=D (the processes share this machine's CPU)"
fi
if (( processes == 1 )) && [[ -n "$port" ]]; then
  die "--port is for multi-process runs (--processes=P, P > 1)"
fi

python="${PYTHON:-python}"
env_prefix=()
if [[ -n "$devices" ]]; then
  xla_flags=()  # the inherited XLA_FLAGS, less any device count of their own
  for f in ${XLA_FLAGS:-}; do
    [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$f")
  done
  xla_flags+=("--xla_force_host_platform_device_count=$devices")
  env_prefix=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=${xla_flags[*]}")
fi

if (( processes == 1 )); then
  cmd=("${env_prefix[@]}" "$python" main.py "$@")
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
  fi
  exec "${cmd[@]}"
fi

if [[ -z "$port" ]]; then  # a port nothing listens on now (the OS's pick)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
process_cmd() {  # process $1's command -> the array cmd
  cmd=("${env_prefix[@]}" PYTHONUNBUFFERED=1 "$python" main.py "${main_args[@]}"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$processes"
       "--process_id=$1" "--cpu_collectives=gloo")
}
main_args=("$@")
if [[ $dry_run == 1 ]]; then
  for (( i = 0; i < processes; i++ )); do
    process_cmd "$i"; printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi

pids=() running=() watchdog=""
stop_all() {  # SIGTERM (main.py checkpoints and exits), SIGKILL 30 s later
  kill -TERM "${running[@]}" 2>/dev/null || true
  if [[ -z "$watchdog" ]]; then
    (
      sleep 30 & trap 'kill $! 2>/dev/null; exit 0' TERM; wait $!
      kill -KILL "${running[@]}" 2>/dev/null || true
    ) </dev/null >/dev/null 2>&1 &
    watchdog=$!
  fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
prefix() { local line; while IFS= read -r line || [[ -n "$line" ]]; do printf '[%s] %s\n' "$1" "$line"; done; }
filters=()
for (( i = 0; i < processes; i++ )); do
  process_cmd "$i"
  # stdout and stderr through a filter that prefixes each line with "[i] ".
  exec {out}> >(prefix "$i")
  filters+=("$!")
  "${cmd[@]}" >&"$out" 2>&1 {out}>&- &
  pids+=("$!")
  exec {out}>&-
done
running=("${pids[@]}")
rc=0
while (( ${#running[@]} > 0 )); do
  done_pid=""
  if wait -n -p done_pid "${running[@]}"; then status=0; else status=$?; fi
  [[ -n "$done_pid" ]] || { rc=${rc/#0/$status}; break; }  # nothing left to wait for
  rest=()
  for pid in "${running[@]}"; do [[ "$pid" == "$done_pid" ]] || rest+=("$pid"); done
  running=("${rest[@]}")
  if (( status != 0 && rc == 0 )); then
    rc=$status
    for (( i = 0; i < processes; i++ )); do
      if [[ "${pids[$i]}" == "$done_pid" ]]; then
        echo "local.sh: process $i exited with status $status; stopping the others" >&2
      fi
    done
    (( ${#running[@]} == 0 )) || stop_all
  fi
done
[[ -z "$watchdog" ]] || kill "$watchdog" 2>/dev/null || true
wait "${filters[@]}" 2>/dev/null || true  # the output filters
exit "$rc"
