#!/usr/bin/env bash
# Installs what netshim needs to build, run and test on Debian 12 (run as root). Idempotent:
# it only calls apt-get when something is missing.
set -euo pipefail
pkgs=(runc crun containerd podman nftables busybox-static iproute2 conntrack python3 procps
      haproxy nginx prometheus python3-botocore etcd-server etcd-client)
# `scripts/deps.sh bench`: also what bench/bench.py runs (the tests do not need these).
if [ "${1:-}" = bench ]; then
  pkgs+=(netavark containernetworking-plugins iptables strace time linux-perf python3-matplotlib)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  # etcd-server's postinst enables and starts a system member on 127.0.0.1:2379. The cluster
  # tests start their own members (loopback, free ports, a temp data dir), and a host that
  # runs netshim's registrar points it at the cluster's members, so the packaged service is
  # kept from starting here (policy-rc.d, only if none exists) and disabled below.
  own_policy=
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
# No packaged etcd left running or starting at boot (an earlier install may have started it).
if dpkg-query -W -f='${Status}' etcd-server 2>/dev/null | grep -q "ok installed"; then
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  else
    update-rc.d etcd disable >/dev/null 2>&1 || true
    /etc/init.d/etcd stop >/dev/null 2>&1 || true
  fi
fi
# The VM lab (tests/vm/): qemu and Debian's own 6.1 kernel, whose modules the guest loads from
# /lib/modules. Without recommends (they would bring apparmor, which changes how runtimes confine
# containers, and qemu's GUI). INITRD=No: the lab builds its own initrd and this host never boots
# the kernel, so its postinst skips update-initramfs (30 MB in /boot, a minute); with no
# bootloader installed nothing else touches the boot setup.
vm_pkgs=(qemu-system-x86 linux-image-amd64 cpio)
vm_missing=()
for p in "${vm_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || vm_missing+=("$p")
done
if [ ${#vm_missing[@]} -gt 0 ]; then
  echo "installing for the VM lab: ${vm_missing[*]}"
  [ ${#missing[@]} -gt 0 ] || apt-get update -qq
  INITRD=No DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${vm_missing[@]}" >/dev/null
fi
[ "${1:-}" = bench ] && exit 0
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "cargo is in ~/.cargo/bin: add it to PATH" >&2
  else
    echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  fi
  exit 1
fi
