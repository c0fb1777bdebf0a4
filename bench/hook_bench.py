#!/usr/bin/env python3
"""Benchmark netshim's OCI hook (bridge mode, one TCP host port) against the same work done
with `ip` and `nft` commands, with 0 and with N other containers already set up.

Everything happens inside a network namespace this script creates ("host" netns, named
nsb<pid>-h): the real host's links and firewall are never touched. Each simulated container is a
fresh named netns with a sleeping process in it. Python 3 standard library only; run as root:

    sudo python3 bench/hook_bench.py [--runs N] [--running 0,500] [--quick] [--out FILE]

See bench/README.md for what is measured and how.
"""

import argparse
import atexit
import ctypes
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CLONE_NEWNET = 0x40000000
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The shim's defaults (config.rs / firewall.rs) and the baseline's own, separate, equivalents.
SHIM_BRIDGE = "netshim0"
SHIM_TABLE = "netshim"
SHIM_RANGE = "20000-60000"
BASE_BRIDGE = "nsbase0"
BASE_TABLE = "nsbase"
BASE_NET = (10, 214)  # 10.214.0.0/16, gateway .0.1
BASE_GW = "10.214.0.1"
BASE_PORT0 = 10000  # baseline host ports: 10000.. (outside the shim's dynamic range)

TIMEOUT = 120  # seconds, any single command


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def setns(fd, nstype=CLONE_NEWNET):
    """Moves the calling thread into the namespace `fd` (os.setns on 3.12+, libc on older)."""
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def thread_netns_inode():
    return os.stat("/proc/thread-self/ns/net").st_ino


def forks_since_boot():
    """The kernel's fork counter (/proc/stat `processes`): system-wide, so other activity on
    the machine can only add to a delta, never hide a fork of ours."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("processes "):
                return int(line.split()[1])
    return 0


def cpu_ticks():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def own_cpu():
    """CPU seconds of this process and its waited-for children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class CpuWatch:
    """How busy the machine was with work that is not the bench's (other sessions' builds,
    tests...): (all CPU time − the bench's own) / (wall time × CPUs). Kernel work done for the
    bench in kernel threads (netns cleanup, RCU) counts as foreign, so it is an upper bound."""

    def __init__(self):
        self.b0, self.t0 = cpu_ticks()
        self.o0 = own_cpu()

    def foreign(self):
        b1, t1 = cpu_ticks()
        dt = t1 - self.t0
        if dt <= 0:
            return 0.0
        hz = os.sysconf("SC_CLK_TCK")
        busy = (b1 - self.b0) / hz
        own = own_cpu() - self.o0
        ncpu = os.cpu_count() or 1
        return max(0.0, busy - own) / (dt / hz / ncpu) / ncpu


def wait_quiet(limit_s, threshold=0.10):
    """Waits (up to limit_s) for a 1-second window in which foreign CPU use is under threshold.
    Returns the last measured foreign fraction."""
    deadline = time.monotonic() + limit_s
    while True:
        w = CpuWatch()
        time.sleep(1.0)
        f = w.foreign()
        if f < threshold or time.monotonic() >= deadline:
            return f
        log(f"  machine busy with other work ({f:.0%} of the CPUs): waiting for it to calm down")


def pct(xs, q):
    """q-th percentile, linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run(argv, inp=None, check=True, env=None):
    """Runs a command (not timed); raises BenchError with its stderr on failure."""
    r = subprocess.run(
        argv,
        input=inp,
        stdin=None if inp is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        timeout=TIMEOUT,
    )
    if check and r.returncode != 0:
        raise BenchError(
            f"`{' '.join(argv)}` exited {r.returncode}: "
            f"{r.stderr.decode(errors='replace').strip() or r.stdout.decode(errors='replace').strip()}"
        )
    return r



# -- cleanup helpers (also used by compare.py)
def named_netns(prefix):
    """Our named namespaces (`prefix-*`) and their inodes. While a name is mounted its inode
    cannot be reused, so the inodes identify our namespaces and nobody else's."""
    names = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
             if n.startswith(prefix + "-")]
    inodes = set()
    for n in names:
        try:
            inodes.add(os.stat(f"/run/netns/{n}").st_ino)
        except OSError:
            pass
    return names, inodes


def kill_inside(inodes):
    """SIGKILL every process (but this one) whose netns is one of `inodes`."""
    me = os.getpid()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                    os.kill(int(d), signal.SIGKILL)
            except OSError:
                pass


