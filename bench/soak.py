#!/usr/bin/env python3
"""Soak: many create/delete cycles of bridge containers, each with a dynamic TCP and a dynamic UDP
mapping, a few in flight at once, real traffic through the host ports every Nth cycle (a TCP
connection and a UDP datagram from a client namespace), then what is left:

- links with netshim's prefixes (`nsh`, `nsa`) in the host namespace,
- elements in the maps and sets of netshim's nftables table,
- committed records, unfinished intents, port/address/link claims that still name a holder,
- ports left in `net.ipv4.ip_local_reserved_ports`,
- conntrack entries of container addresses (UDP outside a released container's conntrack zone,
  where nothing is looked up any more; TCP still open, not timing out),
- mounts under the state dir, files there that an idle ledger does not hold,
- whatever `shim gc` still finds to repair.

Everything runs in namespaces created here (a "host" where the shim runs, a client, one per
container) and deleted at the end; the real host's links and firewall are never touched. The suite
has the short version (tests/soak.rs, 500 cycles). Run as root:

    cargo build --release
    python3 bench/soak.py [--cycles 10000] [--in-flight 4] [--state-dir /dev/shm/netshim-soak]

Exit status: 0 clean, 1 a step failed, 2 something was left behind.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST_IP, CLIENT_IP = "192.168.77.1", "192.168.77.2"
GATEWAY = "10.213.0.1"
MAPS = '[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]'
CONFIG = '[ports]\ndynamic_range = "30000-59999"\n'

SERVER = r"""
import socket, sys, time
reply = sys.argv[1].encode()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 80)); t.listen(4); t.setblocking(False)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 53)); u.settimeout(0.05)
print("ready", flush=True)
tcp = udp = False
end = time.time() + 15
while not (tcp and udp) and time.time() < end:
    if not tcp:
        try:
            c, _ = t.accept(); c.sendall(reply); c.close(); tcp = True
        except BlockingIOError:
            pass
    if not udp:
        try:
            _, a = u.recvfrom(64); u.sendto(reply, a); udp = True
        except socket.timeout:
            pass
sys.exit(0 if tcp and udp else 1)
"""

CLIENT = r"""
import socket, sys, time
host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
end = time.time() + 5
while True:
    try:
        s = socket.create_connection((host, tport), timeout=1); s.settimeout(2)
        b = b""
        while True:
            x = s.recv(64)
            if not x:
                break
            b += x
        out.append(b.decode()); break
    except OSError:
        if time.time() > end:
            out.append("-"); break
        time.sleep(0.1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.7)
got = "-"
for _ in range(5):
    u.sendto(b"ping", (host, uport))
    try:
        got = u.recvfrom(64)[0].decode(); break
    except socket.timeout:
        pass
