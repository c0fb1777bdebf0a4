#!/usr/bin/env python3
"""What UDP mappings cost the hook in conntrack work, for one or more shim binaries in the same run.

    cargo build --release
    sudo python3 bench/conntrack.py before=/tmp/shim-old after=target/x86_64-unknown-linux-gnu/release/shim
    sudo python3 bench/conntrack.py --runs 5 --range-runs 1 after=target/x86_64-unknown-linux-gnu/release/shim   # quick
    sudo python3 bench/conntrack.py new=target/x86_64-unknown-linux-gnu/release/shim 6.1way=target/x86_64-unknown-linux-gnu/release/shim:dump

Each binary gets its own "host" network namespace (nsct<pid>h<n>) holding --entries unrelated
UDP conntrack entries (inserted over ctnetlink, 10 min timeout: clients to host ports outside the
dynamic range). Setup and teardown of a container with one UDP host port are timed against the
same with one TCP host port (the difference is the conntrack work), then a 1,000-port UDP range
against a 1,000-port TCP range. Iterations alternate between binaries and protocols. Teardown
follows the runtimes' lifecycle: the container's process is killed and its netns deleted before
poststop. The conntrack hash table is shared by all namespaces, so every binary sees the same
table. Times are the whole hook process (exec to exit), median of the runs. Python 3 standard
library only; needs root and `ip`. Everything it creates is removed on exit, also on Ctrl-C.
"""

import argparse
import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)
PREFIX = f"nsct{os.getpid() % 100000}"
NAMESPACES = []
SLEEPERS = []
TMP = []
KEEP_NETNS = False


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def netns_add(name):
    sh("ip", "netns", "add", name)
    NAMESPACES.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def enter(name):
    """A preexec_fn that moves the child into netns `name`."""
    path = f"/run/netns/{name}"

    def f():
        fd = os.open(path, os.O_RDONLY)
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            os._exit(99)
        os.close(fd)

    return f


def cleanup():
    for p in SLEEPERS:
        if p.poll() is None:
            p.kill()
            p.wait()
    for ns in reversed(NAMESPACES):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    NAMESPACES.clear()
    for d in TMP:
        shutil.rmtree(d, ignore_errors=True)
    TMP.clear()


# ---- unrelated entries over ctnetlink ----

def nla(kind, payload):
    a = struct.pack("HH", 4 + len(payload), kind) + payload
    return a + b"\0" * (-len(a) % 4)


def nest(kind, *parts):
    return nla(kind | 0x8000, b"".join(parts))


def tup(kind, src, dst, sport, dport):
    ip = nest(1, nla(1, socket.inet_aton(src)), nla(2, socket.inet_aton(dst)))
    l4 = nest(2, nla(1, bytes([17])), nla(2, struct.pack("!H", sport)), nla(3, struct.pack("!H", dport)))
    return nest(kind, ip, l4)


