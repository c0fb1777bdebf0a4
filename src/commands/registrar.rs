//! `shim registrar`: a foreground process keeping HAProxy, nginx, file-sd and etcd sinks equal
//! to the ledger, or (`--from-etcd`) HAProxy, nginx and file-sd equal to the cluster view in
//! etcd (the loop is `lb::registrar`, etcd is `lb::cluster`). Logs to stderr, exits 0 on
//! SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::commands::Globals;
use crate::lb::cluster::{ClusterFeed, EtcdSink, LEASE_FILE, Publisher};
use crate::lb::etcd::Client;
use crate::lb::filesd::FileSdSink;
use crate::lb::haproxy::HaproxySink;
use crate::lb::nginx::NginxSink;
use crate::lb::registrar::{self, Ledger, Options, Sink, Source};
use crate::lb::safe_name;

/// What the command line asked for.
#[derive(Debug, Clone, Default)]
pub struct Args {
    pub haproxy: Vec<PathBuf>,
    pub haproxy_state_file: Vec<PathBuf>,
    pub slot_prefix: String,
    pub nginx: Option<PathBuf>,
    pub nginx_reload: Option<String>,
    pub nginx_test: String,
    pub nginx_pid: Option<PathBuf>,
    pub nginx_upstreams: Vec<String>,
    pub file_sd: Vec<PathBuf>,
    /// Publish this host's targets to etcd (with `host_id`).
    pub etcd: Option<String>,
    pub host_id: Option<String>,
    /// Feed the sinks from the cluster view in etcd instead of the ledger.
    pub from_etcd: Option<String>,
    pub resync: Duration,
    pub probe_timeout: Duration,
}

pub fn run(g: &Globals, a: Args) -> anyhow::Result<()> {
    if !safe_name(&a.slot_prefix) {
        bail!(
            "registrar: --haproxy-slot-prefix {:?}: use letters, digits, '_', '.' or '-'",
            a.slot_prefix
        );
    }
    if a.haproxy_state_file.len() > a.haproxy.len() {
        bail!("registrar: more --haproxy-state-file than --haproxy sockets (they pair in order)");
    }
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    for (i, s) in a.haproxy.iter().enumerate() {
        let state_file = a.haproxy_state_file.get(i).map(PathBuf::as_path);
        sinks.push(Box::new(HaproxySink::new(s, &a.slot_prefix, state_file)));
    }
    if let Some(bad) = a.nginx_upstreams.iter().find(|u| !safe_name(u)) {
        bail!(
            "registrar: --nginx-upstream {bad:?}: use letters, digits, '_', '.' or '-' (at most 64)"
        );
    }
    match (&a.nginx, &a.nginx_reload) {
        (Some(f), Some(r)) => sinks.push(Box::new(NginxSink::new(
            f,
            &a.nginx_test,
            r,
            a.nginx_pid.as_deref(),
            &a.nginx_upstreams,
        ))),
        (Some(_), None) => bail!(
            "registrar: --nginx needs --nginx-reload CMD: e.g. --nginx-reload \"nginx -s reload\""
        ),
        (None, Some(_)) => bail!("registrar: --nginx-reload without --nginx FILE"),
        (None, None) => {}
    }
    for f in &a.file_sd {
        sinks.push(Box::new(FileSdSink::new(f)));
    }
    if sinks.is_empty() && a.etcd.is_none() {
        bail!(
            "registrar: no sink: give --haproxy SOCKET, --nginx FILE --nginx-reload CMD, --file-sd FILE or --etcd URL --host-id ID"
        );
    }
    let source: Box<dyn Source> = match (&a.from_etcd, &a.etcd) {
        (Some(_), Some(_)) => bail!(
            "registrar: --from-etcd and --etcd: a registrar either publishes this host (--etcd) or reads the cluster (--from-etcd); run two"
        ),
        (Some(url), None) => {
            if a.host_id.is_some() {
                bail!("registrar: --host-id goes with --etcd, not --from-etcd");
            }
            if sinks.is_empty() {
                bail!(
                    "registrar: --from-etcd needs a sink: --haproxy SOCKET, --nginx FILE --nginx-reload CMD or --file-sd FILE"
                );
            }
            Box::new(ClusterFeed::start(
                Client::new(url).map_err(|e| anyhow::anyhow!("registrar: --from-etcd: {e}"))?,
            )?)
        }
        (None, etcd) => {
            // The config is read now, so a typo stops the registrar before it touches a sink.
            let cfg = g.load_config()?;
            g.host_address()?;
            if let Some(url) = etcd {
                let client =
                    Client::new(url).map_err(|e| anyhow::anyhow!("registrar: --etcd: {e}"))?;
                let Some(host_id) = a.host_id.clone() else {
                    bail!(
                        "registrar: --etcd needs --host-id ID: a name of this host unique in the cluster (e.g. its instance id)"
                    );
                };
                if !safe_name(&host_id) {
                    bail!(
                        "registrar: --host-id {host_id:?}: use letters, digits, '_', '.' or '-' (at most 64)"
                    );
                }
                sinks.push(Box::new(EtcdSink::start(Publisher {
                    client,
                    host_id,
                    instance_id: g.instance_id()?,
                    ttl: cfg.lb.lease_seconds,
                    lease_file: g.state_dir.join(LEASE_FILE),
                })));
            } else if a.host_id.is_some() {
                bail!("registrar: --host-id without --etcd URL");
            }
            let g2 = g.clone();
            Box::new(Ledger::open(
                &g.state_dir,
                Box::new(move || g2.host_address().unwrap_or(std::net::Ipv4Addr::LOCALHOST)),
            )?)
        }
    };
    registrar::run(Options {
        source,
        sinks,
        resync: a.resync,
        probe_timeout: a.probe_timeout,
    })
}