out.append(got)
print(" ".join(out))
"""


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def run(argv, inp=None, env=None, check=True):
    p = subprocess.run(argv, input=inp, capture_output=True, text=True, env=env, timeout=120)
    if check and p.returncode != 0:
        raise Failed(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


class Soak:
    def __init__(self, a):
        self.a = a
        self.prefix = f"nssk{os.getpid() % 100000}"
        self.host, self.client = self.prefix + "h", self.prefix + "k"
        self.tmp = tempfile.mkdtemp(prefix="netshim-soak-")
        self.state = a.state_dir or os.path.join(self.tmp, "state")
        self.config = os.path.join(self.tmp, "config.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG)
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETSHIM_STATE_DIR": self.state,
                    "NETSHIM_CONFIG": self.config}
        self.live = {}  # ns -> sleep process
        self.setup_ms, self.teardown_ms = [], []

    def ip(self, *args):
        return run(["ip", *args]).stdout

    def in_ns(self, ns, argv):
        return ["nsenter", f"--net=/run/netns/{ns}", *argv]

    def start(self):
        if os.path.exists(self.state):
            if os.listdir(self.state):
                raise Failed(f"state dir {self.state} is not empty")
        for ns in (self.host, self.client):
            self.ip("netns", "add", ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
        ha, cb = self.prefix + "a", self.prefix + "b"
        self.ip("-n", self.host, "link", "add", ha, "type", "veth", "peer", "name", cb,
                "netns", self.client)
        self.ip("-n", self.host, "addr", "add", HOST_IP + "/30", "dev", ha)
        self.ip("-n", self.host, "link", "set", ha, "up")
        self.ip("-n", self.client, "addr", "add", CLIENT_IP + "/30", "dev", cb)
        self.ip("-n", self.client, "link", "set", cb, "up")
        self.ip("-n", self.client, "route", "add", "default", "via", HOST_IP)

    def shim(self, args, inp=""):
        return self.in_ns(self.host, [self.a.shim, *args]), inp

    def container(self, i):
        ns = f"{self.prefix}c{i}"
        self.ip("netns", "add", ns)
        p = subprocess.Popen(self.in_ns(ns, ["sleep", "600"]), stdin=subprocess.DEVNULL)
        self.live[ns] = p
        # nsenter execs sleep: the pid is the container's process once it has entered.
        deadline = time.time() + 5
        want = os.stat(f"/run/netns/{ns}").st_ino
        while os.stat(f"/proc/{p.pid}/ns/net").st_ino != want:
            if time.time() > deadline:
                raise Failed(f"container {ns} did not start")
            time.sleep(0.001)
        st = {"ociVersion": "1.0.2", "id": f"{self.prefix}-ctr{i}", "status": "creating",
              "pid": p.pid, "bundle": "/nonexistent",
              "annotations": {"netshim.network-mode": "bridge", "netshim.port-mappings": MAPS}}
        return ns, st

    def destroy(self, ns):
        p = self.live.pop(ns, None)
        if p:
            p.kill()
            p.wait()
        run(["ip", "netns", "del", ns], check=False)

    def parallel(self, jobs, times):
        """Runs (argv, stdin) jobs at once; all must exit 0. Appends each one's wall ms."""
        t0 = time.monotonic()
        ps = []
        for argv, inp in jobs:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=self.env)
            ps.append((argv, p, inp))
        for argv, p, inp in ps:
            out, err = p.communicate(inp, timeout=120)
            times.append((time.monotonic() - t0) * 1000)
            if p.returncode != 0:
                raise Failed(f"{' '.join(argv[2:])}: exit {p.returncode}: {err.strip()}")

    def ports(self):
        argv, _ = self.shim(["ports", "list", "--json"])
        return json.loads(run(argv, env=self.env).stdout)

    def traffic(self, ns, cid, reply):
        ports = {(p["containerPort"], p["protocol"]): p["hostPort"] for p in self.ports()
                 if p["containerId"] == cid}
        srv = subprocess.Popen(self.in_ns(ns, [sys.executable, "-c", SERVER, reply]),
                               stdout=subprocess.PIPE, text=True)
        if srv.stdout.readline().strip() != "ready":
            raise Failed(f"server in {ns} did not start")
        got = run(self.in_ns(self.client, [sys.executable, "-c", CLIENT, HOST_IP,
                                           str(ports[(80, "tcp")]), str(ports[(53, "udp")])]))
        srv.wait(timeout=20)
        return got.stdout.split() == [reply, reply]

    def cycles(self):
        a = self.a
        done, served, failed_traffic = 0, 0, 0
        t0 = time.monotonic()
        while done < a.cycles:
            batch = [self.container(done + k) for k in range(min(a.in_flight, a.cycles - done))]
            self.parallel([self.shim(["hook", "createRuntime"], json.dumps(st))
                           for _, st in batch], self.setup_ms)
            for k, (ns, st) in enumerate(batch):
                if (done + k) % a.traffic_every == 0:
                    if self.traffic(ns, st["id"], f"c{done + k}"):
                        served += 1
                    else:
                        failed_traffic += 1
                        log(f"cycle {done + k}: traffic through the host ports failed")
            for ns, _ in batch:
                self.destroy(ns)
            self.parallel([self.shim(["hook", "poststop"], json.dumps(
                {"ociVersion": "1.0.2", "id": st["id"], "status": "stopped",
                 "bundle": "/nonexistent"})) for _, st in batch], self.teardown_ms)
            done += len(batch)
            if done % 1000 == 0:
                log(f"{done} cycles, {time.monotonic() - t0:.0f} s")
        return done, served, failed_traffic, time.monotonic() - t0

    def leftovers(self):
        left = {}
        links = json.loads(self.ip("-n", self.host, "-j", "link", "show"))
        # A veth whose container netns the kernel is still destroying goes by itself: wait for it.
        deadline = time.time() + 5
        while True:
            ours = [l["ifname"] for l in links if l["ifname"].startswith(("nsh", "nsa"))]
            if not ours or time.time() > deadline:
                break
            time.sleep(0.1)
            links = json.loads(self.ip("-n", self.host, "-j", "link", "show"))
        left["links"] = ours
        nft = run(self.in_ns(self.host, ["nft", "-j", "list", "table", "ip", "netshim"]),
                  check=False)
        elems = {}
        if nft.returncode == 0:
            for o in json.loads(nft.stdout)["nftables"]:
                for kind in ("set", "map"):
                    if kind in o and o[kind].get("elem"):
                        elems[o[kind]["name"]] = len(o[kind]["elem"])
        left["elements"] = elems
        files = []
        for root, dirs, names in os.walk(self.state):
            for n in names:
                files.append(os.path.relpath(os.path.join(root, n), self.state))
        left["records"] = [f for f in files if f.startswith("containers/")]
        left["intents"] = [f for f in files if f.startswith("pending/")]
        held = []
        for f in files:
            if f.startswith("claims/"):
                with open(os.path.join(self.state, f)) as fh:
                    if any(l and not l.startswith("~") for l in fh.read().splitlines()):
                        held.append(f)
        left["claims held"] = held
        left["other files"] = [f for f in files if f not in ("lock", "index.json")
                               and not f.startswith(("claims/", "containers/", "pending/"))]
        left["reserved ports"] = run(self.in_ns(self.host, [
            "cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])).stdout.strip()
        ct = run(self.in_ns(self.host, ["conntrack", "-L"]), check=False).stdout.splitlines()

        def container_addr(line):
            for w in line.split():
                for k in ("src=", "dst="):
                    if w.startswith(k) and w[4:].startswith("10.213.") and w[4:] != GATEWAY:
                        return True
            return False
        ct = [l for l in ct if container_addr(l)]
        left["conntrack"] = [l for l in ct if ("zone-orig=" not in l if l.startswith("udp")
                                               else not l.startswith("tcp") or "ESTABLISHED" in l)]
        self.closed_tcp = sum(1 for l in ct if l.startswith("tcp")) - sum(
            1 for l in left["conntrack"] if l.startswith("tcp"))
        self.zoned_udp = sum(1 for l in ct if l.startswith("udp") and "zone-orig=" in l)
        with open("/proc/self/mountinfo") as f:
            left["mounts"] = [l.split()[4] for l in f
                              if l.split()[4].startswith(self.state.rstrip("/") + "/")]
        argv, _ = self.shim(["gc"])
        gc = run(argv, env=self.env)
        left["gc repairs"] = gc.stdout.splitlines()
        self.claim_files = sum(1 for f in files if f.startswith("claims/"))
        self.files = len(files)
        return left

    def cleanup(self):
        for ns in list(self.live):
            self.destroy(ns)
        for ns in (self.client, self.host):
            run(["ip", "netns", "del", ns], check=False)
        if self.a.state_dir:
            shutil.rmtree(self.a.state_dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shims = [os.path.join(REPO, t, "release/shim")
             for t in ("target", "target/x86_64-unknown-linux-gnu")]
    ap.add_argument("--shim", default=next((x for x in shims if os.path.exists(x)), shims[0]))
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--traffic-every", type=int, default=25)
    ap.add_argument("--state-dir", help="where the ledger lives (default: a temp dir)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak.py needs root")
    if not os.access(a.shim, os.X_OK):
        sys.exit(f"{a.shim}: not found: cargo build --release first")
    s = Soak(a)
    try:
        s.start()
        done, served, failed_traffic, wall = s.cycles()
        left = s.leftovers()
    except Failed as e:
        log(f"failed: {e}")
        s.cleanup()
        return 1
    except KeyboardInterrupt:
        s.cleanup()
        return 130
    s.cleanup()
    print(f"cycles: {done} ({a.in_flight} in flight), wall {wall:.1f} s, "
          f"{done / wall:.1f} cycles/s; state dir {a.state_dir or 'temp dir'}")
    print(f"traffic trials: {served + failed_traffic}, served {served}, failed {failed_traffic}")
    print(f"batch setup ms p50/p99: {statistics.median(s.setup_ms):.1f} / "
          f"{pct(s.setup_ms, 0.99):.1f}; batch teardown ms p50/p99: "
          f"{statistics.median(s.teardown_ms):.1f} / {pct(s.teardown_ms, 0.99):.1f}")
    bad = 0
    for k, v in left.items():
        if isinstance(v, dict):
            n = sum(v.values())
        elif isinstance(v, str):
            n = len([x for x in v.split(",") if x])
        else:
            n = len(v)
        bad += n
        print(f"left: {k}: {n}" + (f" {v}" if n else ""))
    print(f"not leftovers: {s.closed_tcp} closed TCP conntrack entries timing out, "
          f"{s.zoned_udp} UDP entries timing out in released zones; "
          f"{s.claim_files} released-port claims (tombstones for the reuse delay) of "
          f"{s.files} files in the state dir")
    return 2 if bad or failed_traffic else 0


if __name__ == "__main__":
    sys.exit(main())
