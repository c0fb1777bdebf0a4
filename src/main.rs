//! `shim`: an OCI hook giving containers the Amazon ECS network modes.

mod alloc;
mod commands;
mod config;
mod fault;
mod firewall;
mod kernel;
mod metadata;
mod modes;
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
        default_value = "/run/netshim",
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
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this container.
        #[arg(long)]
        container: Option<String>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let g = Globals {
        state_dir: cli.state_dir,
        config: cli.config,
    };
    let r = match cli.cmd {
        Cmd::Hook { stage } => commands::hook::run(&g, stage),
        Cmd::Ports {
            cmd:
                PortsCmd::List {
                    json,
                    container,
                    service,
                },
        } => commands::ports::list(&g, json, container.as_deref(), service.as_deref()),
        Cmd::Gc => commands::gc::gc(&g),
        Cmd::Reload => commands::gc::reload(&g),
        Cmd::Reset { force } => commands::gc::reset(&g, force),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: "shim: <what failed>: <why>".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("shim: {}", output::escape_controls(&msg));
            ExitCode::FAILURE
        }
    }
}
