#!/usr/bin/env bash
# The VM lab: boots Debian's own kernel (linux-image-amd64, 6.1) under qemu with this machine's
# root shared read-only over 9p (a tmpfs overlay on top), runs a command inside as root and
# exits with its status, its output on stdout. The guest has no network device at all; tests
# inside make their own namespaces. See tests/vm/README.md.
#
#   tests/vm/lab.sh [options] [--] COMMAND [ARGS...]   run COMMAND (in the current directory)
#   tests/vm/lab.sh [options] -s SCRIPT                run a bash script
#
# Options: -t SECONDS whole-run timeout (default 600), -e NAME=VALUE export into the command's
# environment (repeatable), -k KERNEL version or /boot/vmlinuz-* path (default: newest
# /boot/vmlinuz-6.1*), -m MIB guest memory (1536), -c CPUS guest cpus (2), -v boot messages on
# stderr, -b only build the initrd and print its path.
#
# Inside the command, `vmlab_step NAME COMMAND...` runs COMMAND between markers
# (`@@VMLAB <nonce> STEP NAME BEGIN@@` ... `END <status> <ms>ms@@`) that tests parse.
# Exit status: the command's, 124 on timeout, 125 if the lab itself failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="${CARGO_TARGET_DIR:-$repo/target}/vmlab"
timeout_s=600 mem=1536 cpus=2 verbose=0 build_only=0 kernel= script=
envs=()

die() {
  echo "vmlab: $*" >&2
  exit 125
}

while getopts "t:e:k:m:c:s:vbh" o; do
  case "$o" in
    t) timeout_s=$OPTARG ;;
    e) envs+=("$OPTARG") ;;
    k) kernel=$OPTARG ;;
    m) mem=$OPTARG ;;
    c) cpus=$OPTARG ;;
    s) script=$OPTARG ;;
    v) verbose=1 ;;
    b) build_only=1 ;;
    *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ "$build_only" = 0 ] && [ -z "$script" ] && [ $# -eq 0 ]; then
  die "no command: give COMMAND or -s SCRIPT"
fi

# ---- the kernel: Debian's 6.1 unless told otherwise.
case "$kernel" in
  /*) vmlinuz=$kernel ;;
  "") vmlinuz=$(ls -1 /boot/vmlinuz-6.1* 2>/dev/null | sort -V | tail -n 1 || true) ;;
  *) vmlinuz=/boot/vmlinuz-$kernel ;;
esac
[ -n "$vmlinuz" ] && [ -r "$vmlinuz" ] ||
  die "no Debian 6.1 kernel in /boot: apt-get install --no-install-recommends linux-image-amd64 (scripts/deps.sh does)"
kver=${vmlinuz##*/vmlinuz-}
mods=/lib/modules/$kver
[ -f "$mods/modules.dep" ] || die "$mods/modules.dep missing: reinstall linux-image-$kver"
qemu=$(command -v qemu-system-x86_64 || true)
[ -n "$qemu" ] || die "qemu-system-x86_64 missing: apt-get install --no-install-recommends qemu-system-x86"
[ -x /bin/busybox ] || die "/bin/busybox missing: apt-get install busybox-static"
command -v cpio >/dev/null || die "cpio missing: apt-get install cpio"

