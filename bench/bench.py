#!/usr/bin/env python3
"""Benchmark of container bridge networking with one TCP host port: netshim's OCI hook against
the `ip` + `nft` floor, Debian's netavark, Debian's CNI bridge + host-local + portmap plugins and
`/bin/true` (the cost of starting a process).

Each stack runs inside its own private network namespace standing in for the host (created here,
entered with setns, deleted at the end): the real host's links and firewall are never touched.
Writes docs/benchmarks.md and docs/benchmarks.png. Run as root:

    python3 bench/bench.py [--quick] [--shim PATH]

See bench/README.md for what is measured and how.
"""

import argparse
import atexit
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETAVARK = "/usr/lib/podman/netavark"
CNI_DIR = "/usr/lib/cni"
TIMEOUT = 120  # seconds, any single process
BURST = 16
SHIM_RANGE = "30000-60000"  # netshim's dynamic host ports; conntrack filler traffic stays below
CT_ENTRIES = 20000
NEEDS = {  # what the bench runs -> Debian package (installed by `scripts/deps.sh bench`)
    NETAVARK: "netavark", f"{CNI_DIR}/bridge": "containernetworking-plugins",
    f"{CNI_DIR}/host-local": "containernetworking-plugins",
    f"{CNI_DIR}/portmap": "containernetworking-plugins", "/usr/sbin/iptables": "iptables",
    "/usr/bin/strace": "strace", "/usr/bin/time": "time", "/usr/sbin/conntrack": "conntrack",
    "/usr/sbin/nft": "nftables", "/usr/bin/perf": "linux-perf"}
LIBC = ctypes.CDLL(None, use_errno=True)
# Linux 6.12+ updates an element's timeout in place (netshim's teardown retires elements so).
RETIRES = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit()) >= (6, 12)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class StepError(BenchError):
    pass


def setns(fd):
    """Moves the calling thread into the network namespace `fd`."""
    if hasattr(os, "setns"):
        os.setns(fd, 0x40000000)
    elif LIBC.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def ns_ino(path="/proc/thread-self/ns/net"):
    return os.stat(path).st_ino


