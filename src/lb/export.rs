//! The export formats of `shim ports list --format`: what `aws elbv2 register-targets`,
//! Alibaba `AddBackendServers`, Prometheus `file_sd_configs`, an nginx `include` and an HAProxy
//! config take as they are. Pure functions of the listed entries; JSON is written by serde (so
//! every string is escaped), and the nginx and HAProxy texts carry only [`safe_name`]s, IPv4
//! addresses and port numbers.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use serde_json::{Value, json};

use super::{Target, safe_name};
use crate::lb::entries::PortEntry;
use crate::state::LbState;
use crate::types::NetworkMode;

/// `aws elbv2 register-targets --targets file://...`: `[{"Id": ..., "Port": N}]`. bridge/host:
/// the instance id and the host port; awsvpc (target type `ip`): the task's address and the
/// container port.
pub fn elbv2(entries: &[PortEntry], instance_id: &str) -> String {
    #[derive(Serialize)]
    struct T<'a> {
        #[serde(rename = "Id")]
        id: &'a str,
        #[serde(rename = "Port")]
        port: u16,
    }
    let rows: Vec<T> = entries
        .iter()
        .filter(|e| !e.target_ip.is_empty())
        .map(|e| T {
            id: match e.network_mode {
                NetworkMode::Awsvpc => &e.target_ip,
                _ => instance_id,
            },
            port: e.target_port,
        })
        .collect();
    pretty(&rows)
}

/// Alibaba SLB `AddBackendServers --BackendServers`: every value a string. bridge/host: the
/// instance (`ecs`); awsvpc: the task's ENI (`eni`, its id from `eni_id`, else its MAC).
/// Draining targets have weight 0.
pub fn slb(
    entries: &[PortEntry],
    instance_id: &str,
    eni_id: &dyn Fn(&str) -> Option<String>,
) -> String {
    let rows: Vec<Value> = entries
        .iter()
        .filter(|e| !e.target_ip.is_empty())
        .map(|e| {
            let (id, kind) = match e.network_mode {
                NetworkMode::Awsvpc => {
                    let mac = e.eni_mac.clone().unwrap_or_default();
                    (eni_id(&mac).unwrap_or(mac), "eni")
                }
                _ => (instance_id.to_string(), "ecs"),
            };
            let weight = if e.state == LbState::Draining {
                "0"
            } else {
                "100"
            };
            json!({
                "ServerId": id,
                "Weight": weight,
                "Type": kind,
                "Port": e.target_port.to_string(),
                "ServerIp": e.target_ip,
            })
        })
        .collect();
    pretty(&rows)
}

/// Prometheus `file_sd_configs`: one group per container and port name, TCP targets only
/// (Prometheus scrapes over TCP), labelled with the service, container id, network mode and
/// port name. An empty list is `[]`.
pub fn file_sd(entries: &[PortEntry]) -> String {
    let mut groups: BTreeMap<(String, Option<String>), (Vec<String>, Value)> = BTreeMap::new();
    for e in entries {
        if e.protocol != "tcp" || e.target_ip.is_empty() {
            continue;
        }
        let key = (e.container_id.clone(), e.name.clone());
        let g = groups.entry(key).or_insert_with(|| {
            let mut labels = serde_json::Map::new();
            if let Some(s) = &e.service {
                labels.insert("service".into(), json!(s));
            }
            labels.insert("container_id".into(), json!(e.container_id));
            labels.insert("network_mode".into(), json!(e.network_mode.as_str()));
            if let Some(n) = &e.name {
                labels.insert("port_name".into(), json!(n));
            }
            (Vec::new(), Value::Object(labels))
        });
        g.0.push(format!(
            "{}:{}",
            super::bracket(&e.target_ip),
            e.target_port
        ));
    }
    let rows: Vec<Value> = groups
        .into_values()
        .map(|(targets, labels)| json!({"targets": targets, "labels": labels}))
        .collect();
    pretty(&rows)
}

/// Where an upstream with no target points, so a config naming it stays valid (nginx refuses
/// an empty `upstream` and an unknown one).
pub const NGINX_PLACEHOLDER: &str = "127.0.0.1:1";

/// One `upstream <group> { server ip:port; ... }` block per group, draining servers `down`.
/// `keep`: groups that get a block even with no target (a placeholder server marked `down`).
pub fn nginx(targets: &[Target], keep: &[String]) -> String {
    let mut groups: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
    for k in keep.iter().filter(|k| safe_name(k)) {
        groups.entry(k.as_str()).or_default();
    }
    for t in targets.iter().filter(|t| safe_name(&t.group)) {
        groups.entry(t.group.as_str()).or_default().push(t);
    }
    let mut s = String::new();
    for (g, ts) in groups {
        s += &format!("upstream {g} {{\n");
        if ts.is_empty() {
            s += &format!("    server {NGINX_PLACEHOLDER} down;\n");
        }
        for t in ts {
            let down = if t.draining { " down" } else { "" };
            s += &format!("    server {}{down};\n", t.addr);
        }
        s += "}\n";
    }
    s
}

