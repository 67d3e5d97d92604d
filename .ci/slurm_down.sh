#!/usr/bin/env bash
# Stop the one-node cluster started by .ci/slurm_up.sh:  bash .ci/slurm_down.sh "$S"
# Kills only the daemons whose PIDs that cluster wrote (never by name), removes the /etc/slurm symlinks
# that point into its dir, then the dir itself. Safe to call twice or on a half-started cluster.
set -uo pipefail
S=${1:?usage: slurm_down.sh STATE_DIR}
[[ -d $S ]] || exit 0

stop() {  # stop PID from file $1: TERM, wait up to 5 s, then KILL
  local pidfile=$1 pid
  [[ -s $pidfile ]] || return 0
  pid=$(<"$pidfile")
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
stop "$S/run/slurmd.pid"
stop "$S/run/slurmctld.pid"
stop "$S/munge/munged.pid"

for f in slurm.conf gres.conf; do
  if [[ -L /etc/slurm/$f && $(readlink "/etc/slurm/$f") == "$S/$f" ]]; then
    rm -f "/etc/slurm/$f"
  fi
done
# Keep the logs when asked (tests copy them first); otherwise remove everything.
[[ -n ${SLURM_KEEP_DIR:-} ]] || rm -rf "$S"
