//! One module per verb; `main.rs` only parses arguments and dispatches here.

pub mod gc;
pub mod hook;
pub mod ports;

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
