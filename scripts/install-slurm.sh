#!/usr/bin/env bash
# Installs Debian's SLURM (slurmctld, slurmd, client commands) and munge, idempotently:
# the job-script tests start a one-node cluster on localhost from these binaries.
# Does nothing when slurmctld, slurmd, sbatch and munged are already on the PATH.
# Exit status: 0 when SLURM is available afterwards, 1 when it could not be installed.
set -euo pipefail

say() { printf '[install-slurm] %s\n' "$*"; }
die() { printf '[install-slurm] ERROR: %s\n' "$*" >&2; exit 1; }

export PATH="$PATH:/usr/sbin:/sbin"
have_all() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null

have_all && exit 0
sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
command -v apt-get >/dev/null || die "no apt-get here: install slurm-wlm and munge with your package manager"

# Wait for a dpkg lock held by another installer instead of failing at once.
apt=(env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300)
install=("${apt[@]}" install -y --no-install-recommends slurm-wlm munge)
say "installing slurm-wlm and munge from Debian (once)"
if ! sudo_if_needed "${install[@]}" >/dev/null 2>&1; then
  sudo_if_needed "${apt[@]}" update >/dev/null 2>&1 || die "apt-get update failed (no network or no root)"
  sudo_if_needed "${install[@]}" >/dev/null || die "apt-get could not install slurm-wlm and munge"
fi
have_all || die "slurm-wlm and munge were installed but slurmctld/slurmd/sbatch/munged are not on the PATH"
say "ready: $(slurmctld -V)"
