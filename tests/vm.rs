//! The suite on Debian 12's own kernel (6.1 LTS from `linux-image-amd64`), in the VM lab
//! (tests/vm/lab.sh): one guest boot runs this crate's already-built integration test binaries
//! (bridge, host/none, awsvpc, recovery, branch ENIs (also without 8021q), runc end to end;
//! bridge once more with br_netfilter loaded), this file's in-guest tests (802.1Q vlan, dummy and ipvlan links, which this machine's
//! kernel lacks), then checks that nothing was left behind and that the kernel logged no warning.
//! Each `#[test]` below asserts one part of that single run. Needs root (the suites do).
//!
//! Tests that need what only the guest's kernel has are marked
//! `#[ignore = "needs 802.1Q: runs in the VM lab"]` and their binary is listed in [`SUITES`]
//! with `--include-ignored` (tests/vm/README.md).

#[macro_use]
mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;

/// The whole guest run's limit (boot, every suite, checks). A run takes about 4 minutes under
/// software emulation on an idle 2-core machine and up to 10 when it is busy.
const RUN_TIMEOUT: Duration = Duration::from_secs(1200);

/// One step of the guest run.
struct Suite {
    /// The step's name in the guest's markers and in the messages here.
    step: &'static str,
    /// The test target whose newest binary runs (beside this test binary).
    target: &'static str,
    /// libtest arguments.
    args: &'static [&'static str],
    /// A shell command run before the binary in the same step (e.g. a modprobe); the binary
    /// runs only if it succeeds.
    before: Option<&'static str>,
    /// A shell command run after the binary whatever its result (undoes `before`); the step's
    /// status stays the binary's.
    after: Option<&'static str>,
}

/// The suites run in the guest, in this order. `--include-ignored` runs the tests marked as
/// needing the VM lab too; br_netfilter stays loaded once its step has loaded it, so it is last.
const SUITES: &[Suite] = &[
    Suite {
        step: "vm",
        target: "vm",
        args: &["--ignored"],
        before: None,
        after: None,
    },
    Suite {
        step: "host_none",
        target: "host_none",
        args: &["--include-ignored"],
        before: None,
        after: None,
    },
    Suite {
        step: "recovery",
        target: "recovery",
        args: &["--include-ignored"],
        before: None,
        after: None,
    },
    Suite {
        step: "bridge",
        target: "bridge",
        args: &["--include-ignored"],
        before: None,
        after: None,
    },
    // UDP mappings' conntrack zones on 6.1 (ct original zone set, Debian's modular build).
    Suite {
        step: "conntrack",
        target: "conntrack",
        args: &["--include-ignored"],
        before: None,
        after: None,
    },
    Suite {
        step: "awsvpc",
        target: "awsvpc",
        args: &["--include-ignored"],
        before: None,
        after: None,
    },
    Suite {
        step: "branch",
        target: "branch",
        args: &["--ignored"],
        before: None,
        after: None,
    },
    // 802.1Q unavailable: 8021q unloaded and the kernel's module loader pointed at /bin/false
    // for this one test, then restored.
    Suite {
        step: "branch_without_8021q",
        target: "branch",
        args: &[
            "--exact",
            "a_kernel_without_8021q_refuses_branch_enis_clearly_and_changes_nothing",
        ],
        before: Some(
            "modprobe -r 8021q && old=$(cat /proc/sys/kernel/modprobe) && echo /bin/false > /proc/sys/kernel/modprobe",
        ),
        after: Some("[ -n \"${old:-}\" ] && echo \"$old\" > /proc/sys/kernel/modprobe"),
    },
    Suite {
        step: "runc_e2e",
        target: "runc_e2e",
        args: &["--include-ignored"],
        before: None,
        after: None,
    },
    // The runtime matrix's runc cases (runc is all they need).
    Suite {
        step: "runtimes_e2e_runc",
        target: "runtimes_e2e",
        args: &["--include-ignored", "runc_"],
        before: None,
        after: None,
    },
    Suite {
        step: "bridge_br_netfilter",
        target: "bridge",
        args: &["--include-ignored"],
        before: Some("modprobe br_netfilter"),
        after: None,
    },
];

