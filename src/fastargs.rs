//! The hook's own command line, read without building clap's command tree. A runtime calls
//! `shim [--state-dir DIR] [--config FILE] hook <stage>` on every container start and stop, and
//! building the full parser for it costs about a quarter of a millisecond, a tenth of a whole
//! setup. This reads exactly that shape and nothing else: any other command line (another verb,
//! an unknown or repeated flag, an empty or dash-led value, `--help`) returns `None` and goes to
//! clap, which gives the answer and the error messages. A unit test holds the two to the same
//! result for every form this accepts.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::commands::Globals;
use crate::commands::hook::Stage;

/// The state dir when neither the flag nor its variable names one (clap's default too).
pub const DEFAULT_STATE_DIR: &str = "/run/netshim";

/// `(globals, stage)` of a plain hook call, or `None` for clap to parse. `env_state` and
/// `env_config` are the values of `NETSHIM_STATE_DIR` and `NETSHIM_CONFIG`, which the flags
/// override.
pub fn hook(
    args: &[OsString],
    env_state: Option<OsString>,
    env_config: Option<OsString>,
) -> Option<(Globals, Stage)> {
    let mut state: Option<OsString> = None;
    let mut config: Option<OsString> = None;
    let mut words: Vec<&OsStr> = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_str()?;
        let (slot, inline) = if let Some(v) = s.strip_prefix("--state-dir") {
            (&mut state, v)
        } else if let Some(v) = s.strip_prefix("--config") {
            (&mut config, v)
        } else if s.starts_with('-') {
            return None;
        } else {
            words.push(a);
            continue;
        };
        let value = match inline.strip_prefix('=') {
            Some(v) => OsString::from(v),
            None if inline.is_empty() => it.next()?.clone(),
            None => return None,
        };
        if slot.is_some() || !usable(&value) {
            return None;
        }
        *slot = Some(value);
    }
    let [verb, stage] = words[..] else {
        return None;
    };
    if verb != "hook" {
        return None;
    }
    let stage = <Stage as clap::ValueEnum>::from_str(stage.to_str()?, false).ok()?;
    let state = match state.or(env_state) {
        Some(v) if usable(&v) => PathBuf::from(v),
        Some(_) => return None,
        None => PathBuf::from(DEFAULT_STATE_DIR),
    };
    let config = match config.or(env_config) {
        Some(v) if usable(&v) => Some(PathBuf::from(v)),
        Some(_) => return None,
        None => None,
    };
    Some((
        Globals {
            state_dir: state,
            config,
        },
        stage,
    ))
}

/// The line `shim --version` (or `-V`) prints, when that is the whole command line: answered
/// here too, since it is how the start of the process is measured.
pub fn version(args: &[OsString]) -> Option<String> {
    match args {
        [_, v] if v == "--version" || v == "-V" => {
            Some(format!("shim {}\n", env!("CARGO_PKG_VERSION")))
        }
        _ => None,
    }
}

/// A value clap would take as it is: not empty and not led by a dash.
fn usable(v: &OsStr) -> bool {
    v.to_str()
        .is_some_and(|s| !s.is_empty() && !s.starts_with('-'))
}
