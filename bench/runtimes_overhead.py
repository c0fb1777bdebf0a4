#!/usr/bin/env python3
"""What netshim's hook adds to a container's life under each runtime.

For runc, crun, containerd (ctr) and podman, times container create + start + delete with the
shim registered as createRuntime/poststop hook (bridge mode, one dynamic TCP port) against the
same container with a no-op hook registered the same way (`dd of=/dev/null`: reads the state and
exits; same stages, same annotations), and prints
a markdown table of the medians and their ratio. Python 3 standard library only; needs root,
`cargo build --release` first, and the runtimes (scripts/deps.sh installs them):

    sudo python3 bench/runtimes_overhead.py [--runs 10] [--runtimes runc,crun,containerd,podman]

Everything runs inside a network namespace the script creates ("host" netns nsbrt<pid>h, entered
with nsenter), so the shim's bridge and nft table never touch the real host. Temp files live in a
directory under /dev/shm (tmpfs, like /run where the state normally is). On exit, also on error
or Ctrl-C, it deletes its containers, stops its containerd by pid, deletes the netns and the temp
dir, removes the host paths the runtimes create on their own (/run/containerd, /run/containers,
/run/runc, /etc/containers/networks, /var/lib/containers) if they did not exist before, and checks
that nothing is left (exit status 2 if something is).

Per run and runtime, the two variants alternate which goes first; one untimed warm-up cycle of
each comes first (the shim's first setup also creates its bridge and nft table). The timed region
is the runtime's commands only; between them (untimed) the script checks that netshim really set
the container up and released it.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PORTS = '[{"containerPort":80}]'
NOOP = ["/bin/dd", "dd", "of=/dev/null", "status=none"]
TIMEOUT = 60
LOAD0 = os.getloadavg()[0]
HOST_PATHS = {
    "runc": [],
    "crun": ["/run/mount"],
    "containerd": ["/run/containerd", "/opt/containerd"],
    "podman": [
        "/run/containers",
        "/run/runc",
        "/etc/containers/networks",
        "/var/lib/containers/cache",
        "/var/lib/containers",
    ],
}


def log(msg):
    print(f"[rt-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def run(args, check=True, env=None, out=None):
    """Runs a command (stdin closed). Output goes to `out` (a file) or is captured."""
    try:
        if out is not None:
            p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               env=env, timeout=TIMEOUT)
            p.stdout = p.stderr = ""
        else:
            p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out: {' '.join(map(str, args))}") from e
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))} failed ({p.returncode}): "
                         f"{(p.stdout or '') + (p.stderr or '')}".strip())
    return p


class Bench:
    def __init__(self, shim, runs, runtimes, wait_idle_s=0):
        self.wait_idle_s = wait_idle_s
        self.busy = {}
        self.runs = runs
        self.runtimes = runtimes
        self.pid = os.getpid()
        self.ns = f"nsbrt{self.pid}h"
        self.dir = tempfile.mkdtemp(prefix=f"nsbrt{self.pid}-", dir="/dev/shm")
        self.existed = {p: os.path.exists(p) for rt in runtimes for p in HOST_PATHS[rt]}
        self.created = []  # (runtime, name) not yet deleted
        self.containerd = None
        # The binary is copied, so a rebuild during the run cannot change what is measured.
        self.shim = os.path.join(self.dir, "shim")
        shutil.copy2(shim, self.shim)
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "config.toml")
        os.makedirs(self.state)
        with open(self.config, "w") as f:
            f.write('[ports]\ndynamic_range = "40000-60000"\n')
        self.devnull_log = open(os.path.join(self.dir, "runtime.out"), "w")

    # ---- setup -------------------------------------------------------------------------------

    def setup(self):
        run(["ip", "netns", "add", self.ns])
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        rootfs = os.path.join(self.dir, "rootfs")
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            os.makedirs(os.path.join(rootfs, d))
        shutil.copy2("/bin/busybox", os.path.join(rootfs, "bin", "busybox"))
        os.symlink("busybox", os.path.join(rootfs, "bin", "sleep"))
        self.rootfs = rootfs
        shipped = json.load(open(os.path.join(REPO, "hooks", "runc-hooks.json")))["hooks"]
        self.hooks = {"netshim": {}, "noop": {}}
        for stage, lst in shipped.items():
            h = dict(lst[0])
            h["path"] = self.shim
            h["env"] = [f"NETSHIM_STATE_DIR={self.state}", f"NETSHIM_CONFIG={self.config}"]
            self.hooks["netshim"][stage] = [h]
            # A no-op that reads the state like every hook should: crun 1.8 dies of SIGPIPE now
            # and then when a hook exits without reading its stdin (seen with /bin/true).
            self.hooks["noop"][stage] = [{"path": NOOP[0], "args": NOOP[1:], "env": [],
                                          "timeout": h["timeout"]}]
        for variant in ("netshim", "noop"):
            spec = {
                "ociVersion": "1.0.2",
                "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                            "args": ["/bin/busybox", "sleep", "1000"], "env": ["PATH=/bin"]},
                "root": {"path": rootfs},
                "hostname": "bench",
                "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                           {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                            "options": ["nosuid", "mode=755"]}],
                "annotations": {"netshim.network-mode": "bridge",
                                "netshim.port-mappings": PORTS},
                "hooks": self.hooks[variant],
                "linux": {"namespaces": [{"type": t} for t in
                                         ("pid", "ipc", "uts", "mount", "network")]},
            }
            b = os.path.join(self.dir, f"bundle-{variant}")
            os.makedirs(b)
            with open(os.path.join(b, "config.json"), "w") as f:
                json.dump(spec, f)
            # podman: the shipped oci-hooks.d files, or the same with the no-op
            hd = os.path.join(self.dir, f"hooks.d-{variant}")
            os.makedirs(hd)
            for name in sorted(os.listdir(os.path.join(REPO, "hooks", "oci-hooks.d"))):
                v = json.load(open(os.path.join(REPO, "hooks", "oci-hooks.d", name)))
                v["hook"] = self.hooks[variant][v["stages"][0]][0]
                with open(os.path.join(hd, name), "w") as f:
                    json.dump(v, f)
        if "crun" in self.runtimes:
            crun = shutil.which("crun") or "/usr/bin/crun"
            w = os.path.join(self.dir, "crun-nsw")
            with open(w, "w") as f:
                f.write(
                    "#!/bin/sh\n"
                    "if [ \"$(stat -fc %T /sys/fs/cgroup)\" = tmpfs ] && "
                    "[ -n \"$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)\" ]; then\n"
                    f"  exec unshare -m --propagation private sh -c 'umount -n -l "
                    f"/sys/fs/cgroup/unified 2>/dev/null; exec {crun} \"$@\"' crun \"$@\"\nfi\n"
                    f"exec {crun} \"$@\"\n")
            os.chmod(w, 0o755)
        if "podman" in self.runtimes:
            with open(os.path.join(self.dir, "containers.conf"), "w") as f:
                f.write('[engine]\nlock_type = "file"\n')
        if "containerd" in self.runtimes:
            self.start_containerd()

    def host(self, *args):
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--", *args]

    def start_containerd(self):
        d = os.path.join(self.dir, "ctrd")
        os.makedirs(d)
        conf = os.path.join(self.dir, "containerd.toml")
        with open(conf, "w") as f:
            f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.dir}/ctrd.sock"\n'
                    f'[ttrpc]\n  address = "{self.dir}/ctrd.sock.ttrpc"\n'
                    f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{d}/opt"\n')
        logf = open(os.path.join(self.dir, "containerd.log"), "w")
        self.containerd = subprocess.Popen(self.host("containerd", "--config", conf),
                                           stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        for _ in range(200):
            if run(self.ctr("version"), check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise BenchError("private containerd did not come up")

    def ctr(self, *args):
        return self.host("ctr", "-a", f"{self.dir}/ctrd.sock", *args)

    def podman(self, variant, *args):
        return self.host(
            "podman", "--root", f"{self.dir}/podman-root", "--runroot", f"{self.dir}/podman-run",
            "--tmpdir", f"{self.dir}/podman-tmp", "--network-config-dir", f"{self.dir}/podman-net",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc",
            "--hooks-dir", f"{self.dir}/hooks.d-{variant}", *args)

    def podman_env(self):
        return dict(os.environ, CONTAINERS_CONF=f"{self.dir}/containers.conf")

    def oci(self, rt, *args):
        if rt == "runc":
            return self.host("runc", "--root", f"{self.dir}/runc-root", *args)
        return self.host(f"{self.dir}/crun-nsw", "--root", f"{self.dir}/crun-root", *args)

    # ---- one cycle ---------------------------------------------------------------------------

    def up(self, rt, variant, name):
        """create + start; returns seconds."""
        b = os.path.join(self.dir, f"bundle-{variant}")
        self.created.append((rt, name, variant))
        t0 = time.perf_counter()
        if rt in ("runc", "crun"):
            # runc/crun hand their stdio to the container: a file, never a pipe
            run(self.oci(rt, "create", "-b", b, name), out=self.devnull_log)
            run(self.oci(rt, "start", name), out=self.devnull_log)
        elif rt == "containerd":
            run(self.ctr("run", "-d", "--null-io", "--runc-root", f"{self.dir}/ctr-runc",
                         "--config", f"{b}/config.json", name))
        else:
            ann = "netshim.port-mappings=" + PORTS
            run(self.podman(variant, "run", "-d", "--name", name, "--network", "none",
                            "--annotation", "netshim.network-mode=bridge",
                            "--annotation", '"' + ann.replace('"', '""') + '"',
                            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                            "--rootfs", self.rootfs, "/bin/busybox", "sleep", "1000"),
                env=self.podman_env())
        return time.perf_counter() - t0

    def down(self, rt, name, variant, check=True):
        """delete (poststop runs here; podman: at exit, which `rm -f` causes); returns seconds."""
        t0 = time.perf_counter()
        if rt in ("runc", "crun"):
            run(self.oci(rt, "delete", "-f", name), check=check)
        elif rt == "containerd":
            run(self.ctr("task", "rm", "-f", name), check=check)
            run(self.ctr("container", "rm", name), check=check)
        else:
            run(self.podman(variant, "rm", "-f", "-t", "0", name), check=check,
                env=self.podman_env())
        dt = time.perf_counter() - t0
        self.created = [c for c in self.created if c[1] != name]
        return dt

    def recorded(self):
        """Containers netshim holds, from `shim ports list --json` (not its state files, whose
        layout is netshim's own business)."""
        out = run(["ip", "netns", "exec", self.ns, self.shim, "ports", "list", "--json"],
                  env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                       "NETSHIM_STATE_DIR": self.state, "NETSHIM_CONFIG": self.config}).stdout
        return sorted({e["containerId"] for e in json.loads(out or "[]")})

    def veths(self):
        """Ports of netshim's bridge (none, or no bridge: empty)."""
        r = run(["ip", "-n", self.ns, "-o", "link", "show", "master", "netshim0"], check=False)
        return [ln.split(": ")[1].split("@")[0] for ln in r.stdout.splitlines() if ": " in ln]

    def cycle(self, rt, variant, name):
        t_up = self.up(rt, variant, name)
        rec = self.recorded()
        if variant == "netshim" and (len(rec) != 1 or len(self.veths()) != 1):
            raise BenchError(f"{rt}: netshim did not set up {name}: state {rec}, "
                             f"veths {self.veths()}")
        if variant == "noop" and rec:
            raise BenchError(f"{rt}: the no-op variant has netshim records: {rec}")
        t_down = self.down(rt, name, variant)
        # podman's conmon may still be running its cleanup; give it a moment (untimed)
        for _ in range(100):
            if not self.recorded() and not self.veths():
                break
            time.sleep(0.02)
        else:
            raise BenchError(f"{rt}: {name} not released: {self.recorded()} {self.veths()}")
        return t_up, t_down

    def measure(self):
        results = {}
        for rt in self.runtimes:
            if self.wait_idle_s > 0:
                self.busy[rt] = wait_idle(self.wait_idle_s)
            log(f"{rt}: warm-up")
            for variant in ("netshim", "noop"):
                self.cycle(rt, variant, f"nsbrt{self.pid}-{rt}-{variant}-w")
            times = {"netshim": [], "noop": []}
            for i in range(self.runs):
                order = ("netshim", "noop") if i % 2 == 0 else ("noop", "netshim")
                for variant in order:
                    times[variant].append(self.cycle(rt, variant, f"nsbrt{self.pid}-{rt}-{variant}-{i}"))
            results[rt] = times
            log(f"{rt}: done")
        return results

    # ---- cleanup -----------------------------------------------------------------------------

    def cleanup(self):
        problems = []
        for rt, name, variant in list(self.created):
            try:
                self.down(rt, name, variant, check=False)
            except Exception as e:  # noqa: BLE001 - keep cleaning
                problems.append(f"delete {name}: {e}")
        if self.containerd is not None:
            self.containerd.terminate()
            try:
                self.containerd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.containerd.kill()
                self.containerd.wait()
            self.containerd = None
        # conmon's cleanup and containerd shims may still be finishing
        for _ in range(200):
            if not self.procs_mentioning_dir():
                break
            time.sleep(0.05)
        else:
            problems.append(f"processes still mention {self.dir}: {self.procs_mentioning_dir()}")
        for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
            mp = line.split(" ")[4]
            if mp.startswith(self.dir + "/"):
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.ns], stderr=subprocess.DEVNULL)
        self.devnull_log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        for p, existed in self.existed.items():
            if not existed and os.path.exists(p):
                shutil.rmtree(p, ignore_errors=True)
        # checks
        if os.path.exists(f"/run/netns/{self.ns}"):
            problems.append(f"netns {self.ns} left")
        if os.path.exists(self.dir):
            problems.append(f"{self.dir} left")
        for p, existed in self.existed.items():
            if not existed and os.path.exists(p):
                problems.append(f"{p} left")
        return problems

    def procs_mentioning_dir(self):
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == self.pid:
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if self.dir.encode() in f.read():
                        found.append(int(d))
            except OSError:
                pass
        return found


