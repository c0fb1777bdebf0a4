//! A small etcd v3 client over etcd's JSON gateway (HTTP/1.1 POSTs of JSON, keys and values
//! in base64, 64-bit integers as strings), which etcd 3.4 serves on its client port: range,
//! txn, lease grant/revoke/keepalive/timetolive and the watch stream (one JSON object per
//! line). Every call has a connect and a total timeout and every answer a size bound; the
//! watch stream bounds each line and ends after a while, so a caller re-watches from the
//! revision it reached.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// How long a connect may take.
const CONNECT: Duration = Duration::from_secs(1);
/// How long one ordinary call may take, answer included.
const CALL: Duration = Duration::from_secs(3);
/// The largest answer of an ordinary call (a range page is at most [`PAGE`] keys).
const MAX_ANSWER: u64 = 32 * 1024 * 1024;
/// Keys per range page.
const PAGE: usize = 1000;
/// The largest line of the watch stream (one batch of events).
const MAX_LINE: u64 = 32 * 1024 * 1024;
/// A watch stream is closed and reopened after this long (so a silent half-open connection
/// is found out).
pub const WATCH_SPAN: Duration = Duration::from_secs(30);

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No answer: connection refused, timed out, cut.
    #[error("etcd {0}: unreachable: {1}")]
    Unreachable(String, String),
    /// The lease named in the request does not exist (expired or revoked).
    #[error("etcd: the lease is gone")]
    LeaseGone,
    /// The watch's start revision was compacted away.
    #[error("etcd: revision {0} is compacted")]
    Compacted(i64),
    /// etcd answered with an error, or with something that is not its JSON.
    #[error("etcd {0}: {1}")]
    Answer(String, String),
}

pub type Result<T> = std::result::Result<T, EtcdError>;

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
    pub mod_revision: i64,
}

/// One change the watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete(String),
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete(String),
}

/// An etcd cluster's client URLs (`http://host:port`, one or several): a call goes to the
/// member that answered last and moves on to the next when one is unreachable.
#[derive(Clone)]
pub struct Client {
    members: Vec<String>,
    current: Arc<AtomicUsize>,
    /// All the members, comma-separated, for messages.
    base: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

/// etcd's 64-bit integers arrive as strings (absent when zero).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv(v: &Value) -> Kv {
    Kv {
        key: String::from_utf8_lossy(&unb64(&v["key"])).into_owned(),
        value: unb64(&v["value"]),
        lease: int(&v["lease"]),
        mod_revision: int(&v["mod_revision"]),
    }
}

fn agent(total: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(total)
        .timeout_connect(Some(CONNECT))
        .timeout_recv_response(Some(CALL))
        .http_status_as_error(false)
        .max_redirects(0)
        .max_response_header_size(16 * 1024)
        .build()
        .into()
}

