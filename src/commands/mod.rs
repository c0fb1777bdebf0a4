//! One module per verb; `main.rs` only parses arguments and dispatches here.

pub mod drain;
pub mod gc;
pub mod hook;
pub mod ports;
pub mod registrar;

use std::path::PathBuf;

use crate::config::Config;
use crate::state::StateDir;

/// Options every command shares (flags or environment).
#[derive(Debug, Clone)]
pub struct Globals {
    pub state_dir: PathBuf,
    pub config: PathBuf,
}

impl Globals {
    pub fn state(&self) -> StateDir {
        StateDir::new(&self.state_dir)
    }
    pub fn load_config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.config)?)
    }
}

/// An error that ends the process with its own exit code (drain's timeout exits 3).
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub msg: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Exit {}
