//! `shim registrar`: a foreground process keeping HAProxy, nginx and file-sd sinks equal to the
//! ledger (the loop is `lb::registrar`). Logs to stderr, exits 0 on SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::commands::Globals;
use crate::commands::ports::host_address;
use crate::lb::filesd::FileSdSink;
use crate::lb::haproxy::HaproxySink;
use crate::lb::nginx::NginxSink;
use crate::lb::registrar::{self, Options, Sink};
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
    if sinks.is_empty() {
        bail!(
            "registrar: no sink: give --haproxy SOCKET, --nginx FILE --nginx-reload CMD or --file-sd FILE"
        );
    }
    // The config is read now, so a typo stops the registrar before it touches a sink.
    host_address(g)?;
    let g2 = g.clone();
    registrar::run(Options {
        state_dir: g.state_dir.clone(),
        sinks,
        host_address: Box::new(move || host_address(&g2).unwrap_or(std::net::Ipv4Addr::LOCALHOST)),
        resync: a.resync,
        probe_timeout: a.probe_timeout,
    })
}