def ctnetlink(ns):
    """A ctnetlink socket inside netns ns."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    LIBC.setns(fd, CLONE_NEWNET)
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    finally:
        LIBC.setns(here, CLONE_NEWNET)
        os.close(fd)
        os.close(here)
    s.bind((0, 0))
    return s


def request(s, kind, flags, attrs, seq):
    body = struct.pack("BBH", 2, 0, 0) + attrs
    return struct.pack("IHHII", 16 + len(body), (1 << 8) | kind, 1 | 4 | flags, seq, 0) + body


def acked(s, msgs):
    s.send(b"".join(msgs))
    for _ in msgs:
        b = s.recv(65536)
        code = struct.unpack_from("i", b, 16)[0]
        if code:
            raise SystemExit(f"ctnetlink: errno {-code}")


HOST_IP = "198.51.100.1"


def fill(ns, n, kind):
    """Inserts n UDP entries into netns ns: clients to host ports 1024-19999 ("host"), or
    containers' DNS queries masqueraded to the host's address ("egress")."""
    s = ctnetlink(ns)
    batch = []
    for i in range(n):
        sport = 1024 + (i // 250) % 60000
        if kind == "host":
            client, dport = f"192.0.2.{i % 250 + 1}", 1024 + i % 18976
            attrs = tup(1, client, HOST_IP, sport, dport) + tup(2, HOST_IP, client, dport, sport)
        else:
            ctr, dns = f"10.213.1.{i % 250 + 1}", f"203.0.113.{i % 7 + 1}"
            attrs = tup(1, ctr, dns, sport, 53) + tup(2, dns, ctr, 53, sport)
            attrs += nest(6, nla(1, socket.inet_aton(HOST_IP)), nla(2, socket.inet_aton(HOST_IP)))
        attrs += nla(7, struct.pack("!I", 600))
        batch.append(request(s, 0, 0x400, attrs, i + 1))
        if len(batch) == 64 or i == n - 1:
            acked(s, batch)
            batch = []
    s.close()


def drain(ns):
    """Deletes every IPv4 entry of netns ns (a bench namespace)."""
    s = ctnetlink(ns)
    acked(s, [request(s, 2, 0, b"", 1)])
    s.close()


# ---- one shim under test ----

class Stack:
    def __init__(self, index, label, binary, tmp, path=None):
        self.index = index
        self.label = label
        self.path = path
        self.host = f"{PREFIX}h{index}"
        netns_add(self.host)
        self.dir = os.path.join(tmp, label)
        os.makedirs(os.path.join(self.dir, "state"))
        self.bin = os.path.join(self.dir, "shim")
        shutil.copy(binary, self.bin)
        with open(os.path.join(self.dir, "config.toml"), "w") as f:
            f.write('[ports]\ndynamic_range = "40000-59999"\n')
        # A first container, so the bridge, the table and connection tracking exist before
        # anything is timed.
        self.n = 0
        warm = self.container()
        self.hook("createRuntime", warm, '[{"containerPort":80}]')
        self.times = {}
        self.traces = []

    def container(self):
        self.n += 1
        ns = f"{PREFIX}s{self.index}c{self.n}"
        netns_add(ns)
        p = subprocess.Popen(["sleep", "100000"], preexec_fn=enter(ns))
        SLEEPERS.append(p)
        return {"id": f"{self.label}-c{self.n}", "ns": ns, "proc": p}

    def hook(self, phase, c, mappings=None):
        state = {"ociVersion": "1.0.2", "id": c["id"], "bundle": "/nonexistent"}
        if phase == "createRuntime":
            state.update(status="creating", pid=c["proc"].pid, annotations={
                "netshim.network-mode": "bridge", "netshim.port-mappings": mappings})
        else:
            state["status"] = "stopped"
        env = {"NETSHIM_STATE_DIR": os.path.join(self.dir, "state"),
               "NETSHIM_CONFIG": os.path.join(self.dir, "config.toml"),
               "NETSHIM_TRACE": "1", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")}
        if self.path:
            env["NETSHIM_CONNTRACK"] = self.path
        t = time.perf_counter()
        r = subprocess.run([self.bin, "hook", phase], input=json.dumps(state), env=env,
                           capture_output=True, text=True, preexec_fn=enter(self.host))
        dt = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"{self.label}: hook {phase} failed: {r.stderr.strip()}")
        for line in r.stderr.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2].startswith("conntrack"):
                self.traces.append((phase, parts[2], int(parts[3])))
        return dt

    def cycle(self, name, mappings):
        c = self.container()
        setup = self.hook("createRuntime", c, mappings)
        c["proc"].kill()
        c["proc"].wait()
        if not KEEP_NETNS:
            subprocess.run(["ip", "netns", "del", c["ns"]], capture_output=True)
            NAMESPACES.remove(c["ns"])
        teardown = self.hook("poststop", c)
        self.times.setdefault(name, ([], []))
        self.times[name][0].append(setup)
        self.times[name][1].append(teardown)


def ms(xs):
    return f"{statistics.median(xs) * 1e3:.1f}" if xs else "–"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shims", nargs="+", metavar="LABEL=PATH[:WAY]",
                    help="WAY dump or plain: NETSHIM_CONNTRACK for that binary (an older kernel's way)")
    ap.add_argument("--runs", type=int, default=20, help="1-port cycles per protocol (20)")
    ap.add_argument("--range-runs", type=int, default=3, help="1,000-port cycles per protocol (3)")
    ap.add_argument("--range-runs-first", type=int, default=None,
                    help="range cycles for the first binary only (e.g. 1 for a slow old build)")
    ap.add_argument("--entries", type=int, default=20000, help="unrelated UDP entries (20000)")
    ap.add_argument("--kind", choices=("host", "egress"), default="host",
                    help="unrelated entries: clients to other host ports, un-NATed (host, the worst "
                         "case: a dump must copy them all out), or masqueraded DNS egress (egress)")
    ap.add_argument("--interleave", action="store_true",
                    help="all binaries' entries at once, binaries alternating every run")
    ap.add_argument("--keep-netns", action="store_true",
                    help="delete a container's netns after its poststop, not before")
    ap.add_argument("--tmp-parent", default="/dev/shm")
    a = ap.parse_args()
    global KEEP_NETNS
    KEEP_NETNS = a.keep_netns
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    atexit.register(cleanup)
    tmp = tempfile.mkdtemp(prefix="nsct-", dir=a.tmp_parent)
    TMP.append(tmp)
    stacks = []
    for spec in a.shims:
        label, _, path = spec.partition("=")
        path, _, way = path.partition(":")
        if not path or not os.access(path, os.X_OK):
            raise SystemExit(f"{spec}: give LABEL=PATH[:WAY] to an executable shim")
        stacks.append(Stack(len(stacks), label, path, tmp, way or None))
    one = {"udp 1 port": '[{"containerPort":53,"protocol":"udp"}]',
           "tcp 1 port": '[{"containerPort":80}]'}
    rng = {"udp 1,000 ports": '[{"containerPortRange":"3000-3999","protocol":"udp"}]',
           "tcp 1,000 ports": '[{"containerPortRange":"3000-3999"}]'}
    def ones(group, i):
        for s in (group if i % 2 == 0 else group[::-1]):
            for name, m in (one.items() if i % 2 == 0 else list(one.items())[::-1]):
                s.cycle(name, m)

    def ranges(group, i):
        for s in group:
            if s is stacks[0] and a.range_runs_first is not None and i >= a.range_runs_first:
                continue
            for name, m in rng.items():
                print(f"{s.label}: {name} run {i + 1}", file=sys.stderr)
                s.cycle(name, m)

    # One binary at a time holds the unrelated entries, so the kernel's table has --entries
    # entries, not one set per binary (a walk covers every namespace's entries); --interleave
    # fills all at once and alternates binaries every run instead.
    groups = [stacks] if a.interleave else [[s] for s in stacks]
    for group in groups:
        for s in group:
            print(f"{s.label}: {a.entries} {a.kind} entries", file=sys.stderr)
            fill(s.host, a.entries, a.kind)
        for i in range(a.runs):
            ones(group, i)
        for i in range(a.range_runs):
            ranges(group, i)
        for s in group:
            drain(s.host)
    head = "| median of runs, ms | " + " | ".join(s.label for s in stacks) + " |"
    total = a.entries * (len(stacks) if a.interleave else 1)
    print(f"\n{a.entries} unrelated UDP conntrack entries ({a.kind}) per namespace, {total} in the "
          f"kernel's table at a time; kernel {os.uname().release}\n")
    print(head)
    print("|---" * (len(stacks) + 1) + "|")
    rows = []
    for name in list(one) + list(rng):
        for k, phase in enumerate(("setup", "teardown")):
            rows.append((f"{name} {phase}", [ms(s.times.get(name, ([], []))[k]) for s in stacks]))
    for k, phase in enumerate(("setup", "teardown")):
        diff = []
        for s in stacks:
            u, t = s.times.get("udp 1 port", ([], []))[k], s.times.get("tcp 1 port", ([], []))[k]
            diff.append(f"{(statistics.median(u) - statistics.median(t)) * 1e3:+.1f}" if u and t else "–")
        rows.append((f"udp − tcp, 1 port, {phase}", diff))
        diff = []
        for s in stacks:
            u, t = s.times.get("udp 1,000 ports", ([], []))[k], s.times.get("tcp 1,000 ports", ([], []))[k]
            diff.append(f"{(statistics.median(u) - statistics.median(t)) * 1e3:+.1f}" if u and t else "–")
        rows.append((f"udp − tcp, 1,000 ports, {phase}", diff))
    for r, vals in rows:
        print(f"| {r} | " + " | ".join(vals) + " |")
    runs = {name: len(stacks[0].times.get(name, ([], []))[0]) for name in list(one) + list(rng)}
    print(f"\nruns per binary: {runs} (first binary's count)")
    for s in stacks:
        by = {}
        for phase, step, us in s.traces:
            by.setdefault((phase, step), []).append(us)
        for (phase, step), us in sorted(by.items()):
            print(f"{s.label}: trace {phase} {step}: median {statistics.median(us) / 1e3:.2f} ms "
                  f"over {len(us)} (min {min(us) / 1e3:.2f}, max {max(us) / 1e3:.2f})")


if __name__ == "__main__":
    main()
