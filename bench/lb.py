#!/usr/bin/env python3
"""Load-balancer registration benchmark: netshim's registrar in front of a real HAProxy.

  1. propagation: from the createRuntime hook's exit to the first response the new container
     gives through HAProxy, over N starts (p50, p99);
  2. rolling replacement of R busybox httpd replicas under T client threads, with `shim drain`
     before each stop, against the way most registrars do it (stop the container, then the
     target goes), in the same run: requests served and failed, drain time per container;
  3. resync of M targets: how long a registrar takes to converge after a restart (HAProxy
     still filled; HAProxy restarted empty).

Everything runs inside network namespaces this script creates (a "host" H running runc, the
containers, HAProxy and the registrar; a client namespace C; a private namespace for the resync
targets), state on /dev/shm. Python 3 standard library only; needs root, runc, haproxy,
busybox-static and a release build:

    cargo build --release && sudo python3 bench/lb.py [--quick] [--out docs/lb-benchmarks.md]
"""

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CLONE_NEWNET = 0x40000000
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUSYBOX = "/bin/busybox"
NET = "172.27.77"  # H-C link: .1 (H) and .2 (C)
FRONT = 8080
RANGE = "40000-40999"


def log(msg):
    print(f"[lb {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


_libc = ctypes.CDLL(None, use_errno=True)


def setns_path(path):
    """Moves the calling thread into the netns at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)
        elif _libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNET)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


def run(argv, check=True, **kw):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).decode(errors='replace').strip()}")
    return r


def pct(xs, q):
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def http_get(addr, timeout=5.0):
    """One HTTP/1.0 GET /: (status, body)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        buf = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
    text = buf.decode(errors="replace")
    head, _, body = text.partition("\r\n\r\n")
    parts = head.split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


def who(body):
    if "hello from " not in body:
        return None
    return body.split("hello from ", 1)[1].split("<", 1)[0]


class Haproxy:
    """HAProxy (master-worker) from the shipped lb/haproxy.cfg, paths and bind localized."""

    def __init__(self, ns, d, bind, slots):
        os.makedirs(d, exist_ok=True)
        self.dir, self.sock = d, os.path.join(d, "admin.sock")
        self.state_file = os.path.join(d, "servers.state")
        with open(os.path.join(REPO, "lb", "haproxy.cfg")) as f:
            cfg = f.read()
        for needle in ("/run/haproxy/", "    bind :80\n", "server-template slot 10 "):
            if needle not in cfg:
                raise BenchError(f"lb/haproxy.cfg lacks {needle!r}")
        cfg = (cfg.replace("/run/haproxy/", d + "/").replace("    bind :80\n", f"    bind {bind}\n")
               .replace("server-template slot 10 ", f"server-template slot {slots} ")
               .replace("    log /dev/log local0\n", "").replace("    log global\n", "")
               .replace("    option httplog\n", ""))
        self.cfg = os.path.join(d, "haproxy.cfg")
        with open(self.cfg, "w") as f:
            f.write(cfg)
        run(["haproxy", "-c", "-q", "-f", self.cfg])
        self.ns = ns
        self.proc = None
        self.start()

    def start(self):
        self.log = open(os.path.join(self.dir, "haproxy.log"), "ab")
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", "--",
                                      "haproxy", "-W", "-db", "-f", self.cfg],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                self.cmd("show info")
                return
            except OSError:
                time.sleep(0.02)
        raise BenchError("haproxy did not open its admin socket")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cmd(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.sock)
            s.sendall(line.encode() + b"\n")
            out = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                out += d
        return out.decode(errors="replace")

    def worker(self):
        for l in self.cmd("show info").splitlines():
            if l.startswith("Pid: "):
                return int(l[5:])
        return None

    def ready(self, backend="web"):
        """Targets (ip:port) of slots that are ready (not maint, not drain)."""
        out = set()
        for l in self.cmd(f"show servers state {backend}").splitlines()[2:]:
            f = l.split()
            if len(f) < 19 or not f[3].startswith("slot"):
                continue
            adm = int(f[6])
            if adm & (0x01 | 0x02 | 0x20 | 0x40 | 0x08 | 0x10):
                continue
            out.add(f"{f[4]}:{f[18]}")
        return out


