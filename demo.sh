#!/usr/bin/env bash
# netshim demo: two busybox httpd containers under runc in bridge mode with dynamic host ports,
# reached on 127.0.0.1:<hostPort>, listed with `shim ports list`; then Debian's HAProxy on
# loopback in front of them through `shim registrar`, and a rolling replacement of both with
# `shim drain` before each stop while clients keep requesting pages: 0 may fail.
#
#   sudo bash demo.sh          (root, Debian 12; a few seconds once built)
#
# It runs in the real host network namespace (that is the point), but keeps everything else
# private: state, config, runc root, bundles and rootfs live in a temp dir. On exit, whatever
# happened, it stops HAProxy and the registrar it started, deletes the containers, runs `shim reset
# --force` (bridge netshim0 and the nftables table `ip netshim` go), drops the demo's conntrack
# entries, restores net.ipv4.ip_forward and removes the temp dir. HAProxy listens on
# 127.0.0.1:$LB_PORT only. Nothing is installed globally except by apt.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"
PROJECT=$PWD
BRIDGE=netshim0
PACKAGES=(runc nftables busybox-static iproute2 conntrack haproxy)
LB_PORT=18099

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

if (exec 3<>"/dev/tcp/127.0.0.1/$LB_PORT") 2>/dev/null; then
    die "127.0.0.1:$LB_PORT is in use; the demo's HAProxy listens there"
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
BG=()      # pids of what the demo started in the background (HAProxy, registrar, clients)
export NETSHIM_STATE_DIR=$W/state NETSHIM_CONFIG=$W/config.toml

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    section "Cleanup"
    touch "$W/stop-clients" 2>/dev/null
    for pid in "${BG[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${BG[@]}"; do
        wait "$pid" 2>/dev/null
    done
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
    echo "HAProxy and registrar stopped, containers deleted, bridge and nftables table removed, ip_forward=$OLD_FORWARD restored, $W removed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$W/state" "$W/runc"
cat >"$NETSHIM_CONFIG" <<EOF
# netshim config for this demo only
[bridge]
name = "$BRIDGE"
[ports]
host_address = "127.0.0.1"       # load-balancer targets on loopback: HAProxy runs here too
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
    "netshim.port-mappings": "[{\"containerPort\":80}]",
    "netshim.service": "web"
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

# start NAME: a bundle and `runc run -d` (the createRuntime hook sets up its network).
start() {
    local id=demo-$1-$$
    bundle "$id"
    IDS+=("$id")
    TOUCHED=1
    say "runc --root $W/runc run -d -b $W/$id $id"
    if ! runc --root "$W/runc" run -d -b "$W/$id" "$id" </dev/null >"$W/$id.runc.out" 2>&1; then
        cat "$W/$id.runc.out" >&2
        die "runc run $id failed"
    fi
}

# One GET / through HAProxy with bash's /dev/tcp; prints the status line and the body.
lb_get() {
    exec 3<>"/dev/tcp/127.0.0.1/$LB_PORT" || return 1
    printf 'GET / HTTP/1.0\r\nHost: demo\r\n\r\n' >&3
    timeout 5 cat <&3
    exec 3<&- 3>&-
}

# A client: GET / through HAProxy back to back until $W/stop-clients exists; counts 200s and
# everything else (errors, 5xx) into $W/client.N.
client() {
    local ok=0 failed=0 r
    while [ ! -e "$W/stop-clients" ]; do
        r=$(lb_get 2>/dev/null) || r=""
        if [[ $r == "HTTP/1."?" 200"* && $r == *"hello from"* ]]; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
        fi
    done
    echo "$ok $failed" >"$W/client.$1"
}

# Waits (up to 10 s) until container ID answers through HAProxy.
served_by_lb() {
    local end=$((SECONDS + 10))
    while [ "$SECONDS" -lt "$end" ]; do
        [[ $(lb_get 2>/dev/null) == *"hello from $1<"* ]] && return 0
        sleep 0.05
    done
    return 1
}

NAMES=(web1 web2)
section "3. Start two httpd containers (runc run -d, createRuntime hook: bridge mode, dynamic host port)"
echo "annotations: netshim.network-mode=bridge  netshim.port-mappings=[{\"containerPort\":80}]  netshim.service=web"
for name in "${NAMES[@]}"; do
    start "$name"
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

