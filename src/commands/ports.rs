//! `shim ports list`: what load balancers register. Reads the state without the lock: the file
//! is replaced by rename, so this never waits on a running hook nor sees half a file.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::commands::Globals;
use crate::kernel::netlink::Netlink;
use crate::lb;
use crate::state::{LbState, State};
use crate::types::NetworkMode;

/// One mapped port, as the contract names its fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortEntry {
    pub container_id: String,
    pub service: Option<String>,
    pub network_mode: NetworkMode,
    pub protocol: String,
    pub container_port: u16,
    pub host_port: u16,
    #[serde(rename = "bindIP")]
    pub bind_ip: String,
    #[serde(rename = "containerIP")]
    pub container_ip: Option<String>,
    #[serde(rename = "targetIP")]
    pub target_ip: String,
    pub target_port: u16,
    pub name: Option<String>,
    pub dynamic: bool,
    /// `serving`, or `draining` once `shim drain` marked the container.
    pub state: LbState,
    /// awsvpc: the MAC of the task's ENI (for exports that name the ENI).
    #[serde(skip)]
    pub eni_mac: Option<String>,
}

/// Flattens the state into entries (pure: `host_ip` is the host's address for LB targets).
pub fn entries(
    state: &State,
    host_ip: Ipv4Addr,
    container: Option<&str>,
    service: Option<&str>,
) -> Vec<PortEntry> {
    let mut out = Vec::new();
    for c in state.containers.values() {
        if container.is_some_and(|id| id != c.id)
            || service.is_some_and(|s| c.service.as_deref() != Some(s))
        {
            continue;
        }
        // An awsvpc task's own address: its IPv4 one, else (an IPv6-only ENI) its IPv6 one.
        let task_ip: Option<IpAddr> = c.ip.map(IpAddr::V4).or(c.ip6.map(IpAddr::V6));
        for p in &c.ports {
            let (target_ip, target_port) = match c.mode {
                NetworkMode::Awsvpc => (
                    task_ip.map(|i| i.to_string()).unwrap_or_default(),
                    p.container_port,
                ),
                _ => (p.host_ip.unwrap_or(host_ip).to_string(), p.host_port),
            };
            out.push(PortEntry {
                container_id: c.id.clone(),
                // Only names that are safe in every load-balancer format are shown.
                service: c.service.clone().filter(|s| lb::safe_name(s)),
                network_mode: c.mode,
                protocol: p.protocol.to_string(),
                container_port: p.container_port,
                host_port: p.host_port,
                // An awsvpc task listens on its own ENI address.
                bind_ip: match c.mode {
                    NetworkMode::Awsvpc => task_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    _ => IpAddr::V4(p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)),
                }
                .to_string(),
                container_ip: match c.mode {
                    NetworkMode::Awsvpc => task_ip.map(|i| i.to_string()),
                    _ => c.ip.map(|i| i.to_string()),
                },
                target_ip,
                target_port,
                name: p.name.clone(),
                dynamic: p.dynamic,
                state: c.lb,
                eni_mac: c.eni.as_ref().map(|e| e.mac.to_string()),
            });
        }
    }
    out
}

/// The address load balancers target for host ports.
pub fn host_address(g: &Globals) -> anyhow::Result<Ipv4Addr> {
    let cfg = g.load_config()?;
    if let Some(a) = cfg.host_address {
        return Ok(a);
    }
    let found = Netlink::open().ok().and_then(|mut nl| {
        nl.default_route_source(&|ip| !cfg.subnet.contains(ip))
            .ok()
            .flatten()
    });
    Ok(found.unwrap_or(Ipv4Addr::LOCALHOST))
}

/// What `ports list` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Elbv2,
    Slb,
    #[value(name = "file-sd")]
    FileSd,
    Nginx,
    Haproxy,
}

/// Which entries `ports list` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub container: Option<String>,
    pub service: Option<String>,
    pub state: Option<LbState>,
    pub protocol: Option<crate::types::Protocol>,
}