class Registrar:
    def __init__(self, world, hap, env, logname):
        self.log_path = os.path.join(world.tmp, logname)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{world.h}", "--", world.shim, "registrar",
             "--haproxy", hap.sock, "--haproxy-state-file", hap.state_file],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Clients:
    """T threads in netns C doing GETs through HAProxy back to back; every non-200 or error
    is a failed request."""

    def __init__(self, ns_path, addr, threads):
        self.addr, self.stop_ev = addr, threading.Event()
        self.ok = [0] * threads
        self.failed = [0] * threads
        self.errors = []
        self.seen = {}  # container -> first time (ns) it answered
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(ns_path, i), daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def loop(self, ns_path, i):
        setns_path(ns_path)
        while not self.stop_ev.is_set():
            try:
                code, body = http_get(self.addr)
                t = time.time_ns()
                if code == 200:
                    self.ok[i] += 1
                    w = who(body)
                    if w is not None and w not in self.seen:
                        with self.lock:
                            self.seen.setdefault(w, t)
                    continue
                err = f"HTTP {code}"
            except OSError as e:
                err = str(e)
            self.failed[i] += 1
            with self.lock:
                if len(self.errors) < 20:
                    self.errors.append(err)

    def counts(self):
        return sum(self.ok), sum(self.failed)

    def finish(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=10)
        return self.counts()


