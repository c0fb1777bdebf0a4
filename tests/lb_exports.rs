//! The load-balancer exports of `shim ports list --format`, each fed to its real consumer:
//! `haproxy -c` (with the shipped `lb/haproxy.cfg` too), `nginx -t` (with the shipped
//! `lb/nginx.conf` example), a real Prometheus (in a network namespace of its own with only
//! loopback, so it can reach none of the listed addresses) listing the file-sd targets through
//! its HTTP API, and botocore's validation of `elbv2 register-targets` input. The ledger is a
//! hand-written state file with every mode, a draining replica, a UDP port, a container
//! without a service and one whose service name tries to inject into the formats.

#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::lb::{PrivateNs, Proc, free_port, haproxy_config, nginx_config, nginx_test};
use common::{SHIM, in_ns};

/// The service name a hostile annotation could carry.
const EVIL: &str = "x;\nset server web/slot1 addr 6.6.6.6\n}\nupstream evil {";

struct Ledger {
    dir: PathBuf,
}

impl Ledger {
    fn new(tag: &str) -> Ledger {
        let dir = std::env::temp_dir().join(format!("nslbx{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("state")).expect("temp dir");
        let c = |id: &str, mode: &str, svc: Option<&str>, ip: Option<&str>, ports: Value| {
            let mut r = json!({"id": id, "mode": mode, "created": 1, "ports": ports});
            if let Some(s) = svc {
                r["service"] = json!(s);
            }
            if let Some(ip) = ip {
                r["ip"] = json!(ip);
            }
            r
        };
        let p = |proto: &str, cp: u16, hp: u16| json!({"protocol": proto, "containerPort": cp, "hostPort": hp, "dynamic": hp >= 49153});
        let mut named = p("tcp", 9100, 49154);
        named["name"] = json!("metrics");
        let mut draining = c(
            "web-b",
            "bridge",
            Some("web"),
            Some("10.213.0.3"),
            json!([p("tcp", 80, 49155)]),
        );
        draining["lb"] = json!("draining");
        let mut task = c(
            "api-1",
            "awsvpc",
            Some("api"),
            Some("10.0.1.23"),
            json!([p("tcp", 443, 443)]),
        );
        task["eni"] =
            json!({"mac": "02:00:00:00:01:23", "name": "eth1", "attachment": "exclusive"});
        let containers = [
            c(
                "web-a",
                "bridge",
                Some("web"),
                Some("10.213.0.2"),
                json!([p("tcp", 80, 49153), named]),
            ),
            draining,
            c(
                "web-h",
                "host",
                Some("web"),
                None,
                json!([p("tcp", 8080, 8080)]),
            ),
            task,
            c(
                "dns-1",
                "bridge",
                Some("dns"),
                Some("10.213.0.4"),
                json!([p("udp", 53, 5353)]),
            ),
            c(
                "loose",
                "bridge",
                None,
                Some("10.213.0.5"),
                json!([p("tcp", 80, 49156)]),
            ),
            c(
                "c-bad",
                "bridge",
                Some(EVIL),
                Some("10.213.0.6"),
                json!([p("tcp", 80, 49157)]),
            ),
        ];
        let mut map = serde_json::Map::new();
        for r in containers {
            map.insert(r["id"].as_str().expect("id").to_string(), r);
        }
        let state = json!({"version": 1, "revision": 3, "containers": map});
        fs::write(dir.join("state/state.json"), state.to_string()).expect("write state");
        fs::write(
            dir.join("config.toml"),
            "[ports]\nhost_address = \"192.0.2.2\"\n[lb]\ninstance_id = \"i-0test\"\n",
        )
        .expect("write config");
        Ledger { dir }
    }

    fn shim(&self, args: &[&str]) -> Output {
        Command::new(SHIM)
            .args(args)
            .env("NETSHIM_STATE_DIR", self.dir.join("state"))
            .env("NETSHIM_CONFIG", self.dir.join("config.toml"))
            .output()
            .expect("run shim")
    }

    /// `ports list` with `args`, which must succeed; its stdout.
    fn list(&self, args: &[&str]) -> String {
        let mut a = vec!["ports", "list"];
        a.extend_from_slice(args);
        let out = self.shim(&a);
        assert!(
            out.status.success(),
            "shim {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.list(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn assert_no_injection(text: &str) {
    for bad in ["6.6.6.6", "upstream evil", "x;", "set server"] {
        assert!(!text.contains(bad), "{bad:?} reached the output:\n{text}");
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn json_gains_state_and_filters_select() {
    let l = Ledger::new("json");
    let all = l.json(&["--json"]);
    assert_eq!(
        all,
        l.json(&["--format", "json"]),
        "--json is --format json"
    );
    let rows = all.as_array().expect("array");
    assert_eq!(rows.len(), 8, "{all:#}");
    for r in rows {
        let want = if r["containerId"] == "web-b" {
            "draining"
        } else {
            "serving"
        };
        assert_eq!(r["state"], want, "{r}");
    }
    // The unsafe service name is not shown; the container is.
    let evil = rows
        .iter()
        .find(|r| r["containerId"] == "c-bad")
        .expect("c-bad row");
    assert_eq!(evil["service"], Value::Null);
    assert_no_injection(&all.to_string());
    let draining = l.json(&["--format", "json", "--state", "draining"]);
    assert_eq!(draining.as_array().map(Vec::len), Some(1));
    let udp = l.json(&["--json", "--protocol", "udp"]);
    assert_eq!(udp[0]["containerId"], "dns-1");
    assert_eq!(udp.as_array().map(Vec::len), Some(1));
    let table = l.list(&[]);
    assert!(
        table.lines().next().unwrap_or("").ends_with("STATE"),
        "{table}"
    );
    assert!(table.contains("draining"), "{table}");
    assert_no_injection(&table);
    // --json and --format together are refused.
    assert!(
        !l.shim(&["ports", "list", "--json", "--format", "nginx"])
            .status
            .success()
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn elbv2_lists_serving_targets_and_draining_on_request() {
    let l = Ledger::new("elbv2");
    let v = l.json(&["--format", "elbv2", "--service", "web"]);
    assert_eq!(
        v,
        json!([{"Id": "i-0test", "Port": 49153}, {"Id": "i-0test", "Port": 49154}, {"Id": "i-0test", "Port": 8080}])
    );
    let d = l.json(&["--format", "elbv2", "--state", "draining"]);
    assert_eq!(d, json!([{"Id": "i-0test", "Port": 49155}]));
    let a = l.json(&["--format", "elbv2", "--service", "api"]);
    assert_eq!(a, json!([{"Id": "10.0.1.23", "Port": 443}]));
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn elbv2_export_passes_botocore_validation_of_register_targets() {
    let l = Ledger::new("boto");
    let file = l.path("targets.json");
    fs::write(&file, l.list(&["--format", "elbv2"])).expect("write export");
    // botocore validates `aws elbv2 register-targets` input against the service model, with
    // no request sent.
    let script = r#"
import json, sys
import botocore.session, botocore.validate
m = botocore.session.get_session().get_service_model("elbv2")
shape = m.operation_model("RegisterTargets").input_shape
targets = json.load(open(sys.argv[1]))
botocore.validate.validate_parameters({"TargetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef", "Targets": targets}, shape)
bad = [{"Id": 1, "Port": "x"}]
try:
    botocore.validate.validate_parameters({"TargetGroupArn": "a", "Targets": bad}, shape)
    print("control: bad targets accepted"); sys.exit(2)
except botocore.exceptions.ParamValidationError:
    pass
print(len(targets))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&file)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "botocore refuses the elbv2 export (apt-get install python3-botocore): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn slb_values_are_strings_and_draining_weighs_zero() {
    let l = Ledger::new("slb");
    let v = l.json(&["--format", "slb", "--service", "web"]);
    let rows = v.as_array().expect("array");
    assert_eq!(rows.len(), 4);
    for r in rows {
        for k in ["ServerId", "Weight", "Type", "Port", "ServerIp"] {
            assert!(r[k].is_string(), "{k} of {r} is not a string");
        }
        assert_eq!(r["Type"], "ecs");
        assert_eq!(r["ServerId"], "i-0test");
        let w = if r["Port"] == "49155" { "0" } else { "100" };
        assert_eq!(r["Weight"], w, "{r}");
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn haproxy_accepts_the_export_and_the_shipped_config() {
    let l = Ledger::new("haproxy");
    let export = l.list(&["--format", "haproxy"]);
    assert_no_injection(&export);
    assert!(
        export.contains("backend web\n") && export.contains("backend web.metrics\n"),
        "{export}"
    );
    assert!(
        export.contains("server web-b 192.0.2.2:49155 weight 0"),
        "{export}"
    );
    let cfg = format!(
        "global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\nfrontend f\n    bind 127.0.0.1:1\n    use_backend web.metrics if {{ path_beg /metrics }}\n    default_backend web\n{export}"
    );
    let f = l.path("export.cfg");
    fs::write(&f, &cfg).expect("write");
    let check = |f: &Path| {
        let out = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(f)
            .output()
            .expect("haproxy (apt-get install haproxy)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, msg) = check(&f);
    assert!(ok, "haproxy -c refuses the export: {msg}\n{cfg}");
    // Control: a broken server line is refused, so the check can fail.
    fs::write(
        &f,
        cfg.replace(
            "server web-a 192.0.2.2:49153",
            "server web-a 192.0.2.2:49153 bogus",
        ),
    )
    .expect("write");
    assert!(!check(&f).0, "haproxy -c accepted a bogus keyword");
    // The config users copy (paths localized only), with a second service's backend.
    let shipped = haproxy_config(&l.dir, "127.0.0.1:1", 10, &["web", "api"]);
    let f = l.path("shipped.cfg");
    fs::write(&f, &shipped).expect("write");
    let (ok, msg) = check(&f);
    assert!(ok, "haproxy -c refuses lb/haproxy.cfg: {msg}\n{shipped}");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn nginx_accepts_the_export_and_the_shipped_example() {
    let l = Ledger::new("nginx");
    let export = l.list(&["--format", "nginx"]);
    assert_no_injection(&export);
    assert!(export.contains("server 192.0.2.2:49155 down;"), "{export}");
    let ups = l.path("upstreams.conf");
    fs::write(&ups, &export).expect("write");
    let example =
        fs::read_to_string(common::lab::repo_file("lb/nginx.conf")).expect("lb/nginx.conf");
    let server = example.replace("listen 80;", "listen 127.0.0.1:1;")
        + "server { listen 127.0.0.1:2; location / { proxy_pass http://web.metrics; } }\n";
    let cfg = l.path("nginx.conf");
    fs::write(&cfg, nginx_config(&l.dir, &ups, &server)).expect("write");
    // `nginx -t` binds the listen addresses: in a namespace of its own.
    let ns = PrivateNs::new(&format!("nslbn{}", std::process::id()));
    if let Err(e) = nginx_test(&ns.name, &cfg) {
        panic!("nginx -t refuses the export: {e}\n{export}");
    }
    // Control: an upstream the example names but the include lacks is refused.
    fs::write(&ups, export.replace("upstream web {", "upstream other {")).expect("write");
    assert!(
        nginx_test(&ns.name, &cfg).is_err(),
        "nginx -t accepted a missing upstream"
    );
}

/// GET `path` from `127.0.0.1:port` (HTTP/1.0); the body.
fn http_body(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn prometheus_lists_the_file_sd_targets() {
    let l = Ledger::new("prom");
    let sd = l.path("netshim.json");
    fs::write(&sd, l.list(&["--format", "file-sd"])).expect("write");
    let ns = PrivateNs::new(&format!("nslbp{}", std::process::id()));
    let port = free_port(&ns.name);
    let cfg = l.path("prometheus.yml");
    fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1h\nscrape_configs:\n  - job_name: netshim\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
            sd.display()
        ),
    )
    .expect("write");
    let mut cmd = common::command_in(&ns.name, "/usr/bin/prometheus");
    cmd.arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", l.path("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let _prom = Proc::spawn("prometheus", &mut cmd, &l.path("prometheus.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = loop {
        let body = in_ns(&ns.name, move || http_body(port, "/api/v1/targets"));
        if let Ok(b) = body
            && let Ok(v) = serde_json::from_str::<Value>(&b)
            && v["data"]["activeTargets"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus listed no targets within 60 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut got: Vec<(String, String, String)> = found["data"]["activeTargets"]
        .as_array()
        .expect("activeTargets")
        .iter()
        .map(|t| {
            let l = &t["labels"];
            (
                t["discoveredLabels"]["__address__"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                l["service"].as_str().unwrap_or("-").to_string(),
                format!(
                    "{}/{}",
                    l["container_id"].as_str().unwrap_or(""),
                    l["network_mode"].as_str().unwrap_or("")
                ),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(String, String, String)> = [
        ("10.0.1.23:443", "api", "api-1/awsvpc"),
        ("192.0.2.2:49153", "web", "web-a/bridge"),
        ("192.0.2.2:49154", "web", "web-a/bridge"),
        ("192.0.2.2:49155", "web", "web-b/bridge"),
        ("192.0.2.2:49156", "-", "loose/bridge"),
        ("192.0.2.2:49157", "-", "c-bad/bridge"),
        ("192.0.2.2:8080", "web", "web-h/host"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want, "{found:#}");
    let metrics = found["data"]["activeTargets"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|t| t["discoveredLabels"]["__address__"] == "192.0.2.2:49154")
        })
        .expect("metrics target");
    assert_eq!(metrics["labels"]["port_name"], "metrics");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn the_shipped_registrar_unit_runs_and_stops_cleanly_on_sigterm() {
    let unit = fs::read_to_string(common::lab::repo_file("lb/netshim-registrar.service"))
        .expect("lb/netshim-registrar.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(
        unit.contains("KillSignal=SIGTERM") && unit.contains("Restart="),
        "{unit}"
    );
    let env = unit
        .lines()
        .find_map(|l| l.strip_prefix("Environment=NETSHIM_STATE_DIR="))
        .expect("Environment=NETSHIM_STATE_DIR=");
    assert_eq!(env, "/run/netshim");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[0], "/usr/local/bin/shim");
    assert_eq!(args[1], "registrar");
    // Its command line, against sockets that do not exist yet (HAProxy not started): the
    // registrar runs, says so, and exits 0 on SIGTERM.
    let l = Ledger::new("unit");
    let rewritten: Vec<String> = args[1..]
        .iter()
        .map(|a| a.replace("/run/haproxy/", &format!("{}/", l.dir.display())))
        .collect();
    let log = l.path("registrar.log");
    let mut cmd = Command::new(SHIM);
    cmd.args(&rewritten)
        .env("NETSHIM_STATE_DIR", l.dir.join("state"))
        .env("NETSHIM_CONFIG", l.dir.join("config.toml"));
    let mut p = Proc::spawn("registrar", &mut cmd, &log);
    let said = common::lab::wait_for(Duration::from_secs(5), || {
        p.log_text().contains("admin.sock: show info")
    });
    assert!(said, "{}", p.log_text());
    assert!(p.running(), "{}", p.log_text());
    let st = p.terminate().expect("exited on SIGTERM");
    assert!(
        st.success(),
        "exit status {st}: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}
