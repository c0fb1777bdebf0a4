#!/usr/bin/env python3
"""The cluster view in etcd: what a load balancer fed through etcd costs against one fed from
the host's own ledger, in the same run, on the same HAProxy.

  1. propagation: from the createRuntime hook's exit to the first response the new container
     gives through HAProxy, over N starts (p50, p99): `shim registrar --haproxy` on the host
     (baseline), then `shim registrar --etcd` on the host and `shim registrar --from-etcd
     --haproxy` in front;
  2. the publisher's transaction per ledger revision (its own log lines), and one etcd put
     round trip measured by this script for scale;
  3. resync of M targets (default 500): the publisher's first publication and its republication
     after a SIGKILL and restart (revoke the old lease, everything on a new one), and a
     from-etcd registrar filling an empty HAProxy with all of them, against the local
     registrar filling the same HAProxy from the ledger.

One etcd member (Debian's etcd-server, 3.4) on the loopback of the host namespace, its data on
/dev/shm; everything else as bench/lb.py builds it (whose helpers this imports). Python 3
standard library only; needs root, runc, haproxy, etcd, busybox-static and a release build:

    cargo build --release && sudo python3 bench/etcd.py [--quick] [--out docs/cluster-benchmarks.md]
"""

import argparse
import base64
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lb as L  # noqa: E402

TTL = 10


