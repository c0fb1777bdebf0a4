//! The OCI state a runtime writes on a hook's stdin, read leniently: runtimes differ (crun sends
//! `pid: 0` and non-standard statuses, runc omits `pid` in poststop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The fields of the OCI state netshim uses.
#[derive(Debug, Clone, Deserialize)]
pub struct OciState {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

impl OciState {
    pub fn parse(text: &str) -> anyhow::Result<OciState> {
        let st: OciState = serde_json::from_str(text)
            .context("OCI state on stdin is not valid JSON (a runtime passes it to hooks; run this as an OCI hook)")?;
        if !valid_id(&st.id) {
            bail!(
                "OCI state: container id {} is not a container id: use 1-1024 letters, digits, '_', '+', '.' or '-' (what runc, crun, containerd and podman accept)",
                crate::request::quote(&st.id)
            );
        }
        Ok(st)
    }

    /// A usable host pid: present and positive.
    pub fn host_pid(&self) -> Option<i32> {
        self.pid
            .filter(|p| *p > 0 && *p <= i64::from(i32::MAX))
            .map(|p| p as i32)
    }
}

/// Whether `id` is a container id as the runtimes make them (`[A-Za-z0-9_+.-]`, not `.` or
/// `..`): safe as a file name and in every output.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'.' | b'-'))
}

/// Annotations from the bundle's `config.json` (the fallback when the state has none).
pub fn bundle_annotations(bundle: &Path) -> anyhow::Result<HashMap<String, String>> {
    let spec = bundle_spec(bundle)?;
    Ok(spec.annotations().clone().unwrap_or_default())
}

/// The bundle's runtime spec.
pub fn bundle_spec(bundle: &Path) -> anyhow::Result<oci_spec::runtime::Spec> {
    let path = bundle.join("config.json");
    oci_spec::runtime::Spec::load(&path)
        .with_context(|| format!("read bundle config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_crun_and_poststop_states_parse() {
        let runc = r#"{"ociVersion":"1.0.2-dev","id":"rts","status":"creating","pid":16850,"bundle":"/tmp/rt/bf","annotations":{"a":"b"}}"#;
        let s = OciState::parse(runc).unwrap();
        assert_eq!(s.host_pid(), Some(16850));
        let crun = r#"{"ociVersion":"1.0","id":"rts","pid":0,"root":"/r","bundle":"/b","status":"stopped","annotations":{}}"#;
        assert_eq!(OciState::parse(crun).unwrap().host_pid(), None);
        let poststop = r#"{"ociVersion":"1.0.2-dev","id":"rts","status":"stopped","bundle":"/b"}"#;
        let s = OciState::parse(poststop).unwrap();
        assert_eq!(s.host_pid(), None);
        assert!(s.annotations.is_none());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(
            OciState::parse("not json")
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        for bad in ["../x", "a b", "x\u{1b}[2J", "x\u{9b}", "..", ""] {
            let st = serde_json::json!({ "id": bad }).to_string();
            let e = OciState::parse(&st).unwrap_err().to_string();
            assert!(e.contains("is not a container id"), "{bad:?}: {e}");
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
        assert!(OciState::parse(r#"{"id":"web.1_a+b-c"}"#).is_ok());
    }
}