/// More test targets to run in the guest, from `NETSHIM_VM_EXTRA` (comma-separated, e.g.
/// `runtimes_e2e`: crun, containerd and podman take about 5 minutes more there).
fn extra_targets() -> Vec<String> {
    std::env::var("NETSHIM_VM_EXTRA")
        .unwrap_or_default()
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// A step's result as the guest reported it.
#[derive(Debug, Clone)]
struct Step {
    name: String,
    status: Option<i32>,
    millis: u64,
    output: String,
}

/// The single guest run all tests here look at.
struct GuestRun {
    /// Err: the lab could not run at all (no kernel, qemu failed, timeout), with why.
    steps: Result<Vec<Step>, String>,
}

static RUN: OnceLock<GuestRun> = OnceLock::new();

/// Whether this process runs inside the lab's guest (the tests here must not boot another).
fn in_guest() -> bool {
    fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.contains("vmlab.nonce="))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The newest `<target>-<16 hex digits>` executable in `dir` (cargo's name for a test binary).
fn newest_test_binary(dir: &Path, target: &str) -> Option<PathBuf> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hash) = name.strip_prefix(&format!("{target}-")) else {
            continue;
        };
        if hash.len() != 16 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        let Ok(mtime) = meta.modified() else { continue };
        if meta.is_file() && best.as_ref().is_none_or(|(t, _)| mtime > *t) {
            best = Some((mtime, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// Single-quotes `s` for the guest's bash.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest script: the kernel's version, every suite, the leftovers check, kernel warnings.
fn guest_script() -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let deps = exe.parent().ok_or("test binary has no directory")?;
    let mut s = String::from("export RUST_BACKTRACE=1\nvmlab_step kernel uname -r\n");
    let extras = extra_targets();
    let all = SUITES
        .iter()
        .map(|x| (x.step.to_string(), x.target, x.args, x.before, x.after))
        .chain(extras.iter().map(|t| {
            (
                format!("extra_{t}"),
                t.as_str(),
                &["--include-ignored"][..],
                None,
                None,
            )
        }));
    for (step, target, args, before, after) in all {
        let bin = newest_test_binary(deps, target).ok_or_else(|| {
            format!(
                "no built {target} test binary in {}: cargo test builds every test target first",
                deps.display()
            )
        })?;
        let mut cmd = sh_quote(&bin.to_string_lossy());
        for a in args {
            cmd += " ";
            cmd += &sh_quote(a);
        }
        let cmd = match before {
            Some(b) => format!("{b} && {cmd}"),
            None => cmd,
        };
        let cmd = match after {
            Some(a) => format!("{cmd}; rc=$?; {a}; exit $rc"),
            None => cmd,
        };
        s += &format!("vmlab_step {step} bash -c {}\n", sh_quote(&cmd));
    }
    let leftovers = repo().join("tests/vm/leftovers.sh");
    s += &format!(
        "vmlab_step leftovers bash {}\n",
        sh_quote(&leftovers.to_string_lossy())
    );
    s += "vmlab_step dmesg dmesg --level=emerg,alert,crit,err,warn\n";
    Ok(s)
}

/// `@@VMLAB <nonce> STEP <name> BEGIN@@` / `... END <status> <ms>ms@@` lines.
fn parse_steps(nonce: &str, console: &str) -> Vec<Step> {
    let tag = format!("@@VMLAB {nonce} STEP ");
    let mut steps: Vec<Step> = Vec::new();
    let mut open: Option<Step> = None;
    for line in console.lines() {
        if let Some(pos) = line.find(&tag) {
            let rest = line[pos + tag.len()..].trim_end_matches('@');
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                [name, "BEGIN"] => {
                    if let Some(s) = open.take() {
                        steps.push(s);
                    }
                    open = Some(Step {
                        name: name.to_string(),
                        status: None,
                        millis: 0,
                        output: String::new(),
                    });
                }
                [name, "END", status, ms] => {
                    if let Some(mut s) = open.take() {
                        if s.name == *name {
                            s.status = status.parse().ok();
                            s.millis = ms.trim_end_matches("ms").parse().unwrap_or(0);
                        }
                        steps.push(s);
                    }
                }
                _ => {}
            }
        } else if let Some(s) = open.as_mut() {
            s.output.push_str(line);
            s.output.push('\n');
        }
    }
    // A step the guest never finished (timeout, crash) keeps status None.
    steps.extend(open);
    steps
}

/// Boots the guest once and runs [`guest_script`] in it.
fn boot_and_run() -> GuestRun {
    let steps = (|| {
        let script = guest_script()?;
        let nonce = format!(
            "{:x}{:x}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let script_path = std::env::temp_dir().join(format!("vmlab-{nonce}.sh"));
        fs::write(&script_path, script).map_err(|e| format!("write guest script: {e}"))?;
        let started = Instant::now();
        let mut child = Command::new("bash")
            .arg(repo().join("tests/vm/lab.sh"))
            .arg("-t")
            .arg(RUN_TIMEOUT.as_secs().to_string())
            .arg("-s")
            .arg(&script_path)
            .env("VMLAB_NONCE", &nonce)
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a kill reaches qemu too.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn tests/vm/lab.sh: {e}"))?;
        let pgid = child.id() as i32;
        let stdout = child.stdout.take().ok_or("lab stdout")?;
        let stderr = child.stderr.take().ok_or("lab stderr")?;
        let err_reader = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("vm: {line}");
                all += &line;
                all.push('\n');
            }
            all
        });
        // Streams the guest's output as it comes (seen with --nocapture); a watchdog kills the
        // lab's process group if it outlives its own timeout.
        let done = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            thread::spawn(move || {
                let deadline = started + RUN_TIMEOUT + Duration::from_secs(60);
                while Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(500));
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                }
                // SAFETY: the lab's own process group (created above), nothing else.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            })
        };
        let mut console = String::new();
        let mut first_step: Option<Duration> = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if first_step.is_none() && line.contains(&format!("@@VMLAB {nonce} STEP")) {
                first_step = Some(started.elapsed());
            }
            eprintln!("vm: {line}");
            console += &line;
            console.push('\n');
        }
        let status = child.wait().map_err(|e| format!("wait for the lab: {e}"))?;
        done.store(true, Ordering::SeqCst);
        // Whatever of the lab's group outlived it (nothing, normally).
        // SAFETY: the lab's own process group, nothing else.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let lab_err = err_reader.join().unwrap_or_default();
        let _ = watchdog.join();
        let _ = fs::remove_file(&script_path);
        let steps = parse_steps(&nonce, &console);
        eprintln!(
            "vm: lab finished in {:.1}s (boot to the first step {:.1}s), {status}",
            started.elapsed().as_secs_f64(),
            first_step.unwrap_or_default().as_secs_f64()
        );
        for s in &steps {
            eprintln!(
                "vm:   {:<22} {:>7.1}s  {}",
                s.name,
                s.millis as f64 / 1000.0,
                match s.status {
                    Some(0) => "ok".to_string(),
                    Some(n) => format!("exit {n}"),
                    None => "did not finish".to_string(),
                }
            );
        }
        // The lab's own failures (exit 124 timeout, 125 lab broken) before any step ran.
        if steps.is_empty() {
            return Err(format!(
                "the lab ran no step ({status}): {}",
                lab_err.trim()
            ));
        }
        if matches!(status.code(), Some(124) | Some(125)) || status.code().is_none() {
            let last = steps.last().map(|s| s.name.as_str()).unwrap_or("");
            return Err(format!(
                "the lab stopped ({status}) during step {last}: {}",
                lab_err.trim()
            ));
        }
        Ok(steps)
    })();
    GuestRun { steps }
}