impl Client {
    /// `urls` is `http://host:port`, or several of them comma-separated (the members of one
    /// cluster). No TLS: a loopback member or proxy, or a private network.
    pub fn new(urls: &str) -> anyhow::Result<Client> {
        let mut members = Vec::new();
        for url in urls.split(',') {
            let u = url.trim().trim_end_matches('/');
            let rest = u.strip_prefix("http://").unwrap_or("");
            if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
                anyhow::bail!(
                    "etcd URL {url:?}: use http://HOST:PORT (e.g. http://127.0.0.1:2379), several comma-separated"
                );
            }
            members.push(u.to_string());
        }
        if members.len() > 16 {
            anyhow::bail!("etcd URLs: {} members named, at most 16", members.len());
        }
        Ok(Client {
            base: members.join(","),
            members,
            current: Arc::new(AtomicUsize::new(0)),
            agent: agent(Some(CALL)),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> EtcdError {
        EtcdError::Unreachable(self.base.clone(), e.to_string())
    }

    /// The member calls go to now.
    fn member(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        &self.members[i]
    }

    /// One POST to the current member, then to each other one while they are unreachable;
    /// the answer's JSON.
    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..self.members.len() {
            let i = (start + k) % self.members.len();
            match self.post_to(&self.members[i], path, body) {
                Err(e @ EtcdError::Unreachable(..)) => last = Some(e),
                r => {
                    self.current.store(i, Ordering::Relaxed);
                    return r;
                }
            }
        }
        Err(last.unwrap_or_else(|| self.unreachable("no member")))
    }

    fn post_to(&self, member: &str, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{member}{path}");
        let mut resp = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| unreachable_at(member, e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| unreachable_at(member, format!("reading the answer to {path}: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            EtcdError::Answer(
                member.to_string(),
                format!("{path}: HTTP {status}, not etcd's JSON: {}", excerpt(&text)),
            )
        })?;
        if let Some(err) = v.get("error") {
            let msg = v["message"].as_str().or(err.as_str()).unwrap_or("error");
            if msg.contains("lease not found") {
                return Err(EtcdError::LeaseGone);
            }
            // 14 (unavailable) and 4 (deadline exceeded): the member has no leader yet.
            if matches!(v["code"].as_i64(), Some(14 | 4)) {
                return Err(unreachable_at(member, format!("{path}: {msg}")));
            }
            return Err(EtcdError::Answer(
                member.to_string(),
                format!("{path}: {msg}"),
            ));
        }
        if status != 200 {
            return Err(EtcdError::Answer(
                member.to_string(),
                format!("{path}: HTTP {status}: {}", excerpt(&text)),
            ));
        }
        Ok(v)
    }

    /// A new lease of `ttl` seconds; its id.
    pub fn grant(&self, ttl: u64) -> Result<i64> {
        let v = self.post("/v3/lease/grant", &json!({ "TTL": ttl }))?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Answer(
                self.base.clone(),
                format!("lease grant: no ID in {}", excerpt(&v.to_string())),
            )),
            id => Ok(id),
        }
    }

    /// Revokes a lease (its keys go with it); a lease already gone is no error.
    pub fn revoke(&self, id: i64) -> Result<()> {
        match self.post("/v3/lease/revoke", &json!({ "ID": id.to_string() })) {
            Ok(_) | Err(EtcdError::LeaseGone) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Renews a lease; its TTL, or [`EtcdError::LeaseGone`].
    pub fn keepalive(&self, id: i64) -> Result<i64> {
        let v = self.post("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        match int(&v["result"]["TTL"]) {
            t if t > 0 => Ok(t),
            _ => Err(EtcdError::LeaseGone),
        }
    }

    /// The keys attached to a lease and its remaining TTL, or [`EtcdError::LeaseGone`].
    pub fn lease_keys(&self, id: i64) -> Result<(i64, Vec<String>)> {
        let v = self.post(
            "/v3/lease/timetolive",
            &json!({ "ID": id.to_string(), "keys": true }),
        )?;
        let ttl = int(&v["TTL"]);
        if ttl <= 0 {
            return Err(EtcdError::LeaseGone);
        }
        let keys = v["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|k| String::from_utf8_lossy(&unb64(k)).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Ok((ttl, keys))
    }

    /// Every key under `prefix` at one revision (read in pages); that revision and the keys.
    pub fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>)> {
        let end = b64(&prefix_end(prefix));
        let mut from = prefix.as_bytes().to_vec();
        let mut rev = 0;
        let mut out = Vec::new();
        loop {
            let mut req = json!({
                "key": b64(&from),
                "range_end": end,
                "limit": PAGE,
            });
            if rev != 0 {
                req["revision"] = json!(rev.to_string());
            }
            let v = self.post("/v3/kv/range", &req)?;
            if rev == 0 {
                rev = int(&v["header"]["revision"]);
            }
            let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
            let more = v["more"].as_bool().unwrap_or(false);
            let Some(last) = kvs.last() else { break };
            from = unb64(&last["key"]);
            from.push(0);
            out.extend(kvs.iter().map(kv));
            if !more {
                break;
            }
        }
        Ok((rev, out))
    }

    /// One transaction of `ops` (no conditions); the revision it made.
    pub fn txn(&self, ops: &[Op]) -> Result<i64> {
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let mut p =
                        json!({ "key": b64(key.as_bytes()), "value": b64(value.as_bytes()) });
                    if *lease != 0 {
                        p["lease"] = json!(lease.to_string());
                    }
                    json!({ "request_put": p })
                }
                Op::Delete(key) => {
                    json!({ "request_delete_range": { "key": b64(key.as_bytes()) } })
                }
            })
            .collect();
        let v = self.post("/v3/kv/txn", &json!({ "success": success }))?;
        Ok(int(&v["header"]["revision"]))
    }

    /// Opens a watch on every key under `prefix` from revision `from` (inclusive). The stream
    /// ends by itself after [`WATCH_SPAN`].
    pub fn watch(&self, prefix: &str, from: i64) -> Result<Watch> {
        let url = format!("{}/v3/watch", self.member());
        let body = json!({ "create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let streaming: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT))
            .timeout_recv_response(Some(CALL))
            .timeout_recv_body(Some(WATCH_SPAN))
            .http_status_as_error(false)
            .max_redirects(0)
            .max_response_header_size(16 * 1024)
            .build()
            .into();
        let resp = streaming
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| unreachable_at(self.member(), e))?;
        if resp.status().as_u16() != 200 {
            return Err(EtcdError::Answer(
                self.member().to_string(),
                format!("/v3/watch: HTTP {}", resp.status().as_u16()),
            ));
        }
        let reader: Box<dyn Read + Send> = Box::new(resp.into_body().into_reader());
        Ok(Watch {
            opened: std::time::Instant::now(),
            base: self.member().to_string(),
            lines: BufReader::new(reader),
        })
    }
}