say "shim ports list --format haproxy"
"$SHIM" ports list --format haproxy

section "7. HAProxy in front, kept in step by shim registrar"
mkdir -p "$W/haproxy"
# The config users copy (lb/haproxy.cfg), with its paths in the demo's temp dir and its
# frontend on 127.0.0.1:$LB_PORT.
sed -e "s#/run/haproxy/#$W/haproxy/#g" -e "s#    bind :80#    bind 127.0.0.1:$LB_PORT#" \
    -e "s#server-template slot 10 #server-template slot 4 #" -e '/log \/dev\/log/d' -e '/log global/d' \
    "$PROJECT/lb/haproxy.cfg" >"$W/haproxy/haproxy.cfg"
grep -q "bind 127.0.0.1:$LB_PORT" "$W/haproxy/haproxy.cfg" || die "lb/haproxy.cfg has an unexpected shape"
say "haproxy -W -db -f $W/haproxy/haproxy.cfg &"
haproxy -W -db -f "$W/haproxy/haproxy.cfg" </dev/null >"$W/haproxy/haproxy.log" 2>&1 &
BG+=($!)
for _ in $(seq 100); do [ -S "$W/haproxy/admin.sock" ] && break; sleep 0.05; done
[ -S "$W/haproxy/admin.sock" ] || { cat "$W/haproxy/haproxy.log" >&2; die "HAProxy did not start"; }
say "shim registrar --haproxy $W/haproxy/admin.sock --haproxy-state-file $W/haproxy/servers.state &"
"$SHIM" registrar --haproxy "$W/haproxy/admin.sock" --haproxy-state-file "$W/haproxy/servers.state" \
    </dev/null 2>"$W/registrar.log" &
BG+=($!)
for id in "${IDS[@]}"; do
    served_by_lb "$id" || { cat "$W/registrar.log" >&2; die "$id never answered through HAProxy"; }
done
say "GET http://127.0.0.1:$LB_PORT/ (four times)"
for _ in 1 2 3 4; do
    lb_get | sed -n 's/.*\(hello from [^<]*\).*/\1/p'
done

section "8. Rolling replacement under load: start the new one, shim drain the old one, stop it"
rm -f "$W/stop-clients"
for n in 1 2 3; do
    client "$n" &
    BG+=($!)
done
sleep 0.5
OLD=("${IDS[@]}")
for i in 0 1; do
    start "web$((i + 3))"
    new=${IDS[-1]}
    served_by_lb "$new" || die "$new never answered through HAProxy"
    say "shim drain ${OLD[$i]} --timeout 10"
    "$SHIM" drain "${OLD[$i]}" --timeout 10 || die "drain ${OLD[$i]} failed"
    say "runc --root $W/runc delete -f ${OLD[$i]}"
    runc --root "$W/runc" delete -f "${OLD[$i]}"
done
sleep 0.5
touch "$W/stop-clients"
wait "${BG[@]:2}" 2>/dev/null
BG=("${BG[@]:0:2}")
served=0
failed=0
for n in 1 2 3; do
    read -r o f <"$W/client.$n"
    served=$((served + o))
    failed=$((failed + f))
done
echo "through HAProxy during the replacement: $served pages served, $failed failed"
say "shim ports list"
"$SHIM" ports list
echo "registrar log (one line per change):"
sed 's/^/    /' "$W/registrar.log"
for id in "${IDS[@]}"; do
    json=$("$SHIM" ports list --json --container "$id")
    p=$(sed -n '/"hostPort"/{s/.*"hostPort": *\([0-9][0-9]*\).*/\1/p;q;}' <<<"$json")
    [ -n "$p" ] && PORTS+=("$p")
done
[ "$failed" = 0 ] || { echo "FAILED: $failed requests failed during the replacement" >&2; exit 1; }

section "9. Delete the containers (runc delete -f; the poststop hook releases them)"
for id in "${IDS[@]}"; do
    if runc --root "$W/runc" state "$id" >/dev/null 2>&1; then
        say "runc --root $W/runc delete -f $id"
        runc --root "$W/runc" delete -f "$id"
    fi
done
IDS=()
say "shim ports list"
"$SHIM" ports list

section "10. shim reset (removes bridge $BRIDGE and the nftables table)"
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