/// The shared run, booting it on first use; None when this test should not run here.
fn run() -> Option<&'static GuestRun> {
    if !is_root() {
        eprintln!("skipped: needs root");
        return None;
    }
    if in_guest() {
        eprintln!("skipped: already inside the VM lab");
        return None;
    }
    Some(RUN.get_or_init(boot_and_run))
}

/// The step `name` of the shared run; panics with the lab's error if it did not run.
fn step(run: &GuestRun, name: &str) -> Step {
    let steps = match &run.steps {
        Ok(s) => s,
        Err(e) => panic!("VM lab: {e}"),
    };
    steps
        .iter()
        .find(|s| s.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("the guest did not reach step {name}"))
}

/// Names of failed tests in libtest output (`test <name> ... FAILED`).
fn failed_tests(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("test "))
        .filter_map(|l| l.strip_suffix(" ... FAILED"))
        .map(String::from)
        .collect()
}

/// The libtest summary line (`test result: ...`).
fn summary(output: &str) -> String {
    output
        .lines()
        .rfind(|l| l.starts_with("test result:"))
        .unwrap_or("no test result line")
        .to_string()
}

/// Asserts that suite step `name` passed in the guest, naming the failed tests if not.
fn assert_suite_passed(name: &str) {
    let Some(run) = run() else { return };
    let s = step(run, name);
    assert!(
        s.status == Some(0),
        "{name} on Debian's 6.1 kernel: {} (exit {:?}); failed: [{}]\n--- guest output ---\n{}",
        summary(&s.output),
        s.status,
        failed_tests(&s.output).join(", "),
        s.output
    );
    assert!(
        summary(&s.output).contains(" 0 failed"),
        "{name}: {}",
        summary(&s.output)
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn guest_runs_debians_6_1_kernel() {
    let Some(run) = run() else { return };
    let s = step(run, "kernel");
    assert_eq!(s.status, Some(0), "{}", s.output);
    let v = s.output.trim();
    assert!(
        v.starts_with("6.1."),
        "guest kernel {v:?}, want Debian's 6.1"
    );
    assert_ne!(
        v,
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        "the guest must not run this machine's kernel"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn links_only_the_guest_has_work_vlan_dummy_ipvlan() {
    assert_suite_passed("vm");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn host_and_none_suite_passes_on_6_1() {
    assert_suite_passed("host_none");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn recovery_suite_passes_on_6_1() {
    assert_suite_passed("recovery");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn bridge_suite_passes_on_6_1() {
    assert_suite_passed("bridge");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn bridge_suite_passes_on_6_1_with_br_netfilter() {
    assert_suite_passed("bridge_br_netfilter");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn conntrack_suite_passes_on_6_1() {
    assert_suite_passed("conntrack");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn awsvpc_suite_passes_on_6_1() {
    assert_suite_passed("awsvpc");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn branch_eni_suite_passes_on_6_1() {
    assert_suite_passed("branch");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn branch_enis_are_refused_clearly_on_6_1_without_8021q() {
    assert_suite_passed("branch_without_8021q");
    let Some(run) = run() else { return };
    let s = step(run, "branch_without_8021q");
    assert!(
        summary(&s.output).contains(" 1 passed"),
        "the test did not run: {}",
        summary(&s.output)
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn runc_end_to_end_suite_passes_on_6_1() {
    assert_suite_passed("runc_e2e");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn the_runtime_matrix_passes_under_runc_on_6_1() {
    assert_suite_passed("runtimes_e2e_runc");
    let Some(run) = run() else { return };
    let s = step(run, "runtimes_e2e_runc");
    assert!(
        summary(&s.output).contains(" 5 passed"),
        "the runc cases (and the hook-file check) did not all run: {}",
        summary(&s.output)
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn extra_suites_pass_on_6_1() {
    for t in extra_targets() {
        assert_suite_passed(&format!("extra_{t}"));
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn guest_is_left_clean_after_the_suites() {
    let Some(run) = run() else { return };
    let s = step(run, "leftovers");
    assert_eq!(
        s.status,
        Some(0),
        "after the suites in the guest:\n{}",
        s.output
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn guest_kernel_logs_no_warning_or_bug() {
    let Some(run) = run() else { return };
    let s = step(run, "dmesg");
    assert_eq!(s.status, Some(0), "dmesg: {}", s.output);
    let splats: Vec<&str> = s
        .output
        .lines()
        .filter(|l| {
            [
                "WARNING:",
                "BUG:",
                "Oops",
                "general protection",
                "Call Trace",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect();
    assert!(
        splats.is_empty(),
        "the 6.1 kernel warned during the suites:\n{}",
        s.output
    );
}

#[test]
fn console_markers_and_failed_tests_are_parsed() {
    let console = "boot noise\n\
        @@VMLAB n1 STEP bridge BEGIN@@\n\
        test a ... ok\n\
        test b::c ... FAILED\n\
        test result: FAILED. 1 passed; 1 failed; 0 ignored\n\
        @@VMLAB n1 STEP bridge END 101 2300ms@@\n\
        @@VMLAB other STEP fake END 0 1ms@@\n\
        @@VMLAB n1 STEP awsvpc BEGIN@@\n\
        test d ... ok\n";
    let steps = parse_steps("n1", console);
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(
        (steps[0].name.as_str(), steps[0].status, steps[0].millis),
        ("bridge", Some(101), 2300)
    );
    assert_eq!(failed_tests(&steps[0].output), vec!["b::c".to_string()]);
    assert!(summary(&steps[0].output).contains("1 failed"));
    // The guest stopped during awsvpc: no status.
    assert_eq!((steps[1].name.as_str(), steps[1].status), ("awsvpc", None));
}

// ---------------------------------------------------------------------------------------------
// Tests that run only inside the guest (ignored here; SUITES runs them with --ignored there).

/// Two namespaces joined by a veth "trunk" and a third behind an ipvlan: runs `f` with their
/// names and deletes them after, also on failure.
struct Trunk {
    a: String,
    b: String,
    c: String,
}

impl Trunk {
    fn new() -> Trunk {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = format!(
            "nsv{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let t = Trunk {
            a: format!("{p}a"),
            b: format!("{p}b"),
            c: format!("{p}c"),
        };
        for ns in [&t.a, &t.b, &t.c] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &t.a, "link", "add", "trunk", "type", "veth", "peer", "name", "trunk", "netns",
            &t.b,
        ]);
        ip(&["-n", &t.a, "link", "set", "trunk", "up"]);
        ip(&["-n", &t.b, "link", "set", "trunk", "up"]);
        t
    }
}

impl Drop for Trunk {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.c] {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn modprobe(m: &str) {
    let out = Command::new("/usr/sbin/modprobe")
        .arg(m)
        .output()
        .unwrap_or_else(|e| panic!("spawn modprobe {m}: {e}"));
    assert!(
        out.status.success(),
        "modprobe {m}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn vlans_on_a_trunk_carry_only_their_own_tag() {
    modprobe("8021q");
    let t = Trunk::new();
    // VLAN 5 on both ends: the same tag, traffic flows.
    for (ns, addr) in [(&t.a, "10.55.5.1/24"), (&t.b, "10.55.5.2/24")] {
        ip(&[
            "-n", ns, "link", "add", "link", "trunk", "name", "trunk.5", "type", "vlan", "id", "5",
        ]);
        ip(&["-n", ns, "addr", "add", addr, "dev", "trunk.5"]);
        ip(&["-n", ns, "link", "set", "trunk.5", "up"]);
    }
    let d = ip(&["-d", "-n", &t.a, "link", "show", "trunk.5"]);
    assert!(d.contains("vlan protocol 802.1Q id 5"), "{d}");
    // One subnet, different tags on the two ends (6 in a, 7 in b): nothing gets through.
    for (ns, id, addr) in [(&t.a, "6", "10.55.6.1/24"), (&t.b, "7", "10.55.6.2/24")] {
        let name = format!("trunk.{id}");
        ip(&[
            "-n", ns, "link", "add", "link", "trunk", "name", &name, "type", "vlan", "id", id,
        ]);
        ip(&["-n", ns, "addr", "add", addr, "dev", &name]);
        ip(&["-n", ns, "link", "set", &name, "up"]);
    }
    tcp_server(&t.b, 8080, "vlan 5");
    tcp_server(&t.b, 8081, "vlan 7");
    assert_eq!(
        tcp_get(&t.a, "10.55.5.2".parse().unwrap(), 8080, PATIENT).unwrap(),
        "vlan 5"
    );
    assert!(
        tcp_get(&t.a, "10.55.6.2".parse().unwrap(), 8081, SHORT).is_err(),
        "a frame tagged 6 reached VLAN 7"
    );
    // A second VLAN with the same id on one trunk is refused by the kernel.
    let dup = Command::new("/usr/sbin/ip")
        .args([
            "-n", &t.a, "link", "add", "link", "trunk", "name", "again5", "type", "vlan", "id", "5",
        ])
        .output()
        .unwrap();
    assert!(!dup.status.success(), "a second VLAN 5 on one trunk");
}

#[test]
#[ignore = "needs dummy and ipvlan links: runs in the VM lab"]
fn dummy_and_ipvlan_links_carry_traffic() {
    modprobe("dummy");
    modprobe("ipvlan");
    let t = Trunk::new();
    // A dummy link's address is local: a server on it answers inside its namespace.
    ip(&["-n", &t.a, "link", "add", "dum0", "type", "dummy"]);
    ip(&["-n", &t.a, "addr", "add", "10.56.0.1/32", "dev", "dum0"]);
    ip(&["-n", &t.a, "link", "set", "dum0", "up"]);
    tcp_server(&t.a, 8082, "dummy");
    assert_eq!(
        tcp_get(&t.a, "10.56.0.1".parse().unwrap(), 8082, PATIENT).unwrap(),
        "dummy"
    );
    // An ipvlan (l2) on a's trunk end, moved into c: c reaches b through a's link.
    ip(&["-n", &t.a, "addr", "add", "10.57.0.1/24", "dev", "trunk"]);
    ip(&["-n", &t.b, "addr", "add", "10.57.0.2/24", "dev", "trunk"]);
    ip(&[
        "-n", &t.a, "link", "add", "link", "trunk", "name", "ipv0", "type", "ipvlan", "mode", "l2",
    ]);
    ip(&["-n", &t.a, "link", "set", "ipv0", "netns", &t.c]);
    ip(&["-n", &t.c, "addr", "add", "10.57.0.3/24", "dev", "ipv0"]);
    ip(&["-n", &t.c, "link", "set", "ipv0", "up"]);
    let d = ip(&["-d", "-n", &t.c, "link", "show", "ipv0"]);
    assert!(d.contains("ipvlan") && d.contains("mode l2"), "{d}");
    tcp_server(&t.b, 8083, "through ipvlan");
    assert_eq!(
        tcp_get(&t.c, "10.57.0.2".parse().unwrap(), 8083, PATIENT).unwrap(),
        "through ipvlan"
    );
}

/// Loaded kernel modules (the first column of /proc/modules).
fn loaded_modules() -> Vec<String> {
    fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect()
}

/// What a bridge-mode setup with a port mapping needs from a modular kernel (Debian's builds
/// all of it as modules; this machine's kernel has it built in).
const BRIDGE_MODULES: [&str; 8] = [
    "bridge",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nf_nat",
    "nf_conntrack",
    "nft_fib_ipv4",
    "nft_ct",
];

#[test]
#[ignore = "needs a fresh modular kernel: runs in the VM lab"]
fn first_setup_after_boot_loads_the_modules_it_needs_on_demand() {
    let before = loaded_modules();
    for m in ["bridge", "nf_tables"] {
        assert!(
            !before.iter().any(|b| b == m),
            "{m} is loaded already: this test must run first in a freshly booted guest"
        );
    }
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    let started = Instant::now();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "first setup");
    eprintln!(
        "first bridge setup on a fresh kernel: {:.1}s (modules loaded on demand)",
        started.elapsed().as_secs_f64()
    );
    tcp_server(&rig.containers[a].ns, 80, "first");
    let port = rig.host_port(a, 80, "tcp");
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, port, PATIENT).unwrap(),
        "first"
    );
    let after = loaded_modules();
    let missing: Vec<&str> = BRIDGE_MODULES
        .iter()
        .copied()
        .filter(|m| !after.iter().any(|a| a == m))
        .collect();
    assert!(missing.is_empty(), "not loaded after a setup: {missing:?}");
    let loaded: Vec<&String> = after.iter().filter(|m| !before.contains(m)).collect();
    eprintln!("loaded since the test began (parallel tests in the guest included): {loaded:?}");
    must_succeed(&rig.poststop(a), "poststop");
}