/// An open watch stream.
pub struct Watch {
    base: String,
    opened: std::time::Instant,
    lines: BufReader<Box<dyn Read + Send>>,
}

impl Watch {
    /// The next batch of events and the revision they bring the reader to. `Ok(None)`: the
    /// stream ended (reopen it from the last revision + 1).
    pub fn next(&mut self) -> Result<Option<(i64, Vec<Event>)>> {
        loop {
            let mut line = Vec::new();
            let n = match (&mut self.lines)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
            {
                Ok(n) => n,
                // The stream's span is over (ureq's body timeout): the caller watches on.
                Err(_) if self.opened.elapsed() + Duration::from_secs(1) >= WATCH_SPAN => {
                    return Ok(None);
                }
                Err(e) => {
                    return Err(EtcdError::Unreachable(
                        self.base.clone(),
                        format!("watch: {e}"),
                    ));
                }
            };
            if n == 0 {
                return Ok(None);
            }
            if line.last() != Some(&b'\n') && n as u64 >= MAX_LINE {
                return Err(EtcdError::Answer(
                    self.base.clone(),
                    format!("watch: a line over {MAX_LINE} bytes"),
                ));
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&text).map_err(|_| {
                EtcdError::Answer(
                    self.base.clone(),
                    format!("watch: not etcd's JSON: {}", excerpt(&text)),
                )
            })?;
            if v.get("error").is_some() {
                return Err(EtcdError::Unreachable(
                    self.base.clone(),
                    format!("watch: {}", excerpt(&v.to_string())),
                ));
            }
            let r = &v["result"];
            let compacted = int(&r["compact_revision"]);
            if compacted != 0 {
                return Err(EtcdError::Compacted(compacted));
            }
            if r["canceled"].as_bool() == Some(true) {
                return Err(EtcdError::Answer(
                    self.base.clone(),
                    format!("watch canceled: {}", excerpt(&r.to_string())),
                ));
            }
            let rev = int(&r["header"]["revision"]);
            let events: Vec<Event> = r["events"]
                .as_array()
                .map(|evs| {
                    evs.iter()
                        .map(|e| {
                            let k = kv(&e["kv"]);
                            if e["type"].as_str() == Some("DELETE") {
                                Event::Delete(k.key)
                            } else {
                                Event::Put(k)
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Ok(Some((rev, events)));
        }
    }
}

fn unreachable_at(member: &str, e: impl std::fmt::Display) -> EtcdError {
    EtcdError::Unreachable(member.to_string(), e.to_string())
}

/// A short, one-line excerpt of an answer for an error message.
fn excerpt(s: &str) -> String {
    let one: String = s.chars().take(160).collect();
    crate::output::escape_controls(one.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn urls_must_be_plain_http_host_and_port() {
        assert!(Client::new("http://127.0.0.1:2379").is_ok());
        assert!(Client::new("http://127.0.0.1:2379/").is_ok());
        let c = Client::new("http://10.0.0.1:2379, http://10.0.0.2:2379,http://10.0.0.3:2379");
        assert_eq!(
            c.map(|c| c.members.len()).ok(),
            Some(3),
            "three members, spaces allowed"
        );
        for bad in [
            "127.0.0.1:2379",
            "https://x:1",
            "http://x",
            "http://x:1/v3",
            "",
            "http://a:1,",
        ] {
            let e = Client::new(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("use http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn integers_arrive_as_strings_and_zero_is_absent() {
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
    }

    #[test]
    fn an_unreachable_member_is_reported_within_the_connect_timeout() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let c = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let t = std::time::Instant::now();
        let e = c.grant(5).err();
        assert!(matches!(e, Some(EtcdError::Unreachable(..))), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