pub fn list(g: &Globals, format: Format, f: &Filter) -> anyhow::Result<()> {
    let state = g.state()?.load()?;
    let host = host_address(g)?;
    let mut rows = entries(&state, host, f.container.as_deref(), f.service.as_deref());
    // `register-targets` must not re-register what is draining: elbv2 lists serving targets
    // unless asked for draining ones (`--state draining`, for `deregister-targets`).
    let want = match (f.state, format) {
        (None, Format::Elbv2) => Some(LbState::Serving),
        (s, _) => s,
    };
    rows.retain(|r| {
        want.is_none_or(|w| r.state == w) && f.protocol.is_none_or(|p| r.protocol == p.as_str())
    });
    let text = match format {
        Format::Table => table(&rows),
        Format::Json => serde_json::to_string_pretty(&rows)?,
        Format::Elbv2 => lb::export::elbv2(&rows, &instance_id(g)?),
        Format::Slb => {
            let cfg = g.load_config()?;
            let eni = |mac: &str| crate::metadata::eni_id(&cfg.awsvpc, mac);
            lb::export::slb(&rows, &instance_id(g)?, &eni)
        }
        Format::FileSd => lb::export::file_sd(&rows),
        Format::Nginx => lb::export::nginx(&lb::targets(&rows), &[]),
        Format::Haproxy => lb::export::haproxy(&lb::targets(&rows)),
    };
    print(&text)
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let text = text.trim_end_matches('\n');
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// `ports list --etcd URL`: every alive host's entries, each with its `hostId`.
pub fn list_cluster(url: &str, format: Format, f: &Filter) -> anyhow::Result<()> {
    if matches!(format, Format::Elbv2 | Format::Slb) {
        anyhow::bail!(
            "ports list --etcd: --format {}: these name one instance; run it on each host, or use json, table, file-sd, nginx or haproxy",
            if format == Format::Elbv2 {
                "elbv2"
            } else {
                "slb"
            }
        );
    }
    let mut rows = lb::cluster::list(url)?;
    rows.retain(|r| {
        let e = &r.entry;
        f.container.as_deref().is_none_or(|c| e.container_id == c)
            && f.service
                .as_deref()
                .is_none_or(|s| e.service.as_deref() == Some(s))
            && f.state.is_none_or(|w| e.state == w)
            && f.protocol.is_none_or(|p| e.protocol == p.as_str())
    });
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&rows)?,
        Format::Table => {
            let hosts: Vec<&str> = rows.iter().map(|r| r.host_id.as_str()).collect();
            let entries: Vec<PortEntry> = rows.iter().map(|r| r.entry.clone()).collect();
            table_with_hosts(&entries, Some(&hosts))
        }
        _ => {
            let entries: Vec<PortEntry> = rows.into_iter().map(|r| r.entry).collect();
            match format {
                Format::FileSd => lb::export::file_sd(&entries),
                Format::Nginx => lb::export::nginx(&lb::targets(&entries), &[]),
                _ => lb::export::haproxy(&lb::targets(&entries)),
            }
        }
    };
    print(&text)
}

