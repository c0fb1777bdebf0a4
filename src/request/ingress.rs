//! `netshim.ingress`: which new inbound connections a task admits (a per-task security group).

use ipnetwork::IpNetwork;
use serde_json::Value;

use super::ports::{json_port, short};
use super::{RequestError, quote};
use crate::types::{PortRange, Protocol};

/// Most rules one request may carry.
const MAX_RULES: usize = 256;

/// One ingress rule: new connections on `ports`/`protocol` from `cidr` are admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRule {
    pub protocol: Protocol,
    pub ports: PortRange,
    pub cidr: IpNetwork,
}

fn err(i: usize, m: impl std::fmt::Display) -> RequestError {
    RequestError::Ingress(format!("entry {i}: {m}"))
}

/// Parses the `netshim.ingress` JSON array.
pub fn parse_ingress(s: &str) -> Result<Vec<IngressRule>, RequestError> {
    let v: Value = serde_json::from_str(s)
        .map_err(|x| RequestError::Ingress(format!("not valid JSON: {x}")))?;
    let Value::Array(items) = v else {
        return Err(RequestError::Ingress(
            "must be a JSON array of {\"protocol\", \"port\" or \"portRange\", \"cidr\"} objects"
                .into(),
        ));
    };
    if items.len() > MAX_RULES {
        return Err(RequestError::Ingress(format!(
            "{} rules, at most {MAX_RULES}: use wider CIDRs or port ranges",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, it)| parse_rule(i, it))
        .collect()
}

fn parse_rule(i: usize, it: &Value) -> Result<IngressRule, RequestError> {
    let Value::Object(o) = it else {
        return Err(err(i, "must be an object"));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !["protocol", "port", "portRange", "cidr"].contains(&k.as_str()))
    {
        return Err(err(
            i,
            format!(
                "unknown key {} (known: protocol, port, portRange, cidr)",
                quote(k)
            ),
        ));
    }
    let protocol = match o.get("protocol") {
        None => Protocol::Tcp,
        Some(Value::String(p)) => p.parse().map_err(|_| {
            err(
                i,
                format!("unknown protocol {}: use \"tcp\" or \"udp\"", quote(p)),
            )
        })?,
        Some(other) => {
            return Err(err(
                i,
                format!("protocol must be \"tcp\" or \"udp\", got {}", short(other)),
            ));
        }
    };
    let ports = match (o.get("port"), o.get("portRange")) {
        (Some(p), None) => PortRange::single(json_port(p, "port", false).map_err(|e| err(i, e))?),
        (None, Some(Value::String(r))) => {
            PortRange::parse(r).map_err(|x| err(i, format!("portRange: {x}")))?
        }
        (None, Some(other)) => {
            return Err(err(
                i,
                format!(
                    "portRange must be a string like \"8000-8010\", got {}",
                    short(other)
                ),
            ));
        }
        _ => return Err(err(i, "give exactly one of port or portRange")),
    };
    let cidr = match o.get("cidr") {
        None => return Err(err(i, "cidr is required, e.g. \"10.0.0.0/16\"")),
        Some(Value::String(c)) => c.parse::<IpNetwork>().map_err(|_| {
            err(
                i,
                format!("cidr {} is not a CIDR like \"10.0.0.0/16\"", quote(c)),
            )
        })?,
        Some(other) => {
            return Err(err(
                i,
                format!(
                    "cidr must be a string like \"10.0.0.0/16\", got {}",
                    short(other)
                ),
            ));
        }
    };
    Ok(IngressRule {
        protocol,
        ports,
        cidr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_both_families() {
        let r = parse_ingress(r#"[{"protocol":"tcp","port":80,"cidr":"10.0.0.0/16"},{"protocol":"udp","portRange":"8000-8010","cidr":"fd00::/8"}]"#).unwrap();
        assert_eq!(r[0].ports, PortRange::single(80));
        assert_eq!(r[1].protocol, Protocol::Udp);
        assert!(r[1].cidr.is_ipv6());
    }

    #[test]
    fn each_fault_is_named_exactly() {
        for (bad, want) in [
            (
                r#"[{"protocol":"icmp","port":1,"cidr":"10.0.0.0/8"}]"#,
                "entry 0: unknown protocol \"icmp\": use \"tcp\" or \"udp\"",
            ),
            (
                r#"[{"protocol":17,"port":1,"cidr":"10.0.0.0/8"}]"#,
                "entry 0: protocol must be \"tcp\" or \"udp\", got 17",
            ),
            (
                r#"[{"port":1,"cidr":"x"}]"#,
                "entry 0: cidr \"x\" is not a CIDR like \"10.0.0.0/16\"",
            ),
            (
                r#"[{"port":80,"cidr":5}]"#,
                "entry 0: cidr must be a string like \"10.0.0.0/16\", got 5",
            ),
            (
                r#"[{"port":80}]"#,
                "entry 0: cidr is required, e.g. \"10.0.0.0/16\"",
            ),
            (
                r#"[{"port":80,"portRange":"1-2","cidr":"1.0.0.0/8"}]"#,
                "entry 0: give exactly one of port or portRange",
            ),
            (
                r#"[{"port":0,"cidr":"1.0.0.0/8"}]"#,
                "entry 0: port must be an integer 1-65535, got 0",
            ),
            (
                r#"[{"portRange":80,"cidr":"1.0.0.0/8"}]"#,
                "entry 0: portRange must be a string like \"8000-8010\", got 80",
            ),
            (
                r#"[{"port":80,"cidr":"1.0.0.0/8","from":"x"}]"#,
                "entry 0: unknown key \"from\" (known: protocol, port, portRange, cidr)",
            ),
            (
                "{}",
                "must be a JSON array of {\"protocol\", \"port\" or \"portRange\", \"cidr\"} objects",
            ),
        ] {
            assert_eq!(
                parse_ingress(bad).unwrap_err().to_string(),
                format!("annotation netshim.ingress: {want}"),
                "{bad}"
            );
        }
    }
}
