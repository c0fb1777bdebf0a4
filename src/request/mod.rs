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
    fn a_nested_value_with_a_c1_control_is_escaped_in_the_refusal() {
        let e = from_annotations(&ann(&[
            (MODE, "bridge"),
            (
                PORT_MAPPINGS,
                "[{\"containerPort\":[\"\\u001b[2J\u{9b}\"]}]",
            ),
        ]))
        .unwrap_err()
        .to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains("\\u009b"), "{e}");
    }

    #[test]
    fn quoted_tenant_text_stays_on_one_short_line() {
        assert_eq!(quote("a\u{1b}[2Jb"), "\"a\\u001b[2Jb\"");
        assert_eq!(quote("x\u{9b}y"), "\"x\\u009by\"");
        let long = quote(&"z".repeat(500));
        assert!(long.len() < 100 && long.ends_with('…'), "{long}");
    }
}

#[cfg(test)]
mod fuzz {
    //! The parser against hostile input: every fixture in `fixtures/requests/` (attacks seen
    //! and sound requests) gets its expected answer, and arbitrary annotations never panic and
    //! are refused in one line without control characters.
    use super::*;
    use proptest::prelude::*;

    fn check_error_shape(e: &RequestError) {
        let t = e.to_string();
        assert!(
            !t.contains('\n') && !t.chars().any(char::is_control),
            "{t:?}"
        );
        assert!(t.len() < 600, "{} bytes: {t:.100}", t.len());
    }

    #[test]
    fn every_fixture_gets_its_expected_answer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/requests");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let ann: HashMap<String, String> =
                serde_json::from_value(v["annotations"].clone()).unwrap();
            let expect = v["expect"].as_str().unwrap();
            match (from_annotations(&ann), expect) {
                (Ok(None), "none") => {}
                (Ok(Some(_)), "") => {}
                (Err(e), want) if !want.is_empty() && want != "none" => {
                    check_error_shape(&e);
                    assert!(e.to_string().contains(want), "{}: {e}", p.display());
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", p.display()),
            }
            n += 1;
        }
        assert!(n >= 10, "only {n} fixtures");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (0u32..70000).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("02:00:00:00:00:01"),
                Just("10.0.1.5/24"),
                Just("8000-8010"),
                Just("tcp"),
                Just("udp"),
                Just("shared"),
                Just("branch"),
                Just("\u{1b}[2J\u{9b}")
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            let keys = prop_oneof![
                Just("containerPort"),
                Just("containerPortRange"),
                Just("hostPort"),
                Just("hostIp"),
                Just("protocol"),
                Just("name"),
                Just("macAddress"),
                Just("ipv4Addresses"),
                Just("attachment"),
                Just("trunkMacAddress"),
                Just("vlanId"),
                Just("port"),
                Just("portRange"),
                Just("cidr"),
                Just("x"),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(keys.prop_map(String::from), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn arbitrary_annotations_never_panic_and_refuse_in_one_line(
            mode in prop_oneof![
                Just("bridge".to_string()),
                Just("host".to_string()),
                Just("awsvpc".to_string()),
                Just("none".to_string()),
                "\\PC{0,8}"
            ],
            maps in json_value(),
            eni in json_value(),
            ingress in json_value(),
            service in "\\PC{0,70}",
            raw in "\\PC{0,40}",
        ) {
            let mut a = HashMap::new();
            a.insert(MODE.to_string(), mode);
            a.insert(PORT_MAPPINGS.to_string(), maps.to_string());
            a.insert(ENI.to_string(), eni.to_string());
            a.insert(INGRESS.to_string(), ingress.to_string());
            a.insert(SERVICE.to_string(), service);
            if let Err(e) = from_annotations(&a) {
                check_error_shape(&e);
            }
            // Raw, non-JSON text in every slot.
            for k in [PORT_MAPPINGS, ENI, INGRESS] {
                let mut b = HashMap::new();
                b.insert(MODE.to_string(), "awsvpc".to_string());
                b.insert(k.to_string(), raw.clone());
                if let Err(e) = from_annotations(&b) {
                    check_error_shape(&e);
                }
            }
        }

        #[test]
        fn arbitrary_oci_states_never_panic(text in "\\PC{0,200}", id in "\\PC{0,40}") {
            let _ = crate::oci::OciState::parse(&text);
            let st = serde_json::json!({"id": id, "pid": 5}).to_string();
            if let Err(e) = crate::oci::OciState::parse(&st) {
                let t = format!("{e:#}");
                prop_assert!(!t.chars().any(char::is_control), "{:?}", t);
            }
        }
    }
}