/// One `backend <group>` block per group with a `server` line per target, draining ones at
/// weight 0 (no new connections). Server names are the container ids where those are safe.
pub fn haproxy(targets: &[Target]) -> String {
    let mut groups: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
    for t in targets.iter().filter(|t| safe_name(&t.group)) {
        groups.entry(t.group.as_str()).or_default().push(t);
    }
    let mut s = String::new();
    for (g, ts) in groups {
        if !s.is_empty() {
            s += "\n";
        }
        s += &format!("backend {g}\n");
        let mut used = HashSet::new();
        for (i, t) in ts.iter().enumerate() {
            let mut name = if safe_name(&t.container) {
                t.container.clone()
            } else {
                format!("target-{}", i + 1)
            };
            if !used.insert(name.clone()) {
                name = format!("{name}-{}", t.addr.port());
                used.insert(name.clone());
            }
            let w = if t.draining { " weight 0" } else { "" };
            s += &format!("    server {name} {}{w}\n", t.addr);
        }
    }
    s
}

fn pretty<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    //! Golden outputs of every format over the test ledger (every mode, a draining replica, a
    //! UDP port, a container with no service and one with an unsafe service name).
    use std::net::Ipv4Addr;

    use super::*;
    use crate::lb::entries::entries;
    use crate::lb::{targets, testdata};

    fn all() -> Vec<PortEntry> {
        entries(&testdata::state(), Ipv4Addr::new(192, 0, 2, 2), None, None)
    }

    #[test]
    fn elbv2_golden() {
        let e: Vec<PortEntry> = all()
            .into_iter()
            .filter(|e| e.state == LbState::Serving)
            .collect();
        assert_eq!(
            elbv2(&e, "i-0abc"),
            r#"[
  {
    "Id": "10.0.1.23",
    "Port": 443
  },
  {
    "Id": "i-0abc",
    "Port": 5353
  },
  {
    "Id": "i-0abc",
    "Port": 49157
  },
  {
    "Id": "i-0abc",
    "Port": 49156
  },
  {
    "Id": "i-0abc",
    "Port": 49153
  },
  {
    "Id": "i-0abc",
    "Port": 49154
  },
  {
    "Id": "i-0abc",
    "Port": 8080
  }
]"#
        );
    }

    #[test]
    fn slb_golden() {
        let e: Vec<PortEntry> = all()
            .into_iter()
            .filter(|e| e.service.as_deref() == Some("web") || e.service.as_deref() == Some("api"))
            .collect();
        let eni = |mac: &str| (mac == "02:00:00:00:01:23").then(|| "eni-123".to_string());
        let out = slb(&e, "i-0abc", &eni);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!([
                {"ServerId": "eni-123", "Weight": "100", "Type": "eni", "Port": "443", "ServerIp": "10.0.1.23"},
                {"ServerId": "i-0abc", "Weight": "100", "Type": "ecs", "Port": "49153", "ServerIp": "192.0.2.2"},
                {"ServerId": "i-0abc", "Weight": "100", "Type": "ecs", "Port": "49154", "ServerIp": "192.0.2.2"},
                {"ServerId": "i-0abc", "Weight": "0", "Type": "ecs", "Port": "49155", "ServerIp": "192.0.2.2"},
                {"ServerId": "i-0abc", "Weight": "100", "Type": "ecs", "Port": "8080", "ServerIp": "192.0.2.2"}
            ])
        );
        // Without an ENI id the MAC stands in.
        let v: Value = serde_json::from_str(&slb(&e, "i-0abc", &|_| None)).unwrap();
        assert_eq!(v[0]["ServerId"], "02:00:00:00:01:23");
    }

    #[test]
    fn file_sd_golden() {
        let v: Value = serde_json::from_str(&file_sd(&all())).unwrap();
        assert_eq!(
            v,
            json!([
                {"targets": ["10.0.1.23:443"], "labels": {"service": "api", "container_id": "api-1", "network_mode": "awsvpc"}},
                {"targets": ["192.0.2.2:49157"], "labels": {"container_id": "evil", "network_mode": "bridge"}},
                {"targets": ["192.0.2.2:49156"], "labels": {"container_id": "loose", "network_mode": "bridge"}},
                {"targets": ["192.0.2.2:49153"], "labels": {"service": "web", "container_id": "web-a", "network_mode": "bridge"}},
                {"targets": ["192.0.2.2:49154"], "labels": {"service": "web", "container_id": "web-a", "network_mode": "bridge", "port_name": "metrics"}},
                {"targets": ["192.0.2.2:49155"], "labels": {"service": "web", "container_id": "web-b", "network_mode": "bridge"}},
                {"targets": ["192.0.2.2:8080"], "labels": {"service": "web", "container_id": "web-h", "network_mode": "host"}}
            ])
        );
        assert_eq!(file_sd(&[]), "[]");
    }

    #[test]
    fn an_ipv6_only_task_is_targeted_by_its_ipv6_address() {
        let mut st = testdata::state();
        let t = st.containers.get_mut("api-1").expect("api-1");
        t.ip = None;
        t.ip6 = Some("2001:db8:1::23".parse().expect("v6"));
        let e = entries(&st, Ipv4Addr::new(192, 0, 2, 2), Some("api-1"), None);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].target_ip, "2001:db8:1::23");
        assert_eq!(e[0].bind_ip, "2001:db8:1::23");
        assert_eq!(e[0].container_ip.as_deref(), Some("2001:db8:1::23"));
        let v: Value = serde_json::from_str(&file_sd(&e)).unwrap();
        assert_eq!(v[0]["targets"], json!(["[2001:db8:1::23]:443"]));
        let v: Value = serde_json::from_str(&elbv2(&e, "i-0abc")).unwrap();
        assert_eq!(v, json!([{"Id": "2001:db8:1::23", "Port": 443}]));
        // The HAProxy, nginx and etcd sinks carry IPv4 targets only.
        assert!(targets(&e).is_empty());
    }

    #[test]
    fn nginx_golden() {
        let t = targets(&all());
        assert_eq!(
            nginx(&t, &["gone".into(), "bad name".into()]),
            "upstream api {
    server 10.0.1.23:443;
}
upstream gone {
    server 127.0.0.1:1 down;
}
upstream web {
    server 192.0.2.2:8080;
    server 192.0.2.2:49153;
    server 192.0.2.2:49155 down;
}
upstream web.metrics {
    server 192.0.2.2:49154;
}
"
        );
        assert_eq!(nginx(&[], &[]), "");
    }

    #[test]
    fn haproxy_golden() {
        let t = targets(&all());
        assert_eq!(
            haproxy(&t),
            "backend api
    server api-1 10.0.1.23:443

backend web
    server web-h 192.0.2.2:8080
    server web-a 192.0.2.2:49153
    server web-b 192.0.2.2:49155 weight 0

backend web.metrics
    server web-a 192.0.2.2:49154
"
        );
    }

    /// Every line is one of the shapes the formats define, with safe names only.
    fn well_formed(text: &str, shapes: &[&str]) {
        for line in text.lines() {
            let ok = shapes.iter().any(|shape| {
                let (w, l) = (
                    shape.split(' ').collect::<Vec<_>>(),
                    line.split(' ').collect::<Vec<_>>(),
                );
                w.len() == l.len()
                    && w.iter().zip(&l).all(|(w, l)| match *w {
                        "NAME" => safe_name(l),
                        "ADDR" | "ADDR;" => l
                            .trim_end_matches(';')
                            .parse::<std::net::SocketAddrV4>()
                            .is_ok(),
                        _ => w == l,
                    })
            });
            assert!(ok, "unexpected line {line:?} in:\n{text}");
        }
    }

    #[test]
    fn unsafe_names_never_reach_the_text_formats() {
        let mut t = targets(&all());
        t.push(Target {
            group: "web".into(),
            addr: "192.0.2.9:1".parse().unwrap(),
            draining: false,
            container: "x\n    server evil 6.6.6.6:1".into(),
        });
        t.push(Target {
            group: "a}\nupstream b {".into(),
            addr: "192.0.2.9:2".parse().unwrap(),
            draining: false,
            container: "c".into(),
        });
        let h = haproxy(&t);
        well_formed(
            &h,
            &[
                "backend NAME",
                "    server NAME ADDR",
                "    server NAME ADDR weight 0",
                "",
            ],
        );
        assert!(h.contains("server target-4 192.0.2.9:1"), "{h}");
        assert!(!h.contains("192.0.2.9:2"), "{h}");
        let n = nginx(&t, &["x;y".into()]);
        well_formed(
            &n,
            &[
                "upstream NAME {",
                "    server ADDR;",
                "    server ADDR down;",
                "}",
            ],
        );
        assert!(!n.contains("192.0.2.9:2") && !n.contains("x;y"), "{n}");
    }
}
