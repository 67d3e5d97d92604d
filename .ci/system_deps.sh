#!/usr/bin/env bash
# System packages for the browser and SLURM tests: Debian's chromium (renders report/report.html headless)
# and slurmctld/slurmd/slurm-client/munge (the one-node cluster of .ci/slurm_up.sh).
# Idempotent and quiet: does nothing when every binary is present. Installs only as root with apt-get.
# Under CI=true a failure is fatal (the tests that need these would otherwise be skipped silently);
# elsewhere it only warns, and those tests skip with a reason.
set -uo pipefail

# binary -> Debian package
declare -A PKG=(
  [chromium]=chromium
  [slurmctld]=slurmctld
  [slurmd]=slurmd
  [sbatch]=slurm-client
  [munged]=munge
)

fail() {
  if [[ "${CI:-}" == "true" ]]; then
    echo "system-deps: ERROR: $*" >&2
    exit 1
  fi
  echo "system-deps: warning: $* (browser/slurm tests will skip)" >&2
  exit 0
}

missing=()
for bin in "${!PKG[@]}"; do
  # sbin is not on every PATH (slurmctld, slurmd, munged live in /usr/sbin).
  PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 || missing+=("${PKG[$bin]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

[[ $EUID -eq 0 ]] || fail "not root; cannot install ${missing[*]}"
command -v apt-get >/dev/null 2>&1 || fail "no apt-get; install ${missing[*]} by hand"

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
install() {
  apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >"$log" 2>&1
}
start=$SECONDS
# Package lists may be absent or stale on a fresh machine: refresh once and retry before giving up.
if ! install; then
  apt-get update -q -o DPkg::Lock::Timeout=300 >>"$log" 2>&1 && install || {
    tail -n 20 "$log" >&2
    fail "apt-get install ${missing[*]} failed"
  }
fi
echo "system-deps: installed ${missing[*]} in $((SECONDS - start)) s"
