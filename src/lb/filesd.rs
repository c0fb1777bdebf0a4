//! The file-sd sink: the `file-sd` export in a file Prometheus watches (`file_sd_configs`),
//! replaced atomically whenever it differs from what is on disk. With no target the file holds
//! `[]`; it is never deleted (Prometheus keeps a deleted file's last targets).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::export;
use super::registrar::{Log, Sink, Want};

pub struct FileSdSink {
    path: PathBuf,
}

impl FileSdSink {
    pub fn new(path: &Path) -> FileSdSink {
        FileSdSink {
            path: path.to_path_buf(),
        }
    }
}

/// Replaces `path` with `text` atomically (temp file in the same directory, fsync, rename), so
/// a reader sees the old or the new content, never half of it. Keeps an existing file's mode.
pub fn replace(path: &Path, text: &str) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp)?;
    let r = (|| {
        f.write_all(text.as_bytes())?;
        if let Ok(m) = fs::metadata(path) {
            fs::set_permissions(&tmp, m.permissions())?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

impl Sink for FileSdSink {
    fn label(&self) -> String {
        format!("file-sd {}", self.path.display())
    }

    fn apply(&mut self, want: &Want, log: &mut Log) -> anyhow::Result<bool> {
        let text = export::file_sd(want.entries) + "\n";
        let on_disk = fs::read_to_string(&self.path).ok();
        if on_disk.as_deref() == Some(text.as_str()) {
            return Ok(true);
        }
        replace(&self.path, &text).with_context(|| format!("{}: write", self.label()))?;
        let n = want
            .entries
            .iter()
            .filter(|e| e.protocol == "tcp" && !e.target_ip.is_empty())
            .count();
        log.line(format!(
            "{}: {} ({n} target{})",
            self.label(),
            if on_disk.is_some() {
                "rewritten"
            } else {
                "written"
            },
            if n == 1 { "" } else { "s" }
        ));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_atomic_and_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("nsunit-filesd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let p = d.join("t.json");
        replace(&p, "[]").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "[]");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        replace(&p, "[1]").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "[1]");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "temp file left");
        fs::remove_dir_all(&d).unwrap();
    }
}