class World:
    def __init__(self, args):
        self.args = args
        self.prefix = f"nsq{os.getpid()}"
        self.h, self.c = self.prefix + "h", self.prefix + "c"
        self.made_ns = []
        self.containers = []
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="netshim-lb-", dir=args.tmp_parent)
        self.state = os.path.join(self.tmp, "state")
        self.config = os.path.join(self.tmp, "config.toml")
        self.runc_root = os.path.join(self.tmp, "runc")
        os.makedirs(self.state)
        os.makedirs(self.runc_root)
        with open(self.config, "w") as f:
            f.write(f'[ports]\ndynamic_range = "{RANGE}"\n')
        src = os.path.join(REPO, "target", "x86_64-unknown-linux-gnu", "release", "shim")
        if not os.path.exists(src):
            raise BenchError("no target/x86_64-unknown-linux-gnu/release/shim: run `cargo build --release` first")
        self.shim = os.path.join(self.tmp, "shim")
        shutil.copy2(src, self.shim)
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETSHIM_STATE_DIR": self.state,
                    "NETSHIM_CONFIG": self.config}
        self.netns()
        with open(os.path.join(REPO, "hooks", "runc-hooks.json")) as f:
            self.hooks_template = json.load(f)["hooks"]

    def netns(self):
        for n in (self.h, self.c):
            run(["ip", "netns", "add", n])
            self.made_ns.append(n)
            run(["ip", "-n", n, "link", "set", "lo", "up"])
        a, b = self.prefix + "a", self.prefix + "b"
        run(["ip", "-n", self.h, "link", "add", a, "type", "veth", "peer", "name", b, "netns", self.c])
        run(["ip", "-n", self.h, "addr", "add", f"{NET}.1/30", "dev", a])
        run(["ip", "-n", self.h, "link", "set", a, "up"])
        run(["ip", "-n", self.c, "addr", "add", f"{NET}.2/30", "dev", b])
        run(["ip", "-n", self.c, "link", "set", b, "up"])
        run(["ip", "-n", self.c, "route", "add", "default", "via", f"{NET}.1"])
        run(["ip", "-n", self.h, "route", "add", "default", "via", f"{NET}.2"])

    def hooks(self, stamp):
        """The shipped hooks, localized; createRuntime wrapped so its exit time lands in
        `stamp` (date runs after the shim exited: the stamp is at most ~1 ms late)."""
        h = json.loads(json.dumps(self.hooks_template))
        for stage, lst in h.items():
            e = lst[0]
            e["env"] = [f"NETSHIM_STATE_DIR={self.state}", f"NETSHIM_CONFIG={self.config}"]
            if stage == "createRuntime":
                e["path"] = "/bin/sh"
                e["args"] = ["sh", "-c", f'"$0" hook createRuntime; r=$?; /bin/date +%s%N > {stamp}; exit $r',
                             self.shim]
            else:
                e["path"] = self.shim
        return h

    def start(self, name, service="web"):
        cid = f"{self.prefix}-{name}"
        b = os.path.join(self.tmp, name)
        root = os.path.join(b, "rootfs")
        for d in ("bin", "proc", "dev", "www", "tmp"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
        with open(os.path.join(root, "www", "index.html"), "w") as f:
            f.write(f"<html><body>hello from {cid}</body></html>\n")
        stamp = os.path.join(b, "hook-exit")
        spec = {
            "ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                        "args": ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"],
                        "env": ["PATH=/bin"],
                        "capabilities": {k: ["CAP_NET_BIND_SERVICE"] for k in ("bounding", "effective", "permitted")}},
            "root": {"path": root},
            "hostname": name,
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}],
            "annotations": {"netshim.network-mode": "bridge",
                            "netshim.port-mappings": '[{"containerPort":80}]',
                            "netshim.service": service},
            "hooks": self.hooks(stamp),
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
        }
        with open(os.path.join(b, "config.json"), "w") as f:
            json.dump(spec, f)
        self.containers.append(cid)
        out = open(os.path.join(b, "runc.out"), "wb")
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.h}", "--", "runc", "--root", self.runc_root,
                            "run", "-d", "-b", b, cid], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                           timeout=60)
        if r.returncode != 0:
            raise BenchError(f"runc run {cid} failed: {open(os.path.join(b, 'runc.out')).read()}")
        return cid, stamp

    def delete(self, cid):
        run(["nsenter", f"--net=/run/netns/{self.h}", "--", "runc", "--root", self.runc_root,
             "delete", "-f", cid], check=False)
        if cid in self.containers:
            self.containers.remove(cid)

    def shim_cmd(self, *args, check=True):
        return run(["nsenter", f"--net=/run/netns/{self.h}", "--", self.shim, *args], env=self.env, check=check)

    def target(self, cid):
        for e in json.loads(self.shim_cmd("ports", "list", "--json", "--container", cid).stdout):
            return f"{e['targetIP']}:{e['targetPort']}"
        raise BenchError(f"{cid} not in ports list")

    def cleanup(self):
        for cid in list(self.containers):
            self.delete(cid)
        for p in self.procs:
            try:
                p()
            except Exception:
                pass
        for n in reversed(self.made_ns):
            subprocess.run(["ip", "netns", "del", n], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait(pred, limit, step=0.002):
    deadline = time.time() + limit
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def propagation(w, hap, n):
    """Hook exit -> first response from the new container through HAProxy; also when `runc
    run` returned and when HAProxy first showed the slot ready (polled every ~2 ms)."""
    steady = [w.start(f"s{i}")[0] for i in range(2)]
    for cid in steady:
        if not wait(lambda: w.target(cid) in hap.ready(), 10, 0.02):
            raise BenchError(f"{cid} never ready")
    clients = Clients(f"/run/netns/{w.c}", (f"{NET}.1", FRONT), 2)
    out, runc_ret, ready_at, listen_at = [], [], [], []

    def first_accept(cid, box):
        """From inside H: waits for the container's record, then connects to its target every
        2 ms until one succeeds (the container's process listens); the time in box."""
        setns_path(f"/run/netns/{w.h}")
        rec = os.path.join(w.state, "containers", f"{cid}.json")
        deadline = time.time() + 10
        port = None
        while time.time() < deadline and port is None:
            try:
                with open(rec) as f:
                    port = json.load(f)["ports"][0]["hostPort"]
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(0.001)
        while port is not None and time.time() < deadline:
            try:
                with socket.create_connection((f"{NET}.1", port), timeout=0.2):
                    box.append(time.time_ns())
                    return
            except OSError:
                time.sleep(0.002)

    try:
        for i in range(n):
            box = []
            prober = threading.Thread(target=first_accept, args=(f"{w.prefix}-p{i}", box), daemon=True)
            prober.start()
            cid, stamp = w.start(f"p{i}")
            t_runc = time.time_ns()
            tgt = w.target(cid)
            t_ready = None
            deadline = time.time() + 10
            while cid not in clients.seen and time.time() < deadline:
                if t_ready is None and tgt in hap.ready():
                    t_ready = time.time_ns()
                time.sleep(0.002)
            if cid not in clients.seen:
                raise BenchError(f"{cid} never answered through HAProxy")
            with open(stamp) as f:
                exit_ns = int(f.read().strip())
            first = clients.seen[cid]
            out.append((first - exit_ns) / 1e6)
            runc_ret.append((t_runc - exit_ns) / 1e6)
            # Seen by the clients before the poller: the slot was ready by then.
            ready_at.append((min(t_ready or first, first) - exit_ns) / 1e6)
            prober.join(timeout=10)
            listen_at.append(((box[0] if box else first) - exit_ns) / 1e6)
            w.shim_cmd("drain", cid, "--timeout", "10")
            w.delete(cid)
            time.sleep(0.1)
        ok, failed = clients.finish()
    finally:
        clients.stop_ev.set()
    for cid in steady:
        w.delete(cid)
    log(f"propagation over {n} starts: p50 {pct(out, 50):.1f} ms, p99 {pct(out, 99):.1f} ms "
        f"(runc returned p50 {pct(runc_ret, 50):.1f} ms p99 {pct(runc_ret, 99):.1f} ms, "
        f"slot ready p50 {pct(ready_at, 50):.1f} ms; "
        f"{ok} requests, {failed} failed)")
    return {"first": out, "runc": runc_ret, "ready": ready_at, "listen": listen_at}


def rolling(w, hap, replicas, threads, with_drain, gen):
    """Replaces every replica of `web` under load: start the new one, wait until HAProxy has
    it ready, then either drain + stop the old one, or just stop it (the registrar removes the
    target after poststop)."""
    old = [w.start(f"g{gen}o{i}")[0] for i in range(replicas)]
    want = {w.target(c) for c in old}
    if not wait(lambda: want <= hap.ready(), 30, 0.02):
        raise BenchError("replicas never ready")
    time.sleep(0.3)
    worker = hap.worker()
    clients = Clients(f"/run/netns/{w.c}", (f"{NET}.1", FRONT), threads)
    time.sleep(0.5)
    drains = []
    t0 = time.time()
    new = []
    for i, o in enumerate(old):
        cid = w.start(f"g{gen}n{i}")[0]
        new.append(cid)
        tgt = w.target(cid)
        if not wait(lambda: tgt in hap.ready(), 10):
            raise BenchError(f"{cid} never ready")
        if with_drain:
            t = time.time()
            r = w.shim_cmd("drain", o, "--timeout", "30", check=False)
            drains.append(time.time() - t)
            if r.returncode != 0:
                log(f"drain {o} exited {r.returncode}: {r.stderr.decode().strip()}")
        w.delete(o)
    time.sleep(0.5)
    ok, failed = clients.finish()
    wall = time.time() - t0
    same_worker = hap.worker() == worker and hap.proc.poll() is None
    for c in new:
        w.delete(c)
    mode = "drain" if with_drain else "baseline"
    log(f"rolling ({mode}): {ok} served, {failed} failed, {wall:.1f} s"
        + (f", drain p50 {statistics.median(drains)*1000:.0f} ms" if drains else "")
        + (f"; errors: {clients.errors[:3]}" if clients.errors else ""))
    return {"mode": mode, "served": ok, "failed": failed, "wall": wall, "drains": drains,
            "worker_same": same_worker, "errors": clients.errors[:5]}


def resync(w, m, rounds):
    """M targets (listeners in a private netns), HAProxy with M+20 slots: time to converge
    after a registrar start with HAProxy empty, after a registrar SIGKILL + restart with HAProxy
    filled, and after an HAProxy restart with no state file while the registrar runs."""
    ns = w.prefix + "r"
    run(["ip", "netns", "add", ns])
    w.made_ns.append(ns)
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    base = 20000
    listeners = []

    def serve():
        setns_path(f"/run/netns/{ns}")
        import selectors
        sel = selectors.DefaultSelector()
        for i in range(m):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", base + i))
            s.listen(128)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            listeners.append(s)
        ready_ev.set()
        while not stop_ev.is_set():
            for key, _ in sel.select(0.2):
                try:
                    c, _ = key.fileobj.accept()
                    c.close()
                except OSError:
                    pass

    ready_ev, stop_ev = threading.Event(), threading.Event()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready_ev.wait(30)
    sd = os.path.join(w.tmp, "rstate")
    os.makedirs(sd)
    recs = {}
    for i in range(m):
        cid = f"t{i:04d}"
        recs[cid] = {"id": cid, "mode": "host", "service": "web", "created": 1,
                     "ports": [{"protocol": "tcp", "containerPort": base + i, "hostPort": base + i, "dynamic": False}]}
    with open(os.path.join(sd, "state.json"), "w") as f:
        json.dump({"version": 1, "revision": 1, "containers": recs}, f)
    cfgp = os.path.join(w.tmp, "rconfig.toml")
    with open(cfgp, "w") as f:
        f.write('[ports]\nhost_address = "127.0.0.1"\n')
    env = dict(w.env, NETSHIM_STATE_DIR=sd, NETSHIM_CONFIG=cfgp)
    hap = Haproxy(ns, os.path.join(w.tmp, "rhaproxy"), "127.0.0.1:8080", m + 20)
    w.procs.append(hap.stop)
    want = {f"127.0.0.1:{base + i}" for i in range(m)}

    class RW:  # the registrar runs in the resync namespace
        pass
    rw = RW()
    rw.tmp, rw.h, rw.shim = w.tmp, ns, w.shim

    def status_rev(pid):
        try:
            with open(os.path.join(sd, "registrars", f"{pid}.json")) as f:
                return json.load(f)["revision"]
        except (OSError, ValueError, KeyError):
            return None

    res = {"cold": [], "restart": [], "haproxy_restart": []}
    for r in range(rounds):
        # Cold: HAProxy with every slot disabled.
        hap.stop()
        try:
            os.remove(hap.state_file)
        except OSError:
            pass
        hap.start()
        t = time.time()
        reg = Registrar(rw, hap, env, f"rreg{r}.log")
        if not wait(lambda: hap.ready() == want, 120, 0.01):
            raise BenchError(f"cold resync never converged: {len(hap.ready())} of {m}")
        res["cold"].append(time.time() - t)
        # SIGKILL and restart with HAProxy filled: read, compare, nothing to change.
        reg.stop(signal.SIGKILL)
        t = time.time()
        reg = Registrar(rw, hap, env, f"rreg{r}b.log")
        if not wait(lambda: status_rev(reg.proc.pid) == 1 and hap.ready() == want, 60, 0.005):
            raise BenchError("restart never converged")
        res["restart"].append(time.time() - t)
        time.sleep(0.3)
        # HAProxy restarted empty while the registrar runs: detect, refill.
        hap.stop()
        os.remove(hap.state_file)
        t = time.time()
        hap.start()
        if not wait(lambda: hap.ready() == want, 60, 0.01):
            raise BenchError("refill after HAProxy restart never converged")
        res["haproxy_restart"].append(time.time() - t)
        with open(reg.log_path) as f:
            changes = sum(1 for l in f if " ready (container " in l)
        res.setdefault("changes_after_restart", []).append(changes)
        reg.stop()
    stop_ev.set()
    th.join(timeout=5)
    for s in listeners:
        s.close()
    hap.stop()
    for k in ("cold", "restart", "haproxy_restart"):
        log(f"resync {m} targets, {k}: median {statistics.median(res[k])*1000:.0f} ms")
    return res


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for l in f:
                if l.startswith("model name"):
                    cpu = l.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ver = lambda a: run(a, check=False).stdout.decode(errors="replace").splitlines()[0] if shutil.which(a[0]) else "?"
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "haproxy": ver(["haproxy", "-v"]), "runc": ver(["runc", "--version"]),
            "shim": ver([os.path.join(REPO, "target", "x86_64-unknown-linux-gnu", "release", "shim"), "--version"])}