def pct(xs, q):
    """q-th percentile, linear interpolation between closest ranks."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def med(xs):
    return pct(list(xs), 50)


def run(argv, inp=None, check=True, env=None):
    """Runs a command untimed; raises BenchError with its stderr on failure."""
    if isinstance(inp, str):
        inp = inp.encode()
    r = subprocess.run(argv, input=inp, stdin=None if inp is not None else subprocess.DEVNULL,
                       capture_output=True, env=env, timeout=TIMEOUT)
    if check and r.returncode != 0:
        raise BenchError(f"`{' '.join(map(str, argv))[:200]}` exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).decode(errors='replace').strip()[:400]}")
    return r


def spawn(argv, inp=None, env=None):
    """Runs one process as a runtime runs a hook: `inp` already in a pipe on its stdin, stdout and
    stderr captured. Returns (exit code, stdout, stderr, rusage of it and its waited children)."""
    r, w = os.pipe()
    fds = [r]
    try:
        if inp:
            os.write(w, inp)  # small (< 64 KiB): fits in the pipe before the child starts
        os.close(w)
        out, err = os.memfd_create("out"), os.memfd_create("err")
        fds += [out, err]
        p = subprocess.Popen(argv, stdin=r, stdout=out, stderr=err, env=env)
        pfd = os.pidfd_open(p.pid)
        fds.append(pfd)
        if not select.select([pfd], [], [], TIMEOUT)[0]:
            p.kill()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)

        def text(fd):
            os.lseek(fd, 0, 0)
            chunks = []
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    return b"".join(chunks)
                chunks.append(b)

        return p.returncode, text(out), text(err), ru
    finally:
        for fd in fds:
            os.close(fd)


class Step:
    """The processes of one setup or teardown; `wrap` rewrites each argv (strace, time)."""

    def __init__(self, wrap=None):
        self.wrap, self.cpu = wrap, 0.0

    def run(self, argv, inp=None, env=None):
        argv = self.wrap(argv) if self.wrap else argv
        rc, out, err, ru = spawn(argv, inp, env)
        self.cpu += (ru.ru_utime + ru.ru_stime) * 1000.0
        if rc != 0:
            raise StepError(f"`{' '.join(map(str, argv))[:120]}` exited {rc}: "
                            f"{(err or out).decode(errors='replace').strip()[:400]}")
        return out


def cpu_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


class CpuWatch:
    """Share of the CPUs other work took since creation: (all busy time - this process's and its
    waited children's) / wall; kernel work done for the bench (netns cleanup) counts as other, so
    it is an upper bound."""

    def __init__(self):
        self.b0, self.t0 = cpu_ticks()
        self.o0 = self.own()

    @staticmethod
    def own():
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def foreign(self):
        b1, t1 = cpu_ticks()
        if t1 <= self.t0:
            return 0.0
        busy = (b1 - self.b0) / os.sysconf("SC_CLK_TCK")
        return max(0.0, busy - (self.own() - self.o0)) / ((t1 - self.t0) / os.sysconf("SC_CLK_TCK"))


class Patience:
    """One budget of seconds for the whole run, spent waiting for a quiet machine and redoing
    runs other work disturbed: on a machine that stays busy the run still ends."""

    def __init__(self, seconds):
        self.until = time.monotonic() + seconds

    def left(self):
        return self.until - time.monotonic()

    def wait_quiet(self, threshold=0.10):
        """Waits (within the budget) for a second in which other work uses under `threshold`
        of the CPUs; returns the last share seen."""
        said = False
        while True:
            w = CpuWatch()
            time.sleep(0.5)
            f = w.foreign()
            if f < threshold or self.left() <= 0:
                return f
            if not said:
                log(f"  machine busy with other work ({f:.0%} of the CPUs): waiting "
                    f"({self.left():.0f} s of patience left)")
                said = True


def atoms(x):
    """Every scalar inside a JSON value, as strings (nft's concatenations are nested)."""
    if isinstance(x, dict):
        return [a for v in x.values() for a in atoms(v)]
    if isinstance(x, list):
        return [a for v in x for a in atoms(v)]
    return [str(x)]


# ---------------------------------------------------------------------- containers and stacks


class Ctr:
    """One simulated container: its netns (named, or anonymous and held by its sleeper), the
    sleeping process standing for its processes, and what its stack gave it."""

    def __init__(self, cid, maps=None):
        self.cid, self.maps = cid, maps or [{"containerPort": 80}]
        self.ns = self.path = self.sleeper = self.pid = None
        self.ip = self.port = self.peer = self.veth = self.result = None

    @property
    def nports(self):
        spans = [m.get("containerPortRange", "0-0").split("-") for m in self.maps]
        return sum(int(b) - int(a) + 1 for a, b in spans)


class Stack:
    name = tag = bridge = net = ""
    network = True  # False: /bin/true, no container to check
    pins_netns = False  # its runtime keeps the netns named until teardown returns (podman)
    port0 = 0

    def __init__(self, b, idx):
        self.b, self.idx = b, idx
        self.host_ns, self.cli_ns = f"{b.prefix}-{self.tag}h", f"{b.prefix}-{self.tag}k"
        self.cli_host, self.cli_addr = f"10.250.{idx}.1", f"10.250.{idx}.2"
        self.host_fd = self.host_ino = self.first_use = None
        self.bg, self.bg_ms, self.k, self.programs = [], [], 0, {}
        self.env = {"PATH": PATH}

    def enter(self):
        setns(self.host_fd)
        self.check_in()

    def check_in(self):
        if ns_ino() != self.host_ino:
            raise BenchError(f"safety check: this thread is not in {self.host_ns}")

    def prepare(self):
        b = self.b
        b.add_netns(self.host_ns)
        self.host_ino = b.ns_inodes[self.host_ns]
        self.host_fd = os.open(f"/run/netns/{self.host_ns}", os.O_RDONLY)
        self.enter()
        if self.host_ino == b.root_ino:
            raise BenchError("safety check: the stack's netns is the original one")
        run(["ip", "link", "set", "lo", "up"])
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:  # this thread's netns
            f.write("1")
        if self.network:  # a client namespace behind a veth, standing in for another machine
            b.add_netns(self.cli_ns)
            run(["ip", "link", "add", "bcli0", "type", "veth", "peer", "name", "eth0", "netns",
                 self.cli_ns])
            run(["ip", "-batch", "-"], f"addr add {self.cli_host}/24 dev bcli0\nlink set bcli0 up\n")
            run(["ip", "-n", self.cli_ns, "-batch", "-"],
                f"addr add {self.cli_addr}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
                f"route add default via {self.cli_host}\n")
        self.init()

    def init(self):
        pass

    def assign(self, c, k):
        c.port = self.port0 + k

    def bg_setup(self, c):
        self.setup(c, Step())

    # -- checks through the kernel, never timed
    def links(self):
        return {x["ifindex"] for x in json.loads(run(["ip", "-j", "link", "show"]).stdout)}

    def bridge_ports(self):
        r = run(["ip", "-j", "link", "show", "master", self.bridge], check=False)
        return {x["ifindex"] for x in json.loads(r.stdout or b"[]")} if r.returncode == 0 else set()

    def check_link(self, c):
        """eth0 in the container has an address of the stack's subnet (c.ip if known) and its
        veth peer is a port of the bridge."""
        j = json.loads(run(["ip", "-n", c.ns, "-j", "addr", "show", "dev", "eth0"]).stdout)[0]
        ip = next((a["local"] for a in j.get("addr_info", []) if a["family"] == "inet"), None)
        if not ip or not ip.startswith(self.net + ".") or (c.ip and ip != c.ip):
            raise BenchError(f"{self.name}: eth0 in {c.ns} has {ip}, want {c.ip or self.net}")
        c.ip, c.peer = ip, j.get("link_index")
        if c.peer not in self.bridge_ports():
            raise BenchError(f"{self.name}: the veth of {c.cid} (ifindex {c.peer}) is not on "
                             f"{self.bridge}")

    def veth_gone(self, c, wait=10.0):
        """Waits for the host end of c's veth to be gone (the kernel removes it with the netns,
        asynchronously): a teardown must never leave one behind."""
        deadline = time.monotonic() + wait
        while c.peer in self.links():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: veth ifindex {c.peer} of {c.cid} still there "
                                 f"{wait:.0f} s after teardown")
            time.sleep(0.02)

    def nft_map_elems(self):
        """(key atoms, value atoms) of every map element in this netns's nftables ruleset, once
        no element is retiring (a teardown's 1 ms timeout, listed until the next tick; at most
        1 s, then what is listed)."""
        deadline = time.monotonic() + 1.0
        while True:
            listed = json.loads(run(["nft", "-j", "list", "ruleset"]).stdout).get("nftables", [])
            if "expires" not in json.dumps(listed) or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        out = []
        for o in listed:
            for e in o.get("map", {}).get("elem", []):
                if isinstance(e, list) and len(e) == 2:
                    out.append((atoms(e[0]), atoms(e[1])))
        return out

    def nft_mapped(self, ip=None):
        """Map elements pointing into the stack's subnet (to `ip` if given)."""
        return [(k, v) for k, v in self.nft_map_elems()
                if (ip in v if ip else any(a.startswith(self.net + ".") for a in v))]

    def check_nft_up(self, c):
        got = self.nft_mapped(c.ip)
        proto = c.maps[0].get("protocol", "tcp")
        if len(got) != c.nports or (c.nports == 1 and not (str(c.port) in got[0][0]
                                                         and proto in got[0][0])):
            raise BenchError(f"{self.name}: {len(got)} map elements to {c.ip} (want {c.nports}"
                             f", {proto}/{c.port})")

    def nat_rules(self):
        return run(["iptables", "-w", "-t", "nat", "-S"]).stdout.decode()

    def check_dnat(self, c, up):
        rules = self.nat_rules()
        if up and f"--dport {c.port} -j DNAT --to-destination {c.ip}:80" not in rules:
            raise BenchError(f"{self.name}: no DNAT rule for tcp/{c.port} -> {c.ip}:80")
        if not up and (f"--dport {c.port} " in rules or f"--dports {c.port} " in rules):
            raise BenchError(f"{self.name}: tcp/{c.port} still in the nat table after teardown")

    def counts(self):
        return (len(self.bridge_ports()),
                sum(1 for line in self.nat_rules().splitlines() if "-j DNAT" in line))


class Netshim(Stack):
    name, tag, bridge, net = "netshim", "s", "netshim0", "10.213"

    def init(self):
        cfg = os.path.join(self.b.tmp, "netshim.toml")
        with open(cfg, "w") as f:
            f.write(f'[bridge]\nname = "{self.bridge}"\nsubnet = "{self.net}.0.0/16"\n'
                    f'[ports]\ndynamic_range = "{SHIM_RANGE}"\n')
        self.state_dir = os.path.join(self.b.tmp, "netshim-state")
        self.env = dict(self.env, NETSHIM_STATE_DIR=self.state_dir, NETSHIM_CONFIG=cfg)

    def oci(self, c, status):
        st = {"ociVersion": "1.0.2", "id": c.cid, "status": status, "bundle": "/nonexistent"}
        if status == "creating":
            st["pid"] = c.pid
            st["annotations"] = {"netshim.network-mode": "bridge",
                                 "netshim.port-mappings": json.dumps(c.maps)}
        return json.dumps(st).encode()

    def setup(self, c, st):
        st.run([self.b.shim, "hook", "createRuntime"], self.oci(c, "creating"), self.env)

    def teardown(self, c, st):
        st.run([self.b.shim, "hook", "poststop"], self.oci(c, "stopped"), self.env)

    def ports(self):
        return json.loads(run([self.b.shim, "ports", "list", "--json"], env=self.env).stdout)

    def check_up(self, c):
        mine = [e for e in self.ports() if e["containerId"] == c.cid]
        if len(mine) != c.nports:
            raise BenchError(f"netshim: `ports list` has {len(mine)} entries for {c.cid}, "
                             f"want {c.nports}")
        c.port, c.ip = mine[0]["hostPort"], mine[0]["containerIP"]
        self.check_link(c)
        self.check_nft_up(c)

    def check_down(self, c):
        if any(e["containerId"] == c.cid for e in self.ports()):
            raise BenchError(f"netshim: {c.cid} still in `ports list` after poststop")
        if self.nft_mapped(c.ip):
            raise BenchError(f"netshim: map elements to {c.ip} left after poststop")
        self.veth_gone(c)

    def counts(self):
        return len(self.bridge_ports()), len(self.nft_mapped()), len(self.ports())


class Floor(Stack):
    """The same work as netshim's setup in the fewest processes a shell needs: `ip -batch` for
    the host side, `ip -n NS -batch` for the container side, one `nft` for the two elements.
    Teardown retires the elements as netshim does on Linux 6.12+ (re-added with a 1 ms timeout,
    so `nft`'s exit does not wait for an RCU grace period), or deletes them on older kernels."""
    name, tag, bridge, net = "ip+nft", "f", "nsfloor0", "10.214"
    port0, table = 10000, "nsfloor"

    def init(self):
        run(["ip", "-batch", "-"], f"link add {self.bridge} type bridge forward_delay 0\n"
            f"addr add {self.net}.0.1/16 dev {self.bridge}\nlink set {self.bridge} up\n")
        run(["nft", "-f", "-"], (
            f"table ip {self.table} {{\n"
            "  map ports { type inet_proto . inet_service : ipv4_addr . inet_service; "
            "flags timeout; }\n"
            "  set mapped { type inet_proto . inet_service; flags timeout; }\n"
            "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
            "    fib daddr type local meta l4proto { tcp, udp } "
            "dnat ip to meta l4proto . th dport map @ports\n  }\n}\n"))

    def assign(self, c, k):
        off = 2 + k
        c.ip, c.port, c.veth = f"{self.net}.{off >> 8}.{off & 255}", self.port0 + k, f"nf{k:05d}"

    def host_batch(self, c, netns):
        v = c.veth
        return (f"link add {v} type veth peer name eth0 netns {netns}\n"
                f"link set {v} addrgenmode none master {self.bridge}\n"
                f"link set {v} type bridge_slave hairpin on\nlink set {v} up\n").encode()

    def ctr_batch(self, c):
        return (f"addr add {c.ip}/16 dev eth0\nlink set eth0 up\nlink set lo up\n"
                f"route add default via {self.net}.0.1\n").encode()

    def elements(self, c, verb):
        if verb == "retire":  # an update with a 1 ms timeout (Linux 6.12+)
            return ["nft", f"add element ip {self.table} ports "
                           f"{{ tcp . {c.port} timeout 1ms : {c.ip} . 80 }}; "
                           f"add element ip {self.table} mapped {{ tcp . {c.port} timeout 1ms }}"]
        val = f" : {c.ip} . 80" if verb == "add" else ""
        return ["nft", f"{verb} element ip {self.table} ports {{ tcp . {c.port}{val} }}; "
                       f"{verb} element ip {self.table} mapped {{ tcp . {c.port} }}"]

    def setup(self, c, st):
        st.run(["ip", "-batch", "-"], self.host_batch(c, c.ns), self.env)
        st.run(["ip", "-n", c.ns, "-batch", "-"], self.ctr_batch(c), self.env)
        st.run(self.elements(c, "add"), None, self.env)

    def bg_setup(self, c):  # anonymous netns: reached through the sleeper's pid
        run(["ip", "-batch", "-"], self.host_batch(c, c.pid))
        run(["nsenter", f"--net={c.path}", "ip", "-batch", "-"], self.ctr_batch(c))
        run(self.elements(c, "add"))

    def teardown(self, c, st):  # the veth went with the netns
        st.run(self.elements(c, "retire" if RETIRES else "delete"), None, self.env)

    def check_up(self, c):
        self.check_link(c)
        self.check_nft_up(c)

    def check_down(self, c):
        if self.nft_mapped(c.ip):
            raise BenchError(f"ip+nft: tcp/{c.port} still mapped after teardown")
        self.veth_gone(c)

    def counts(self):
        return len(self.bridge_ports()), len(self.nft_mapped())


class Netavark(Stack):
    """netavark as podman drives it: podman assigns address and host port (here the bench),
    holds a file lock around `netavark setup|teardown NETNS` (network options on stdin), and
    keeps the netns until teardown returns. iptables firewall driver."""
    name, tag, bridge, net = "netavark", "v", "bnv0", "10.215"
    port0, pins_netns = 12000, True

    def init(self):
        self.confdir = os.path.join(self.b.tmp, "netavark")
        os.makedirs(self.confdir)
        self.lockfile = os.path.join(self.b.tmp, "netavark.lock")
        open(self.lockfile, "w").close()
        self.env = dict(self.env, NETAVARK_FW="iptables")
        self.free, self.next, self.mu = [], 2, threading.Lock()

    def options(self, c):
        return json.dumps({
            "container_id": hashlib.sha256(c.cid.encode()).hexdigest(), "container_name": c.cid,
            "port_mappings": [{"host_ip": "", "container_port": 80, "host_port": c.port,
                               "range": 1, "protocol": "tcp"}],
            "networks": {"bnv": {"static_ips": [c.ip], "interface_name": "eth0",
                                 "aliases": None, "static_mac": None}},
            "network_info": {"bnv": {
                "name": "bnv", "id": hashlib.sha256(b"bnv").hexdigest(), "driver": "bridge",
                "network_interface": self.bridge,
                "subnets": [{"subnet": f"{self.net}.0.0/16", "gateway": f"{self.net}.0.1"}],
                "ipv6_enabled": False, "internal": False, "dns_enabled": False,
                "ipam_options": {"driver": "host-local"}, "options": None,
                "network_dns_servers": None}}}).encode()

    def locked(self, fn):
        with open(self.lockfile) as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                return fn()
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)

    def setup(self, c, st):
        def go():
            if c.ip is None:  # podman's IPAM: lowest free address
                with self.mu:
                    off = self.free.pop(0) if self.free else self.next
                    self.next += off == self.next
                c.ip = f"{self.net}.{off >> 8}.{off & 255}"
            st.run([NETAVARK, "--config", self.confdir, "setup", c.path], self.options(c),
                   self.env)
        self.locked(go)

    def teardown(self, c, st):
        def go():
            st.run([NETAVARK, "--config", self.confdir, "teardown", c.path], self.options(c),
                   self.env)
            a, b = c.ip.split(".")[2:]
            with self.mu:
                self.free = sorted(self.free + [int(a) * 256 + int(b)])
        self.locked(go)

    def check_up(self, c):
        self.check_link(c)
        self.check_dnat(c, True)

    def check_down(self, c):
        self.check_dnat(c, False)
        self.veth_gone(c)


