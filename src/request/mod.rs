//! The container's network request: annotations in, a validated [`NetworkRequest`] out.
//!
//! This is the only module that knows annotation names. It is pure (no I/O), so every validation
//! rule is unit-tested without root. Annotations are written by tenants: everything here is
//! untrusted input, checked for shape and range before anything else looks at it. One submodule
//! per annotation: [`ports`] (`netshim.port-mappings`), [`eni`] (`netshim.eni`), [`ingress`]
//! (`netshim.ingress`).

pub mod eni;
pub mod ingress;
pub mod ports;

use std::collections::HashMap;

use serde_json::Value;

use crate::types::NetworkMode;

pub use eni::{EniSpec, parse_eni};
pub use ingress::{IngressRule, parse_ingress};
pub use ports::{HostPorts, PortMapping, parse_mappings};

/// Prefix of every netshim annotation.
pub const PREFIX: &str = "netshim.";
/// Annotation naming the network mode; a container without it is left alone.
pub const MODE: &str = "netshim.network-mode";
/// Annotation holding the ECS `portMappings` JSON array.
pub const PORT_MAPPINGS: &str = "netshim.port-mappings";
/// Annotation naming the service / target group the ports belong to.
pub const SERVICE: &str = "netshim.service";
/// awsvpc: the task's ENI (JSON object).
pub const ENI: &str = "netshim.eni";
/// Per-task ingress rules (JSON array).
pub const INGRESS: &str = "netshim.ingress";
/// Every annotation netshim reads.
pub const KEYS: [&str; 5] = [MODE, PORT_MAPPINGS, SERVICE, ENI, INGRESS];

/// Longest service name (a load-balancer target group or backend name).
pub const SERVICE_MAX: usize = 64;

/// Errors in the request: each names the annotation and, where it helps, the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("annotation {MODE}: unknown network mode {0:?}: use one of bridge, host, awsvpc, none")]
    UnknownMode(String),
    #[error(
        "annotation {0:?}: no such netshim annotation: use one of netshim.network-mode, netshim.port-mappings, netshim.service, netshim.eni, netshim.ingress"
    )]
    UnknownKey(String),
    #[error(
        "annotation {0} needs {MODE}: add {MODE} (bridge, host, awsvpc or none), or remove {0}"
    )]
    NoMode(String),
    #[error("annotation {PORT_MAPPINGS}: not valid JSON: {0}")]
    Json(String),
    #[error("annotation {PORT_MAPPINGS}: {0}")]
    Mapping(String),
    #[error("annotation {SERVICE}: {0}")]
    Service(String),
    #[error("annotation {ENI}: {0}")]
    Eni(String),
    #[error("annotation {INGRESS}: {0}")]
    Ingress(String),
}

/// The validated network request of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    pub mode: NetworkMode,
    pub mappings: Vec<PortMapping>,
    pub service: Option<String>,
    /// awsvpc: the task's ENI.
    pub eni: Option<EniSpec>,
    /// When present, new inbound connections not matching a rule are dropped.
    pub ingress: Option<Vec<IngressRule>>,
}

/// Whether `s` is a safe identifier for load balancers and file names: `[A-Za-z0-9_.-]{1,max}`.
pub fn is_safe_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Reads the request from annotations. `Ok(None)`: no netshim annotation at all, leave the
/// container alone. A misspelt `netshim.` key, or netshim annotations without a mode, is an error:
/// a typo must never turn into a container without the network it asked for.
pub fn from_annotations(
    ann: &HashMap<String, String>,
) -> Result<Option<NetworkRequest>, RequestError> {
    let mut ours: Vec<&str> = ann
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with(PREFIX))
        .collect();
    ours.sort();
    if let Some(k) = ours.iter().find(|k| !KEYS.contains(k)) {
        return Err(RequestError::UnknownKey(k.to_string()));
    }
    let Some(mode) = ann.get(MODE) else {
        return match ours.first() {
            Some(k) => Err(RequestError::NoMode(k.to_string())),
            None => Ok(None),
        };
    };
    let mode: NetworkMode = mode
        .trim()
        .parse()
        .map_err(|_| RequestError::UnknownMode(mode.trim().to_string()))?;
    let mappings = match ann.get(PORT_MAPPINGS) {
        None => Vec::new(),
        Some(s) if s.trim().is_empty() => Vec::new(),
        Some(s) => parse_mappings(s)?,
    };
    ports::validate(mode, &mappings)?;
    let service = parse_service(ann.get(SERVICE).map(String::as_str))?;
    let eni = match ann.get(ENI) {
        Some(s) if mode == NetworkMode::Awsvpc => Some(parse_eni(s)?),
        Some(_) => {
            return Err(RequestError::Eni(format!(
                "only awsvpc mode takes an ENI, this container asks for {mode}"
            )));
        }
        None if mode == NetworkMode::Awsvpc => {
            return Err(RequestError::Eni(
                "awsvpc mode needs it: {\"macAddress\": \"02:...\", ...}".into(),
            ));
        }
        None => None,
    };
    let ingress = match ann.get(INGRESS) {
        Some(_) if mode == NetworkMode::Host => {
            return Err(RequestError::Ingress(
                "host mode has no network namespace of its own to filter".into(),
            ));
        }
        Some(s) => Some(parse_ingress(s)?),
        None => None,
    };
    Ok(Some(NetworkRequest {
        mode,
        mappings,
        service,
        eni,
        ingress,
    }))
}

