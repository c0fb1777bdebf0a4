#!/usr/bin/env python3
"""Side-by-side benchmark of container bridge networking with one TCP host port: netshim's OCI
hook, Debian's netavark, Debian's CNI bridge + host-local + portmap plugins, and an `ip` + `nft`
baseline.

Each stack runs inside its own private network namespace that stands in for the host (created
here, entered with setns, deleted at the end), so the real host's links and firewall (iptables
included) are never touched. Writes docs/benchmarks.md and docs/benchmark-setup.png. Run as root:

    python3 bench/compare.py [--quick]

See bench/README.md for what is measured and how.
"""

import argparse
import atexit
import errno
import fcntl
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import hook_bench as hb  # noqa: E402  (shared helpers: setns, CPU watch, quiet wait, percentiles)
from hook_bench import BenchError, CpuWatch, pct, setns, thread_netns_inode  # noqa: E402

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETAVARK = "/usr/lib/podman/netavark"
CNI_DIR = "/usr/lib/cni"
TIMEOUT = hb.TIMEOUT
STACKS = ("netshim", "netavark", "cni", "ip+nft")
LABEL = {"netshim": "netshim hook", "netavark": "netavark", "cni": "CNI bridge+portmap",
         "ip+nft": "ip+nft baseline"}
BURST = 16


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv, inp=None, check=True, env=None):
    return hb.run(argv, inp=inp, check=check, env=env)


def med(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------- fork counter


class ForkCounter:
    """Counts the processes (not threads) created by this process and its descendants, from the
    kernel's process events connector (netlink). The socket is opened in the original netns
    before anything else. Falls back to the /proc/stat fork counter (system-wide, threads
    included) where the connector is not available."""

    def __init__(self):
        self.mine = {os.getpid()}
        self.lost = False
        self.stat0 = hb.forks_since_boot()
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)  # NETLINK_CONNECTOR
            try:
                s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind((0, 1))  # CN_IDX_PROC
            op = struct.pack("=I", 1)  # PROC_CN_MCAST_LISTEN
            cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(op), 0) + op
            s.send(struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)  # NLMSG_DONE
            s.setblocking(False)
            self.sock = s
            self.kind = "proc connector"
        except OSError as e:
            self.sock = None
            self.kind = f"/proc/stat (threads and other work included; connector: {e})"

    def drain(self):
        """(processes, threads, execs) by descendants since the last drain; None if events were
        lost (socket overflow)."""
        if self.sock is None:
            n = hb.forks_since_boot()
            d, self.stat0 = n - self.stat0, n
            return (d, 0, 0)
        procs = threads = execs = 0
        lost = False
        while True:
            try:
                d = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise
            off = 0
            while off + 16 <= len(d):
                ln = struct.unpack_from("=I", d, off)[0]
                if ln < 16:
                    break
                ev = off + 16 + 20  # nlmsghdr + cn_msg
                if ev + 16 <= len(d):
                    what = struct.unpack_from("=I", d, ev)[0]
                    body = ev + 16
                    if what == 0x1:  # fork
                        _pp, ptgid, cpid, ctgid = struct.unpack_from("=4I", d, body)
                        if ptgid in self.mine:
                            if cpid == ctgid:
                                procs += 1
                                self.mine.add(ctgid)
                            else:
                                threads += 1
                    elif what == 0x2:  # exec
                        _pid, tgid = struct.unpack_from("=2I", d, body)
                        if tgid in self.mine:
                            execs += 1
                    elif what == 0x80000000:  # exit
                        pid, tgid = struct.unpack_from("=2I", d, body)
                        if pid == tgid and pid != os.getpid():
                            self.mine.discard(pid)
                off += (ln + 3) & ~3
        if lost:
            self.lost = True
            return None
        return (procs, threads, execs)


# ---------------------------------------------------------------------- containers & execution


class Ctr:
    """One simulated container: a netns (named, or anonymous and held by its sleeper), maybe a
    sleeping process (its pid is what a runtime gives netshim), and what its stack assigned."""

    def __init__(self, cid):
        self.cid = cid
        self.ns = None  # name under /run/netns, or None for an anonymous netns
        self.path = None  # netns path handed to netavark / CNI
        self.sleeper = None
        self.pid = None
        self.ip = None
        self.port = None
        self.veth = None
        self.result = None  # CNI result, for DEL


class StepError(BenchError):
    pass


class Exec:
    """Runs the commands of one step the way a runtime runs a hook or plugin: exec, input on
    stdin, output captured. Keeps each command's time; optionally wraps argv (strace)."""

    def __init__(self, wrap=None):
        self.splits = []
        self.wrap = wrap

    def run(self, argv, inp=None, env=None):
        if self.wrap:
            argv = self.wrap(argv)
        c0 = time.perf_counter()
        r = subprocess.run(argv, input=inp,
                           stdin=None if inp is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           timeout=TIMEOUT)
        self.splits.append((time.perf_counter() - c0) * 1000.0)
        if r.returncode != 0:
            raise StepError(f"`{' '.join(argv[:4])}…` exited {r.returncode}: "
                            f"{(r.stderr or r.stdout).decode(errors='replace').strip()[:400]}")
        return r.stdout


# ---------------------------------------------------------------------- stacks