/// The instance id exports name bridge and host targets by: `[lb] instance_id`, else instance
/// metadata, else the host name.
pub fn instance_id(g: &Globals) -> anyhow::Result<String> {
    let cfg = g.load_config()?;
    if let Some(id) = cfg.lb.instance_id {
        return Ok(id);
    }
    if let Some(id) = crate::metadata::quick_value(&cfg.awsvpc, "instance-id")
        && lb::safe_name(&id)
    {
        return Ok(id);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    Ok(host.trim().to_string())
}

/// The human table.
pub fn table(rows: &[PortEntry]) -> String {
    table_with_hosts(rows, None)
}

/// The human table, with a first HOST column when `hosts` names each row's host.
fn table_with_hosts(rows: &[PortEntry], hosts: Option<&[&str]>) -> String {
    let head = [
        "CONTAINER",
        "SERVICE",
        "MODE",
        "PROTO",
        "HOST",
        "CONTAINER ADDR",
        "TARGET",
        "STATE",
    ];
    let mut cells: Vec<[String; 8]> = vec![head.map(String::from)];
    for r in rows {
        // 64-hex ids (podman, containerd) are shortened as those tools do; others stay whole.
        let id = if r.container_id.len() == 64
            && r.container_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            r.container_id[..12].to_string()
        } else {
            r.container_id.clone()
        };
        cells.push([
            id,
            r.service.clone().unwrap_or_else(|| "-".into()),
            r.network_mode.to_string(),
            r.protocol.clone(),
            format!(
                "{}:{}{}",
                lb::bracket(&r.bind_ip),
                r.host_port,
                if r.dynamic { "*" } else { "" }
            ),
            format!(
                "{}:{}",
                lb::bracket(r.container_ip.as_deref().unwrap_or("-")),
                r.container_port
            ),
            format!("{}:{}", lb::bracket(&r.target_ip), r.target_port),
            r.state.as_str().to_string(),
        ]);
    }
    if let Some(h) = hosts {
        let w = h.iter().map(|s| s.len()).max().unwrap_or(0).max(7);
        for (i, c) in cells.iter_mut().enumerate() {
            let name = if i == 0 {
                "HOST ID"
            } else {
                h.get(i - 1).copied().unwrap_or("-")
            };
            c[0] = format!("{name:<w$}  {}", c[0]);
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let lines: Vec<String> = cells
        .iter()
        .map(|c| {
            c.iter()
                .zip(&widths)
                .map(|(s, w)| format!("{s:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect();
    let mut s = lines.join("\n");
    if rows.iter().any(|r| r.dynamic) {
        s += "\n(* dynamic host port)";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ContainerRecord, PortRecord};
    use crate::types::Protocol;

    fn state() -> State {
        let mut st = State::default();
        for (id, svc, port) in [("aaa", Some("web"), 49153), ("bbb", None, 8080)] {
            let mut r = ContainerRecord::new(id, NetworkMode::Bridge);
            r.service = svc.map(String::from);
            r.ip = Some(Ipv4Addr::new(10, 213, 0, 2));
            r.ports = vec![PortRecord {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: port,
                host_ip: None,
                name: None,
                dynamic: port == 49153,
            }];
            st.containers.insert(id.into(), r);
        }
        st
    }

    #[test]
    fn json_has_the_contract_fields() {
        let rows = entries(&state(), Ipv4Addr::new(192, 0, 2, 2), None, None);
        let v = serde_json::to_value(&rows).unwrap();
        for k in [
            "containerId",
            "service",
            "networkMode",
            "protocol",
            "containerPort",
            "hostPort",
            "bindIP",
            "containerIP",
            "targetIP",
            "targetPort",
            "state",
        ] {
            assert!(v[0].get(k).is_some(), "missing {k}: {v}");
        }
        assert_eq!(v[0]["targetIP"], "192.0.2.2");
        assert_eq!(v[0]["targetPort"], 49153);
        assert_eq!(v[0]["networkMode"], "bridge");
        assert_eq!(v[1]["service"], serde_json::Value::Null);
        assert_eq!(v[0]["state"], "serving");
        assert!(v[0].get("eniMac").is_none(), "{v}");
    }

    #[test]
    fn filters_by_container_and_service() {
        let st = state();
        assert_eq!(
            entries(&st, Ipv4Addr::LOCALHOST, Some("bbb"), None).len(),
            1
        );
        assert_eq!(
            entries(&st, Ipv4Addr::LOCALHOST, None, Some("web"))[0].container_id,
            "aaa"
        );
        assert!(entries(&st, Ipv4Addr::LOCALHOST, None, Some("nope")).is_empty());
    }

    #[test]
    fn the_cluster_table_names_each_rows_host_first() {
        let rows = entries(&state(), Ipv4Addr::LOCALHOST, None, None);
        let t = table_with_hosts(&rows, Some(&["host-a", "b"]));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("HOST ID  CONTAINER"), "{t}");
        assert!(lines[1].starts_with("host-a   aaa"), "{t}");
        assert!(lines[2].starts_with("b        bbb"), "{t}");
    }

    #[test]
    fn table_lists_each_port() {
        let t = table(&entries(&state(), Ipv4Addr::LOCALHOST, None, None));
        assert!(t.contains("0.0.0.0:49153*"), "{t}");
        assert!(t.contains("127.0.0.1:8080"), "{t}");
        assert_eq!(t.lines().count(), 4);
    }
}