def report(args, prop, rolls, rs, wall):
    m = machine()
    L = []
    L.append("# Load-balancer registration benchmarks\n")
    L.append("Regenerated by `sudo python3 bench/lb.py` (after `cargo build --release`); the "
             "figures below are from one run on this machine. Bridge-mode busybox httpd "
             "replicas under runc, registered by `shim registrar --haproxy` in a real HAProxy "
             "started from the shipped `lb/haproxy.cfg`; clients in a separate network "
             "namespace, each request a new TCP connection (`GET /`, HTTP/1.0).\n")
    L.append(f"- machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}")
    L.append(f"- {m['haproxy']}; {m['runc']}; {m['shim']}")
    L.append(f"- state dir on {args.tmp_parent}; wall time {wall:.0f} s; load average at the start "
             f"{args.load_start}, at the end {os.getloadavg()[0]:.1f} (other work on the machine "
             f"shows up in the tails)\n")
    L.append("## Propagation: hook exit to the first response through HAProxy\n")
    L.append(f"From the createRuntime hook's exit (a `date +%s%N` right after the shim, so up to "
             f"~1 ms late) to the first response the new container gives through HAProxy "
             f"(2 client threads polling, 2 other replicas serving), over {len(prop['first'])} starts. "
             f"It includes runc starting the container process and httpd binding its port, "
             f"the registrar's TCP check (every 5 ms at first) and its two runtime API "
             f"commands. Goal: p50 ≤ 50 ms, p99 ≤ 200 ms.\n")
    L.append("| from the hook's exit to | p50 | p90 | p99 | max |")
    L.append("|---|---:|---:|---:|---:|")
    for label, key in (("`runc run -d` returned", "runc"),
                       ("the container's port accepts a connection (probed every 2 ms)", "listen"),
                       ("**first response through HAProxy**", "first")):
        xs = prop[key]
        L.append(f"| {label} | {pct(xs, 50):.1f} ms | {pct(xs, 90):.1f} ms | {pct(xs, 99):.1f} ms | {max(xs):.1f} ms |")
    gap = [f - l for f, l in zip(prop["first"], prop["listen"])]
    L.append("\nEach start (runc returned / port accepts / first response, ms): "
             + ", ".join(f"{a:.0f}/{c:.0f}/{b:.0f}" for a, c, b in zip(prop["runc"], prop["listen"], prop["first"]))
             + ". The container's process starts before `runc run -d` returns, so the first "
             "response often comes first. What the registrar and HAProxy add, from the port "
             f"accepting to the first response through HAProxy: p50 {pct(gap, 50):.1f} ms, "
             f"p99 {pct(gap, 99):.1f} ms; the rest is the container's own start.\n")
    L.append(f"## Rolling replacement of {args.replicas} replicas under {args.threads} client threads\n")
    L.append("Each old replica in turn: start its replacement, wait until HAProxy has it ready, "
             "then **drain**: `shim drain <old> --timeout 30`, then `runc delete -f <old>`; or "
             "**baseline** (what most registrars do): `runc delete -f <old>` at once, the "
             "registrar taking the target out after poststop. A failed request is any "
             "response other than 200 or any connection error seen by a client.\n")
    L.append("| mode | requests served | requests failed | wall time | drain p50 | drain max | HAProxy worker unchanged |")
    L.append("|---|---:|---:|---:|---:|---:|---|")
    for r in rolls:
        d = r["drains"]
        L.append(f"| {r['mode']} | {r['served']} | {r['failed']} | {r['wall']:.1f} s | "
                 + (f"{statistics.median(d)*1000:.0f} ms | {max(d)*1000:.0f} ms" if d else "– | –")
                 + f" | {'yes' if r['worker_same'] else 'NO'} |")
    errs = [e for r in rolls if r["mode"] == "baseline" for e in r["errors"]]
    if errs:
        L.append(f"\nBaseline failures seen by the clients (first ones): {', '.join(sorted(set(errs))[:4])}. "
                 "A 502 is a request in flight when its container was killed; a 503 one HAProxy "
                 "sent to a stopped container before the registrar took its target out, after "
                 "its connection attempts failed. Requests to an address that no longer answers "
                 "wait for `timeout connect` (2 s), which is why the clients got through far fewer "
                 "requests in the baseline.")
    drains = [x for r in rolls for x in r["drains"]]
    if drains:
        L.append(f"\nDrain time per container (all drains): "
                 + ", ".join(f"{x*1000:.0f}" for x in drains) + " ms.\n")
    L.append(f"## Resync of {args.resync} targets\n")
    L.append(f"{args.resync} targets in the ledger (host-mode records on loopback listeners in a "
             f"namespace of their own), one HAProxy backend with {args.resync + 20} slots; "
             f"median of {len(rs['cold'])} rounds, from the registrar's (or HAProxy's) start "
             f"to every target ready in HAProxy.\n")
    L.append("| case | converged in |")
    L.append("|---|---:|")
    L.append(f"| registrar starts, HAProxy has every slot disabled (fills {args.resync}) | {statistics.median(rs['cold'])*1000:.0f} ms |")
    L.append(f"| registrar killed with SIGKILL and restarted, HAProxy filled (compares, changes nothing) | {statistics.median(rs['restart'])*1000:.0f} ms |")
    L.append(f"| HAProxy restarted without its state file while the registrar runs (detects, refills) | {statistics.median(rs['haproxy_restart'])*1000:.0f} ms |")
    L.append(f"\nChanges the restarted registrar made to a filled HAProxy: "
             f"{', '.join(str(c - args.resync) for c in rs['changes_after_restart'])} "
             f"(per round; only the HAProxy restart's refill).\n")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--resync", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3, help="resync rounds")
    ap.add_argument("--quick", action="store_true", help="5 starts, 4 replicas, 100 targets, 1 round")
    ap.add_argument("--tmp-parent", default="/dev/shm")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "lb-benchmarks.md"))
    args = ap.parse_args()
    if args.quick:
        args.starts, args.replicas, args.resync, args.rounds = 5, 4, 100, 1
    if os.geteuid() != 0:
        sys.exit("lb.py: run as root (network namespaces, runc)")
    for p in ("runc", "haproxy", "nsenter"):
        if not shutil.which(p):
            sys.exit(f"lb.py: {p} missing (bash scripts/deps.sh)")
    t0 = time.time()
    args.load_start = f"{os.getloadavg()[0]:.1f}"
    w = World(args)

    def on_signal(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        hap = Haproxy(w.h, os.path.join(w.tmp, "haproxy"), f"0.0.0.0:{FRONT}", 2 * args.replicas + 10)
        w.procs.append(hap.stop)
        reg = Registrar(w, hap, w.env, "registrar.log")
        w.procs.append(reg.stop)
        prop = propagation(w, hap, args.starts)
        rolls = []
        for gen, mode in enumerate((True, False)):
            rolls.append(rolling(w, hap, args.replicas, args.threads, mode, gen))
        reg.stop()
        rs = resync(w, args.resync, args.rounds)
        text = report(args, prop, rolls, rs, time.time() - t0)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            log(f"wrote {args.out}")
    except BenchError as e:
        log(f"failed: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        w.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
