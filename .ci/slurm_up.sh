#!/usr/bin/env bash
# Start a one-node SLURM cluster inside this machine (WORKFLOW_NOTES.md §9), for tests/test_slurm.py.
#
#   S=$(bash .ci/slurm_up.sh)   # prints the cluster's state dir on stdout, progress on stderr
#   ...  sbatch / sinfo / snakemake --executor slurm ...
#   bash .ci/slurm_down.sh "$S"
#
# Needs root and the packages of .ci/system_deps.sh. Everything lives in a fresh mktemp dir; only two
# symlinks go into /etc/slurm (srun inside a job finds its config only there, SLURM_CONF is not enough).
# Partitions: debug (default) and gpu; the node advertises Gres=gpu:fake:2 backed by two empty files,
# so `--gpus=fake:1` is schedulable on a machine without a GPU. Daemons run as root, without cgroups.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "$0")" && pwd)

say() { echo "slurm_up: $*" >&2; }
[[ $(id -u) -eq 0 ]] || { say "needs root"; exit 1; }
for bin in munged slurmctld slurmd sinfo sbatch; do
  command -v "$bin" >/dev/null || { say "$bin not found: run .ci/system_deps.sh"; exit 1; }
done
for f in slurm.conf gres.conf; do
  if [[ -e /etc/slurm/$f ]]; then
    say "/etc/slurm/$f exists (another cluster up? stop it with slurm_down.sh)"; exit 1
  fi
  # A dangling symlink left by a cluster that was killed without slurm_down.sh: replace it.
  [[ -L /etc/slurm/$f ]] && rm -f "/etc/slurm/$f"
done

S=$(mktemp -d -t flatness-slurm.XXXXXX)
chmod 755 "$S"  # munged runs as user munge and must reach $S/munge
mkdir -p "$S"/{state,spool,log,run,munge}
# Anything failing from here on: stop what was started, remove the dir.
trap 'say "failed; tearing down"; bash "$here/slurm_down.sh" "$S" >&2 || true' ERR

# The node is this machine under its short name; addresses are loopback so no DNS is needed.
host=$(hostname -s)
# Port pair chosen per cluster so a stale daemon from an earlier run cannot answer for this one.
port=$((20000 + RANDOM % 20000))

# --- munge: its own socket and a copy of the package's key, owned by munge ---
install -o munge -g munge -m 400 /etc/munge/munge.key "$S/munge/munge.key"
chown munge:munge "$S/munge"
chmod 711 "$S/munge"
runuser -u munge -- munged --socket="$S/munge/munge.socket.2" --key-file="$S/munge/munge.key" \
  --pid-file="$S/munge/munged.pid" --log-file="$S/munge/munged.log" --seed-file="$S/munge/munged.seed"

# --- slurm.conf / gres.conf ---
# CPU layout as slurmd sees it, memory capped below the machine's (jobs are not memory-limited here).
hw=$(slurmd -C | head -n1)
layout=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//' <<<"$hw")
real_mb=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
mem_mb=$((real_mb < 8000 ? real_mb : 8000))  # more than the machine has would drain the node
touch "$S/fakegpu0" "$S/fakegpu1"
cat >"$S/slurm.conf" <<EOF
ClusterName=flatnesstest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket.2
CredType=cred/munge
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# squeue is the executor's status source (no accounting): keep finished jobs visible for 5 min.
MinJobAge=300
ReturnToService=2
GresTypes=gpu
# A job the cluster can never run is refused by sbatch at once (the run fails with the reason)
# instead of pending forever. No partition time limit: profiles ask for real-cluster runtimes.
EnforcePartLimits=ALL
NodeName=$host NodeAddr=127.0.0.1 $layout RealMemory=$mem_mb Gres=gpu:fake:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
cat >"$S/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu Type=fake File=$S/fakegpu[0-1]
EOF
mkdir -p /etc/slurm
ln -s "$S/slurm.conf" /etc/slurm/slurm.conf
ln -s "$S/gres.conf" /etc/slurm/gres.conf

# --- daemons ---
slurmctld
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
slurmd
# Ready when both partitions list the node idle.
for _ in $(seq 150); do
  states=$(sinfo -h -o '%P %t' 2>/dev/null || true)
  if [[ $(grep -c ' idle$' <<<"$states") -ge 2 ]]; then
    say "up in $SECONDS s: $(tr '\n' ' ' <<<"$states")"
    echo "$S"
    exit 0
  fi
  sleep 0.2
done
say "node never became idle; sinfo: $states"
tail -n 20 "$S/log/slurmctld.log" "$S/log/slurmd.log" >&2 || true
false
