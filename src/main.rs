//! `shim`: an OCI hook giving containers the Amazon ECS network modes.

mod alloc;
mod commands;
mod config;
mod fastargs;
mod fault;
mod firewall;
mod kernel;
mod lb;
mod metadata;
mod modes;
mod names;
mod oci;
mod output;
mod reap;
mod request;
mod state;
mod trace;
mod types;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::Globals;

#[derive(Parser)]
#[command(
    name = "shim",
    version,
    about = "Container network modes (bridge, host, awsvpc, none) as an OCI hook"
)]
struct Cli {
    /// Where the ledger and its lock live.
    #[arg(
        long,
        env = "NETSHIM_STATE_DIR",
        default_value = fastargs::DEFAULT_STATE_DIR,
        global = true
    )]
    state_dir: PathBuf,
    /// TOML config file [default: /etc/netshim/config.toml, optional there; a path named here
    /// must exist].
    #[arg(long, env = "NETSHIM_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run as an OCI hook: the OCI state JSON on stdin.
    Hook {
        #[arg(value_enum)]
        stage: commands::hook::Stage,
    },
    /// Host ports and addresses, for load-balancer registration.
    Ports {
        #[command(subcommand)]
        cmd: PortsCmd,
    },
    /// Keep HAProxy, nginx, Prometheus file-sd and etcd in step with the ledger, or with the
    /// cluster in etcd (foreground).
    Registrar {
        /// HAProxy admin socket (runtime API, level admin); repeat for several HAProxies.
        #[arg(long, value_name = "SOCKET")]
        haproxy: Vec<PathBuf>,
        /// Keep this HAProxy `server-state-file` current (pairs with the --haproxy of the same
        /// position), so a reload starts with the slots filled.
        #[arg(long, value_name = "FILE")]
        haproxy_state_file: Vec<PathBuf>,
        /// Servers named <prefix><n> (from `server-template <prefix> N ...`) are the slots.
        #[arg(long, default_value = "slot", value_name = "PREFIX")]
        haproxy_slot_prefix: String,
        /// nginx include file of upstream blocks, replaced atomically.
        #[arg(long, value_name = "FILE")]
        nginx: Option<PathBuf>,
        /// Command that reloads nginx after the include changed (run with sh -c).
        #[arg(long, value_name = "CMD")]
        nginx_reload: Option<String>,
        /// Command that checks the config before a reload (run with sh -c).
        #[arg(long, value_name = "CMD", default_value = "nginx -t -q")]
        nginx_test: String,
        /// nginx's pid file: after a reload, wait for its new workers.
        #[arg(long, value_name = "FILE")]
        nginx_pid: Option<PathBuf>,
        /// An upstream the include always has, even before its first container (repeatable).
        #[arg(long, value_name = "NAME")]
        nginx_upstream: Vec<String>,
        /// Prometheus file_sd_configs file, replaced atomically; repeatable.
        #[arg(long, value_name = "FILE")]
        file_sd: Vec<PathBuf>,
        /// Publish this host's targets to etcd (http://HOST:PORT), on a lease of this host.
        #[arg(long, value_name = "URL", requires = "host_id")]
        etcd: Option<String>,
        /// This host's name in etcd (unique in the cluster), with --etcd.
        #[arg(long, value_name = "ID")]
        host_id: Option<String>,
        /// Feed the sinks from every host's targets in etcd instead of this host's ledger.
        #[arg(long, value_name = "URL", conflicts_with = "etcd")]
        from_etcd: Option<String>,
        /// Full comparison with every sink this often, changes or not.
        #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
        resync: f64,
        /// TCP connect timeout of a new target's readiness check.
        #[arg(long, default_value_t = 300, value_name = "MS")]
        probe_timeout_ms: u64,
    },
    /// Stop new load-balancer traffic to a container and wait until it is idle (exit 3 on timeout).
    Drain {
        /// Container id.
        id: String,
        /// Give up (exit 3) after this many seconds.
        #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
        timeout: f64,
    },
    /// Release containers whose process is gone (missed poststop, crash).
    Gc,
    /// Re-apply netshim's firewall table from the state (after a firewall reload).
    Reload,
    /// Remove netshim's bridge and firewall table.
    Reset {
        /// Also release containers still recorded.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PortsCmd {
    /// List every mapped port.
    List {
        /// Output format: the table, JSON, or what a load balancer takes.
        #[arg(long, value_enum, conflicts_with = "json")]
        format: Option<commands::ports::Format>,
        /// JSON array instead of a table (same as --format json).
        #[arg(long)]
        json: bool,
        /// Only targets in this load-balancer state.
        #[arg(long, value_parser = ["serving", "draining"])]
        state: Option<String>,
        /// Only this protocol.
        #[arg(long, value_parser = ["tcp", "udp"])]
        protocol: Option<String>,
        /// Only this container.
        #[arg(long)]
        container: Option<String>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// The whole cluster from etcd (http://HOST:PORT) instead of this host's ledger; each
        /// entry names its hostId.
        #[arg(long, value_name = "URL")]
        etcd: Option<String>,
    },
}