class Cni(Stack):
    """The CNI protocol as a runtime speaks it: bridge (IPAM host-local) then portmap with
    bridge's result as prevResult; DEL in reverse with the result. podman 3's default network
    options: isGateway, ipMasq, hairpinMode."""
    name, tag, bridge, net = "cni", "c", "bcni0", "10.216"
    port0 = 14000

    def init(self):
        self.datadir = os.path.join(self.b.tmp, "cni-ipam")
        self.conf = {
            "cniVersion": "1.0.0", "name": "bcni", "type": "bridge", "bridge": self.bridge,
            "isGateway": True, "ipMasq": True, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": self.datadir, "routes": [{"dst": "0.0.0.0/0"}],
                     "ranges": [[{"subnet": f"{self.net}.0.0/16", "gateway": f"{self.net}.0.1"}]]}}

    def cenv(self, cmd, c):
        return dict(self.env, CNI_COMMAND=cmd, CNI_CONTAINERID=c.cid, CNI_NETNS=c.path,
                    CNI_IFNAME="eth0", CNI_PATH=CNI_DIR)

    def pm_conf(self, c, prev):
        return json.dumps({
            "cniVersion": "1.0.0", "name": "bcni", "type": "portmap",
            "capabilities": {"portMappings": True}, "prevResult": prev,
            "runtimeConfig": {"portMappings": [{"hostPort": c.port, "containerPort": 80,
                                                "protocol": "tcp"}]}}).encode()

    def setup(self, c, st):
        c.result = json.loads(st.run([f"{CNI_DIR}/bridge"], json.dumps(self.conf).encode(),
                                     self.cenv("ADD", c)))
        c.ip = c.result["ips"][0]["address"].split("/")[0]
        c.result = json.loads(st.run([f"{CNI_DIR}/portmap"], self.pm_conf(c, c.result),
                                     self.cenv("ADD", c)))

    def teardown(self, c, st):
        if c.result is not None:
            st.run([f"{CNI_DIR}/portmap"], self.pm_conf(c, c.result), self.cenv("DEL", c))
        st.run([f"{CNI_DIR}/bridge"], json.dumps(dict(self.conf, prevResult=c.result)
                                                 if c.result else self.conf).encode(),
               self.cenv("DEL", c))

    def check_up(self, c):
        self.check_link(c)
        self.check_dnat(c, True)

    def check_down(self, c):
        self.check_dnat(c, False)
        if os.path.exists(os.path.join(self.datadir, "bcni", c.ip)):
            raise BenchError(f"cni: host-local still holds {c.ip} after DEL")
        self.veth_gone(c)


class TrueStack(Stack):
    """`/bin/true` with the OCI state on stdin: what any hook pays to be started."""
    name, tag, network = "/bin/true", "t", False

    def setup(self, c, st):
        st.run(["/bin/true"], json.dumps({"id": c.cid, "status": "creating"}).encode(), self.env)

    teardown = setup

    def check_up(self, c):
        pass

    def check_down(self, c):
        pass


STACKS = (Netshim, Floor, Netavark, Cni, TrueStack)
LABEL = {"netshim": "netshim hook", "ip+nft": "ip + nft floor (3 processes)",
         "netavark": "netavark (Debian)", "cni": "CNI bridge + portmap (Debian)",
         "/bin/true": "/bin/true (process start)"}
STYLE = {"netshim": ("#1f77b4", "o"), "ip+nft": ("#7f7f7f", "D"), "netavark": ("#d62728", "s"),
         "cni": ("#2ca02c", "^"), "/bin/true": ("#9467bd", "v")}

# A responder in a container and a client in a client netns, for the latency rounds.
RESPONDER = r"""
import os, signal, socket, sys
signal.alarm(int(sys.argv[1]))
if int(sys.argv[2]) >= 0:
    os.sched_setaffinity(0, {int(sys.argv[2])})
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(128); print("ready", flush=True)
while True:
    c, _ = s.accept()
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d:
            break
        buf += d
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"); c.close()
"""
CLIENT = r"""
import json, os, socket, sys, time
hp, hport, d, dport, n, warm, cpu = sys.argv[1:8]
if int(cpu) >= 0:
    os.sched_setaffinity(0, {int(cpu)})
def once(a, p):
    t0 = time.perf_counter()
    s = socket.create_connection((a, p), timeout=5); s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    buf = b""
    while True:
        x = s.recv(4096)
        if not x:
            break
        buf += x
    s.close()
    if not buf.startswith(b"HTTP/1.0 200"):
        raise RuntimeError("bad reply %r" % buf[:40])
    return (time.perf_counter() - t0) * 1e6
out = {"hostport": [], "direct": [], "errors": []}
for i in range(int(warm) + int(n)):
    legs = [("hostport", hp, int(hport)), ("direct", d, int(dport))]
    for k, a, p in (legs if i % 2 else legs[::-1]):
        try:
            us = once(a, p)
            if i >= int(warm):
                out[k].append(us)
        except Exception as e:
            out["errors"].append("%s: %s" % (k, e))
print(json.dumps(out))
"""
# UDP datagrams to `n` closed ports: each leaves an unreplied conntrack entry on the host.
FLOOD = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2]) + i))
    if i % 100 == 99:
        time.sleep(0.001)