class Stack:
    name = ""
    tag = ""
    bridge = ""
    net = ""  # first two octets
    needs_pid = False  # a sleeper in timed containers too
    direct = 1  # processes the runtime itself spawns per setup
    direct_down = 1

    def __init__(self, bench, idx):
        self.b = bench
        self.idx = idx
        self.host_ns = f"{bench.prefix}-{self.tag}h"
        self.cli_ns = f"{bench.prefix}-{self.tag}k"
        self.cli_host = f"10.250.{idx}.1"
        self.cli_addr = f"10.250.{idx}.2"
        self.host_fd = None
        self.host_ino = None
        self.bg = []
        self.bg_ms = []
        self.k = 0  # containers ever made by this stack (ports, veth names)
        self.env = {"PATH": PATH}
        self.first_use = None
        self.programs = None  # {program: count} exec'd per setup / teardown (strace)

    # -- namespaces
    def enter(self):
        setns(self.host_fd)
        if thread_netns_inode() != self.host_ino:
            raise BenchError(f"safety check: not in {self.host_ns}")

    def check_in(self):
        if thread_netns_inode() != self.host_ino:
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
        # A container host forwards; netshim, netavark and the bridge plugin set this too. The
        # file follows this thread's netns (checked below against the original one).
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        # A client namespace behind a veth, standing in for another machine.
        b.add_netns(self.cli_ns)
        run(["ip", "link", "add", "cmpcli0", "type", "veth", "peer", "name", "eth0",
             "netns", self.cli_ns])
        run(["ip", "addr", "add", f"{self.cli_host}/24", "dev", "cmpcli0"])
        run(["ip", "link", "set", "cmpcli0", "up"])
        for cmd in (["addr", "add", f"{self.cli_addr}/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                    ["route", "add", "default", "via", self.cli_host]):
            run(["ip", "-n", self.cli_ns] + cmd)
        self.init()

    def init(self):
        pass

    def new_ctr(self, kind):
        """kind 't' (timed), 'p' (parallel burst), 'l' (latency): a named netns (a sleeper in it
        if the stack needs a pid); 'bg': an anonymous netns held by its sleeper."""
        b = self.b
        k = self.k
        self.k += 1
        c = Ctr(f"{self.tag}{kind}{k}")
        if kind == "bg":
            c.sleeper = b.start_anon_sleeper()
            c.pid = c.sleeper.pid
            c.path = f"/proc/{c.pid}/ns/net"
        else:
            c.ns = f"{b.prefix}-{self.tag}{kind}{k}"
            b.add_netns(c.ns)
            c.path = f"/run/netns/{c.ns}"
            if self.needs_pid:
                c.sleeper = b.start_sleeper(c.ns)
                c.pid = c.sleeper.pid
        self.assign(c, k)
        return c

    def assign(self, c, k):
        pass

    def remove_ctr(self, c):
        if c.sleeper is not None:
            self.b.stop_proc(c.sleeper)
        if c.ns:
            self.b.del_netns(c.ns)

    def bg_setup(self, c):
        self.setup(c, Exec())

    def cleanup_failed(self, c):
        """Untimed best-effort undo after a failed step."""
        try:
            self.teardown(c, Exec())
        except BenchError:
            pass

    def ctr_ip(self, c):
        out = run(["nsenter", f"--net={c.path}", "ip", "-o", "-4", "addr", "show", "dev",
                   "eth0"], check=False).stdout.decode()
        for w in out.split():
            if "/" in w and w[0].isdigit():
                return w.split("/")[0]
        return None

    def bridge_ports(self):
        out = run(["ip", "-o", "link", "show", "master", self.bridge], check=False).stdout.decode()
        return sum(1 for line in out.splitlines() if line.strip())

    def nat_rules(self):
        return run(["iptables", "-w", "-t", "nat", "-S"], check=False).stdout.decode()

    def check_ip(self, c):
        ip = self.ctr_ip(c)
        if not ip or (c.ip and ip != c.ip):
            raise BenchError(f"{self.name}: eth0 in {c.path} has {ip}, want {c.ip}")
        if not ip.startswith(self.net + "."):
            raise BenchError(f"{self.name}: eth0 in {c.path} has {ip}, outside {self.net}.0.0/16")
        c.ip = ip

    def check_iptables_up(self, c):
        rules = self.nat_rules()
        if f"--dport {c.port} -j DNAT --to-destination {c.ip}:80" not in rules:
            raise BenchError(f"{self.name}: no DNAT rule for tcp/{c.port} -> {c.ip}:80")

    def check_iptables_down(self, c):
        rules = self.nat_rules()
        if f"--dport {c.port} " in rules or f"--dports {c.port} " in rules:
            raise BenchError(f"{self.name}: tcp/{c.port} still in the nat table after teardown")

    def count_dnat(self):
        return sum(1 for line in self.nat_rules().splitlines() if "-j DNAT" in line)


class Netshim(Stack):
    name, tag, bridge, net = "netshim", "s", "netshim0", "10.213"
    needs_pid = True

    def init(self):
        t = self.b.tmp
        self.state_dir = os.path.join(t, "netshim-state")
        self.config = os.path.join(t, "netshim.toml")
        with open(self.config, "w") as f:
            f.write(f'[ports]\ndynamic_range = "{hb.SHIM_RANGE}"\n')
        self.env = dict(self.env, NETSHIM_STATE_DIR=self.state_dir, NETSHIM_CONFIG=self.config)

    def setup(self, c, ex):
        ann = {"netshim.network-mode": "bridge",
               "netshim.port-mappings": json.dumps([{"containerPort": 80}])}
        st = {"ociVersion": "1.0.2", "id": c.cid, "status": "creating", "pid": c.pid,
              "bundle": "/nonexistent", "annotations": ann}
        ex.run([self.b.shim, "hook", "createRuntime"], json.dumps(st).encode(), self.env)

    def teardown(self, c, ex):
        st = {"ociVersion": "1.0.2", "id": c.cid, "status": "stopped", "bundle": "/nonexistent"}
        ex.run([self.b.shim, "hook", "poststop"], json.dumps(st).encode(), self.env)

    def state(self):
        with open(os.path.join(self.state_dir, "state.json")) as f:
            return json.load(f)["containers"]

    def check_up(self, c):
        rec = self.state().get(c.cid)
        if not rec:
            raise BenchError(f"netshim: {c.cid} not in state.json after createRuntime")
        c.ip, c.veth, c.port = rec["ip"], rec["veth"], rec["ports"][0]["hostPort"]
        self.check_ip(c)
        out = run(["ip", "-o", "link", "show", c.veth]).stdout.decode()
        if f"master {self.bridge}" not in out:
            raise BenchError(f"netshim: {c.veth} not on {self.bridge}")
        out = run(["nft", f"get element ip {hb.SHIM_TABLE} ports {{ tcp . {c.port} }}"],
                  check=False).stdout.decode()
        if f"{c.ip} . 80" not in out:
            raise BenchError(f"netshim: map element for tcp/{c.port} missing or wrong")

    def check_down(self, c):
        if c.cid in self.state():
            raise BenchError(f"netshim: {c.cid} still in state.json after poststop")
        if c.veth and run(["ip", "link", "show", c.veth], check=False).returncode == 0:
            raise BenchError(f"netshim: {c.veth} still exists after poststop")
        r = run(["nft", f"get element ip {hb.SHIM_TABLE} ports {{ tcp . {c.port} }}"], check=False)
        if r.returncode == 0:
            raise BenchError(f"netshim: tcp/{c.port} still mapped after poststop")

    def counts(self):
        return self.bridge_ports(), map_elements(hb.SHIM_TABLE)


class Netavark(Stack):
    """netavark as podman drives it: podman allocates the address and host port (here: the
    bench, in-process, under the same lock), takes a file lock, execs `netavark setup` with the
    network options on stdin. iptables firewall driver."""
    name, tag, bridge, net = "netavark", "v", "cmpnv0", "10.215"
    port0 = 12000

    def init(self):
        t = self.b.tmp
        self.confdir = os.path.join(t, "netavark")
        os.makedirs(self.confdir)
        self.lockfile = os.path.join(t, "netavark.lock")
        open(self.lockfile, "w").close()
        self.env = dict(self.env, NETAVARK_FW="iptables")
        self.net_id = hashlib.sha256(b"cmpnv").hexdigest()
        self.free = []  # freed address offsets, reused lowest first
        self.next = 2

    def assign(self, c, k):
        c.port = self.port0 + k

    def alloc(self):
        if self.free:
            self.free.sort()
            off = self.free.pop(0)
        else:
            off = self.next
            self.next += 1
        return f"{self.net}.{off >> 8}.{off & 255}"

    def release(self, ip):
        a, b = ip.split(".")[2:]
        self.free.append(int(a) * 256 + int(b))

    def options(self, c):
        return json.dumps({
            "container_id": hashlib.sha256(c.cid.encode()).hexdigest(),
            "container_name": c.cid,
            "port_mappings": [{"host_ip": "", "container_port": 80, "host_port": c.port,
                               "range": 1, "protocol": "tcp"}],
            "networks": {"cmpnv": {"static_ips": [c.ip], "interface_name": "eth0",
                                   "aliases": None, "static_mac": None}},
            "network_info": {"cmpnv": {
                "name": "cmpnv", "id": self.net_id, "driver": "bridge",
                "network_interface": self.bridge,
                "subnets": [{"subnet": f"{self.net}.0.0/16", "gateway": f"{self.net}.0.1"}],
                "ipv6_enabled": False, "internal": False, "dns_enabled": False,
                "ipam_options": {"driver": "host-local"}, "options": None,
                "network_dns_servers": None}},
        }).encode()

    def locked(self, fn):
        with open(self.lockfile, "r") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                return fn()
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)

    def setup(self, c, ex):
        def go():
            if c.ip is None:
                c.ip = self.alloc()
            out = ex.run([NETAVARK, "--config", self.confdir, "setup", c.path],
                         self.options(c), self.env)
            got = json.loads(out)["cmpnv"]["interfaces"]["eth0"]["subnets"][0]["ipnet"]
            if got.split("/")[0] != c.ip:
                raise StepError(f"netavark: setup reported {got}, want {c.ip}")
        self.locked(go)

    def teardown(self, c, ex):
        def go():
            ex.run([NETAVARK, "--config", self.confdir, "teardown", c.path], self.options(c),
                   self.env)
            self.release(c.ip)
            c.ip_released = True
        self.locked(go)

    def cleanup_failed(self, c):
        try:
            self.teardown(c, Exec())
        except BenchError:
            if c.ip and not getattr(c, "ip_released", False):
                self.release(c.ip)

    def check_up(self, c):
        self.check_ip(c)
        self.check_iptables_up(c)

    def check_down(self, c):
        if self.ctr_ip(c):
            raise BenchError(f"netavark: eth0 still in {c.path} after teardown")
        self.check_iptables_down(c)

    def counts(self):
        return self.bridge_ports(), self.count_dnat()


class Cni(Stack):
    """The CNI protocol as a runtime speaks it: bridge (its IPAM: host-local) then portmap with
    bridge's result as prevResult and the port in runtimeConfig; DEL in reverse order, each with
    the cached result. Config as podman 3's default network: isGateway, ipMasq, hairpinMode."""
    name, tag, bridge, net = "cni", "c", "cmpcni0", "10.216"
    port0 = 14000
    direct = 2
    direct_down = 2

    def init(self):
        self.datadir = os.path.join(self.b.tmp, "cni-ipam")
        self.conf = {
            "cniVersion": "1.0.0", "name": "cmpcni", "type": "bridge", "bridge": self.bridge,
            "isGateway": True, "ipMasq": True, "hairpinMode": True,
            "ipam": {"type": "host-local",
                     "ranges": [[{"subnet": f"{self.net}.0.0/16", "gateway": f"{self.net}.0.1"}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": self.datadir},
        }

    def assign(self, c, k):
        c.port = self.port0 + k

    def cenv(self, cmd, c):
        return dict(self.env, CNI_COMMAND=cmd, CNI_CONTAINERID=c.cid, CNI_NETNS=c.path,
                    CNI_IFNAME="eth0", CNI_PATH=CNI_DIR)

    def pm_conf(self, c, prev):
        return json.dumps({
            "cniVersion": "1.0.0", "name": "cmpcni", "type": "portmap",
            "capabilities": {"portMappings": True},
            "runtimeConfig": {"portMappings": [{"hostPort": c.port, "containerPort": 80,
                                                "protocol": "tcp"}]},
            "prevResult": prev}).encode()

    def setup(self, c, ex):
        out = ex.run([f"{CNI_DIR}/bridge"], json.dumps(self.conf).encode(), self.cenv("ADD", c))
        res = json.loads(out)
        c.result = res
        c.ip = res["ips"][0]["address"].split("/")[0]
        out = ex.run([f"{CNI_DIR}/portmap"], self.pm_conf(c, res), self.cenv("ADD", c))
        c.result = json.loads(out)

    def teardown(self, c, ex):
        prev = c.result
        if prev is None:  # bridge ADD failed: DEL without a result, as a runtime would
            ex.run([f"{CNI_DIR}/bridge"], json.dumps(self.conf).encode(), self.cenv("DEL", c))
            return
        ex.run([f"{CNI_DIR}/portmap"], self.pm_conf(c, prev), self.cenv("DEL", c))
        ex.run([f"{CNI_DIR}/bridge"], json.dumps(dict(self.conf, prevResult=prev)).encode(),
               self.cenv("DEL", c))

    def check_up(self, c):
        self.check_ip(c)
        self.check_iptables_up(c)

    def check_down(self, c):
        if self.ctr_ip(c):
            raise BenchError(f"cni: eth0 still in {c.path} after DEL")
        self.check_iptables_down(c)
        if c.ip and os.path.exists(os.path.join(self.datadir, "cmpcni", c.ip)):
            raise BenchError(f"cni: host-local still holds {c.ip} after DEL")

    def counts(self):
        return self.bridge_ports(), self.count_dnat()


class IpNft(Stack):
    """hook_bench.py's baseline: its bridge, table and the same 7 setup / 2 teardown commands."""
    name, tag, bridge, net = "ip+nft", "b", hb.BASE_BRIDGE, "10.214"
    direct = 7
    direct_down = 2

    def init(self):
        run(["ip", "link", "add", self.bridge, "type", "bridge", "forward_delay", "0"])
        run(["ip", "addr", "add", f"{hb.BASE_GW}/16", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        run(["nft", "-f", "-"], inp=(
            f"table ip {hb.BASE_TABLE} {{\n"
            "  map ports { type inet_proto . inet_service : ipv4_addr . inet_service; }\n"
            "  set mapped { type inet_proto . inet_service; }\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            "    fib daddr type local meta l4proto { tcp, udp } "
            "dnat ip to meta l4proto . th dport map @ports\n"
            "  }\n"
            "}\n").encode())

    def assign(self, c, k):
        off = 2 + k
        c.ip = f"{self.net}.{off >> 8}.{off & 255}"
        c.port = hb.BASE_PORT0 + k
        c.veth = f"nbv{k:05d}"

    def elem_add(self, c):
        return ["nft", f"add element ip {hb.BASE_TABLE} ports {{ tcp . {c.port} : {c.ip} . 80 }}; "
                       f"add element ip {hb.BASE_TABLE} mapped {{ tcp . {c.port} }}"]

    def setup(self, c, ex):
        ns = c.ns
        for argv in (
                ["ip", "link", "add", c.veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
                ["ip", "link", "set", c.veth, "master", self.bridge, "up"],
                ["ip", "-n", ns, "addr", "add", f"{c.ip}/16", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "-n", ns, "route", "add", "default", "via", hb.BASE_GW],
                self.elem_add(c)):
            ex.run(argv, None, self.env)

    def bg_setup(self, c):
        # Anonymous netns: the same state, reached through the sleeper's pid (untimed).
        run(["ip", "link", "add", c.veth, "type", "veth", "peer", "name", "eth0", "netns",
             str(c.pid)])
        run(["ip", "link", "set", c.veth, "master", self.bridge, "up"])
        run(["nsenter", f"--net={c.path}", "ip", "-batch", "-"], inp=(
            f"addr add {c.ip}/16 dev eth0\nlink set eth0 up\nlink set lo up\n"
            f"route add default via {hb.BASE_GW}\n").encode())
        run(self.elem_add(c))

    def teardown(self, c, ex):
        ex.run(["nft", f"delete element ip {hb.BASE_TABLE} ports {{ tcp . {c.port} }}; "
                       f"delete element ip {hb.BASE_TABLE} mapped {{ tcp . {c.port} }}"],
               None, self.env)
        ex.run(["ip", "link", "del", c.veth], None, self.env)

    def cleanup_failed(self, c):
        run(["nft", f"delete element ip {hb.BASE_TABLE} ports {{ tcp . {c.port} }}"], check=False)
        run(["nft", f"delete element ip {hb.BASE_TABLE} mapped {{ tcp . {c.port} }}"], check=False)
        run(["ip", "link", "del", c.veth], check=False)

    def check_up(self, c):
        self.check_ip(c)
        out = run(["nft", f"get element ip {hb.BASE_TABLE} ports {{ tcp . {c.port} }}"],
                  check=False).stdout.decode()
        if f"{c.ip} . 80" not in out:
            raise BenchError(f"ip+nft: element tcp/{c.port} missing")

    def check_down(self, c):
        if run(["ip", "link", "show", c.veth], check=False).returncode == 0:
            raise BenchError(f"ip+nft: {c.veth} still exists after teardown")
        r = run(["nft", f"get element ip {hb.BASE_TABLE} ports {{ tcp . {c.port} }}"], check=False)
        if r.returncode == 0:
            raise BenchError(f"ip+nft: tcp/{c.port} still mapped after teardown")

    def counts(self):
        return self.bridge_ports(), map_elements(hb.BASE_TABLE)


def map_elements(table):
    r = run(["nft", "-j", "list", "map", "ip", table, "ports"], check=False)
    if r.returncode != 0:
        return 0
    for obj in json.loads(r.stdout)["nftables"]:
        if "map" in obj:
            return len(obj["map"].get("elem", []))
    return 0


# ---------------------------------------------------------------------- the tiny server and client

RESPONDER = r"""
import os, signal, socket, sys
signal.alarm(int(sys.argv[1]))  # stops by itself even if nobody kills it
if int(sys.argv[2]) >= 0:
    os.sched_setaffinity(0, {int(sys.argv[2])})
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(128)
print("ready", flush=True)
body = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
while True:
    c, _ = s.accept()
    try:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = c.recv(4096)
            if not d:
                break
            buf += d
        c.sendall(body)
    finally:
        c.close()
"""

CLIENT = r"""
import json, os, socket, sys, time
hp_addr, hp_port, d_addr, d_port, n, warm, cpu = sys.argv[1:8]
hp_port, d_port, n, warm = int(hp_port), int(d_port), int(n), int(warm)
if int(cpu) >= 0:
    os.sched_setaffinity(0, {int(cpu)})
def once(a, p):
    t0 = time.perf_counter()
    s = socket.create_connection((a, p), timeout=5)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    buf = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        buf += d
    s.close()
    t1 = time.perf_counter()
    if not buf.startswith(b"HTTP/1.0 200"):
        raise RuntimeError("bad reply %r" % buf[:40])
    return (t1 - t0) * 1e6
out = {"hostport": [], "direct": [], "errors": []}
for i in range(warm + n):
    legs = [("hostport", hp_addr, hp_port), ("direct", d_addr, d_port)]
    if i % 2:
        legs.reverse()
    for k, a, p in legs:
        try:
            us = once(a, p)
            if i >= warm:
                out[k].append(us)
        except Exception as e:
            out["errors"].append("%s: %s" % (k, e))
print(json.dumps(out))
"""


# ---------------------------------------------------------------------- the bench


class Compare:
    def __init__(self, args):
        self.args = args
        self.pid = os.getpid()
        self.prefix = f"nsc{self.pid}"
        self.procs = []  # every long-lived process we start (sleepers, responders)
        self.ns_inodes = {}
        self.root_fd = None
        self.root_ino = thread_netns_inode()
        self.tmp = None
        self.cleaned = False
        self.t_start = time.perf_counter()
        self.fc = ForkCounter()
        self.stacks = []
        self.results = {}  # (stack, level) -> dict
        self.bursts = {}  # (stack, level) -> dict
        self.lat = {}  # (stack, level) -> dict
        self.load = {}  # level -> (before, mean, max, redone)
        self.lat_foreign = {}  # level -> other work's CPU share during the latency rounds
        self.notes = []

    # -- namespaces & processes
    def add_netns(self, name):
        run(["ip", "netns", "add", name])
        self.ns_inodes[name] = os.stat(f"/run/netns/{name}").st_ino

    def del_netns(self, name):
        run(["ip", "netns", "del", name], check=False)
        self.ns_inodes.pop(name, None)

    def _wait_ns(self, p, want=None, differ=None, what=""):
        deadline = time.monotonic() + 10
        while True:
            try:
                ino = os.stat(f"/proc/{p.pid}/ns/net").st_ino
                if (want is not None and ino == want) or (differ is not None and ino != differ):
                    return p
            except FileNotFoundError:
                pass
            if p.poll() is not None:
                raise BenchError(f"{what} exited with {p.returncode}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what} never entered its namespace")
            time.sleep(0.0005)

    def start_sleeper(self, ns):
        p = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "100000"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return self._wait_ns(p, want=self.ns_inodes[ns], what=f"sleeper in {ns}")

    def start_anon_sleeper(self):
        here = thread_netns_inode()
        p = subprocess.Popen(["unshare", "--net", "--", "sleep", "100000"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return self._wait_ns(p, differ=here, what="anonymous-netns sleeper")

    def stop_proc(self, p):
        if p.poll() is None:
            p.kill()
        p.wait()
        try:
            self.procs.remove(p)
        except ValueError:
            pass

    # -- setup
    def prepare(self):
        a = self.args
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=a.tmp_parent)
        self.shim = os.path.join(self.tmp, "shim")
        shutil.copy2(a.shim, self.shim)
        with open(self.shim, "rb") as f:
            self.shim_sha = hashlib.sha256(f.read()).hexdigest()[:16]
        self.root_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            self.root_fwd = f.read().strip()
        for i, cls in enumerate((Netshim, Netavark, Cni, IpNft)):
            s = cls(self, i)
            self.stacks.append(s)
            s.prepare()
            log(f"{s.name}: host netns {s.host_ns} (inode {s.host_ino}), bridge {s.bridge} "
                f"{s.net}.0.0/16")
        setns(self.root_fd)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            if f.read().strip() != self.root_fwd:
                raise BenchError("safety check: ip_forward of the original netns changed")
        log(f"temp dir {self.tmp}")

    def timed(self, s, fn, wrap=None):
        """One timed step of stack s: returns dict(ms, procs, threads, execs, cpu, splits)."""
        s.check_in()
        ex = Exec(wrap)
        self.fc.drain()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        fn(ex)
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        f = self.fc.drain()
        return {"ms": (t1 - t0) * 1000.0, "forks": f, "splits": ex.splits,
                "cpu": ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1000.0}

    def warm_up(self):
        """First use of each stack (creates its bridge and rules): timed, not in the table. Then
        one untimed setup + teardown under strace to list the programs each stack runs."""
        for s in self.stacks:
            s.enter()
            c = s.new_ctr("t")
            up = self.timed(s, lambda ex: s.setup(c, ex))
            s.check_up(c)
            down = self.timed(s, lambda ex: s.teardown(c, ex))
            s.check_down(c)
            s.remove_ctr(c)
            s.first_use = (up["ms"], down["ms"])
            log(f"{s.name}: first use setup {up['ms']:.1f} ms, teardown {down['ms']:.1f} ms")
            if shutil.which("strace"):
                s.programs = self.strace_programs(s)

    def strace_programs(self, s):
        """Programs exec'd by one setup and one teardown (strace -f, untimed)."""
        d = os.path.join(self.tmp, "strace")
        os.makedirs(d, exist_ok=True)
        files = []

        def wrap(argv):
            fn = os.path.join(d, f"{s.tag}{len(files)}")
            files.append(fn)
            return ["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o", fn,
                    "--"] + argv

        out = {}
        # Two containers, so the teardown under strace is not the last one (netavark removes
        # its bridge and network rules then).
        c0 = s.new_ctr("t")
        s.setup(c0, Exec())
        c = s.new_ctr("t")
        for stage, fn in (("setup", lambda ex: s.setup(c, ex)),
                          ("teardown", lambda ex: s.teardown(c, ex))):
            files.clear()
            fn(Exec(wrap))
            progs = {}
            for f in files:
                with open(f) as fh:
                    for line in fh:
                        if "execve(" in line and line.rstrip().endswith("= 0"):
                            prog = os.path.basename(line.split('"')[1])
                            progs[prog] = progs.get(prog, 0) + 1
            out[stage] = progs
        s.check_down(c)
        s.remove_ctr(c)
        s.teardown(c0, Exec())
        s.remove_ctr(c0)
        return out

    def grow_to(self, level):
        for s in self.stacks:
            s.enter()
            t0 = time.perf_counter()
            while len(s.bg) < level:
                c = s.new_ctr("bg")
                c0 = time.perf_counter()
                s.bg_setup(c)
                s.bg_ms.append((time.perf_counter() - c0) * 1000.0)
                s.bg.append(c)
                if len(s.bg) % 100 == 0:
                    log(f"  {s.name}: {len(s.bg)}/{level} background containers")
            got = s.counts()
            if got != (level, level):
                raise BenchError(f"{s.name} after growing to {level}: (veths on {s.bridge}, "
                                 f"port mappings) = {got}, want {(level, level)}")
            log(f"  {s.name}: {level} running, checked; took {time.perf_counter() - t0:.1f} s")

    def one_run(self, i):
        n = len(self.stacks)
        order = [self.stacks[(i + j) % n] for j in range(n)]  # rotate who goes first
        ctrs = {}
        out = {}
        for s in self.stacks:
            s.enter()
            ctrs[s.name] = s.new_ctr("t")
        for s in order:
            s.enter()
            c = ctrs[s.name]
            out[s.name] = {"up": self.timed(s, lambda ex: s.setup(c, ex))}
            time.sleep(self.args.settle)
        for s in order:
            s.enter()
            s.check_up(ctrs[s.name])
        for s in order:
            s.enter()
            c = ctrs[s.name]
            out[s.name]["down"] = self.timed(s, lambda ex: s.teardown(c, ex))
            time.sleep(self.args.settle)
        for s in order:
            s.enter()
            s.check_down(ctrs[s.name])
            s.remove_ctr(ctrs[s.name])
        time.sleep(self.args.settle)
        return out

    def measure(self, level, n):
        a = self.args
        quiet = hb.wait_quiet(a.wait_idle)
        keep = []
        foreign = []
        redone = 0
        i = 0
        while len(keep) < n:
            w = CpuWatch()
            out = self.one_run(i)
            f = w.foreign()
            if f > a.max_foreign and redone < a.max_redo:
                redone += 1
                log(f"  run dropped: other work took {f:.0%} of the CPUs during it; redoing")
                hb.wait_quiet(a.wait_idle)
                continue
            keep.append(out)
            foreign.append(f)
            i += 1
        self.load[level] = (quiet, statistics.mean(foreign), max(foreign), redone)
        for s in self.stacks:
            ups = [r[s.name]["up"] for r in keep]
            downs = [r[s.name]["down"] for r in keep]
            fu = [x["forks"] for x in ups if x["forks"] is not None]
            fd = [x["forks"] for x in downs if x["forks"] is not None]
            st = [x["ms"] for x in ups]
            td = [x["ms"] for x in downs]
            self.results[(s.name, level)] = {
                "setup_p50": med(st), "setup_p90": pct(st, 90),
                "teardown_p50": med(td), "teardown_p90": pct(td, 90),
                "procs_setup": (min(x[0] for x in fu), med(x[0] for x in fu)) if fu else None,
                "procs_teardown": (min(x[0] for x in fd), med(x[0] for x in fd)) if fd else None,
                "threads_setup": med(x[1] for x in fu) if fu else None,
                "cpu_setup": med(x["cpu"] for x in ups), "cpu_teardown": med(x["cpu"] for x in downs),
                "split_setup": [med(c) for c in zip(*(x["splits"] for x in ups))],
                "split_teardown": [med(c) for c in zip(*(x["splits"] for x in downs))],
                "n": len(st),
            }
        log(f"  level {level}: " + "; ".join(
            f"{s.name} {self.results[(s.name, level)]['setup_p50']:.1f}/"
            f"{self.results[(s.name, level)]['teardown_p50']:.1f} ms" for s in self.stacks)
            + f" (setup/teardown p50; {redone} runs redone)")

    # -- 16 at once
    def parallel(self, s, ctrs, what):
        """Starts `what` (setup / teardown) for all ctrs at once, one thread each (threads
        inherit this thread's netns: checked in each). Returns (wall ms, [error or None])."""
        s.check_in()
        barrier = threading.Barrier(len(ctrs))
        res = [None] * len(ctrs)

        def work(i, c):
            ok_ns = thread_netns_inode() == s.host_ino
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                res[i] = ("barrier broken", 0.0, 0.0)
                return
            if not ok_ns:
                res[i] = ("safety check: worker thread not in the stack's netns", 0.0, 0.0)
                return
            t0 = time.perf_counter()
            try:
                getattr(s, what)(c, Exec())
                res[i] = (None, t0, time.perf_counter())
            except Exception as e:  # noqa: BLE001 - reported as a failure of this container
                res[i] = (str(e), t0, time.perf_counter())

        ts = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(ctrs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        starts = [r[1] for r in res if r[1]]
        ends = [r[2] for r in res if r[2]]
        wall = (max(ends) - min(starts)) * 1000.0 if starts else float("nan")
        if any(r[0] and r[0].startswith("safety check") for r in res):
            raise BenchError(f"{s.name}: a burst thread was not in the stack's netns")
        return wall, [r[0] for r in res]

    def burst(self, level, rounds):
        for s in self.stacks:
            s.enter()
            agg = {"setup_wall": [], "teardown_wall": [], "setup_fail": 0, "teardown_fail": 0,
                   "bad": 0, "dup_ip": 0, "dup_port": 0, "errors": [], "procs": [],
                   "foreign": []}
            for _ in range(rounds):
                hb.wait_quiet(min(self.args.wait_idle, 30))
                ctrs = [s.new_ctr("p") for _ in range(BURST)]
                w = CpuWatch()
                self.fc.drain()
                wall, errs = self.parallel(s, ctrs, "setup")
                f = self.fc.drain()
                if f is not None:
                    agg["procs"].append(f[0])
                agg["setup_wall"].append(wall)
                ok = []
                for c, e in zip(ctrs, errs):
                    if e:
                        agg["setup_fail"] += 1
                        agg["errors"].append(f"setup: {e}")
                        continue
                    try:
                        s.check_up(c)
                        ok.append(c)
                    except BenchError as e2:
                        agg["bad"] += 1
                        agg["errors"].append(f"check: {e2}")
                ips = [c.ip for c in ok]
                ports = [c.port for c in ok]
                agg["dup_ip"] += len(ips) - len(set(ips))
                agg["dup_port"] += len(ports) - len(set(ports))
                time.sleep(self.args.settle)
                wall, errs = self.parallel(s, ok, "teardown") if ok else (float("nan"), [])
                agg["teardown_wall"].append(wall)
                agg["foreign"].append(w.foreign())
                failed = [c for c in ctrs if c not in ok]
                for c, e in zip(ok, errs):
                    if e:
                        agg["teardown_fail"] += 1
                        agg["errors"].append(f"teardown: {e}")
                        failed.append(c)
                for c in failed:  # untimed cleanup, in sequence
                    s.cleanup_failed(c)
                for c in ctrs:
                    try:
                        s.check_down(c)
                    except BenchError as e2:
                        agg["errors"].append(f"after cleanup: {e2}")
                    s.remove_ctr(c)
                got = s.counts()
                if got != (level, level):
                    raise BenchError(f"{s.name}: after the burst at {level} running, (veths, "
                                     f"mappings) = {got}, want {(level, level)}")
                time.sleep(self.args.settle)
            self.bursts[(s.name, level)] = agg
            log(f"  {s.name}: {BURST} at once x{rounds}: setup wall p50 "
                f"{med(agg['setup_wall']):.0f} ms, failures {agg['setup_fail']}+{agg['bad']}, "
                f"dup ip {agg['dup_ip']}, dup port {agg['dup_port']}; teardown wall p50 "
                f"{med(agg['teardown_wall']):.0f} ms, failures {agg['teardown_fail']}")

    # -- connect + request latency
    def latency(self, level, n):
        """One container per stack with a responder in it; the client runs in rounds of 25
        requests per path, the stacks taking turns, so drift on the machine hits them alike.
        Client and responders are pinned to two different CPUs (where there are two)."""
        hb.wait_quiet(min(self.args.wait_idle, 30))
        cpus = sorted(os.sched_getaffinity(0))
        cpu_client, cpu_resp = (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, -1)
        per = 25
        rounds = max(1, -(-n // per))
        live = []
        data = {s.name: {"hostport": [], "direct": [], "errors": []} for s in self.stacks}
        try:
            for s in self.stacks:
                s.enter()
                c = s.new_ctr("l")
                s.setup(c, Exec())
                live.append((s, c, None))
                s.check_up(c)
                resp = subprocess.Popen(
                    ["ip", "netns", "exec", c.ns, sys.executable, "-c", RESPONDER, "900",
                     str(cpu_resp)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL)
                self.procs.append(resp)
                live[-1] = (s, c, resp)
                if resp.stdout.readline().strip() != b"ready":
                    raise BenchError(f"{s.name}: responder in {c.ns} did not start")
            w = CpuWatch()
            for r in range(rounds):
                for j in range(len(live)):
                    s, c, _ = live[(r + j) % len(live)]
                    s.enter()
                    out = run(["ip", "netns", "exec", s.cli_ns, sys.executable, "-c", CLIENT,
                               s.cli_host, str(c.port), c.ip, "80", str(per),
                               "20" if r == 0 else "3", str(cpu_client)])
                    d = json.loads(out.stdout)
                    for k in data[s.name]:
                        data[s.name][k] += d[k]
            self.lat_foreign[level] = w.foreign()
        finally:
            for _, _, resp in live:
                if resp is not None:
                    self.stop_proc(resp)
        for s, c, _ in live:
            s.enter()
            s.teardown(c, Exec())
            s.check_down(c)
            s.remove_ctr(c)
            d = data[s.name]
            hp, di = d["hostport"], d["direct"]
            self.lat[(s.name, level)] = {
                "hp50": med(hp), "hp90": pct(hp, 90), "d50": med(di), "d90": pct(di, 90),
                "n": min(len(hp), len(di)), "errors": d["errors"]}
            log(f"  {s.name}: connect+request via host port p50 {med(hp):.0f} us, direct "
                f"{med(di):.0f} us ({len(d['errors'])} errors)")
        self.lat_pinned = cpu_client >= 0

    # -- cleanup
    def cleanup(self):
        if self.cleaned:
            return
        self.cleaned = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            # Every namespace of ours is still pinned here (sleepers alive, names mounted), so
            # its inode cannot have been reused: kill whatever is inside one of them.
            names, inodes = hb.named_netns(self.prefix)
            for p in self.procs:
                if p.poll() is None:
                    try:
                        inodes.add(os.stat(f"/proc/{p.pid}/ns/net").st_ino)
                    except OSError:
                        pass
            inodes.discard(self.root_ino)
            hb.kill_inside(inodes)
            hb.stop_procs(self.procs)
            if self.root_fd is not None:
                try:
                    setns(self.root_fd)
                except OSError as e:
                    log(f"cleanup: cannot return to the original netns: {e}")
            for s in self.stacks:
                if s.host_fd is not None:
                    os.close(s.host_fd)
                    s.host_fd = None
            hosts = {s.host_ns for s in self.stacks}
            names.sort(key=lambda n: n in hosts)  # containers and clients first, hosts last
            hb.delete_netns(names)
            self.live_inodes = inodes
            if self.tmp and os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)

    def leftovers(self):
        out = []
        if os.path.isdir("/run/netns"):
            out += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(self.prefix)]
        alive = [p.pid for p in self.procs if p.poll() is None]
        if alive:
            out.append(f"processes still alive: {alive[:10]}")
        if self.tmp and os.path.exists(self.tmp):
            out.append(f"temp dir {self.tmp}")
        if self.root_fd is not None and thread_netns_inode() != self.root_ino:
            out.append("this thread is not back in the original netns")
        # Any process whose netns is one of ours that is still named (none should be).
        named = set()
        for n in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
            if n.startswith(self.prefix):
                try:
                    named.add(os.stat(f"/run/netns/{n}").st_ino)
                except OSError:
                    pass
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}/ns/net").st_ino in named:
                        out.append(f"pid {d} is inside one of the bench's namespaces")
                except OSError:
                    pass
        links = run(["ip", "-o", "link", "show"], check=False).stdout.decode()
        for name in ("cmpnv0", "cmpcni0", "cmpcli0", hb.BASE_BRIDGE, "nbv"):
            if f": {name}" in links:
                out.append(f"a link named {name}* in the original netns")
        return out


# ---------------------------------------------------------------------- host state snapshots


def host_firewall():
    """The original netns's firewall as text (iptables-save, ip6tables-save, nft list ruleset),
    with the timestamp comments removed."""
    out = {}
    for name, argv in (("iptables-save", ["iptables-save"]), ("ip6tables-save", ["ip6tables-save"]),
                       ("nft list ruleset", ["nft", "list", "ruleset"])):
        if not shutil.which(argv[0]):
            out[name] = None
            continue
        r = run(argv, check=False)
        out[name] = "\n".join(line for line in r.stdout.decode().splitlines()
                              if not line.startswith("#")) + f"\n(rc {r.returncode})"
    return out


def loaded_modules():
    try:
        with open("/proc/modules") as f:
            return {line.split()[0] for line in f}
    except OSError:
        return set()


# ---------------------------------------------------------------------- dependencies


def ensure_packages(allow):
    want = {"netavark": [NETAVARK], "containernetworking-plugins":
            [f"{CNI_DIR}/{p}" for p in ("bridge", "host-local", "portmap")],
            "iptables": ["/usr/sbin/iptables", "/usr/sbin/iptables-save"]}
    missing = [pkg for pkg, paths in want.items() if not all(os.path.exists(p) for p in paths)]
    if not shutil.which("strace"):
        missing.append("strace")
    if missing:
        if not allow:
            raise BenchError(f"missing: {' '.join(missing)} (apt-get install -y them, or drop "
                             f"--no-install)")
        log(f"installing {' '.join(missing)} with apt-get")
        r = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq"]
                           + missing, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode != 0:
            raise BenchError(f"apt-get install {' '.join(missing)} failed: "
                             f"{r.stdout.decode(errors='replace')[-500:]}")
    for pkg, paths in want.items():
        for p in paths:
            if not os.path.exists(p):
                raise BenchError(f"{p} (package {pkg}) not found")


def chart_python(allow):
    """An interpreter that has matplotlib: this one, Debian's python3, or None."""
    try:
        import matplotlib  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    deb = "/usr/bin/python3"

    def has(py):
        return os.path.exists(py) and subprocess.run(
            [py, "-c", "import matplotlib"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL).returncode == 0

    if has(deb):
        return deb
    if allow:
        log("installing python3-matplotlib with apt-get (for the chart)")
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq",
                        "python3-matplotlib"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=dict(os.environ,
                                                           DEBIAN_FRONTEND="noninteractive"))
        if has(deb):
            return deb
    return None


# ---------------------------------------------------------------------- chart


def render_chart_mpl(data, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"netshim": "#1f77b4", "netavark": "#d62728", "cni": "#2ca02c", "ip+nft": "#7f7f7f"}
    markers = {"netshim": "o", "netavark": "s", "cni": "^", "ip+nft": "D"}
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=120)
    xs = data["levels"]
    for name in data["order"]:
        p50, p90 = data["p50"][name], data["p90"][name]
        ax.fill_between(xs, p50, p90, color=colors[name], alpha=0.12, linewidth=0)
        ax.plot(xs, p50, marker=markers[name], color=colors[name], linewidth=2,
                label=data["labels"][name])
        ax.annotate(f"{p50[-1]:.1f} ms", (xs[-1], p50[-1]), textcoords="offset points",
                    xytext=(6, -3), fontsize=8, color=colors[name])
    top = max(max(v) for v in data["p50"].values())
    low = min(min(v) for v in data["p50"].values())
    log_scale = low > 0 and top / low > 25
    if log_scale:
        from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
        ax.set_yscale("log")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
                 if low / 2 <= t <= top * 2]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlim(xs[0] - max(xs) * 0.02, max(xs) * 1.12)
    ax.set_xticks(xs)
    ax.set_xlabel("containers already running (set up by the same stack)")
    ax.set_ylabel("setup time, median (ms)" + (", log scale" if log_scale else "")
                  + "; band: median to p90")
    ax.set_title("Container network setup (bridge + one TCP host port) vs containers running",
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.text(0.01, 0.01, data["footer"], fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out)


# A 3x5 pixel font for the fallback chart (lower case, digits, a little punctuation).
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001010010", "8": "111101111101111",
    "9": "111101111001111", "a": "010101111101101", "b": "110101110101110",
    "c": "011100100100011", "d": "110101101101110", "e": "111100110100111",
    "f": "111100110100100", "g": "011100101101011", "h": "101101111101101",
    "i": "111010010010111", "j": "001001001101010", "k": "101101110101101",
    "l": "100100100100111", "m": "101111111101101", "n": "110101101101101",
    "o": "010101101101010", "p": "110101110100100", "q": "010101101110011",
    "r": "110101110101101", "s": "011100010001110", "t": "111010010010010",
    "u": "101101101101111", "v": "101101101101010", "w": "101101111111101",
    "x": "101101010101101", "y": "101101010010010", "z": "111001010100111",
    "+": "000010111010000", "-": "000000111000000", ".": "000000000000010",
    "(": "010100100100010", ")": "010001001001010", "/": "001001010100100",
    ":": "000010000010000", ",": "000000000010100", "%": "101001010100101",
    "=": "000111000111000", " ": "000000000000000", ";": "000010000010100",
}


def render_chart_png(data, out, W=960, H=600):
    """Fallback without matplotlib: a plain RGB PNG (axes, grid, lines, labels) written with
    zlib and struct."""
    px = bytearray(b"\xff" * (W * H * 3))

    def dot(x, y, c):
        if 0 <= x < W and 0 <= y < H:
            i = (y * W + x) * 3
            px[i:i + 3] = bytes(c)

    def box(x0, y0, x1, y1, c):
        for y in range(max(0, y0), min(H, y1)):
            for x in range(max(0, x0), min(W, x1)):
                dot(x, y, c)

    def line(x0, y0, x1, y1, c, w=1):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            x = round(x0 + (x1 - x0) * i / n)
            y = round(y0 + (y1 - y0) * i / n)
            box(x - w // 2, y - w // 2, x - w // 2 + w, y - w // 2 + w, c)

    def text(x, y, s, c=(0, 0, 0), k=2):
        for ch in s.lower():
            g = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for col in range(3):
                    if g[r * 3 + col] == "1":
                        box(x + col * k, y + r * k, x + col * k + k, y + r * k + k, c)
            x += 4 * k
        return x

    colors = {"netshim": (31, 119, 180), "netavark": (214, 39, 40), "cni": (44, 160, 44),
              "ip+nft": (127, 127, 127)}
    L, R, T, B = 90, W - 40, 60, H - 80
    xs = data["levels"]
    top = max(max(v) for v in data["p50"].values()) * 1.1 or 1.0
    step = 10 ** len(str(int(top / 5))) / 10 if top >= 5 else 1.0
    for m in (1, 2, 5, 10):
        if top / (step * m) <= 6:
            step *= m
            break
    ymax = step * (int(top / step) + 1)
    xmax = max(xs) or 1

    def X(v):
        return round(L + (R - L) * v / xmax)

    def Y(v):
        return round(B - (B - T) * v / ymax)

    yv = 0.0
    while yv <= ymax + 1e-9:
        line(L, Y(yv), R, Y(yv), (225, 225, 225))
        text(L - 10 - 8 * len(f"{yv:g}"), Y(yv) - 5, f"{yv:g}")
        yv += step
    for v in xs:
        line(X(v), B, X(v), B + 6, (0, 0, 0))
        text(X(v) - 4 * len(str(v)), B + 12, str(v))
    line(L, T, L, B, (0, 0, 0), 2)
    line(L, B, R, B, (0, 0, 0), 2)
    text(L, 20, "setup median (ms) vs containers already running")
    text(L + 200, H - 40, "containers already running")
    ly = T + 10
    for name in data["order"]:
        c = colors[name]
        pts = [(X(x), Y(y)) for x, y in zip(xs, data["p50"][name])]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            line(x0, y0, x1, y1, c, 3)
        for x, y in pts:
            box(x - 4, y - 4, x + 5, y + 5, c)
        box(L + 20, ly, L + 40, ly + 10, c)
        text(L + 50, ly, data["labels"][name], c)
        ly += 20
    text(10, H - 16, data["footer"][:110], (90, 90, 90), 1)
    raw = b"".join(b"\x00" + bytes(px[y * W * 3:(y + 1) * W * 3]) for y in range(H))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    with open(out, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_chart(data, out, allow_install, force_fallback=False):
    """Returns how the chart was drawn."""
    py = None if force_fallback else chart_python(allow_install)
    if py:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(data, f)
            path = f.name
        try:
            r = subprocess.run([py, os.path.abspath(__file__), "--render-chart", path, out],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        finally:
            os.unlink(path)
        if r.returncode == 0:
            return "matplotlib"
        log(f"matplotlib chart failed ({r.stderr.decode(errors='replace').strip()[-300:]}); "
            f"drawing the fallback PNG")
    render_chart_png(data, out)
    return "built-in PNG writer (no matplotlib)"


# ---------------------------------------------------------------------- report


def machine_info(b):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.split(":")[0].strip() in ("model name", "Model", "cpu model"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1048576:.1f} GiB"

    def out(argv):
        return run(argv, check=False).stdout.decode().strip().splitlines()[0:1] or ["?"]

    pk = run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "netavark",
              "containernetworking-plugins", "iptables", "nftables", "iproute2"],
             check=False).stdout.decode().strip().replace("\n", ", ")
    git = out(["git", "-C", REPO, "describe", "--always", "--dirty"])[0]
    return [
        f"machine: {os.cpu_count()} CPUs ({cpu}), {mem}, kernel {platform.release()}, "
        f"Debian {open('/etc/debian_version').read().strip()}, Python {platform.python_version()}",
        f"netshim: {out([b.args.shim, '--version'])[0]} (sha256 {b.shim_sha}…, tree {git})",
        f"Debian packages: {pk}; iptables backend: {out(['iptables', '--version'])[0]}",
        f"netshim state dir on {b.args.tmp_parent}; IPv6 on in every host netns (default)",
    ]


def fmt_procs(p):
    if p is None:
        return "n/a"
    lo, mid = p
    return f"{lo}" if lo == mid else f"{lo} (p50 {mid:g})"


def fmt_progs(d):
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(d.items(), key=lambda x: -x[1]))


def report(b, levels, n, wall, chart_how, host_same, left, mods_new):
    R = b.results
    names = [s.name for s in b.stacks]
    lo, hi = levels[0], levels[-1]
    L = ["# Container network setup: netshim vs netavark vs CNI bridge+portmap vs ip+nft", ""]
    L += ["Regenerated by `python3 bench/compare.py` (as root; `--quick` for a one-minute run). "
          "Bridge networking with one TCP host port (container port 80) per container; each "
          "stack runs in its own private network namespace standing in for the host, with its "
          "own bridge and subnet.", ""]
    L += [f"- {x}" for x in machine_info(b)]
    L += [f"- {n} runs per (stack, level), levels {', '.join(map(str, levels))} containers "
          f"already running; the four stacks take turns within each run (who goes first "
          f"rotates); {b.args.settle * 1000:.0f} ms idle between timed steps; wall time "
          f"{wall:.0f} s" + (" (--quick)" if b.args.quick else ""), ""]
    L += ["![setup p50 vs running containers](benchmark-setup.png)", ""]
    L += ["## Setup and teardown", "",
          "Milliseconds, wall clock from the first exec to the last exit of one container's "
          "setup (or teardown), input on stdin, output captured. Processes: every process "
          "created under the bench during the step (the proc connector's fork events, threads "
          "not counted), minimum over the runs.", "",
          "| stack | running | setup p50 | setup p90 | teardown p50 | teardown p90 "
          "| processes / setup | processes / teardown |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in b.stacks:
        for lv in levels:
            r = R[(s.name, lv)]
            L.append(f"| {s.name} | {lv} | {r['setup_p50']:.2f} | {r['setup_p90']:.2f} | "
                     f"{r['teardown_p50']:.2f} | {r['teardown_p90']:.2f} | "
                     f"{fmt_procs(r['procs_setup'])} | {fmt_procs(r['procs_teardown'])} |")
    L += ["", "Ratios netshim / other (p50; below 1: netshim is faster):", "",
          "| running | " + " | ".join(f"setup vs {o} | teardown vs {o}" for o in names[1:]) + " |",
          "|---:|" + "---:|" * (2 * (len(names) - 1))]
    for lv in levels:
        sh = R[("netshim", lv)]
        cells = []
        for o in names[1:]:
            r = R[(o, lv)]
            cells += [f"{sh['setup_p50'] / r['setup_p50']:.2f}",
                      f"{sh['teardown_p50'] / r['teardown_p50']:.2f}"]
        L.append(f"| {lv} | " + " | ".join(cells) + " |")
    L += ["", f"Flatness: p50 at {hi} running / p50 at {lo} running (1.00 = flat):", "",
          "| stack | setup | teardown | setup ms added |", "|---|---:|---:|---:|"]
    for s in b.stacks:
        a, z = R[(s.name, lo)], R[(s.name, hi)]
        L.append(f"| {s.name} | {z['setup_p50'] / a['setup_p50']:.2f} | "
                 f"{z['teardown_p50'] / a['teardown_p50']:.2f} | "
                 f"{z['setup_p50'] - a['setup_p50']:+.2f} |")

    L += ["", f"## {BURST} setups started at once", "",
          f"{BURST} threads released together, each running one container's setup; then the "
          f"{BURST} teardowns the same way. Wall time from the first start to the last exit. "
          "Failures: a step exiting non-zero, or a check afterwards failing (address in the "
          "container, DNAT entry on the host side). Duplicates: containers given the same "
          "address or host port. \"÷ 16 one-at-a-time\": the wall time over 16 × the "
          "single-container p50 at that level — about 1 when the 16 run one after another, "
          "lower when they overlap. netavark's calls hold podman's lock, so they queue.", "",
          "| stack | running | rounds | setup wall p50 (ms) | ÷ 16 one-at-a-time setups "
          "| failures | duplicate addresses | duplicate host ports | teardown wall p50 (ms) "
          "| ÷ 16 one-at-a-time teardowns | teardown failures | processes / burst |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in b.stacks:
        for lv in sorted({k[1] for k in b.bursts}):
            g = b.bursts[(s.name, lv)]
            who = "" if s.name == "netshim" else " (caller-assigned)"
            one = R[(s.name, lv)]
            L.append(
                f"| {s.name} | {lv} | {len(g['setup_wall'])} | {med(g['setup_wall']):.0f} | "
                f"{med(g['setup_wall']) / (BURST * one['setup_p50']):.2f} | "
                f"{g['setup_fail'] + g['bad']} | "
                f"{g['dup_ip']}{' (caller-assigned)' if s.name in ('netavark', 'ip+nft') else ''} | "
                f"{g['dup_port']}{who} | {med(g['teardown_wall']):.0f} | "
                f"{med(g['teardown_wall']) / (BURST * one['teardown_p50']):.2f} | "
                f"{g['teardown_fail']} | {med(g['procs']):g} |")
    errs = [(k, e) for k, g in b.bursts.items() for e in g["errors"]]
    if errs:
        L += ["", "Burst errors (first of each stack):", ""]
        seen = set()
        for (name, lv), e in errs:
            if name not in seen:
                seen.add(name)
                n_all = sum(1 for k2, _ in errs if k2[0] == name)
                L.append(f"- {name} at {lv} running ({n_all} in all): `{e[:300]}`")

    fb = [f for g in b.bursts.values() for f in g["foreign"]]
    if fb:
        L += ["", f"Other work on the machine during the burst rounds: {statistics.mean(fb):.0%} "
                  f"of the CPUs on average, {max(fb):.0%} at most (upper bounds; bursts are not "
                  f"redone)."]
    L += ["", "## Connect + request latency", "",
          "A client in its own netns (behind a veth, like another machine) opens a TCP "
          "connection, sends a request and reads the reply until close, to a tiny responder in "
          "one container: through the host-port mapping (the host's address, DNAT) and straight "
          "to the container's address (routed through the host netns, no DNAT); the two "
          "alternate, and the stacks take turns in rounds of 25 requests per path"
          + ("; client and responder pinned to two different CPUs" if getattr(b, "lat_pinned",
                                                                                False) else "")
          + ". Microseconds.", "",
          "| stack | running | via host port p50 | p90 | direct p50 | p90 | DNAT cost p50 "
          "| requests | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in b.stacks:
        for lv in sorted({k[1] for k in b.lat}):
            x = b.lat[(s.name, lv)]
            L.append(f"| {s.name} | {lv} | {x['hp50']:.0f} | {x['hp90']:.0f} | {x['d50']:.0f} | "
                     f"{x['d90']:.0f} | {x['hp50'] - x['d50']:+.0f} | {x['n']} | "
                     f"{len(x['errors'])} |")

    if b.lat_foreign:
        L += ["", "Other work on the machine during these requests: " + ", ".join(
            f"{v:.0%} of the CPUs at {lv} running" for lv, v in sorted(b.lat_foreign.items()))
            + " (upper bounds)."]
    L += ["", "## Processes", "",
          "What each setup and teardown runs (one extra, untimed setup and teardown under "
          "`strace -f -e trace=execve`, with one other container present):", "",
          "| stack | runtime spawns / setup | programs exec'd by a setup | by a teardown |",
          "|---|---:|---|---|"]
    for s in b.stacks:
        p = s.programs or {}
        L.append(f"| {s.name} | {s.direct} | {fmt_progs(p.get('setup', {})) or '?'} | "
                 f"{fmt_progs(p.get('teardown', {})) or '?'} |")
    L += ["", "CPU time (user + system) of the processes of one step, p50, ms:", "",
          "| stack | running | setup CPU | teardown CPU |", "|---|---:|---:|---:|"]
    for s in b.stacks:
        for lv in levels:
            r = R[(s.name, lv)]
            L.append(f"| {s.name} | {lv} | {r['cpu_setup']:.1f} | {r['cpu_teardown']:.1f} |")

    L += ["", "## Context", ""]
    for s in b.stacks:
        if s.first_use:
            L.append(f"- {s.name} first use (creates its bridge and rules; not in the table): "
                     f"setup {s.first_use[0]:.1f} ms, teardown {s.first_use[1]:.1f} ms")
    for s in b.stacks:
        if len(s.bg_ms) >= 20:
            k = max(5, len(s.bg_ms) // 10)
            L.append(f"- {s.name}: untimed-by-the-table setups of its {len(s.bg_ms)} background "
                     f"containers: median of the first {k} {med(s.bg_ms[:k]):.1f} ms, of the "
                     f"last {k} {med(s.bg_ms[-k:]):.1f} ms")
    for s in b.stacks:
        if s.name in ("cni", "ip+nft"):
            for lv in (lo, hi):
                r = R[(s.name, lv)]
                L.append(f"- {s.name} per-command p50 at {lv} running: setup "
                         + ", ".join(f"{x:.2f}" for x in r["split_setup"]) + "; teardown "
                         + ", ".join(f"{x:.2f}" for x in r["split_teardown"]) + " (ms)")
    for lv in levels:
        q, mean, mx, redone = b.load[lv]
        L.append(f"- other work on the machine at {lv} running: {q:.0%} of the CPUs just before, "
                 f"{mean:.0%} on average during the kept runs, {mx:.0%} at most (upper bounds); "
                 f"runs dropped and redone: {redone}"
                 + (" — WARNING: busy machine, absolute times inflated" if mean > 0.15 else ""))
    L.append(f"- process counts from: {b.fc.kind}" + ("; some events were lost (socket "
                                                       "overflow), those steps not counted"
                                                       if b.fc.lost else ""))
    L.append(f"- chart drawn with: {chart_how}")
    L += [f"- {x}" for x in b.notes]
    L += ["", "## Where netshim is not the fastest", ""]
    L += slower_than(b, levels) or ["- nowhere in this run (setup, teardown, 16 at once, "
                                    "host-port latency; 5% tolerance)"]
    L += ["", "## Reading the numbers", ""] + reading_notes(b, levels)
    L += ["", "## How the stacks are driven", "",
          "- **netshim**: `shim hook createRuntime` / `hook poststop` with the OCI state on stdin "
          "(pid of a process in the container netns), as a runtime runs a hook; bridge "
          "`netshim0` 10.213.0.0/16, dynamic host port from 20000-60000 (its own allocation), "
          "table `ip netshim` (DNAT map).",
          "- **netavark** (Debian's, iptables driver, `NETAVARK_FW=iptables`): `netavark --config "
          "DIR setup|teardown NETNS` with podman's network options JSON on stdin, under an "
          "exclusive `flock` on a lock file as podman holds around its netavark calls (included "
          "in the time). The address (10.215.0.0/16, bridge `cmpnv0`) and host port are "
          "assigned by the bench in-process, as podman's own IPAM and port code does; DNS off.",
          "- **cni** (Debian's containernetworking-plugins): `bridge` (`cmpcni0` 10.216.0.0/16, "
          "isGateway, ipMasq, hairpinMode, IPAM `host-local`) then `portmap` with bridge's result "
          "as `prevResult` and `runtimeConfig.portMappings`; DEL in reverse, each with the result "
          "(CNI 1.0.0, env `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, "
          "`CNI_PATH`). Host port assigned by the caller, address by host-local.",
          "- **ip+nft**: bench/hook_bench.py's baseline — bridge `nsbase0` 10.214.0.0/16, table "
          "`ip nsbase` with a DNAT map; 7 commands per setup (`ip` ×6 with `ip -n NS`, one "
          "`nft`), 2 per teardown; address and port assigned by the caller.",
          "- Containers already running were set up by the same stack (untimed), each in an "
          "anonymous netns held by a sleeping process (`unshare --net sleep`), so the number of "
          "named namespaces (mounts under /run/netns) does not grow with the level. Timed "
          "containers get a fresh named netns each run (creation not timed).",
          "- iptables (netavark, portmap) and nft only ever run inside the stacks' private "
          "namespaces: every step checks the thread's netns first, burst threads check their "
          "own, and the host's ruleset is compared before and after the run (below).",
          "", "## Cleanup check", ""]
    L.append("- host firewall (iptables-save, ip6tables-save, nft list ruleset of the original "
             "netns) before vs after: " + ("unchanged" if host_same else "CHANGED"))
    L.append("- left behind: " + ("nothing (no namespace, process, temp dir or link of the bench)"
                                  if not left else "; ".join(left)))
    if mods_new:
        L.append(f"- kernel modules loaded during the run (global, not a ruleset; they stay "
                 f"loaded): {', '.join(sorted(mods_new))}")
    return "\n".join(L) + "\n"


def slower_than(b, levels, tol=1.05):
    """Every measured quantity in which another stack beat netshim by more than tol."""
    out = []
    R = b.results
    others = [s.name for s in b.stacks if s.name != "netshim"]
    for lv in levels:
        for key, what in (("setup_p50", "setup p50"), ("teardown_p50", "teardown p50")):
            for o in others:
                if R[("netshim", lv)][key] > tol * R[(o, lv)][key]:
                    out.append(f"- {what} at {lv} running: netshim {R[('netshim', lv)][key]:.1f} "
                               f"ms, {o} {R[(o, lv)][key]:.1f} ms")
    for (name, lv), g in sorted(b.bursts.items()):
        if name == "netshim":
            continue
        mine = b.bursts[("netshim", lv)]
        for key, what in (("setup_wall", "16 setups at once"), ("teardown_wall",
                                                                 "16 teardowns at once")):
            if med(mine[key]) > tol * med(g[key]):
                out.append(f"- {what} at {lv} running (wall p50): netshim {med(mine[key]):.0f} "
                           f"ms, {name} {med(g[key]):.0f} ms")
    for (name, lv), x in sorted(b.lat.items()):
        if name == "netshim":
            continue
        mine = b.lat[("netshim", lv)]
        if mine["hp50"] > tol * x["hp50"]:
            out.append(f"- connect+request via host port at {lv} running (p50): netshim "
                       f"{mine['hp50']:.0f} µs, {name} {x['hp50']:.0f} µs (direct to the "
                       f"container: {mine['d50']:.0f} vs {x['d50']:.0f} µs)")
    return out


def reading_notes(b, levels):
    R = b.results
    lo, hi = levels[0], levels[-1]
    L = []
    nv0, nv1 = R[("netavark", lo)], R[("netavark", levels[1])]
    if nv0["procs_teardown"] and nv1["procs_teardown"]:
        L.append(f"- netavark at {lo} running: the timed container is the only one on its "
                 f"network, so its teardown also deletes the bridge and the network's iptables "
                 f"chains and the next setup creates them again ({nv0['procs_teardown'][0]} "
                 f"processes per teardown at {lo} running, {nv1['procs_teardown'][0]} at "
                 f"{levels[1]}); hence a teardown slower at {lo} than at {levels[1]}.")
    L.append("- netavark and the CNI plugins program the firewall by running `iptables` (nft "
             "backend here) once per rule operation; each of those processes reads the table it "
             "changes from the kernel, and port forwarding is a chain with one jump per mapping, "
             "so both the setup time and the host-port connection cost grow with the number of "
             "containers. netshim and the ip+nft baseline add one element to an nftables map "
             "(a hash lookup per new connection whatever the number of mappings).")
    sh = b.bursts.get(("netshim", hi))
    if sh:
        ratio = med(sh["teardown_wall"]) / (BURST * R[("netshim", hi)]["teardown_p50"])
        L.append(f"- netshim's 16 teardowns at once take about {ratio:.2f} × 16 single "
                 f"teardowns: `hook poststop` holds netshim's state lock (flock) while it deletes "
                 f"the veth (src/commands/hook.rs), and a veth deletion waits for RCU grace "
                 f"periods in the kernel, so concurrent teardowns queue behind each other; the "
                 f"ip+nft baseline's teardowns have no lock and overlap.")
    a, z = R[("netshim", lo)], R[("netshim", hi)]
    L.append(f"- netshim's setup p50 goes from {a['setup_p50']:.1f} ms at {lo} running to "
             f"{z['setup_p50']:.1f} ms at {hi}, and the CPU time of its process from "
             f"{a['cpu_setup']:.1f} to {z['cpu_setup']:.1f} ms: work that grows with the "
             f"containers already there (in the shim or in the kernel), not a process spawn.")
    L.append("- Teardown times of netshim and ip+nft are mostly the kernel: deleting a veth "
             "waits for RCU grace periods (see bench/README.md).")
    L.append("- Absolute times depend on this machine (2 vCPUs, shared with other work); the "
             "ratios are steadier because the stacks take turns run by run.")
    return L


def chart_data(b, levels):
    info = machine_info(b)[0]
    return {"levels": levels, "order": [s.name for s in b.stacks],
            "labels": {s.name: LABEL[s.name] for s in b.stacks},
            "p50": {s.name: [b.results[(s.name, lv)]["setup_p50"] for lv in levels]
                    for s in b.stacks},
            "p90": {s.name: [b.results[(s.name, lv)]["setup_p90"] for lv in levels]
                    for s in b.stacks},
            "footer": f"{info}; {b.results[(b.stacks[0].name, levels[0])]['n']} runs per point; "
                      f"bench/compare.py"}


# ---------------------------------------------------------------------- main


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--render-chart":
        with open(sys.argv[2]) as f:
            render_chart_mpl(json.load(f), sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="5 runs, levels 0,10,50, one burst round, 50 requests (about a minute)")
    ap.add_argument("--runs", type=int, help="timed runs per (stack, level) (default 30)")
    ap.add_argument("--running", help="running-container levels (default 0,100,500)")
    ap.add_argument("--burst-rounds", type=int, help="rounds of 16 setups at once at the lowest "
                                                     "and highest level (default 3; quick 1)")
    ap.add_argument("--requests", type=int, help="connect+request samples per path (default 300)")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    ap.add_argument("--chart", default=os.path.join(REPO, "docs", "benchmark-setup.png"))
    ap.add_argument("--shim", default=os.path.join(REPO, "target", "release", "shim"))
    ap.add_argument("--tmp-parent", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    ap.add_argument("--wait-idle", type=float, help="wait up to S s for a quiet machine before "
                                                    "each condition (default 300; quick 3)")
    ap.add_argument("--max-foreign", type=float, default=0.25)
    ap.add_argument("--max-redo", type=int, help="at most this many dropped runs per level "
                                                 "(default 100; quick 2)")
    ap.add_argument("--settle", type=float, default=0.05)
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install missing netavark / CNI plugins / iptables / "
                         "strace / python3-matplotlib")
    ap.add_argument("--png-fallback", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    n = a.runs or (5 if a.quick else 30)
    levels = sorted({int(x) for x in (a.running or ("0,10,50" if a.quick else "0,100,500"))
                     .split(",")})
    rounds = a.burst_rounds if a.burst_rounds is not None else (1 if a.quick else 3)
    nreq = a.requests or (50 if a.quick else 300)
    if a.wait_idle is None:
        a.wait_idle = 3 if a.quick else 300
    if a.max_redo is None:
        a.max_redo = 2 if a.quick else 100
    if n < 1 or any(x < 0 for x in levels) or len(levels) < 2:
        ap.error("--runs >= 1 and at least two levels >= 0")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces, links, firewall rules)")
    if not os.access(a.shim, os.X_OK):
        ap.error(f"no shim binary at {a.shim}: build it with `cargo build --release`")
    for tool in ("ip", "nft", "unshare", "nsenter", "dpkg-query"):
        if not shutil.which(tool):
            ap.error(f"`{tool}` not found")
    try:
        ensure_packages(not a.no_install)
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1

    fw_before = host_firewall()
    mods_before = loaded_modules()
    b = Compare(a)
    atexit.register(b.cleanup)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    rc = 0
    done = False
    left = []
    try:
        b.prepare()
        b.warm_up()
        for lv in levels:
            log(f"level {lv}: growing every stack to {lv} running containers (untimed)")
            b.grow_to(lv)
            log(f"level {lv}: {n} runs")
            b.measure(lv, n)
            if lv in (levels[0], levels[-1]):
                log(f"level {lv}: {BURST} setups at once, {rounds} round(s) per stack")
                b.burst(lv, rounds)
                log(f"level {lv}: connect+request latency, {nreq} per path")
                b.latency(lv, nreq)
        done = True
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
    fw_after = host_firewall()
    host_same = fw_before == fw_after
    if not host_same:
        for k in fw_before:
            if fw_before[k] != fw_after[k]:
                left.append(f"host {k} output changed during the run")
    if left:
        log("LEFT BEHIND: " + "; ".join(left))
        rc = rc or 2
    else:
        log("cleanup checked: no namespace, process, temp dir or link of the bench left; host "
            "firewall unchanged")
    if done:
        data = chart_data(b, levels)
        how = write_chart(data, a.chart, not a.no_install, a.png_fallback)
        text = report(b, levels, n, time.perf_counter() - b.t_start, how, host_same, left,
                      loaded_modules() - mods_before)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        sys.stdout.write(text)
        log(f"report written to {a.out}, chart to {a.chart}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