def stop_procs(procs):
    """Kill and reap child processes."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def delete_netns(names):
    """`ip netns del` each name (in the given order), retrying briefly while some remain."""
    for _ in range(3):
        for n in names:
            if os.path.exists(f"/run/netns/{n}"):
                subprocess.run(["ip", "netns", "del", n], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=60)
        if not any(os.path.exists(f"/run/netns/{n}") for n in names):
            break
        time.sleep(0.3)


class Bench:
    def __init__(self, args):
        self.args = args
        self.pid = os.getpid()
        self.prefix = f"nsb{self.pid}"
        self.host_ns = f"{self.prefix}-h"
        self.sleepers = []  # Popen objects
        self.ns_inodes = {}  # netns name -> inode, for the final leak check
        self.root_fd = None
        self.host_ino = None
        self.tmp = None
        self.cleaned = False
        self.t_start = time.perf_counter()
        self.seq = 0  # unique suffix for timed container names
        self.base_n = 0  # baseline containers ever made (addresses, ports, names)
        self.shim_bg = []  # (id, netns) of the shim's background containers
        self.base_bg = []  # (veth, port) of the baseline's background containers
        self.bg_setup_ms = []  # untimed-by-the-table background shim setups, in order
        self.results = {}  # (stack, level) -> dict
        self.diag = {}  # level -> dict of spawn-floor timings
        self.first_use = {}
        self.notes = []
        self.last_split = []
        self.last_cpu = 0.0
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

    # ------------------------------------------------------------------ namespaces & processes

    def in_host(self):
        if thread_netns_inode() != self.host_ino:
            raise BenchError("safety check: this thread is not in the bench's host netns")

    def add_netns(self, name):
        run(["ip", "netns", "add", name])
        self.ns_inodes[name] = os.stat(f"/run/netns/{name}").st_ino

    def del_netns(self, name):
        run(["ip", "netns", "del", name], check=False)

    def start_sleeper(self, ns):
        """`ip netns exec NS sleep 100000`; returns its pid once it really is inside NS (ip
        switches namespace after the fork: until then /proc/<pid>/ns/net is ours)."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sleep", "100000"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.sleepers.append(p)
        want = self.ns_inodes[ns]
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.stat(f"/proc/{p.pid}/ns/net").st_ino == want:
                    return p
            except FileNotFoundError:
                pass
            if p.poll() is not None:
                raise BenchError(f"sleeper in {ns} exited with {p.returncode}")
            if time.monotonic() > deadline:
                raise BenchError(f"sleeper in {ns} never entered the namespace")
            time.sleep(0.0005)

    def stop_sleeper(self, p):
        if p.poll() is None:
            p.kill()
        p.wait()

    # ------------------------------------------------------------------ setup of the bench

    def prepare(self):
        a = self.args
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=a.tmp_parent)
        # A private copy of the binary: a rebuild during the run cannot change what is measured.
        self.shim = os.path.join(self.tmp, "shim")
        shutil.copy2(a.shim, self.shim)
        with open(self.shim, "rb") as f:
            self.shim_sha = hashlib.sha256(f.read()).hexdigest()[:16]
        self.state_dir = os.path.join(self.tmp, "state")
        self.config = os.path.join(self.tmp, "config.toml")
        with open(self.config, "w") as f:
            f.write(f'[ports]\ndynamic_range = "{SHIM_RANGE}"\n')
        self.shim_env = dict(self.env, NETSHIM_STATE_DIR=self.state_dir, NETSHIM_CONFIG=self.config)

        self.root_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.add_netns(self.host_ns)
        self.host_ino = self.ns_inodes[self.host_ns]
        hfd = os.open(f"/run/netns/{self.host_ns}", os.O_RDONLY)
        try:
            setns(hfd)
        finally:
            os.close(hfd)
        self.in_host()
        log(f"in host netns {self.host_ns} (inode {self.host_ino}); temp dir {self.tmp}")
        run(["ip", "link", "set", "lo", "up"])
        if self.args.no_ipv6:
            # Only in the bench's host netns (this thread is in it; /proc/sys/net follows it).
            for k in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{k}/disable_ipv6", "w") as f:
                    f.write("1")

        # Baseline: its own bridge and its own table, same shape as the shim's port map.
        run(["ip", "link", "add", BASE_BRIDGE, "type", "bridge", "forward_delay", "0"])
        run(["ip", "addr", "add", f"{BASE_GW}/16", "dev", BASE_BRIDGE])
        run(["ip", "link", "set", BASE_BRIDGE, "up"])
        run(["nft", "-f", "-"], inp=(
            f"table ip {BASE_TABLE} {{\n"
            "  map ports { type inet_proto . inet_service : ipv4_addr . inet_service; }\n"
            "  set mapped { type inet_proto . inet_service; }\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            "    fib daddr type local meta l4proto { tcp, udp } "
            "dnat ip to meta l4proto . th dport map @ports\n"
            "  }\n"
            "}\n").encode())

    # ------------------------------------------------------------------ the two stacks

    def oci_create(self, cid, pid):
        ann = {
            "netshim.network-mode": "bridge",
            "netshim.port-mappings": json.dumps([{"containerPort": 80}]),
        }
        return json.dumps({"ociVersion": "1.0.2", "id": cid, "status": "creating", "pid": pid,
                           "bundle": "/nonexistent", "annotations": ann}).encode()

    def oci_stop(self, cid):
        return json.dumps({"ociVersion": "1.0.2", "id": cid, "status": "stopped",
                           "bundle": "/nonexistent"}).encode()

    def shim_setup_cmds(self, cid, pid):
        return [([self.shim, "hook", "createRuntime"], self.oci_create(cid, pid))]

    def shim_teardown_cmds(self, cid):
        return [([self.shim, "hook", "poststop"], self.oci_stop(cid))]

    def base_alloc(self):
        k = self.base_n
        self.base_n += 1
        off = 2 + k
        ip = f"{BASE_NET[0]}.{BASE_NET[1]}.{off >> 8}.{off & 255}"
        return f"nbv{k:05d}", ip, BASE_PORT0 + k

    def base_setup_cmds(self, ns, veth, ip, port):
        hairpin = ([(["ip", "link", "set", veth, "type", "bridge_slave", "hairpin", "on"], None)]
                   if self.args.baseline_hairpin else [])
        return [
            (["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns], None),
            (["ip", "link", "set", veth, "master", BASE_BRIDGE, "up"], None),
        ] + hairpin + [
            (["ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0"], None),
            (["ip", "-n", ns, "link", "set", "eth0", "up"], None),
            (["ip", "-n", ns, "link", "set", "lo", "up"], None),
            (["ip", "-n", ns, "route", "add", "default", "via", BASE_GW], None),
            # Same transaction content as the shim's: the map element and the guard-set entry.
            (["nft", f"add element ip {BASE_TABLE} ports {{ tcp . {port} : {ip} . 80 }}; "
                     f"add element ip {BASE_TABLE} mapped {{ tcp . {port} }}"], None),
        ]

    def base_teardown_cmds(self, veth, port):
        return [
            (["nft", f"delete element ip {BASE_TABLE} ports {{ tcp . {port} }}; "
                     f"delete element ip {BASE_TABLE} mapped {{ tcp . {port} }}"], None),
            (["ip", "link", "del", veth], None),
        ]

    def timed(self, cmds, env):
        """Runs cmds in sequence the way a runtime runs a hook (exec, state on stdin, output
        captured). Returns (milliseconds, forks seen by the kernel meanwhile); the time of each
        command is left in self.last_split."""
        split = []
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        f0 = forks_since_boot()
        t0 = time.perf_counter()
        for argv, inp in cmds:
            c0 = time.perf_counter()
            r = subprocess.run(argv, input=inp,
                               stdin=None if inp is not None else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, timeout=TIMEOUT)
            if r.returncode != 0:
                raise BenchError(
                    f"`{' '.join(argv)}` exited {r.returncode}"
                    + (f" (stdin: {inp.decode()})" if inp else "")
                    + f": {r.stderr.decode(errors='replace').strip()}")
            split.append(time.perf_counter() - c0)
        t1 = time.perf_counter()
        f1 = forks_since_boot()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.last_split = [x * 1000.0 for x in split]
        # CPU (user + system) of the spawned processes, from their rusage at wait().
        self.last_cpu = ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1000.0
        return (t1 - t0) * 1000.0, f1 - f0

    # ------------------------------------------------------------------ checks (never timed)

    def load_state(self):
        with open(os.path.join(self.state_dir, "state.json")) as f:
            return json.load(f)

    def check_shim_up(self, cid, ns):
        st = self.load_state()
        rec = st["containers"].get(cid)
        if not rec:
            raise BenchError(f"shim: container {cid} is not in state.json after createRuntime")
        ip, veth = rec["ip"], rec["veth"]
        port = rec["ports"][0]["hostPort"]
        out = run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"]).stdout.decode()
        if f"inet {ip}/16" not in out:
            raise BenchError(f"shim: eth0 in {ns} lacks {ip}/16: {out.strip()}")
        out = run(["ip", "-o", "link", "show", veth]).stdout.decode()
        if f"master {SHIM_BRIDGE}" not in out:
            raise BenchError(f"shim: {veth} not on {SHIM_BRIDGE}: {out.strip()}")
        out = run(["nft", f"get element ip {SHIM_TABLE} ports {{ tcp . {port} }}"]).stdout.decode()
        if f"{ip} . 80" not in out:
            raise BenchError(f"shim: map element for tcp/{port} missing or wrong: {out.strip()}")
        return veth, port

    def check_shim_down(self, cid, veth, port):
        if cid in self.load_state()["containers"]:
            raise BenchError(f"shim: {cid} still in state.json after poststop")
        if run(["ip", "link", "show", veth], check=False).returncode == 0:
            raise BenchError(f"shim: {veth} still exists after poststop")
        r = run(["nft", f"get element ip {SHIM_TABLE} ports {{ tcp . {port} }}"], check=False)
        if r.returncode == 0:
            raise BenchError(f"shim: element tcp/{port} still mapped after poststop")

    def check_base_up(self, ns, veth, ip, port):
        out = run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"]).stdout.decode()
        if f"inet {ip}/16" not in out:
            raise BenchError(f"baseline: eth0 in {ns} lacks {ip}/16")
        out = run(["nft", f"get element ip {BASE_TABLE} ports {{ tcp . {port} }}"]).stdout.decode()
        if f"{ip} . 80" not in out:
            raise BenchError(f"baseline: element tcp/{port} missing")

    def counts(self):
        """(shim veths on its bridge, shim map elements, baseline veths, baseline elements)."""
        def ports_on(br):
            out = run(["ip", "-o", "link", "show", "master", br], check=False).stdout.decode()
            return sum(1 for l in out.splitlines() if l.strip())

        def elements(table):
            r = run(["nft", "-j", "list", "map", "ip", table, "ports"], check=False)
            if r.returncode != 0:
                return 0
            for obj in json.loads(r.stdout)["nftables"]:
                if "map" in obj:
                    return len(obj["map"].get("elem", []))
            return 0

        return ports_on(SHIM_BRIDGE), elements(SHIM_TABLE), ports_on(BASE_BRIDGE), elements(BASE_TABLE)

    # ------------------------------------------------------------------ phases

    def warm_up(self):
        """First use: the shim creates its bridge and table here. Timed separately, not in the
        table. One baseline setup/teardown warms the same caches for ip and nft."""
        self.in_host()
        ns = f"{self.prefix}-w"
        self.add_netns(ns)
        p = self.start_sleeper(ns)
        ms, _ = self.timed(self.shim_setup_cmds("warmup", p.pid), self.shim_env)
        veth, port = self.check_shim_up("warmup", ns)
        ms2, _ = self.timed(self.shim_teardown_cmds("warmup"), self.shim_env)
        self.check_shim_down("warmup", veth, port)
        self.first_use = {"setup": ms, "teardown": ms2}
        nsb = f"{self.prefix}-wb"
        self.add_netns(nsb)
        veth, ip, port = self.base_alloc()
        self.timed(self.base_setup_cmds(nsb, veth, ip, port), self.env)
        self.check_base_up(nsb, veth, ip, port)
        self.timed(self.base_teardown_cmds(veth, port), self.env)
        self.stop_sleeper(p)
        self.del_netns(ns)
        self.del_netns(nsb)
        log(f"first use (creates bridge + table): shim setup {ms:.1f} ms, teardown {ms2:.1f} ms")

    def grow_to(self, level):
        """Brings both stacks to `level` running containers (untimed; set up by the shim itself
        and by the same ip/nft commands)."""
        self.in_host()
        t0 = time.perf_counter()
        need = level - len(self.shim_bg)
        for _ in range(max(0, need)):
            k = len(self.shim_bg)
            ns = f"{self.prefix}-s{k}"
            self.add_netns(ns)
            p = self.start_sleeper(ns)
            cid = f"bg-{k}"
            ms, _ = self.timed(self.shim_setup_cmds(cid, p.pid), self.shim_env)
            self.bg_setup_ms.append(ms)
            self.shim_bg.append((cid, ns))
            if (k + 1) % 100 == 0:
                log(f"  shim background containers: {k + 1}/{level}")
        need = level - len(self.base_bg)
        for _ in range(max(0, need)):
            k = len(self.base_bg)
            ns = f"{self.prefix}-b{k}"
            self.add_netns(ns)
            veth, ip, port = self.base_alloc()
            self.timed(self.base_setup_cmds(ns, veth, ip, port), self.env)
            self.base_bg.append((veth, port))
            if (k + 1) % 100 == 0:
                log(f"  baseline background containers: {k + 1}/{level}")
        c = self.counts()
        want = (level, level, level, level)
        if c != want:
            raise BenchError(f"after growing to {level}: (shim veths, shim elements, "
                             f"baseline veths, baseline elements) = {c}, want {want}")
        log(f"  {level} running in each stack, checked (veths on bridges, map elements); "
            f"took {time.perf_counter() - t0:.1f} s")

    def diagnostics(self, level, n):
        """Spawn floors at this level: what one process costs before it does any work."""
        ns = f"{self.prefix}-d"
        self.add_netns(ns)
        d = {}
        for name, cmd in [("true", ["/bin/true"]),
                          ("ip link show lo", ["ip", "link", "show", "lo"]),
                          ("ip -n NS link show lo", ["ip", "-n", ns, "link", "show", "lo"]),
                          ("nft list tables", ["nft", "list", "tables"])]:
            xs = [self.timed([(cmd, None)], self.env)[0] for _ in range(max(n, 5))]
            d[name] = statistics.median(xs)
        self.del_netns(ns)
        self.diag[level] = d

    def one_run(self, level, i):
        """One run: fresh container netns for each stack, setup of both (alternating which goes
        first), checks, teardown of both. Returns {stack: (setup ms, teardown ms, forks at
        setup, forks at teardown, per-command split of setup, of teardown)}."""
        self.seq += 1
        ns_s = f"{self.prefix}-t{self.seq}s"
        ns_b = f"{self.prefix}-t{self.seq}b"
        self.add_netns(ns_s)
        self.add_netns(ns_b)
        p = self.start_sleeper(ns_s)
        cid = f"run-{level}-{self.seq}"
        veth_b, ip_b, port_b = self.base_alloc()
        out = {"netshim": [None] * 8, "ip+nft": [None] * 8}

        def step(stack, slot, cmds, env):
            ms, forks = self.timed(cmds, env)
            out[stack][slot] = ms
            out[stack][slot + 2] = forks
            out[stack][slot + 4] = self.last_split
            out[stack][slot + 6] = self.last_cpu

        ups = [lambda: step("netshim", 0, self.shim_setup_cmds(cid, p.pid), self.shim_env),
               lambda: step("ip+nft", 0, self.base_setup_cmds(ns_b, veth_b, ip_b, port_b), self.env)]
        downs = [lambda: step("netshim", 1, self.shim_teardown_cmds(cid), self.shim_env),
                 lambda: step("ip+nft", 1, self.base_teardown_cmds(veth_b, port_b), self.env)]
        if i % 2:  # alternate which stack goes first, so drift and order effects cancel out
            ups.reverse()
            downs.reverse()
        ups[0]()
        time.sleep(self.args.settle)
        ups[1]()
        veth_s, port_s = self.check_shim_up(cid, ns_s)
        self.check_base_up(ns_b, veth_b, ip_b, port_b)
        time.sleep(self.args.settle)
        downs[0]()
        time.sleep(self.args.settle)
        downs[1]()
        self.check_shim_down(cid, veth_s, port_s)
        self.stop_sleeper(p)
        self.del_netns(ns_s)
        self.del_netns(ns_b)
        time.sleep(self.args.settle)  # let the kernel's async netns cleanup finish
        return out

    def measure(self, level, n):
        self.in_host()
        keep = {"netshim": [], "ip+nft": []}
        quiet = wait_quiet(self.args.wait_idle)
        kept_foreign = []
        redone = 0
        i = 0
        while len(keep["netshim"]) < n:
            w = CpuWatch()
            out = self.one_run(level, i)
            f = w.foreign()
            if f > self.args.max_foreign and redone < self.args.max_redo:
                # Another session's build or tests took the CPUs during this run: drop it.
                redone += 1
                log(f"  run dropped: other work took {f:.0%} of the CPUs during it; redoing")
                wait_quiet(self.args.wait_idle)
                continue
            for stack in keep:
                keep[stack].append(out[stack])
            kept_foreign.append(f)
            i += 1
        load = (quiet, statistics.mean(kept_foreign), max(kept_foreign))
        for stack, rows in keep.items():
            setup = [r[0] for r in rows]
            teardown = [r[1] for r in rows]
            self.results[(stack, level)] = {
                "setup_p50": statistics.median(setup), "setup_p90": pct(setup, 90),
                "teardown_p50": statistics.median(teardown), "teardown_p90": pct(teardown, 90),
                "setup_min": min(setup), "setup_max": max(setup),
                "procs_setup": len(self.shim_setup_cmds("x", 1)) if stack == "netshim"
                else len(self.base_setup_cmds("n", "v", "i", 1)),
                "procs_teardown": len(self.shim_teardown_cmds("x")) if stack == "netshim"
                else len(self.base_teardown_cmds("v", 1)),
                "forks_setup_min": min(r[2] for r in rows),
                "forks_teardown_min": min(r[3] for r in rows),
                "n": len(rows), "load": load, "redone": redone,
                "cpu_setup_p50": statistics.median(r[6] for r in rows),
                "cpu_teardown_p50": statistics.median(r[7] for r in rows),
                # Per-command p50: where the time goes.
                "split": ([statistics.median(c) for c in zip(*(r[4] for r in rows))],
                          [statistics.median(c) for c in zip(*(r[5] for r in rows))]),
            }
        r, b = self.results[("netshim", level)], self.results[("ip+nft", level)]
        if self.args.strace_dir:
            self.strace_one(level)
        log(f"  level {level}: shim setup p50 {r['setup_p50']:.2f} ms, teardown p50 "
            f"{r['teardown_p50']:.2f} ms | ip+nft setup p50 {b['setup_p50']:.2f} ms, teardown p50 "
            f"{b['teardown_p50']:.2f} ms ({redone} runs redone)")

    def strace_one(self, level):
        """One extra, untimed shim setup + teardown under `strace -f -tt -T` (--strace-dir)."""
        if not shutil.which("strace"):
            self.notes.append("--strace-dir: strace not installed, no traces taken")
            return
        os.makedirs(self.args.strace_dir, exist_ok=True)
        ns = f"{self.prefix}-x{level}"
        self.add_netns(ns)
        p = self.start_sleeper(ns)
        cid = f"strace-{level}"
        for stage, inp in (("setup", self.oci_create(cid, p.pid)), ("teardown", self.oci_stop(cid))):
            path = os.path.join(self.args.strace_dir, f"shim-{stage}-{level}.txt")
            hook = "createRuntime" if stage == "setup" else "poststop"
            run(["strace", "-f", "-tt", "-T", "-o", path, self.shim, "hook", hook], inp=inp,
                env=self.shim_env)
        self.stop_sleeper(p)
        self.del_netns(ns)
        self.notes.append(f"strace of one shim setup/teardown at {level} running: "
                          f"{self.args.strace_dir}/shim-{{setup,teardown}}-{level}.txt")

    def reset(self):
        """`shim reset --force` (untimed by the table; reported) before everything is deleted."""
        self.in_host()
        t0 = time.perf_counter()
        r = run([self.shim, "reset", "--force"], check=False, env=self.shim_env)
        ms = (time.perf_counter() - t0) * 1000
        left = run(["ip", "link", "show", SHIM_BRIDGE], check=False).returncode == 0
        tab = run(["nft", "list", "table", "ip", SHIM_TABLE], check=False).returncode == 0
        if r.returncode != 0 or left or tab:
            self.notes.append(f"`shim reset --force` exited {r.returncode} "
                              f"({r.stderr.decode(errors='replace').strip()}); bridge left: {left}, "
                              f"table left: {tab}")
        else:
            self.notes.append(f"`shim reset --force` with {len(self.shim_bg)} containers recorded: "
                              f"{ms:.0f} ms, bridge and table gone")

    # ------------------------------------------------------------------ cleanup & final check

    def cleanup(self):
        if self.cleaned:
            return
        self.cleaned = True
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        try:
            stop_procs(self.sleepers)
            if self.root_fd is not None:
                try:
                    setns(self.root_fd)
                except OSError as e:
                    log(f"cleanup: cannot return to the original netns: {e}")
            # Any process still inside one of the bench's namespaces goes first (a sleeper
            # that outlived its Popen handle keeps a netns alive).
            names, self.live_inodes = named_netns(self.prefix)
            kill_inside(self.live_inodes)
            # Containers first, the host netns (bridges, tables, veths) last.
            names.sort(key=lambda n: n == self.host_ns)
            delete_netns(names)
            if self.tmp and os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)

    def leftovers(self):
        """What is still there after cleanup (empty list: nothing)."""
        out = []
        if os.path.isdir("/run/netns"):
            out += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(self.prefix)]
        alive = [p.pid for p in self.sleepers if p.poll() is None]
        if alive:
            out.append(f"sleeper processes still alive: {alive[:10]}")
        # Namespaces deleted during the runs had their sleepers killed first; only those alive
        # at cleanup could hold a straggler (and their inode numbers cannot have been reused
        # while a straggler keeps them alive).
        inodes = getattr(self, "live_inodes", set())
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                        out.append(f"pid {d} is inside one of the bench's namespaces")
                except OSError:
                    pass
        if self.tmp and os.path.exists(self.tmp):
            out.append(f"temp dir {self.tmp}")
        if self.root_fd is not None and thread_netns_inode() == self.host_ino:
            out.append("this process is still in the bench's host netns")
        # The baseline's names are the bench's own; netshim0 / table netshim are not checked here
        # (the project's own tests may use them), every shim run was checked to be in the bench
        # netns instead.
        links = run(["ip", "-o", "link", "show"], check=False).stdout.decode()
        for name in (BASE_BRIDGE, "nbv"):
            if f": {name}" in links:
                out.append(f"a link named {name}* in the original netns")
        tables = run(["nft", "list", "tables"], check=False).stdout.decode()
        if f"table ip {BASE_TABLE}\n" in tables + "\n":
            out.append(f"table ip {BASE_TABLE} in the original netns")
        return out