"""


# ---------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args):
        self.a = args
        self.prefix = f"nsb{os.getpid()}"
        self.procs, self.ns_inodes, self.stacks = [], {}, []
        self.root_fd, self.root_ino, self.tmp, self.cleaned = None, ns_ino(), None, False
        self.t0 = time.perf_counter()
        self.patience = Patience(args.wait_idle)
        self.res, self.load, self.bursts, self.lat, self.rss = {}, {}, {}, {}, {}
        self.start, self.udp, self.maint, self.notes = {}, {}, {}, []

    # -- namespaces and processes
    def add_netns(self, name):
        run(["ip", "netns", "add", name])
        self.ns_inodes[name] = ns_ino(f"/run/netns/{name}")

    def del_netns(self, name):
        """What `ip netns del` does (lazy unmount, unlink), in-process: no extra process between
        a container's death and its teardown."""
        p = f"/run/netns/{name}".encode()
        if LIBC.umount2(p, 2) == 0:  # MNT_DETACH
            try:
                os.unlink(p)
            except OSError:
                pass
        else:
            run(["ip", "netns", "del", name], check=False)
        self.ns_inodes.pop(name, None)

    def sleeper(self, argv, want=None):
        """Starts a process that sleeps in a netns; returns once it is there (want: that inode;
        else any netns but this thread's)."""
        here = ns_ino()
        p = subprocess.Popen(argv + ["sleep", "1000000"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while True:
            try:
                ino = ns_ino(f"/proc/{p.pid}/ns/net")
                if ino == want or (want is None and ino != here):
                    return p
            except FileNotFoundError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"`{' '.join(argv)} sleep` did not get into its netns")
            time.sleep(0.0005)

    def kill(self, p):
        if p.poll() is None:
            p.kill()
        p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def new_ctr(self, s, kind, maps=None):
        """kind "bg": anonymous netns held by its sleeper (the number of named namespaces, which
        `ip -n` pays for, does not grow with the level); else a named netns with a sleeper."""
        k = s.k
        s.k += 1
        c = Ctr(f"{s.tag}{kind}{k}", maps)
        if s.network:
            if kind == "bg":
                c.sleeper = self.sleeper(["unshare", "--net", "--"])
                c.path = f"/proc/{c.sleeper.pid}/ns/net"
            else:
                c.ns = f"{self.prefix}-{s.tag}{kind}{k}"
                self.add_netns(c.ns)
                c.path = f"/run/netns/{c.ns}"
                c.sleeper = self.sleeper(["ip", "netns", "exec", c.ns], self.ns_inodes[c.ns])
            c.pid = c.sleeper.pid
        s.assign(c, k)
        return c

    def stop(self, s, c):
        """The container dies: its processes are killed and its netns released (unless the
        stack's runtime keeps it until teardown), before its teardown runs."""
        if c.sleeper is not None:
            self.kill(c.sleeper)
            c.sleeper = None
        if c.ns and not s.pins_netns:
            self.del_netns(c.ns)

    def forget(self, c):
        if c.ns and c.ns in self.ns_inodes:
            self.del_netns(c.ns)

    def timed(self, s, fn, wrap=None):
        """(wall ms, CPU ms of its processes) of one step of stack s."""
        s.check_in()
        st = Step(wrap)
        t0 = time.perf_counter()
        fn(st)
        return (time.perf_counter() - t0) * 1000.0, st.cpu

    def cycle(self, s, kind="t", maps=None, wrap=None):
        """One container through the lifecycle, untimed checks in between: (setup ms, setup CPU
        ms, teardown ms)."""
        s.enter()
        c = self.new_ctr(s, kind, maps)
        try:
            up, cpu = self.timed(s, lambda st: s.setup(c, st), wrap)
            s.check_up(c)
            self.stop(s, c)
            down, _ = self.timed(s, lambda st: s.teardown(c, st), wrap)
            self.forget(c)
            s.check_down(c)
            return up, cpu, down
        finally:
            self.stop(s, c)
            self.forget(c)

    # -- phases
    def prepare(self):
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=self.a.tmp_parent)
        self.shim = os.path.join(self.tmp, "shim")  # a rebuild during the run changes nothing
        shutil.copy2(self.a.shim, self.shim)
        with open(self.shim, "rb") as f:
            self.shim_sha = hashlib.sha256(f.read()).hexdigest()[:16]
        self.root_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            fwd = f.read()
        for i, cls in enumerate(STACKS):
            s = cls(self, i)
            self.stacks.append(s)
            s.prepare()
            log(f"{s.name}: host netns {s.host_ns}" + (f", bridge {s.bridge} {s.net}.0.0/16"
                                                       if s.network else ""))
        setns(self.root_fd)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            if f.read() != fwd:
                raise BenchError("safety check: ip_forward of the original netns changed")
        self.info = machine(self)
        log(f"temp dir {self.tmp}")

    def warm_up(self):
        """First use of each stack (creates its bridge and rules), timed apart; then one
        setup + teardown under strace (with another container present) for the programs run."""
        for s in self.stacks:
            up, _, down = self.cycle(s)
            s.first_use = (up, down)
            s.enter()
            files = []

            def wrap(argv):
                files.append(os.path.join(self.tmp, f"strace-{s.tag}{len(files)}"))
                return ["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o",
                        files[-1], "--"] + argv

            def programs():
                progs = {}
                for fn in files:
                    with open(fn) as fh:
                        for line in fh:
                            if "execve(" in line and line.rstrip().endswith("= 0"):
                                prog = os.path.basename(line.split('"')[1])
                                progs[prog] = progs.get(prog, 0) + 1
                files.clear()
                return progs

            other, c = self.new_ctr(s, "t"), self.new_ctr(s, "t")
            s.setup(other, Step())
            s.check_up(other)
            s.setup(c, Step(wrap))
            s.programs["setup"] = programs()
            s.check_up(c)
            for x, w in ((c, wrap), (other, None)):
                self.stop(s, x)
                s.teardown(x, Step(w))
                self.forget(x)
                s.check_down(x)
                if w:
                    s.programs["teardown"] = programs()
            log(f"{s.name}: first use {up:.1f} / {down:.1f} ms; runs "
                f"{fmt_progs(s.programs['setup'])} / {fmt_progs(s.programs['teardown'])}")

    def grow_to(self, level, only=None):
        for s in only or self.stacks:
            if not s.network:
                continue
            s.enter()
            t0 = time.perf_counter()
            while len(s.bg) < level:
                c = self.new_ctr(s, "bg")
                c0 = time.perf_counter()
                s.bg_setup(c)
                s.bg_ms.append((time.perf_counter() - c0) * 1000.0)
                s.bg.append(c)
                if len(s.bg) % 100 == 0:
                    log(f"  {s.name}: {len(s.bg)}/{level} running")
            got = s.counts()
            if got != (level,) * len(got):
                raise BenchError(f"{s.name} at {level} running: counts (bridge ports, mappings"
                                 f"[, ports list]) = {got}")
            log(f"  {s.name}: {level} running, checked; {time.perf_counter() - t0:.1f} s")

    def one_run(self, i):
        n = len(self.stacks)
        order = [self.stacks[(i + j) % n] for j in range(n)]  # who goes first rotates
        ctrs, out = {}, {}
        try:
            for s in order:
                s.enter()
                c = ctrs[s.name] = self.new_ctr(s, "t")
                ms, cpu = self.timed(s, lambda st: s.setup(c, st))
                out[s.name] = [ms, cpu, None]
                time.sleep(self.a.settle)
            for s in order:
                s.enter()
                s.check_up(ctrs[s.name])
            for s in order:
                s.enter()
                c = ctrs[s.name]
                self.stop(s, c)
                out[s.name][2], _ = self.timed(s, lambda st: s.teardown(c, st))
                self.forget(c)
                time.sleep(self.a.settle)
            for s in order:
                s.enter()
                s.check_down(ctrs[s.name])
        finally:
            for s in order:
                if s.name in ctrs:
                    s.enter()
                    self.stop(s, ctrs[s.name])
                    self.forget(ctrs[s.name])
        return out

    def measure(self, level, n):
        """n runs; one during which other work took more than --max-foreign of the CPUs is
        redone while the run's patience lasts."""
        a = self.a
        quiet = self.patience.wait_quiet()
        keep, foreign, redone, i = [], [], 0, 0
        while len(keep) < n:
            w = CpuWatch()
            out = self.one_run(i)
            f = w.foreign()
            i += 1
            if f > a.max_foreign and redone < a.max_redo and self.patience.left() > 0:
                redone += 1
                log(f"  run dropped: other work took {f:.0%} of the CPUs; redoing")
                self.patience.wait_quiet()
                continue
            keep.append(out)
            foreign.append(f)
        self.load[level] = (quiet, statistics.mean(foreign), max(foreign), redone)
        for s in self.stacks:
            rows = [r[s.name] for r in keep]
            self.res[(s.name, level)] = {
                "setup": [r[0] for r in rows], "cpu": [r[1] for r in rows],
                "teardown": [r[2] for r in rows]}
        log(f"  level {level}: " + "; ".join(
            f"{s.name} {med(self.res[(s.name, level)]['setup']):.1f}/"
            f"{med(self.res[(s.name, level)]['teardown']):.1f}" for s in self.stacks)
            + f" ms (setup/teardown p50; {redone} runs redone)")

    def parallel(self, s, ctrs, what):
        """`what` (setup or teardown) of every container at once, one thread each (threads
        inherit this thread's netns: checked in each). Returns (wall ms, [error or None])."""
        s.check_in()
        barrier = threading.Barrier(len(ctrs))
        res = [(None, 0.0, 0.0)] * len(ctrs)

        def work(i, c):
            ok = ns_ino() == s.host_ino
            barrier.wait(timeout=60)
            t0 = time.perf_counter()
            try:
                if not ok:
                    raise BenchError("safety check: burst thread not in the stack's netns")
                getattr(s, what)(c, Step())
                res[i] = (None, t0, time.perf_counter())
            except Exception as e:  # noqa: BLE001 - a failure of this container, reported
                res[i] = (str(e), t0, time.perf_counter())

        ts = [threading.Thread(target=work, args=(i, c), daemon=True) for i, c in enumerate(ctrs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if any(e and e.startswith("safety check") for e, _, _ in res):
            raise BenchError(f"{s.name}: a burst thread was not in the stack's netns")
        return (max(r[2] for r in res) - min(r[1] for r in res)) * 1000.0, [r[0] for r in res]

    def burst(self, level, rounds):
        for s in self.stacks:
            s.enter()
            g = {"up": [], "down": [], "fail": 0, "dup": 0, "errors": [], "load": []}
            self.patience.wait_quiet()
            for _ in range(rounds):
                ctrs = [self.new_ctr(s, "p") for _ in range(BURST)]
                w = CpuWatch()
                try:
                    wall, errs = self.parallel(s, ctrs, "setup")
                    g["up"].append(wall)
                    ok = []
                    for c, e in zip(ctrs, errs):
                        try:
                            if e:
                                raise BenchError(e)
                            s.check_up(c)
                            ok.append(c)
                        except BenchError as e2:
                            g["fail"] += 1
                            g["errors"].append(str(e2))
                    seen = [(c.ip, c.port) for c in ok if s.network]
                    g["dup"] += len(seen) - len(set(seen))
                    for c in ctrs:
                        self.stop(s, c)
                    wall, errs = self.parallel(s, ok, "teardown") if ok else (float("nan"), [])
                    g["down"].append(wall)
                    g["load"].append(w.foreign())
                    for c, e in zip(ok, errs):
                        if e:
                            g["fail"] += 1
                            g["errors"].append(e)
                    for c in ctrs:
                        self.forget(c)
                        try:
                            if c not in ok or errs[ok.index(c)]:
                                try:  # untimed cleanup of a failed container
                                    s.teardown(c, Step())
                                except BenchError:
                                    pass
                            if c.ip:
                                s.check_down(c)
                        except BenchError as e:
                            g["fail"] += 1
                            g["errors"].append(f"after teardown: {e}")
                finally:
                    for c in ctrs:
                        self.stop(s, c)
                        self.forget(c)
            if s.network and s.counts() != (level,) * len(s.counts()):
                raise BenchError(f"{s.name}: counts after the bursts at {level}: {s.counts()}")
            self.bursts[(s.name, level)] = g
            log(f"  {s.name}: {BURST} at once x{rounds}: setup {med(g['up']):.0f} ms, teardown "
                f"{med(g['down']):.0f} ms, failures {g['fail']}, duplicates {g['dup']}")

    def latency(self, level, n):
        """A responder in one container per stack; the client connects, requests and reads the
        reply through the host port and straight to the container, the stacks taking turns in
        rounds of 25 per path, client and responder pinned to two CPUs."""
        self.patience.wait_quiet()
        cpus = sorted(os.sched_getaffinity(0))
        cc, cr = (cpus[0], cpus[1]) if len(cpus) > 1 else (-1, -1)
        live, data = [], {}
        try:
            for s in self.stacks:
                if not s.network:
                    continue
                s.enter()
                c = self.new_ctr(s, "l")
                live.append((s, c))
                s.setup(c, Step())
                s.check_up(c)
                resp = subprocess.Popen(["ip", "netns", "exec", c.ns, sys.executable, "-c",
                                         RESPONDER, "900", str(cr)], stdout=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.procs.append(resp)
                if resp.stdout.readline().strip() != b"ready":
                    raise BenchError(f"{s.name}: responder in {c.ns} did not start")
                data[s.name] = {"hostport": [], "direct": [], "errors": [], "resp": resp}
            for r in range(max(1, -(-n // 25))):
                for j in range(len(live)):
                    s, c = live[(r + j) % len(live)]
                    s.enter()
                    d = json.loads(run(["ip", "netns", "exec", s.cli_ns, sys.executable, "-c",
                                        CLIENT, s.cli_host, str(c.port), c.ip, "80", "25",
                                        "20" if r == 0 else "3", str(cc)]).stdout)
                    for k in ("hostport", "direct", "errors"):
                        data[s.name][k] += d[k]
        finally:
            for s, c in live:
                if s.name in data:
                    self.kill(data[s.name]["resp"])
                s.enter()
                self.stop(s, c)
                s.teardown(c, Step())
                self.forget(c)
                s.check_down(c)
        for name, d in data.items():
            self.lat[(name, level)] = d
            log(f"  {name}: via host port p50 {med(d['hostport']):.0f} us, direct "
                f"{med(d['direct']):.0f} us ({len(d['errors'])} errors)")

    def peak_rss(self, level, k):
        """k setups + teardowns per stack with each process under `/usr/bin/time -f %M`: the
        peak RSS of the largest process of the step (time's own fork shows in /bin/true's)."""
        for s in self.stacks:
            files = []

            def wrap(argv):
                files.append(os.path.join(self.tmp, f"rss{len(files)}"))
                return ["/usr/bin/time", "-f", "%M", "-o", files[-1], "--"] + argv

            def peak():
                v = max(int(open(f).read().split()[-1]) for f in files)
                files.clear()
                return v

            up, down = [], []
            for _ in range(k):
                s.enter()
                c = self.new_ctr(s, "r")
                try:
                    s.setup(c, Step(wrap))
                    up.append(peak())
                    s.check_up(c)
                    self.stop(s, c)
                    s.teardown(c, Step(wrap))
                    down.append(peak())
                    self.forget(c)
                    s.check_down(c)
                finally:
                    self.stop(s, c)
                    self.forget(c)
            self.rss[(s.name, level)] = (med(up), med(down))

    def process_start(self, reps):
        """task-clock and page faults of starting a process: perf stat, else wait4's rusage."""
        self.stacks[0].enter()
        # `shim hook poststart` on an empty stdin: the whole start of a hook call (arguments,
        # stdin, the OCI state refused in one line), without the work of a setup.
        cmds = [("/bin/true", ["/bin/true"]), ("shim --version", [self.shim, "--version"]),
                ("shim hook poststart </dev/null", [self.shim, "hook", "poststart"]),
                ("nft --version", ["nft", "--version"])]
        perf = shutil.which("perf") and run(["perf", "stat", "-x,", "-e", "task-clock", "true"],
                                            check=False).returncode == 0
        for name, argv in cmds:
            if perf:
                r = run(["perf", "stat", "-r", str(reps), "-x,", "-e", "task-clock,page-faults",
                         "--"] + argv, check=False, env={"PATH": PATH})
                v = {f[2]: float(f[0]) for f in (x.split(",") for x in
                                                 r.stderr.decode().splitlines()) if len(f) > 3}
                self.start[name] = (v["task-clock"], v["page-faults"])
            else:
                rus = [spawn(argv, env={"PATH": PATH})[3] for _ in range(reps)]
                self.start[name] = (med((u.ru_utime + u.ru_stime) * 1000 for u in rus),
                                    med(u.ru_minflt + u.ru_majflt for u in rus))
        self.start_how = (f"`perf stat -r {reps} -e task-clock,page-faults`" if perf else
                          f"wait4 rusage of {reps} runs (CPU time, minor + major faults), p50")

    def udp_bench(self, n, ports):
        """netshim only: a UDP range of `ports` ports, and one UDP vs one TCP mapping with 0 and
        with CT_ENTRIES unrelated conntrack entries on the host."""
        s = self.stacks[0]
        rng = [{"containerPortRange": f"10000-{10000 + ports - 1}", "protocol": "udp"}]
        xs = [self.cycle(s, "u", rng) for _ in range(max(1, n // 10))]
        self.udp["range"] = ([x[0] for x in xs], [x[2] for x in xs], ports)
        s.enter()
        run(["conntrack", "-F"], check=False)  # this netns's table only
        with open("/proc/sys/net/netfilter/nf_conntrack_udp_timeout", "w") as f:
            f.write("1800")  # this netns only: the filler entries outlive the measurement
        for entries in (0, CT_ENTRIES):
            if entries:
                for _ in range(5):
                    run(["ip", "netns", "exec", s.cli_ns, sys.executable, "-c", FLOOD,
                         s.cli_host, "5000", str(entries)])
                    if self.conntrack_count() >= entries:
                        break
            have = self.conntrack_count()
            if have < entries:
                raise BenchError(f"only {have} conntrack entries, want {entries}")
            for proto in ("tcp", "udp"):
                self.udp[(proto, entries)] = ([], [])
            for i in range(n):
                for proto in (("tcp", "udp") if i % 2 else ("udp", "tcp")):
                    up, _, down = self.cycle(s, "u", [{"containerPort": 80, "protocol": proto}])
                    self.udp[(proto, entries)][0].append(up)
                    self.udp[(proto, entries)][1].append(down)
            self.udp[("entries", entries)] = (have, self.conntrack_count())
        run(["conntrack", "-F"], check=False)  # this netns's table only
        log(f"  netshim UDP: {ports}-port range {med(self.udp['range'][0]):.0f} / "
            f"{med(self.udp['range'][1]):.0f} ms; one port with {CT_ENTRIES} entries: udp "
            f"{med(self.udp[('udp', CT_ENTRIES)][0]):.1f} vs tcp "
            f"{med(self.udp[('tcp', CT_ENTRIES)][0]):.1f} ms")

    def conntrack_count(self):
        self.stacks[0].check_in()
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:  # this thread's netns
            return int(f.read())

    def maintenance(self):
        """netshim only, with its background containers: `shim gc` with all alive; `shim gc`
        once they all died without poststop; `shim reset --force` with all alive."""
        s = self.stacks[0]
        s.enter()
        lv = len(s.bg)

        def cmd(*args):
            ms, _ = self.timed(s, lambda st: st.run([self.shim, *args], None, s.env))
            return ms

        self.maint["gc, all alive"] = med([cmd("gc") for _ in range(3)])
        if s.counts() != (lv,) * 3:
            raise BenchError(f"netshim: `shim gc` changed live containers: {s.counts()}")
        for c in s.bg:
            self.stop(s, c)
        deadline = time.monotonic() + 120
        while s.bridge_ports() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.maint["gc, all dead"] = cmd("gc")
        if s.counts() != (0, 0, 0):
            raise BenchError(f"netshim: after `shim gc` of {lv} dead containers: {s.counts()}")
        s.bg, ms = [], list(s.bg_ms)
        self.grow_to(lv, [s])
        s.bg_ms = ms  # the report's growth trend is the first growth's
        s.enter()
        self.maint["reset --force"] = cmd("reset", "--force")
        tables = run(["nft", "list", "tables"]).stdout.decode().strip()
        if s.bridge in run(["ip", "-o", "link", "show"]).stdout.decode() or tables:
            raise BenchError(f"netshim: bridge or table ({tables}) left after reset --force")
        for c in s.bg:
            self.stop(s, c)
        s.bg = []
        self.maint["containers"] = lv
        log("  netshim: " + ", ".join(f"{k} {v:.0f} ms" for k, v in self.maint.items()
                                      if k != "containers") + f" ({lv} containers)")

    # -- cleanup
    def cleanup(self):
        if self.cleaned:
            return
        self.cleaned = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            # Every namespace of ours is still pinned (named, or held by a live sleeper), so its
            # inode cannot have been reused: kill whatever runs inside one.
            names = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                     if n.startswith(self.prefix + "-")]
            inodes = set()
            for path in [f"/run/netns/{n}" for n in names] + [f"/proc/{p.pid}/ns/net"
                                                               for p in self.procs]:
                try:
                    inodes.add(ns_ino(path))
                except OSError:
                    pass
            inodes.discard(self.root_ino)
            for d in os.listdir("/proc"):
                if d.isdigit() and int(d) != os.getpid():
                    try:
                        if ns_ino(f"/proc/{d}/ns/net") in inodes:
                            os.kill(int(d), signal.SIGKILL)
                    except OSError:
                        pass
            for p in list(self.procs):
                self.kill(p)
            if self.root_fd is not None:
                setns(self.root_fd)
            for s in self.stacks:
                if s.host_fd is not None:
                    os.close(s.host_fd)
                    s.host_fd = None
            hosts = {s.host_ns for s in self.stacks}
            for _ in range(3):  # containers and clients first, the hosts (bridges, rules) last
                for n in sorted(names, key=lambda x: x in hosts):
                    if os.path.exists(f"/run/netns/{n}"):
                        self.del_netns(n)
                if not any(os.path.exists(f"/run/netns/{n}") for n in names):
                    break
                time.sleep(0.3)
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)

    def leftovers(self):
        out = [f"netns {n}" for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns")
                                      else []) if n.startswith(self.prefix)]
        out += [f"process {p.pid}" for p in self.procs if p.poll() is None]
        if self.tmp and os.path.exists(self.tmp):
            out.append(f"temp dir {self.tmp}")
        if ns_ino() != self.root_ino:
            out.append("this thread is not back in the original netns")
        links = run(["ip", "-o", "link", "show"], check=False).stdout.decode()
        out += [f"link {n}* in the original netns" for n in ("bnv0", "bcni0", "bcli0", "nsfloor0",
                                                               "nf0") if f": {n}" in links]
        return out


def host_firewall():
    """The original netns's firewall as text, timestamps removed."""
    out = {}
    for argv in (["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]):
        r = run(argv, check=False) if shutil.which(argv[0]) else None
        out[argv[0]] = r and "\n".join(x for x in r.stdout.decode().splitlines()
                                       if not x.startswith("#"))
    return out


# ---------------------------------------------------------------------- report and chart


def fmt_progs(d):
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(d.items(), key=lambda x: -x[1]))


def machine(b):
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                if x.startswith("model name")), "?")
    mem = int(open("/proc/meminfo").readline().split()[1]) / 1048576
    pk = run(["dpkg-query", "-W", "-f", "${Package} ${Version}, ", "netavark",
              "containernetworking-plugins", "iptables", "nftables", "iproute2", "conntrack"],
             check=False).stdout.decode().strip(", ")
    fs = run(["stat", "-f", "-c", "%T", b.a.tmp_parent], check=False).stdout.decode().strip()
    git = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False)
    ver = run([b.shim, "--version"], check=False).stdout.decode().strip()
    return [f"machine: {os.cpu_count()} CPUs ({cpu}), {mem:.1f} GiB, kernel {platform.release()}, "
            f"Debian {open('/etc/debian_version').read().strip()}, Python "
            f"{platform.python_version()}",
            f"netshim: {ver} (sha256 {b.shim_sha}…), bench tree {git.stdout.decode().strip()}",
            f"Debian packages: {pk}",
            f"netshim state dir: {b.a.tmp_parent} ({fs}); IPv6 on in every host netns"]


def report(b, levels, n, wall, host_same, left, chart_rel):
    R, names = b.res, [s.name for s in b.stacks]
    lo, hi = levels[0], levels[-1]
    p = lambda name, lv, key, q=50: pct(R[(name, lv)][key], q)  # noqa: E731
    L = ["# Container network setup and teardown: netshim, ip + nft, netavark, CNI, /bin/true", "",
         "Regenerated by `python3 bench/bench.py` (root; `--quick` for a short run; see "
         "[bench/README.md](../bench/README.md)). Bridge networking, one TCP host port per "
         "container; every stack in its own private network namespace standing in for the host.",
         ""]
    L += [f"- {x}" for x in b.info]
    L += [f"- {n} runs per (stack, level), {', '.join(map(str, levels))} containers already "
          f"running; the stacks take turns in each run; wall time {wall / 60:.1f} min; "
          f"command `bench/bench.py{''.join(' ' + x for x in sys.argv[1:])}`", "", f"![setup and teardown p50]({chart_rel})",
          "", "## Setup and teardown", "",
          "Milliseconds from the first exec to the last exit of one container's setup (or "
          "teardown), input on stdin, output captured. Teardown as runtimes do it: the "
          "container's processes are killed and its netns released first (netavark: podman "
          "keeps the netns until `netavark teardown` returns, which needs it). CPU: user + "
          f"system of the step's processes. p99 of {n} samples is close to the maximum.", "",
          "| stack | running | setup p50 | p90 | p99 | teardown p50 | p90 | p99 | setup CPU p50 |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        for lv in levels:
            L.append(f"| {name} | {lv} | " + " | ".join(
                f"{p(name, lv, k, q):.2f}" for k in ("setup", "teardown") for q in (50, 90, 99))
                + f" | {p(name, lv, 'cpu'):.1f} |")
    L += ["", "Ratios of p50s, netshim / other, same run (below 1: netshim is faster):", "",
          "| running | " + " | ".join(f"setup / {o} | teardown / {o}" for o in names[1:]) + " |",
          "|---:|" + "---:|" * (2 * len(names) - 2)]
    for lv in levels:
        L.append(f"| {lv} | " + " | ".join(
            f"{p('netshim', lv, k) / p(o, lv, k):.2f}" for o in names[1:]
            for k in ("setup", "teardown")) + " |")
    L += ["", f"Flatness: p50 at {hi} running / p50 at {lo}:", "",
          "| stack | setup | setup ms added | teardown | teardown ms added |",
          "|---|---:|---:|---:|---:|"]
    for name in names:
        L.append(f"| {name} | " + " | ".join(
            f"{p(name, hi, k) / p(name, lo, k):.2f} | {p(name, hi, k) - p(name, lo, k):+.2f}"
            for k in ("setup", "teardown")) + " |")
    L += ["", "## Starting the hook process", "", f"{b.start_how}, stdout to /dev/null:", "",
          "| process | task-clock ms | page faults | × /bin/true (time, faults) |",
          "|---|---:|---:|---:|"]
    t = b.start["/bin/true"]
    for name, (ms, pf) in b.start.items():
        L.append(f"| `{name}` | {ms:.2f} | {pf:.0f} | {ms / t[0]:.2f}, {pf / t[1]:.2f} |")
    L += ["", "## Peak RSS", "", "Maximum resident set of the largest process of a step "
          "(`/usr/bin/time -f %M` around each process, p50 of the runs; /bin/true's row is the "
          "floor of this method), KiB:", "", "| stack | " + " | ".join(
              f"setup at {lv} | teardown at {lv}" for lv in sorted({k[1] for k in b.rss}))
          + " |", "|---|" + "---:|" * (2 * len({k[1] for k in b.rss}))]
    for name in names:
        L.append(f"| {name} | " + " | ".join(f"{b.rss[(name, lv)][0]:.0f} | "
                                             f"{b.rss[(name, lv)][1]:.0f}" for lv in
                                             sorted({k[1] for k in b.rss})) + " |")
    L += ["", f"## {BURST} at once", "", f"{BURST} threads released together each run one "
          f"setup; after the checks the {BURST} containers die and their {BURST} teardowns are "
          "released together. Wall time from the first start to the last exit, p50 over the "
          "rounds; ÷ serial: that over 16 × the one-at-a-time p50 (1: no overlap). Failures: "
          "non-zero exit or failed check; duplicates: two containers given the same address "
          "and port. netavark's calls queue on podman's lock.", "",
          "| stack | running | rounds | setup wall ms | ÷ serial | teardown wall ms | ÷ serial "
          "| failures | duplicates |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, lv), g in b.bursts.items():
        L.append(f"| {name} | {lv} | {len(g['up'])} | {med(g['up']):.0f} | "
                 f"{med(g['up']) / (BURST * p(name, lv, 'setup')):.2f} | {med(g['down']):.0f} | "
                 f"{med(g['down']) / (BURST * p(name, lv, 'teardown')):.2f} | {g['fail']} | "
                 f"{g['dup']} |")
    fb = [f for g in b.bursts.values() for f in g["load"]]
    L += ["", f"Other work on the machine during the rounds: {statistics.mean(fb):.0%} of the CPUs "
          f"on average, {max(fb):.0%} at most (upper bounds; rounds are not redone)."]
    for (name, lv), g in b.bursts.items():
        if g["errors"]:
            L.append(f"\n- {name} at {lv}: {len(g['errors'])} errors, first: "
                     f"`{g['errors'][0][:300]}`")
    u = b.udp
    if u:
        rn = len(u["range"][0])
        L += ["", "## UDP (netshim)", "", f"netshim at 0 running. A UDP range of {u['range'][2]} "
              f"container ports (dynamic host ports), {rn} run{'s' * (rn > 1)}: setup "
              f"{med(u['range'][0]):.1f} ms, teardown {med(u['range'][1]):.1f} ms (p50). One "
              "mapping, UDP against TCP (a UDP mapping gets a conntrack zone of its own, where "
              "before its stale entries were flushed), with no "
              f"conntrack entries and with {CT_ENTRIES} unrelated ones in the host netns (UDP "
              "datagrams from the client netns to closed ports), ms, p50:", "",
              "| conntrack entries | tcp setup | udp setup | udp − tcp | tcp teardown "
              "| udp teardown | udp − tcp |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for e in (0, CT_ENTRIES):
            tc, ud = u[("tcp", e)], u[("udp", e)]
            L.append(f"| {u[('entries', e)][0]} | {med(tc[0]):.2f} | {med(ud[0]):.2f} | "
                     f"{med(ud[0]) - med(tc[0]):+.2f} | {med(tc[1]):.2f} | {med(ud[1]):.2f} | "
                     f"{med(ud[1]) - med(tc[1]):+.2f} |")
    if b.maint:
        m = b.maint
        L += ["", "## Maintenance (netshim)", "", f"With {m['containers']} containers: `shim gc` "
              f"with all alive (nothing to release, p50 of 3) {m['gc, all alive']:.0f} ms; `shim "
              f"gc` after all died without poststop (processes killed, netns released) "
              f"{m['gc, all dead']:.0f} ms; `shim reset --force` with all alive "
              f"{m['reset --force']:.0f} ms (bridge and table gone, checked)."]
    if b.lat:
        L += ["", "## Connect + request latency", "", "A client in its own netns (behind a veth, "
              "like another machine) connects, sends a request and reads the reply from a "
              "responder in one container, through the host port (DNAT) and straight to the "
              "container address; microseconds.", "",
              "| stack | running | via host port p50 | p90 | direct p50 | p90 | DNAT cost p50 "
              "| requests | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (name, lv), d in b.lat.items():
            hp, di = d["hostport"], d["direct"]
            L.append(f"| {name} | {lv} | {med(hp):.0f} | {pct(hp, 90):.0f} | {med(di):.0f} | "
                     f"{pct(di, 90):.0f} | {med(hp) - med(di):+.0f} | {len(hp)} | "
                     f"{len(d['errors'])} |")
    L += ["", "## Processes", "", "Programs exec'd by one setup and one teardown (an extra "
          "untimed pair under `strace -f -e trace=execve`, one other container present):", "",
          "| stack | setup | teardown |", "|---|---|---|"]
    for s in b.stacks:
        L.append(f"| {s.name} | {fmt_progs(s.programs['setup'])} | "
                 f"{fmt_progs(s.programs['teardown']) or '–'} |")
    L += ["", "## Context", ""]
    for s in (s for s in b.stacks if s.network):
        L.append(f"- {s.name} first use (creates its bridge and rules; not in the tables): setup "
                 f"{s.first_use[0]:.1f} ms, teardown {s.first_use[1]:.1f} ms")
    for s in b.stacks:
        if len(s.bg_ms) >= 20:
            k = max(5, len(s.bg_ms) // 10)
            L.append(f"- {s.name}: setups of its {len(s.bg_ms)} background containers (untimed "
                     f"by the tables): p50 of the first {k} {med(s.bg_ms[:k]):.1f} ms, of the "
                     f"last {k} {med(s.bg_ms[-k:]):.1f} ms")
    for lv in levels:
        q, mean, mx, redone = b.load[lv]
        L.append(f"- other work on the machine at {lv} running: {q:.0%} of the CPUs just before, "
                 f"{mean:.0%} on average during the kept runs, {mx:.0%} at most (upper bounds); "
                 f"runs dropped and redone: {redone}"
                 + (" — busy machine, absolute times inflated" if mean > 0.15 else ""))
    L += [f"- {x}" for x in b.notes]
    L += ["- netavark at 0 running: the timed container is alone on its network, so its "
          "teardown also deletes the bridge and the network's chains, and its setup recreates "
          "them.",
          "- netavark and the CNI plugins run `iptables` (nft backend) per rule change, each "
          "reading the table it changes, and forward ports through a chain with a jump per "
          "mapping: their setup and DNAT cost grow with the containers. netshim and ip + nft "
          "add map elements: one hash lookup per new connection whatever the count.",
          "", "## Cleanup check", "",
          "- host firewall (iptables-save, ip6tables-save, nft list ruleset of the original "
          "netns) before vs after: " + ("unchanged" if host_same else "CHANGED"),
          "- left behind: " + ("; ".join(left) if left else "nothing (no namespace, process, "
                                                             "temp dir or link of the bench)")]
    return "\n".join(L) + "\n"


def chart(b, levels, n, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    for ax, key, title in zip(axes, ("setup", "teardown"), (
            "setup", "teardown (processes killed, netns released first)")):
        for s in b.stacks:
            col, mk = STYLE[s.name]
            p50 = [pct(b.res[(s.name, lv)][key], 50) for lv in levels]
            ax.fill_between(levels, p50, [pct(b.res[(s.name, lv)][key], 90) for lv in levels],
                            color=col, alpha=0.12, linewidth=0)
            ax.plot(levels, p50, marker=mk, color=col, linewidth=2, label=LABEL[s.name])
            ax.annotate(f"{p50[-1]:.1f}", (levels[-1], p50[-1]), textcoords="offset points",
                        xytext=(6, -3), fontsize=8, color=col)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(levels)
        ax.set_xlim(levels[0] - levels[-1] * 0.03, levels[-1] * 1.15)
        ax.set_xlabel("containers already running (set up by the same stack)")
        ax.set_ylabel("ms, median (band: to p90), log scale")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Bridge network + one TCP host port per container", fontsize=12)
    fig.text(0.01, 0.01, f"{b.info[0]}; {n} runs per point; bench/bench.py", fontsize=7,
             color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def ensure_tools(allow):
    """Installs what is missing with `scripts/deps.sh bench`; re-runs the bench under Debian's
    python3 when this interpreter has no matplotlib."""
    def have_mpl(py):
        return subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0

    missing = sorted({pkg for path, pkg in NEEDS.items() if not os.path.exists(path)}
                     | (set() if have_mpl(sys.executable) or have_mpl("/usr/bin/python3")
                        else {"python3-matplotlib"}))
    if missing:
        if not allow:
            raise BenchError(f"missing {' '.join(missing)}: run `scripts/deps.sh bench` or drop "
                             "--no-install")
        log(f"installing {' '.join(missing)} (scripts/deps.sh bench)")
        r = subprocess.run(["bash", os.path.join(REPO, "scripts", "deps.sh"), "bench"],
                           capture_output=True)
        if r.returncode != 0:
            raise BenchError(f"scripts/deps.sh bench failed: {r.stderr.decode()[-400:]}")
    if not have_mpl(sys.executable):
        if sys.executable != "/usr/bin/python3" and have_mpl("/usr/bin/python3"):
            os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
        raise BenchError("matplotlib not found: apt-get install python3-matplotlib (or pip "
                         "install matplotlib)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (about 2 minutes): 5 "
                    "runs, levels 0,20, one burst round, a 100-port UDP range; writes to /tmp")
    ap.add_argument("--runs", type=int, help="timed runs per (stack, level) (default 40)")
    ap.add_argument("--running", help="levels of running containers (default 0,100,500)")
    ap.add_argument("--burst-rounds", type=int, help="rounds of 16 at once (default 3)")
    ap.add_argument("--requests", type=int, help="latency samples per path (default 300)")
    ap.add_argument("--out", help="report (default docs/benchmarks.md; --quick: /tmp/...)")
    ap.add_argument("--chart", help="chart (default docs/benchmarks.png; --quick: /tmp/...)")
    ap.add_argument("--shim", default=os.path.join(REPO, "target", "x86_64-unknown-linux-gnu", "release", "shim"),
                    help="the shim binary to measure (copied first)")
    ap.add_argument("--tmp-parent", default="/dev/shm", help="where the temp dir (netshim's "
                    "state dir, configs) goes (default /dev/shm: tmpfs, like /run on most hosts)")
    ap.add_argument("--wait-idle", type=float, help="spend at most S s in all waiting for a "
                    "quiet machine and redoing busy runs (default 180; --quick 5)")
    ap.add_argument("--max-foreign", type=float, default=0.25, help="redo a run during which "
                    "other work took more than this share of the CPUs (default 0.25)")
    ap.add_argument("--max-redo", type=int, help="at most this many redone runs per level "
                    "(default 40; --quick 2)")
    ap.add_argument("--settle", type=float, default=0.05, help="idle s between timed steps")
    ap.add_argument("--no-install", action="store_true", help="do not install missing packages")
    a = ap.parse_args()
    q = a.quick
    n = a.runs or (5 if q else 40)
    levels = sorted({int(x) for x in (a.running or ("0,20" if q else "0,100,500")).split(",")})
    rounds = a.burst_rounds if a.burst_rounds is not None else (1 if q else 3)
    nreq = a.requests or (50 if q else 300)
    a.wait_idle = a.wait_idle if a.wait_idle is not None else (5 if q else 180)
    a.max_redo = a.max_redo if a.max_redo is not None else (2 if q else 40)
    a.out = a.out or ("/tmp/netshim-bench-quick.md" if q else os.path.join(REPO, "docs",
                                                                          "benchmarks.md"))
    a.chart = a.chart or ("/tmp/netshim-bench-quick.png" if q else os.path.join(REPO, "docs",
                                                                               "benchmarks.png"))
    if n < 1 or len(levels) < 2 or levels[0] < 0:
        ap.error("--runs >= 1 and at least two levels >= 0")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces, links, firewall rules)")
    if not os.access(a.shim, os.X_OK):
        ap.error(f"no shim binary at {a.shim}: build it with `cargo build --release`")
    try:
        ensure_tools(not a.no_install)
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1

    fw = host_firewall()
    b = Bench(a)
    atexit.register(b.cleanup)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    rc, done, left = 0, False, []
    try:
        b.prepare()
        log(f"process start ({'20' if q else '100'} runs each)")
        b.process_start(20 if q else 100)
        b.warm_up()
        for lv in levels:
            log(f"level {lv}: growing every stack to {lv} running containers (untimed)")
            b.grow_to(lv)
            log(f"level {lv}: {n} runs")
            b.measure(lv, n)
            if lv in (levels[0], levels[-1]):
                log(f"level {lv}: {BURST} at once, latency, peak RSS")
                b.burst(lv, rounds)
                b.latency(lv, nreq)
                b.peak_rss(lv, 2 if q else 5)
            if lv == levels[0]:
                log(f"level {lv}: netshim UDP")
                b.udp_bench(4 if q else 20, 100 if q else 1000)
        log(f"netshim maintenance with {levels[-1]} containers")
        b.maintenance()
        done = True
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except SystemExit as e:
        log("terminated")
        rc = e.code
    except BenchError as e:
        log(f"FAILED: {e}")
        rc = 1
    finally:
        log("cleaning up")
        b.cleanup()
        left = b.leftovers()
    same = host_firewall() == fw
    if not same:
        left.append("the original netns's firewall changed during the run")
    if left:
        log("LEFT BEHIND: " + "; ".join(left))
        rc = rc or 2
    else:
        log("cleanup checked: nothing of the bench left; host firewall unchanged")
    if done:
        chart(b, levels, n, a.chart)
        text = report(b, levels, n, time.perf_counter() - b.t0, same, left,
                      os.path.relpath(a.chart, os.path.dirname(os.path.abspath(a.out))))
        with open(a.out, "w") as f:
            f.write(text)
        sys.stdout.write(text)
        log(f"report written to {a.out}, chart to {a.chart}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
