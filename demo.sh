#!/usr/bin/env bash
# netshim demo: two busybox httpd containers under runc in bridge mode with dynamic host ports,
# reached on 127.0.0.1:<hostPort>, listed with `shim ports list`, then released by poststop.
#
#   sudo bash demo.sh          (root, Debian 12; about a second once built)
#
# It runs in the real host network namespace (that is the point), but keeps everything else
# private: state, config, runc root, bundles and rootfs live in a temp dir. On exit, whatever
# happened, it deletes the containers, runs `shim reset --force` (bridge netshim0 and the nftables
# table `ip netshim` go), drops the demo's conntrack entries, restores net.ipv4.ip_forward and
# removes the temp dir. Nothing is installed globally except by apt.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"
PROJECT=$PWD
BRIDGE=netshim0
PACKAGES=(runc nftables busybox-static iproute2 conntrack)

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
section() { printf '\n%s=== %s ===%s\n' "$BOLD" "$*" "$PLAIN"; }
say() { printf '$ %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it creates a bridge, veth pairs and an nftables table"

section "1. Packages"
missing=()
for p in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
else
    echo "all present: ${PACKAGES[*]}"
fi
CARGO=$(command -v cargo || true)
[ -n "$CARGO" ] || { [ -x "$HOME/.cargo/bin/cargo" ] && CARGO=$HOME/.cargo/bin/cargo; } ||
    die "cargo not found: install a Rust toolchain (rustup) first"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (package busybox-static)"

# Refuse to run next to a netshim already in use on this host: the cleanup below removes the
# bridge and the table, which would cut off that netshim's containers.
if ip link show "$BRIDGE" >/dev/null 2>&1 || nft list table ip netshim >/dev/null 2>&1; then
    die "bridge $BRIDGE or nftables table 'ip netshim' already exists on this host (a netshim in use?); the demo would remove them, so it stops here"
fi

section "2. Build"
say "cargo build --release"
"$CARGO" build --release
# .cargo/config.toml names the target (a static, non-PIE build), so the binary is under it.
SHIM=$PROJECT/target/x86_64-unknown-linux-gnu/release/shim
[ -x "$SHIM" ] || die "build produced no $SHIM"
case $SHIM in *[\"\\]*) die "project path $PROJECT contains a quote or backslash; move it" ;; esac

# --- private world + cleanup -----------------------------------------------------------------
W=$(mktemp -d /tmp/netshim-demo.XXXXXX)
OLD_FORWARD=$(cat /proc/sys/net/ipv4/ip_forward)
IDS=()
PORTS=()
TOUCHED=""
export NETSHIM_STATE_DIR=$W/state NETSHIM_CONFIG=$W/config.toml

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    section "Cleanup"
    for id in "${IDS[@]}"; do
        runc --root "$W/runc" delete -f "$id" >/dev/null 2>&1
    done
    if [ -n "$TOUCHED" ]; then
        "$SHIM" reset --force >/dev/null 2>&1 || echo "warning: shim reset --force failed"
        for p in "${PORTS[@]}"; do
            conntrack -D -p tcp --orig-dst 127.0.0.1 --orig-port-dst "$p" >/dev/null 2>&1
        done
        # The bridge's own traffic (IGMP joins from the gateway address).
        conntrack -D --orig-src 10.213.0.1 >/dev/null 2>&1
    fi
    echo "$OLD_FORWARD" >/proc/sys/net/ipv4/ip_forward
    rm -rf "$W"
    echo "containers deleted, bridge and nftables table removed, ip_forward=$OLD_FORWARD restored, $W removed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$W/state" "$W/runc"
cat >"$NETSHIM_CONFIG" <<EOF
# netshim config for this demo only
[bridge]
name = "$BRIDGE"
EOF

# The hooks users merge into config.json, pointed at the binary just built and the private state.
HOOKS=$(<"$PROJECT/hooks/runc-hooks.json")
HOOKS=${HOOKS//'"/usr/local/bin/shim"'/"\"$SHIM\""}
HOOKS=${HOOKS//'"NETSHIM_STATE_DIR=/run/netshim"'/"\"NETSHIM_STATE_DIR=$NETSHIM_STATE_DIR\", \"NETSHIM_CONFIG=$NETSHIM_CONFIG\""}
case $HOOKS in
*/usr/local/bin/shim* | *NETSHIM_STATE_DIR=/run/netshim*) die "hooks/runc-hooks.json has an unexpected shape" ;;
esac
HOOKS_MEMBER=${HOOKS#*\{} # `"hooks": {...} }`: the snippet without its opening brace

# bundle NAME: a static busybox rootfs whose /www/index.html names the container, and a
# config.json running httpd on :80, annotated for netshim, with the netshim hooks.
bundle() {
    local name=$1 b=$W/$1
    mkdir -p "$b/rootfs"/{bin,proc,sys,dev,etc,tmp,www}
    cp "$BUSYBOX" "$b/rootfs/bin/busybox"
    for a in sh httpd sleep ip cat echo nc wget; do ln -s busybox "$b/rootfs/bin/$a"; done
    echo "<html><body><h1>hello from $name</h1></body></html>" >"$b/rootfs/www/index.html"
    cat >"$b/config.json" <<EOF
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false, "user": {"uid": 0, "gid": 0}, "cwd": "/",
    "args": ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"],
    "env": ["PATH=/bin"],
    "capabilities": {"bounding": ["CAP_NET_BIND_SERVICE"], "effective": ["CAP_NET_BIND_SERVICE"], "permitted": ["CAP_NET_BIND_SERVICE"]}
  },
  "root": {"path": "$b/rootfs"},
  "hostname": "$name",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
  ],
  "annotations": {
    "netshim.network-mode": "bridge",
    "netshim.port-mappings": "[{\"containerPort\":80}]"
  },
  "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]},
${HOOKS_MEMBER}
EOF
}

# GET a URL, retrying for up to ~5 s while httpd starts.
fetch() {
    local end=$((SECONDS + 5))
    while :; do
        if command -v curl >/dev/null; then
            curl -fsS --max-time 2 "$1" 2>/dev/null && return 0
        else
            # Not `wget -T`: busybox 1.35's static wget segfaults with it.
            timeout 3 busybox wget -q -O - "$1" 2>/dev/null && return 0
        fi
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.1
    done
}

NAMES=(web1 web2)
section "3. Start two httpd containers (runc run -d, createRuntime hook: bridge mode, dynamic host port)"
echo "annotations: netshim.network-mode=bridge  netshim.port-mappings=[{\"containerPort\":80}]"
for name in "${NAMES[@]}"; do
    id=demo-$name-$$
    bundle "$id"
    IDS+=("$id")
    TOUCHED=1
    say "runc --root $W/runc run -d -b $W/$id $id"
    if ! runc --root "$W/runc" run -d -b "$W/$id" "$id" </dev/null >"$W/$id.runc.out" 2>&1; then
        cat "$W/$id.runc.out" >&2
        die "runc run $id failed"
    fi
done

section "4. Fetch a page from each container through its dynamic host port on 127.0.0.1"
failed=0
for id in "${IDS[@]}"; do
    json=$("$SHIM" ports list --json --container "$id")
    port=$(sed -n '/"hostPort"/{s/.*"hostPort": *\([0-9][0-9]*\).*/\1/p;q;}' <<<"$json")
    [ -n "$port" ] || die "no host port recorded for $id"
    PORTS+=("$port")
    say "GET http://127.0.0.1:$port/   ($id)"
    if ! page=$(fetch "http://127.0.0.1:$port/"); then
        echo "FAILED: no page from $id on 127.0.0.1:$port" >&2
        failed=1
    elif [[ $page != *"hello from $id"* ]]; then
        echo "FAILED: the page on 127.0.0.1:$port is not $id's: $page" >&2
        failed=1
    else
        printf '%s\n' "$page"
    fi
done

section "5. shim ports list"
say "shim ports list"
"$SHIM" ports list
section "6. shim ports list --json"
say "shim ports list --json"
"$SHIM" ports list --json

section "7. Delete both containers (runc delete -f; the poststop hook releases them)"
for id in "${IDS[@]}"; do
    say "runc --root $W/runc delete -f $id"
    runc --root "$W/runc" delete -f "$id"
done
IDS=()
say "shim ports list"
"$SHIM" ports list

section "8. shim reset (removes bridge $BRIDGE and the nftables table)"
say "shim reset"
"$SHIM" reset
ip link show "$BRIDGE" >/dev/null 2>&1 && die "bridge $BRIDGE still exists after shim reset"
nft list table ip netshim >/dev/null 2>&1 && die "table ip netshim still exists after shim reset"
echo "bridge $BRIDGE and table ip netshim are gone"

if [ "$failed" != 0 ]; then
    echo "demo: a page fetch failed" >&2
    exit 1
fi
section "Demo OK"