def free_port(ns):
    box = []

    def f():
        L.setns_path(f"/run/netns/{ns}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            box.append(s.getsockname()[1])
    t = threading.Thread(target=f)
    t.start()
    t.join()
    return box[0]


class Etcd:
    def __init__(self, w):
        self.ns = w.h
        self.port, self.peer = free_port(w.h), free_port(w.h)
        self.url = f"http://127.0.0.1:{self.port}"
        d = os.path.join(w.tmp, "etcd")
        peer = f"http://127.0.0.1:{self.peer}"
        self.log = open(os.path.join(w.tmp, "etcd.log"), "ab")
        self.argv = ["nsenter", f"--net=/run/netns/{w.h}", "--", "etcd", "--name", "b", "--data-dir", d,
                     "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                     "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", f"b={peer}", "--logger", "zap", "--log-level", "warn"]
        self.proc = None
        w.procs.append(self.stop)
        self.start()

    def start(self):
        """Starts the member (again: same ports, same data); seconds until it answered."""
        t = time.time()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        if not L.wait(lambda: self.try_post("/v3/kv/range", {"key": b64("x")}) is not None, 20, 0.01):
            raise L.BenchError("etcd did not answer")
        return time.time() - t

    def lease_left(self, lease):
        """The TTL etcd reports for a lease (-1: gone); retried while the member does not answer."""
        for _ in range(20):
            v = self.try_post("/v3/lease/timetolive", {"ID": str(lease)})
            if v is not None:
                return int(v.get("TTL", -1))
            time.sleep(0.1)
        raise L.BenchError("etcd does not answer timetolive")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def try_post(self, path, body):
        box = []

        def f():
            L.setns_path(f"/run/netns/{self.ns}")
            try:
                req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    box.append(json.loads(r.read()))
            except OSError:
                pass
        t = threading.Thread(target=f)
        t.start()
        t.join()
        return box[0] if box else None

    def count(self, prefix):
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        v = self.try_post("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
        return int((v or {}).get("count", 0))

    def put_times(self, n):
        """n sequential puts from this script (a fresh thread in H, one HTTP connection each)."""
        out = []

        def f():
            L.setns_path(f"/run/netns/{self.ns}")
            for i in range(n):
                body = json.dumps({"key": b64(f"/bench/put/{i}"), "value": b64("x" * 400)}).encode()
                t = time.perf_counter()
                req = urllib.request.Request(self.url + "/v3/kv/txn", headers={"Content-Type": "application/json"},
                                             data=json.dumps({"success": [{"request_put": json.loads(body)}]}).encode())
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
                out.append((time.perf_counter() - t) * 1000)
        t = threading.Thread(target=f)
        t.start()
        t.join()
        return out


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class Shim:
    """`shim registrar ...` inside H with its own environment, stopped on cleanup."""

    def __init__(self, w, env, args, logname):
        self.log_path = os.path.join(w.tmp, logname)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{w.h}", "--", w.shim, "registrar", *args],
                                     env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        w.procs.append(self.stop)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


TXN = re.compile(r"revision \d+: (\d+) put, (\d+) deleted in ([0-9.]+) ms")


def txns(text):
    return [(int(p) + int(d), float(ms)) for p, d, ms in TXN.findall(text)]


def write_config(path, extra=""):
    with open(path, "w") as f:
        f.write(f'[ports]\ndynamic_range = "{L.RANGE}"\n{extra}\n[lb]\nlease_seconds = {TTL}\ninstance_id = "i-bench"\n')


def resync(w, etcd, m):
    """M host-mode records on loopback listeners in H; HAProxy with M+20 slots in H."""
    base = 21000
    listeners, ready_ev, stop_ev = [], threading.Event(), threading.Event()

    def serve():
        L.setns_path(f"/run/netns/{w.h}")
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
    write_config(cfgp, 'host_address = "127.0.0.1"')
    env = dict(w.env, NETSHIM_STATE_DIR=sd, NETSHIM_CONFIG=cfgp)
    hap = L.Haproxy(w.h, os.path.join(w.tmp, "rhaproxy"), "127.0.0.1:8090", m + 20)
    w.procs.append(hap.stop)
    want = {f"127.0.0.1:{base + i}" for i in range(m)}
    res = {}

    def empty_haproxy():
        hap.stop()
        try:
            os.remove(hap.state_file)
        except OSError:
            pass
        hap.start()

    # Baseline: the local registrar fills the empty HAProxy from the ledger.
    empty_haproxy()
    t = time.time()
    reg = Shim(w, env, ["--haproxy", hap.sock], "r-local.log")
    if not L.wait(lambda: hap.ready() == want, 120, 0.01):
        raise L.BenchError(f"local fill never converged: {len(hap.ready())} of {m}")
    res["local_fill"] = time.time() - t
    reg.stop()
    # The publisher's first publication (no HAProxy).
    prefix = "/netshim/v1/targets/web/bench-r/"
    t = time.time()
    pub = Shim(w, env, ["--etcd", etcd.url, "--host-id", "bench-r"], "r-pub.log")
    if not L.wait(lambda: etcd.count(prefix) == m, 60, 0.005):
        raise L.BenchError(f"publication never complete: {etcd.count(prefix)} of {m}")
    res["publish"] = time.time() - t
    L.wait(lambda: txns(pub.text()), 5, 0.005)  # its log line follows the last transaction
    res["publish_txns"] = txns(pub.text())
    # SIGKILL, restart: a new lease, everything put on it, the old one revoked.
    pub.stop(signal.SIGKILL)
    t = time.time()
    pub = Shim(w, env, ["--etcd", etcd.url, "--host-id", "bench-r"], "r-pub2.log")
    if not L.wait(lambda: "revoked lease" in pub.text(), 60, 0.005):
        raise L.BenchError("republication never complete")
    res["republish"] = time.time() - t
    res["republish_txns"] = txns(pub.text())
    # A from-etcd registrar fills the empty HAProxy from etcd.
    empty_haproxy()
    t = time.time()
    fe = Shim(w, w.env, ["--from-etcd", etcd.url, "--haproxy", hap.sock], "r-from.log")
    if not L.wait(lambda: want <= hap.ready(), 120, 0.01):
        raise L.BenchError(f"from-etcd fill never converged: {len(hap.ready() & want)} of {m}")
    res["from_fill"] = time.time() - t
    # Killed and restarted with HAProxy filled: one range, nothing to change.
    fe.stop(signal.SIGKILL)
    t = time.time()
    fe = Shim(w, w.env, ["--from-etcd", etcd.url, "--haproxy", hap.sock], "r-from2.log")
    if not L.wait(lambda: "watching etcd" in fe.text(), 30, 0.002):
        raise L.BenchError("from-etcd restart never started")
    time.sleep(0.5)
    res["from_restart_changes"] = fe.text().count(" ready (container ")
    # The host dies (publisher SIGKILLed, not restarted): its lease expires, etcd deletes the
    # keys, the watch reports it, the slots go to maint.
    lease = int(open(os.path.join(sd, "registrar-etcd.lease")).read().strip())
    res["dead_left"] = etcd.lease_left(lease)
    pub.stop(signal.SIGKILL)
    t = time.time()
    if not L.wait(lambda: etcd.count(prefix) == 0, TTL + 10, 0.01):
        raise L.BenchError("a dead host's keys never went")
    res["dead_keys"] = time.time() - t
    if not L.wait(lambda: not (want & hap.ready()), 20, 0.01):
        raise L.BenchError("a dead host's targets never left HAProxy")
    res["dead_haproxy"] = time.time() - t
    fe.stop()
    stop_ev.set()
    th.join(timeout=5)
    for s in listeners:
        s.close()
    hap.stop()
    for k in ("local_fill", "publish", "republish", "from_fill"):
        L.log(f"resync {m}: {k} {res[k] * 1000:.0f} ms")
    return res


def rearm(etcd, ttl, wait_before, down):
    """A lease no one renews, etcd SIGKILLed after `wait_before` s and restarted after `down`
    s: the TTL left when it was killed, right after the restart, and when its key went
    (seconds after the member answered)."""
    lease = int(etcd.try_post("/v3/lease/grant", {"TTL": ttl})["ID"])
    etcd.try_post("/v3/kv/put", {"key": b64("/bench/rearm"), "value": b64("x"), "lease": str(lease)})
    time.sleep(wait_before)
    left = etcd.lease_left(lease)
    etcd.stop()
    time.sleep(down)
    up = etcd.start()
    t = time.time()
    after = etcd.lease_left(lease)
    if not L.wait(lambda: etcd.count("/bench/rearm") == 0, ttl + 20, 0.01):
        raise L.BenchError("the key of an un-renewed lease never went")
    gone = time.time() - t
    r = {"ttl": ttl, "left": left, "down": down, "up": up, "after": after, "gone": gone}
    L.log(f"lease re-arm: {r}")
    return r


def fmt(xs):
    return f"{L.pct(xs, 50):.1f} ms | {L.pct(xs, 90):.1f} ms | {L.pct(xs, 99):.1f} ms | {max(xs):.1f} ms"


def report(args, base, clus, pub_txns, puts, rs, rearms, wall):
    m = L.machine()
    etcd_v = L.run(["etcd", "--version"], check=False).stdout.decode(errors="replace").splitlines()[0]
    R = ["# Cluster view benchmarks (etcd)\n",
         "Regenerated by `sudo python3 bench/etcd.py` (after `cargo build --release`); one run on "
         "this machine. One etcd member on the host namespace's loopback (data on "
         f"{args.tmp_parent}), HAProxy from the shipped `lb/haproxy.cfg`, busybox httpd replicas "
         "under runc; the baseline is measured in the same run on the same HAProxy.\n",
         f"- machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}",
         f"- {m['haproxy']}; {etcd_v}; {m['shim']}",
         f"- wall time {wall:.0f} s; load average at the start {args.load_start}, at the end "
         f"{os.getloadavg()[0]:.1f}\n",
         "## Propagation: hook exit to the first response through HAProxy\n",
         f"{len(base['first'])} starts each, interleaved (baseline, cluster, baseline, cluster); 2 "
         "client threads polling, 2 other replicas serving. Both paths end in the same "
         "registrar loop, whose TCP check of a new target runs every 5 ms at first: the "
         "container's own start and that cadence dominate, and the etcd hop (one transaction, "
         "one watch event, below) mostly hides inside them.\n",
         "| path | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|",
         f"| baseline: `registrar --haproxy` on the host | {fmt(base['first'])} |",
         f"| **cluster: `registrar --etcd` → etcd → `registrar --from-etcd --haproxy`** | {fmt(clus['first'])} |",
         f"| cluster, the container's port accepts (for scale) | {fmt(clus['listen'])} |",
         ""]
    gb = [f - l for f, l in zip(base["first"], base["listen"])]
    gc = [f - l for f, l in zip(clus["first"], clus["listen"])]
    R.append(f"From the container's port accepting to the first response through HAProxy: baseline "
             f"p50 {L.pct(gb, 50):.1f} ms, cluster p50 {L.pct(gc, 50):.1f} ms (ratio "
             f"{L.pct(gc, 50) / max(L.pct(gb, 50), 0.001):.2f}); p99 {L.pct(gb, 99):.1f} vs "
             f"{L.pct(gc, 99):.1f} ms.\n")
    R.append("## Transactions\n")
    small = [ms for n, ms in pub_txns]
    R.append(f"The publisher's transaction per ledger revision during the propagation runs "
             f"({len(small)} revisions, {statistics.mean([n for n, _ in pub_txns]):.1f} operations "
             f"each on average): p50 {L.pct(small, 50):.1f} ms, p99 {L.pct(small, 99):.1f} ms. "
             f"One single-put transaction from this script (Python, a new connection each, "
             f"{len(puts)} of them): p50 {L.pct(puts, 50):.1f} ms, p99 {L.pct(puts, 99):.1f} ms.\n")
    R.append(f"## Resync of {args.resync} targets\n")
    R.append(f"{args.resync} host-mode records on loopback listeners; one HAProxy backend with "
             f"{args.resync + 20} slots.\n")
    R.append("| case | time |")
    R.append("|---|---:|")
    pt = rs["publish_txns"]
    rt = rs["republish_txns"]
    R.append(f"| baseline: local registrar fills an empty HAProxy from the ledger | {rs['local_fill'] * 1000:.0f} ms |")
    R.append(f"| publisher's first publication (every key in etcd): {sum(n for n, _ in pt)} operations in "
             f"{sum(-(-n // 128) for n, _ in pt)} transactions of at most 128, "
             f"{sum(ms for _, ms in pt):.0f} ms in etcd calls | {rs['publish'] * 1000:.0f} ms |")
    R.append(f"| publisher killed with SIGKILL and restarted: new lease, {sum(n for n, _ in rt)} puts, old lease revoked | {rs['republish'] * 1000:.0f} ms |")
    R.append(f"| from-etcd registrar fills an empty HAProxy from etcd | {rs['from_fill'] * 1000:.0f} ms |")
    R.append(f"\nA from-etcd registrar killed and restarted in front of the filled HAProxy made "
             f"{rs['from_restart_changes']} changes (one range read, then the watch).\n")
    R.append(f"A host of {args.resync} targets dies (its publisher SIGKILLed with {rs['dead_left']} s "
             f"of its {TTL} s lease left): its keys gone from etcd after {rs['dead_keys']:.2f} s, its "
             f"targets out of HAProxy (slots in maint) after {rs['dead_haproxy']:.2f} s.\n")
    R.append("## A lease across an etcd restart\n")
    R.append("A lease no one renews; the member SIGKILLed and started again on the same data. "
             "\"Left\" is the TTL etcd reported (`/v3/lease/timetolive`): before the kill, and "
             "right after the restart; \"gone\" is when its key was deleted, counted from the "
             "member answering again.\n")
    R.append("| TTL | left at the kill | down | restart until it answers | left after the restart | key gone after |")
    R.append("|---:|---:|---:|---:|---:|---:|")
    for r in rearms:
        R.append(f"| {r['ttl']} s | {r['left']} s | {r['down']} s | {r['up']:.2f} s | {r['after']} s | {r['gone']:.2f} s |")
    R.append("\netcd re-arms every lease when a member becomes leader: the full TTL again (plus "
             "about an election timeout), whatever was left and however long the member was "
             "down. A host that died during an etcd outage therefore stays listed for up to a "
             "full TTL (and a little) after etcd is back.\n")
    return "\n".join(R) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--resync", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="5 starts, 100 targets")
    ap.add_argument("--tmp-parent", default="/dev/shm")
    ap.add_argument("--out", default=os.path.join(L.REPO, "docs", "cluster-benchmarks.md"))
    args = ap.parse_args()
    if args.quick:
        args.starts, args.resync = 5, 100
    if os.geteuid() != 0:
        sys.exit("etcd.py: run as root (network namespaces, runc)")
    for p in ("runc", "haproxy", "nsenter", "etcd"):
        if not L.shutil.which(p):
            sys.exit(f"etcd.py: {p} missing (bash scripts/deps.sh)")
    t0 = time.time()
    args.load_start = f"{os.getloadavg()[0]:.1f}"
    w = L.World(args)
    write_config(w.config)

    def on_signal(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        etcd = Etcd(w)
        hap = L.Haproxy(w.h, os.path.join(w.tmp, "haproxy"), f"0.0.0.0:{L.FRONT}", 20)
        w.procs.append(hap.stop)
        # Interleaved (baseline, cluster, baseline, cluster), half the starts each time, so
        # warm-up and load drift fall on both alike.
        base, clus, pub_txns = {}, {}, []
        for rnd in range(4):
            n = args.starts // 2 if rnd < 2 else args.starts - args.starts // 2
            if rnd % 2 == 0:
                reg = Shim(w, w.env, ["--haproxy", hap.sock], f"local{rnd}.log")
                got = L.propagation(w, hap, n)
                reg.stop()
                into = base
            else:
                pub = Shim(w, w.env, ["--etcd", etcd.url, "--host-id", "bench"], f"publish{rnd}.log")
                fe = Shim(w, w.env, ["--from-etcd", etcd.url, "--haproxy", hap.sock], f"from-etcd{rnd}.log")
                got = L.propagation(w, hap, n)
                pub_txns += txns(pub.text())
                fe.stop()
                pub.stop()
                into = clus
            for k, v in got.items():
                into.setdefault(k, []).extend(v)
        puts = etcd.put_times(50)
        rs = resync(w, etcd, args.resync)
        rearms = [rearm(etcd, TTL, 6, 12), rearm(etcd, 3, 1, 1), rearm(etcd, 3, 1, 5)]
        text = report(args, base, clus, pub_txns, puts, rs, rearms, time.time() - t0)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            L.log(f"wrote {args.out}")
    except L.BenchError as e:
        L.log(f"failed: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        w.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