def cpu_busy(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit, threshold=0.2):
    """Waits up to `limit` s for other work on the machine to stop; returns the last busy level."""
    deadline = time.monotonic() + limit
    while True:
        busy = cpu_busy(3.0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        log(f"machine busy ({busy:.0%} of the CPUs), waiting")


def version(args):
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def report(results, runs, busy):
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    lines = [
        f"Container create + start + delete, median of {runs} runs per cell (ms), "
        f"hooks createRuntime + poststop, bridge mode with one dynamic TCP port "
        f"(`{PORTS}`); no-op = `{' '.join(NOOP[1:])}` registered the same way.",
        "",
        "| runtime | no-op hook | netshim hook | ratio | added | up (create+start) no-op / netshim "
        "| delete no-op / netshim |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rt, t in results.items():
        tot = {v: [u + d for u, d in t[v]] for v in t}
        up = {v: [u for u, _ in t[v]] for v in t}
        dn = {v: [d for _, d in t[v]] for v in t}
        a, b = ms(tot["noop"]), ms(tot["netshim"])
        lines.append(
            f"| {rt} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {b - a:+.1f} | "
            f"{ms(up['noop']):.1f} / {ms(up['netshim']):.1f} | "
            f"{ms(dn['noop']):.1f} / {ms(dn['netshim']):.1f} |")
    lines += [
        "",
        "Commands timed: runc/crun `create` + `start` + `delete -f` (crun through the unshare "
        "wrapper); containerd `ctr run -d --null-io --config` + `ctr task rm -f` + "
        "`ctr container rm`; podman `run -d --network none --rootfs` + `rm -f -t 0`.",
        f"Versions: {version(['runc', '--version'])}; {version(['crun', '--version'])}; "
        f"{version(['containerd', '--version'])}; {version(['podman', '--version'])}. "
        f"{os.cpu_count()} CPUs, load average {LOAD0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
    ]
    if busy:
        lines.append("Other work on the machine just before each runtime's runs: " + ", ".join(
            f"{rt} {b:.0%}" for rt, b in busy.items()) + " of the CPUs.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--runtimes", default="runc,crun,containerd,podman")
    ap.add_argument("--shim", default=os.path.join(REPO, "target", "x86_64-unknown-linux-gnu", "release", "shim"))
    ap.add_argument("--raw", metavar="FILE",
                    help="also write every sample (seconds: [up, delete] per run) as JSON")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="wait up to S s for a quiet machine before each runtime (0: don't)")
    args = ap.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    for r in runtimes:
        if r not in HOST_PATHS:
            sys.exit(f"unknown runtime {r}")
    if os.geteuid() != 0:
        sys.exit("needs root")
    if not os.access(args.shim, os.X_OK):
        sys.exit(f"{args.shim}: not found: cargo build --release")
    bench = Bench(args.shim, args.runs, runtimes, args.wait_idle)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    status = 0
    try:
        bench.setup()
        results = bench.measure()
        print(report(results, args.runs, bench.busy))
        if args.raw:
            with open(args.raw, "w") as f:
                json.dump(results, f)
    except BenchError as e:
        log(f"error: {e}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        problems = bench.cleanup()
        for p in problems:
            log(f"left behind: {p}")
        if problems:
            status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