/// A command line clap refuses. As a hook, the runtime logs one line: a `shim:` line naming
/// the problem (after draining stdin, so a misregistered hook reports its usage error instead of
/// killing the runtime with SIGPIPE). Elsewhere clap's full text.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let hook =
        std::env::args().nth(1).as_deref() == Some("hook") || std::env::args().any(|a| a == "hook");
    if !hook || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit()
    }
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad arguments")
        .trim_start_matches("error: ");
    eprintln!(
        "shim: hook: {}: register it as [\"shim\", \"hook\", \"createRuntime\"] (or prestart, poststop)",
        output::escape_controls(first)
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    trace::init();
    fault::list_if_asked();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(v) = fastargs::version(&args) {
        use std::io::Write;
        return match std::io::stdout().write_all(v.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    if let Some((g, stage)) = fastargs::hook(
        &args,
        std::env::var_os("NETSHIM_STATE_DIR"),
        std::env::var_os("NETSHIM_CONFIG"),
    ) {
        trace::mark("args");
        return finish(commands::hook::run(&g, stage));
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    trace::mark("args");
    let g = Globals {
        state_dir: cli.state_dir,
        config: cli.config,
    };
    let r = match cli.cmd {
        Cmd::Hook { stage } => commands::hook::run(&g, stage),
        Cmd::Ports {
            cmd:
                PortsCmd::List {
                    format,
                    json,
                    state,
                    protocol,
                    container,
                    service,
                    etcd,
                },
        } => {
            use commands::ports::{Filter, Format};
            let format = format.unwrap_or(if json { Format::Json } else { Format::Table });
            let filter = Filter {
                container,
                service,
                state: state.map(|s| match s.as_str() {
                    "draining" => state::LbState::Draining,
                    _ => state::LbState::Serving,
                }),
                protocol: protocol.map(|p| match p.as_str() {
                    "udp" => types::Protocol::Udp,
                    _ => types::Protocol::Tcp,
                }),
            };
            match etcd {
                Some(url) => commands::ports::list_cluster(&url, format, &filter),
                None => commands::ports::list(&g, format, &filter),
            }
        }
        Cmd::Registrar {
            haproxy,
            haproxy_state_file,
            haproxy_slot_prefix,
            nginx,
            nginx_reload,
            nginx_test,
            nginx_pid,
            nginx_upstream,
            file_sd,
            etcd,
            host_id,
            from_etcd,
            resync,
            probe_timeout_ms,
        } => commands::registrar::run(
            &g,
            commands::registrar::Args {
                haproxy,
                haproxy_state_file,
                slot_prefix: haproxy_slot_prefix,
                nginx,
                nginx_reload,
                nginx_test,
                nginx_pid,
                nginx_upstreams: nginx_upstream,
                file_sd,
                etcd,
                host_id,
                from_etcd,
                resync: seconds(resync),
                probe_timeout: std::time::Duration::from_millis(probe_timeout_ms),
            },
        ),
        Cmd::Drain { id, timeout } => commands::drain::drain(&g, &id, seconds(timeout)),
        Cmd::Gc => commands::gc::gc(&g),
        Cmd::Reload => commands::gc::reload(&g),
        Cmd::Reset { force } => commands::gc::reset(&g, force),
    };
    finish(r)
}

/// The exit of a command: 0, or its one `shim:` line and its code.
fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<commands::Exit>().is_some() => {
            let code = e.downcast_ref::<commands::Exit>().map_or(1, |x| x.code);
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("shim: {}", output::escape_controls(&msg));
            ExitCode::from(code)
        }
        Err(e) => {
            // One line: "shim: <what failed>: <why>".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("shim: {}", output::escape_controls(&msg));
            ExitCode::FAILURE
        }
    }
}

/// A duration from a seconds flag (negative and NaN are zero, huge values a day).
fn seconds(s: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(if s.is_finite() {
        s.clamp(0.0, 86_400.0)
    } else {
        0.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn argv(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    /// What clap makes of a command line, in the fast reader's terms (`None`: not a hook call,
    /// or refused).
    fn by_clap(args: &[OsString]) -> Option<(PathBuf, Option<PathBuf>, String)> {
        let cli = Cli::try_parse_from(args).ok()?;
        match cli.cmd {
            Cmd::Hook { stage } => Some((cli.state_dir, cli.config, format!("{stage:?}"))),
            _ => None,
        }
    }

    fn by_fast(args: &[OsString]) -> Option<(PathBuf, Option<PathBuf>, String)> {
        let (g, stage) = fastargs::hook(
            args,
            std::env::var_os("NETSHIM_STATE_DIR"),
            std::env::var_os("NETSHIM_CONFIG"),
        )?;
        Some((g.state_dir, g.config, format!("{stage:?}")))
    }

    #[test]
    fn the_fast_hook_reader_agrees_with_clap_on_every_line_it_takes() {
        let taken = [
            "shim hook createRuntime",
            "shim hook prestart",
            "shim hook poststop",
            "shim hook createContainer",
            "shim hook startContainer",
            "shim hook poststart",
            "shim --state-dir /tmp/s hook prestart",
            "shim --state-dir=/tmp/s hook poststop",
            "shim --config /etc/x.toml hook createRuntime",
            "shim --config=/etc/x.toml --state-dir /d hook prestart",
            "shim hook --state-dir /d prestart",
            "shim hook prestart --config /c",
        ];
        for line in taken {
            let a = argv(line);
            let fast = by_fast(&a);
            assert!(fast.is_some(), "{line}: the fast reader should take it");
            assert_eq!(fast, by_clap(&a), "{line}");
        }
        // Everything else goes to clap (which may take it or refuse it).
        let left = [
            "shim",
            "shim hook",
            "shim hook frob",
            "shim hook Prestart",
            "shim hook prestart extra",
            "shim ports list",
            "shim gc",
            "shim --version",
            "shim hook --help",
            "shim -h hook prestart",
            "shim --state-dir hook prestart",
            "shim --state-dir= hook prestart",
            "shim --state-dir -x hook prestart",
            "shim --state-dir /a --state-dir /b hook prestart",
            "shim --state-dirx /a hook prestart",
            "shim --configx hook prestart",
            "shim --config",
            "shim -- hook prestart",
            "shim prestart hook",
        ];
        for line in left {
            assert_eq!(by_fast(&argv(line)), None, "{line}: must go to clap");
        }
    }

    #[test]
    fn the_fast_version_line_is_clap_s() {
        use clap::CommandFactory;
        let clap_line = Cli::command().render_version().to_string();
        for a in ["shim --version", "shim -V"] {
            assert_eq!(
                fastargs::version(&argv(a)).as_deref(),
                Some(&*clap_line),
                "{a}"
            );
        }
        for a in [
            "shim --version hook",
            "shim hook --version",
            "shim -V -V",
            "shim",
        ] {
            assert_eq!(fastargs::version(&argv(a)), None, "{a}");
        }
    }

    #[test]
    fn the_flags_override_the_environment_and_empty_values_go_to_clap() {
        let a = argv("shim hook prestart");
        let s = |v: &str| Some(OsString::from(v));
        let (g, _) = fastargs::hook(&a, s("/env/s"), s("/env/c")).unwrap();
        assert_eq!(g.state_dir, PathBuf::from("/env/s"));
        assert_eq!(g.config, Some(PathBuf::from("/env/c")));
        let b = argv("shim --state-dir /flag hook prestart --config /flagc");
        let (g, _) = fastargs::hook(&b, s("/env/s"), s("/env/c")).unwrap();
        assert_eq!(g.state_dir, PathBuf::from("/flag"));
        assert_eq!(g.config, Some(PathBuf::from("/flagc")));
        let (g, _) = fastargs::hook(&a, None, None).unwrap();
        assert_eq!(g.state_dir, PathBuf::from(fastargs::DEFAULT_STATE_DIR));
        assert_eq!(g.config, None);
        assert!(fastargs::hook(&a, s(""), None).is_none());
        assert!(fastargs::hook(&a, None, s("")).is_none());
    }
}