# ---- the initrd: busybox, stage 1 and the modules that mount the host's root, in the order
# modules.dep gives (each module after everything it needs). Cached per kernel and content.
boot_modules=(virtio_pci 9pnet_virtio 9p overlay)
order=()
declare -A placed=()
place() { # depth first: what a module needs (its modules.dep line), then the module
  local p=$1 d
  [ -n "${placed[$p]:-}" ] && return 0
  placed[$p]=1
  for d in $(grep -m1 "^$p:" "$mods/modules.dep" | cut -d: -f2); do place "$d"; done
  order+=("$p")
}
for m in "${boot_modules[@]}"; do
  pat=${m//[-_]/[-_]}
  grep -qE "/$pat\.ko$" "$mods/modules.builtin" 2>/dev/null && continue
  p=$(grep -m1 -oE "^[^:]*/$pat\.ko(\.[a-z]+)?:" "$mods/modules.dep" | tr -d :) ||
    die "module $m not found in $mods/modules.dep"
  place "$p"
done
key=$(
  {
    cat "$here/init"
    printf '%s\n' "${order[@]}"
    sha256sum /bin/busybox "$vmlinuz"
  } | sha256sum | cut -c1-16
)
initrd="$cache/initrd-$kver-$key.cpio"
if [ ! -s "$initrd" ]; then
  mkdir -p "$cache"
  stage=$(mktemp -d "$cache/.initrd.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/bin" "$stage/dev" "$stage/lib/modules"
  cp /bin/busybox "$stage/bin/busybox"
  install -m 0755 "$here/init" "$stage/init"
  for p in "${order[@]}"; do
    mkdir -p "$stage/lib/modules/$(dirname "$p")"
    cp "$mods/$p" "$stage/lib/modules/$p"
  done
  printf '%s\n' "${order[@]}" >"$stage/modules"
  (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$stage.cpio"
  mv -f "$stage.cpio" "$initrd"
  rm -rf "$stage"
  trap - EXIT
  # Older initrds of this kernel are stale.
  find "$cache" -maxdepth 1 -name "initrd-$kver-*.cpio" ! -name "${initrd##*/}" -delete
fi
if [ "$build_only" = 1 ]; then
  echo "$initrd"
  exit 0
fi

# ---- the run: a directory the guest reads through the share (the command) and nothing else.
mkdir -p "$cache/runs"
# Run directories of labs that were killed outright (SIGKILL) before they could clean up.
for d in "$cache"/runs/*/; do
  [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null && continue
  [ -n "$(find "$d" -maxdepth 0 -mmin +1 2>/dev/null)" ] && rm -rf "$d"
done
run=$(mktemp -d "$cache/runs/XXXXXX")
echo $$ >"$run/pid"
case "$run$here" in *[[:space:]]*) rm -rf "$run"; die "paths with spaces are not supported: $run" ;; esac
nonce=${VMLAB_NONCE:-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}
[[ "$nonce" =~ ^[0-9a-zA-Z]+$ ]] || die "VMLAB_NONCE must be letters and digits"
qpid=
cleanup() {
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
  fi
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
{
  echo "cd $(printf '%q' "$PWD") 2>/dev/null || cd /"
  for e in ${envs[@]+"${envs[@]}"}; do
    [[ "$e" == *=* ]] || die "-e wants NAME=VALUE, got $e"
    echo "export $(printf '%q' "${e%%=*}")=$(printf '%q' "${e#*=}")"
  done
  if [ -n "$script" ]; then
    [ -r "$script" ] || die "no script $script"
    cat "$script"
  else
    printf 'exec'
    printf ' %q' "$@"
    echo
  fi
} >"$run/cmd"

console="$run/console"
: >"$console"
# No network device (-nic none): the guest cannot reach anything, and never through slirp.
timeout --foreground -k 5 "$timeout_s" "$qemu" \
  -accel tcg -cpu max -smp "$cpus" -m "$mem" \
  -nographic -monitor none -serial "file:$console" -no-reboot -nic none \
  -kernel "$vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1 vmlab.nonce=$nonce vmlab.stage2=$here/guest.sh vmlab.run=$run" \
  -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
  </dev/null >"$run/qemu.log" 2>&1 &
qpid=$!

# Stream the command's output (between BEGIN and EXIT) while the guest runs, line by line.
stream() {
  local on=0 line
  while IFS= read -r line; do
    line=${line%$'\r'}
    case "$line" in
      *"@@VMLAB $nonce BEGIN"*) on=1; [ "$verbose" = 1 ] && printf '%s\n' "$line" >&2 ;;
      *"@@VMLAB $nonce EXIT "*) return 0 ;;
      *) if [ "$on" = 1 ]; then printf '%s\n' "$line"; elif [ "$verbose" = 1 ]; then printf '%s\n' "$line" >&2; fi ;;
    esac
  done
}
tail -n +1 -s 0.2 -f --pid="$qpid" "$console" 2>/dev/null | stream || true
set +e
wait "$qpid"
qrc=$?
set -e
qpid=
status=$(tr -d '\r' <"$console" | sed -n "s/^.*@@VMLAB $nonce EXIT \([0-9]*\)@@.*/\1/p" | tail -n 1)
if [ -n "$status" ]; then
  exit "$status"
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "vmlab: timed out after ${timeout_s}s; last console lines:" >&2
  rc=124
else
  echo "vmlab: the guest stopped without a result (qemu exit $qrc); last console lines:" >&2
  rc=125
fi
tr -d '\r' <"$console" | tail -n 40 >&2
sed 's/^/vmlab: qemu: /' "$run/qemu.log" | tail -n 5 >&2
exit "$rc"
