#!/usr/bin/env bash
# Installs what netshim needs to build, run and test on Debian 12 (run as root). Idempotent:
# it only calls apt-get when something is missing.
set -euo pipefail
pkgs=(runc crun containerd podman nftables busybox-static iproute2 conntrack python3 procps)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "cargo is in ~/.cargo/bin: add it to PATH" >&2
  else
    echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  fi
  exit 1
fi
