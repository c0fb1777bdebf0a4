#!/bin/bash
# Stage 2 of the VM lab, pid 1 in the guest, inside the host's root (read-only 9p, tmpfs overlay):
# mounts what a Debian host has (tmpfs /run and /tmp, /run/netns, cgroup2, devpts, /dev/shm),
# runs the run directory's `cmd` script, prints its output between the result markers on the
# console and powers the guest off. Steps inside `cmd` (`vmlab_step NAME COMMAND...`) get markers
# of their own, so the host side can tell several commands' results apart in one boot.
set -u
nonce=none run=
for arg in $(</proc/cmdline); do
  case "$arg" in
    vmlab.nonce=*) nonce="${arg#vmlab.nonce=}" ;;
    vmlab.run=*) run="${arg#vmlab.run=}" ;;
  esac
done
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8

poweroff_now() {
  sync
  echo o >/proc/sysrq-trigger
  # pid 1 must not exit (that panics the kernel) while the power-off request is handled.
  while :; do sleep 60; done
}

setup() {
  mount -t tmpfs -o mode=0755,nosuid,nodev run /run &&
    mkdir -p /run/netns /run/lock &&
    mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp &&
    mkdir -p /dev/pts /dev/shm /dev/mqueue &&
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts &&
    mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm &&
    mount -t mqueue mqueue /dev/mqueue &&
    mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup &&
    { mountpoint -q /sys/kernel/security || mount -t securityfs securityfs /sys/kernel/security; } &&
    ip link set lo up &&
    hostname vmlab
}

# Runs one named step of the command, between markers that carry its exit status and duration.
vmlab_step() {
  local name="$1" start status ms
  shift
  start=${EPOCHREALTIME/./}
  echo "@@VMLAB $nonce STEP $name BEGIN@@"
  "$@" </dev/null 2>&1
  status=$?
  ms=$(((${EPOCHREALTIME/./} - start) / 1000))
  echo "@@VMLAB $nonce STEP $name END $status ${ms}ms@@"
  return $status
}
export -f vmlab_step
export nonce

if ! setup; then
  echo "vmlab stage 2: mounting /run, /tmp, /dev/pts, /dev/shm or cgroup2 failed"
  echo "@@VMLAB $nonce EXIT 125@@"
  poweroff_now
fi
[ -f "$run/cmd" ] || {
  echo "vmlab stage 2: no command at $run/cmd"
  echo "@@VMLAB $nonce EXIT 125@@"
  poweroff_now
}
echo "@@VMLAB $nonce BEGIN $(uname -r) $(nproc) cpus $(($(getconf _PHYS_PAGES) * $(getconf PAGESIZE) / 1048576)) MiB@@"
# The command runs in a child; pid 1 (this shell) reaps whatever it orphans while it waits.
bash "$run/cmd" </dev/null 2>&1 &
wait $!
status=$?
echo "@@VMLAB $nonce EXIT $status@@"
poweroff_now
