//! `shim ports list`: what load balancers register. Reads the state without the lock: the file
//! is replaced by rename, so this never waits on a running hook nor sees half a file.

use std::io::Write;

use crate::commands::Globals;
use crate::lb;
use crate::lb::entries::{PortEntry, entries};
use crate::state::LbState;

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
    let host = g.host_address()?;
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
        Format::Elbv2 => lb::export::elbv2(&rows, &g.instance_id()?),
        Format::Slb => {
            let cfg = g.load_config()?;
            let eni = |mac: &str| crate::metadata::eni_id(&cfg.awsvpc, mac);
            lb::export::slb(&rows, &g.instance_id()?, &eni)
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
    use crate::state::State;
    use std::net::Ipv4Addr;

    fn state() -> State {
        crate::lb::entries::sample_state()
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
