//! A real etcd (Debian's etcd-server, 3.4) for the cluster tests: one member on the loopback
//! of a namespace the test made, on free ports, its data dir in the test's temp dir; stopped
//! (and restartable on the same ports and data) by the test, killed on drop. The test talks to
//! it over its JSON gateway from a thread inside that namespace.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::in_ns;
use super::lb::{Proc, free_port};

pub const ETCD: &str = "/usr/bin/etcd";

pub struct Etcd {
    pub ns: String,
    pub client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log_dir: PathBuf,
    starts: u32,
    proc: Option<Proc>,
}

impl Etcd {
    /// Starts a member in netns `ns`, data under `dir/etcd`; waits until it answers.
    pub fn start(ns: &str, dir: &Path) -> Etcd {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} missing: scripts/deps.sh installs etcd-server"
        );
        let mut e = Etcd {
            ns: ns.to_string(),
            client_port: free_port(ns),
            peer_port: free_port(ns),
            data: dir.join("etcd"),
            log_dir: dir.to_path_buf(),
            starts: 0,
            proc: None,
        };
        e.restart();
        e
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts the member again (same ports, same data) after [`Etcd::stop`].
    pub fn restart(&mut self) {
        self.starts += 1;
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = super::command_in(&self.ns, ETCD);
        cmd.args(["--name", "t"])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let log = self.log_dir.join(format!("etcd.{}.log", self.starts));
        self.proc = Some(Proc::spawn("etcd", &mut cmd, &log));
        let up = super::lab::wait_for(Duration::from_secs(15), || {
            self.try_post("/v3/kv/range", json!({"key": B64.encode("x")}))
                .is_ok()
        });
        assert!(up, "etcd did not answer on {client} within 15 s");
    }

    /// SIGKILL (a crash, or the machine gone); [`Etcd::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn try_post(&self, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.url());
        in_ns(&self.ns, move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(3)))
                .http_status_as_error(false)
                .build()
                .into();
            let mut r = agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.to_string())
                .map_err(|e| e.to_string())?;
            let text = r
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
            if v.get("error").is_some() {
                return Err(v.to_string());
            }
            Ok(v)
        })
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        self.try_post(path, body)
            .unwrap_or_else(|e| panic!("etcd {path}: {e}"))
    }

    /// Every key under `prefix`: (key, value as JSON, lease).
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, Value, i64)> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(l) = end.last_mut() {
            *l += 1;
        }
        let v = self.post(
            "/v3/kv/range",
            json!({"key": B64.encode(prefix), "range_end": B64.encode(end)}),
        );
        v["kvs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|kv| {
                let key = String::from_utf8(B64.decode(kv["key"].as_str().unwrap_or("")).unwrap())
                    .unwrap();
                let raw = B64.decode(kv["value"].as_str().unwrap_or("")).unwrap();
                let value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                (key, value, int(&kv["lease"]))
            })
            .collect()
    }

    /// A lease's remaining and granted TTL, `None` once it is gone.
    pub fn lease_ttl(&self, lease: i64) -> Option<(i64, i64)> {
        let v = self.post("/v3/lease/timetolive", json!({"ID": lease.to_string()}));
        let ttl = int(&v["TTL"]);
        (ttl >= 0).then(|| (ttl, int(&v["grantedTTL"])))
    }

    /// A lease of `ttl` seconds the test keeps (or not) itself.
    pub fn grant(&self, ttl: i64) -> i64 {
        int(&self.post("/v3/lease/grant", json!({ "TTL": ttl }))["ID"])
    }

    pub fn revoke(&self, lease: i64) {
        self.post("/v3/lease/revoke", json!({"ID": lease.to_string()}));
    }

    pub fn put(&self, key: &str, value: &str, lease: i64) {
        self.post(
            "/v3/kv/put",
            json!({"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()}),
        );
    }

    /// How long until `f` holds, polling every 20 ms, up to `limit`.
    pub fn until(&self, limit: Duration, mut f: impl FnMut(&Etcd) -> bool) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if f(self) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