# ---------------------------------------------------------------------- report


def machine_info(b):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "cpu model"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1048576:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    fs = (run(["findmnt", "-no", "FSTYPE", "-T", b.args.tmp_parent], check=False).stdout.decode()
          .split("\n")[0].strip())
    ipv = run(["ip", "-V"], check=False).stdout.decode().strip()
    nftv = run(["nft", "--version"], check=False).stdout.decode().strip()
    shimv = run([b.args.shim, "--version"], check=False).stdout.decode().strip()
    git = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False).stdout.decode().strip()
    return [
        f"nproc: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        f"kernel: {platform.release()}",
        f"CPU: {cpu}",
        f"memory: {mem}",
        f"python: {platform.python_version()}; {ipv}; {nftv}",
        f"shim: {shimv} ({b.args.shim}, sha256 {b.shim_sha}…, tree {git or '?'})",
        f"state dir on: {fs or '?'} ({b.args.tmp_parent}); IPv6 in the host netns: "
        f"{'disabled' if b.args.no_ipv6 else 'on (default)'}; baseline hairpin: "
        f"{'yes' if b.args.baseline_hairpin else 'no (the shim also turns hairpin on)'}",
    ]


def report(b, levels, n, wall):
    R = b.results
    lines = ["# netshim hook benchmark", ""]
    lines += [f"- {x}" for x in machine_info(b)]
    lines += [f"- runs per condition: {n}; running-container levels: "
              f"{', '.join(map(str, levels))}; settle pause {b.args.settle * 1000:.0f} ms; "
              f"wall time {wall:.0f} s", ""]
    lines += ["Times in ms, wall clock around exec-to-exit of every process of one setup "
              "(or teardown), state on stdin, output captured.", ""]
    lines += ["| stack | running | setup p50 | setup p90 | teardown p50 | teardown p90 "
              "| processes / setup | processes / teardown | forks seen / setup (min) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stack in ("netshim", "ip+nft"):
        for lv in levels:
            r = R[(stack, lv)]
            lines.append(
                f"| {stack} | {lv} | {r['setup_p50']:.2f} | {r['setup_p90']:.2f} | "
                f"{r['teardown_p50']:.2f} | {r['teardown_p90']:.2f} | {r['procs_setup']} | "
                f"{r['procs_teardown']} | {r['forks_setup_min']} |")
    lines += ["", "CPU time (user + system, from rusage) of the spawned processes, p50, ms — the "
              "rest of the wall time is waiting (kernel RCU grace periods, scheduling):", "",
              "| stack | running | setup CPU | teardown CPU |", "|---|---:|---:|---:|"]
    for stack in ("netshim", "ip+nft"):
        for lv in levels:
            r = R[(stack, lv)]
            lines.append(f"| {stack} | {lv} | {r['cpu_setup_p50']:.1f} | {r['cpu_teardown_p50']:.1f} |")
    lines += ["", "Ratios (p50):", ""]
    for lv in levels:
        s, bb = R[("netshim", lv)], R[("ip+nft", lv)]
        lines.append(f"- {lv} running: netshim setup / ip+nft setup = "
                     f"{s['setup_p50'] / bb['setup_p50']:.2f}; teardown = "
                     f"{s['teardown_p50'] / bb['teardown_p50']:.2f}")
    if len(levels) > 1:
        lo, hi = levels[0], levels[-1]
        for stack in ("netshim", "ip+nft"):
            a, z = R[(stack, lo)], R[(stack, hi)]
            lines.append(
                f"- {stack} flatness: setup p50 at {hi} / at {lo} = "
                f"{z['setup_p50'] / a['setup_p50']:.2f} (+{z['setup_p50'] - a['setup_p50']:.2f} ms); "
                f"teardown = {z['teardown_p50'] / a['teardown_p50']:.2f} "
                f"(+{z['teardown_p50'] - a['teardown_p50']:.2f} ms)")
    lines += ["", "Context:", ""]
    if b.first_use:
        lines.append(f"- netshim first use (creates bridge + nft table), not in the table: setup "
                     f"{b.first_use['setup']:.2f} ms, teardown {b.first_use['teardown']:.2f} ms")
    if len(b.bg_setup_ms) >= 20:
        k = max(10, len(b.bg_setup_ms) // 10)
        first, last = b.bg_setup_ms[:k], b.bg_setup_ms[-k:]
        lines.append(
            f"- netshim setups of the {len(b.bg_setup_ms)} background containers, in order: "
            f"median of the first {k} {statistics.median(first):.2f} ms, of the last {k} "
            f"{statistics.median(last):.2f} ms")
    for lv in levels:
        d = b.diag.get(lv)
        if d:
            lines.append(f"- spawn floors at {lv} running (p50): "
                         + ", ".join(f"`{k}` {v:.2f} ms" for k, v in d.items()))
    names_s = (["link add veth", "link set master up"]
               + (["link set hairpin on"] if b.args.baseline_hairpin else [])
               + ["-n addr add", "-n link set eth0 up", "-n link set lo up",
                  "-n route add default", "nft add element"])
    names_t = ["nft delete element", "link del veth"]
    for lv in levels:
        ss, st = R[("ip+nft", lv)]["split"]
        lines.append(f"- ip+nft per-command p50 at {lv} running: setup "
                     + ", ".join(f"`{k}` {v:.2f}" for k, v in zip(names_s, ss))
                     + "; teardown " + ", ".join(f"`{k}` {v:.2f}" for k, v in zip(names_t, st))
                     + " (ms)")
    for lv in levels:
        la = R[("netshim", lv)]["load"]
        lines.append(f"- CPU used by other work on the machine at {lv} running: {la[0]:.0%} just "
                     f"before the runs; during the kept runs {la[1]:.0%} on average, {la[2]:.0%} at "
                     f"most (upper bounds); runs dropped and redone because of it (over "
                     f"{b.args.max_foreign:.0%}): {R[('netshim', lv)]['redone']}")
        if la[1] > 0.15:
            lines.append(f"  - WARNING: the machine was busy with other work during the "
                         f"{lv}-running runs: absolute times are inflated; ratios less so "
                         f"(the stacks alternate run by run)")
    lines += [f"- {x}" for x in b.notes]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, help="runs per condition (default 30; --quick: 5)")
    ap.add_argument("--running", help="running-container levels, comma separated "
                                      "(default 0,500; --quick: 0,50)")
    ap.add_argument("--quick", action="store_true", help="5 runs, levels 0,50 unless given")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"),
                    help="also write the report here (default bench/results.md)")
    ap.add_argument("--shim", default=os.path.join(REPO, "target", "release", "shim"))
    ap.add_argument("--tmp-parent", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",
                    help="where the temp dir (state dir, config) goes; default /dev/shm (tmpfs, "
                         "like /run on most hosts)")
    ap.add_argument("--wait-idle", type=float, default=300,
                    help="before each condition, wait up to this many seconds for other work "
                         "on the machine to stop (default 300)")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="drop and redo a run during which other work used more than this "
                         "fraction of the CPUs (default 0.25)")
    ap.add_argument("--max-redo", type=int, default=100,
                    help="at most this many dropped runs per condition (default 100)")
    ap.add_argument("--strace-dir", help="after each condition, trace one extra (untimed) shim "
                                         "setup and teardown with strace into this directory")
    ap.add_argument("--baseline-hairpin", action="store_true",
                    help="baseline also turns hairpin mode on for its bridge port (as the shim "
                         "does) with an 8th process: `ip link set V type bridge_slave hairpin on`")
    ap.add_argument("--no-ipv6", action="store_true",
                    help="disable IPv6 in the bench's host netns (every new link's IPv6 routes "
                         "otherwise make each link change walk a bigger IPv6 FIB)")
    ap.add_argument("--settle", type=float, default=0.05,
                    help="seconds of idle between timed steps (default 0.05)")
    a = ap.parse_args()
    n = a.runs or (5 if a.quick else 30)
    levels = sorted({int(x) for x in (a.running or ("0,50" if a.quick else "0,500")).split(",")})
    if n < 1 or any(x < 0 for x in levels):
        ap.error("--runs must be >= 1 and levels >= 0")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces, links, nftables)")
    if not os.access(a.shim, os.X_OK):
        ap.error(f"no shim binary at {a.shim}: build it with `cargo build --release`")
    for tool in ("ip", "nft", "findmnt"):
        if not shutil.which(tool):
            ap.error(f"`{tool}` not found")

    b = Bench(a)
    atexit.register(b.cleanup)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    rc = 0
    text = None
    try:
        b.prepare()
        b.warm_up()
        for lv in levels:
            log(f"level {lv}: growing both stacks to {lv} running containers (untimed)")
            b.grow_to(lv)
            b.diagnostics(lv, n)
            log(f"level {lv}: {n} runs per stack")
            b.measure(lv, n)
        b.reset()
        text = report(b, levels, n, time.perf_counter() - b.t_start)
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except BenchError as e:
        log(f"FAILED: {e}")
        rc = 1
    finally:
        log("cleaning up")
        b.cleanup()
        left = b.leftovers()
        if left:
            log("LEFT BEHIND: " + "; ".join(left))
            rc = rc or 2
        else:
            log(f"cleanup checked: no {b.prefix}* namespace, no sleeper, no process in a bench "
                f"namespace, no temp dir, original netns untouched")
    if text:
        text += "- cleanup check: " + ("nothing left behind\n" if not left else "; ".join(left) + "\n")
        sys.stdout.write(text)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        log(f"report written to {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