/// `netshim.service`: absent or empty means none; otherwise a safe identifier, because it goes
/// verbatim into HAProxy backends, nginx upstreams, Prometheus labels and etcd keys.
fn parse_service(v: Option<&str>) -> Result<Option<String>, RequestError> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) if is_safe_name(s, SERVICE_MAX) => Ok(Some(s.to_string())),
        Some(s) => Err(RequestError::Service(format!(
            "{} is not a service name: use 1-{SERVICE_MAX} letters, digits, '_', '.' or '-' (load balancers take it as a backend name)",
            quote(s)
        ))),
    }
}

/// A JSON-style quotation of tenant text for error messages: control characters escaped, long
/// text cut, so a hostile value can neither break the one-line error nor flood the log.
pub fn quote(s: &str) -> String {
    const MAX: usize = 80;
    let cut: String = s.chars().take(MAX).collect();
    let mut q = serde_json::to_string(&Value::String(cut)).unwrap_or_default();
    q = crate::output::escape_controls(&q);
    if s.chars().count() > MAX {
        q.push('…');
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_netshim_annotation_means_leave_alone() {
        assert_eq!(from_annotations(&HashMap::new()).unwrap(), None);
        assert_eq!(
            from_annotations(&ann(&[("io.kubernetes.pod", "x")])).unwrap(),
            None
        );
    }

    #[test]
    fn unknown_mode_is_refused() {
        let e = from_annotations(&ann(&[(MODE, "overlay")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "annotation netshim.network-mode: unknown network mode \"overlay\": use one of bridge, host, awsvpc, none"
        );
    }

    #[test]
    fn a_misspelt_netshim_key_is_named_with_the_keys_that_exist() {
        for typo in [
            "netshim.port-mapping",
            "netshim.network_mode",
            "netshim.Service",
        ] {
            let e = from_annotations(&ann(&[(MODE, "bridge"), (typo, "[]")]))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "annotation \"{typo}\": no such netshim annotation"
                )) && e.contains("netshim.port-mappings"),
                "{e}"
            );
        }
    }

    #[test]
    fn netshim_annotations_without_a_mode_are_refused() {
        let e = from_annotations(&ann(&[(PORT_MAPPINGS, r#"[{"containerPort":80}]"#)]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "annotation netshim.port-mappings needs netshim.network-mode: add netshim.network-mode (bridge, host, awsvpc or none), or remove netshim.port-mappings"
        );
        let e = from_annotations(&ann(&[(ENI, "{}")])).unwrap_err();
        assert_eq!(e, RequestError::NoMode(ENI.into()));
    }

    #[test]
    fn service_names_are_safe_identifiers() {
        let ok = from_annotations(&ann(&[(MODE, "none"), (SERVICE, " web.v2_a-1 ")]))
            .unwrap()
            .unwrap();
        assert_eq!(ok.service.as_deref(), Some("web.v2_a-1"));
        for bad in [
            "web api",
            "web\nbackend evil",
            "a\"b",
            "x;y",
            "é",
            &"a".repeat(65),
        ] {
            let e = from_annotations(&ann(&[(MODE, "none"), (SERVICE, bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("annotation netshim.service: ")
                    && e.contains("is not a service name")
                    && !e.contains('\n'),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn awsvpc_needs_an_eni_and_others_refuse_one() {
        let e = from_annotations(&ann(&[(MODE, "awsvpc")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation netshim.eni: awsvpc mode needs it: {\"macAddress\": \"02:...\", ...}"
        );
        let e = from_annotations(&ann(&[
            (MODE, "bridge"),
            (ENI, r#"{"macAddress":"02:00:00:00:00:01"}"#),
        ]))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation netshim.eni: only awsvpc mode takes an ENI, this container asks for bridge"
        );
    }

    #[test]
    fn host_mode_takes_no_ingress() {
        let e = from_annotations(&ann(&[(MODE, "host"), (INGRESS, "[]")])).unwrap_err();
        assert!(e.to_string().contains("host mode has no network namespace"));
    }

    #[test]
    fn quoted_tenant_text_stays_on_one_short_line() {
        assert_eq!(quote("a\u{1b}[2Jb"), "\"a\\u001b[2Jb\"");
        assert_eq!(quote("x\u{9b}y"), "\"x\\u009by\"");
        let long = quote(&"z".repeat(500));
        assert!(long.len() < 100 && long.ends_with('…'), "{long}");
    }
}
