//! netshim's nftables layout, as text for libnftables. Pure: the scripts are unit-tested here and
//! applied by the modes through [`crate::kernel::nft::Nft`].
//!
//! One table, `ip netshim`, owned by netshim alone. Port mappings are map elements, not rules:
//! the per-packet lookup is one hash lookup whatever the number of mappings, and a setup or
//! teardown adds or deletes only its own elements (their identity, protocol + host port + host
//! address, is stored in the state, so teardown never depends on the config).

use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::request::IngressRule;
use crate::state::{ContainerRecord, PortRecord};

/// The table netshim owns.
pub const TABLE: &str = "netshim";

/// Base chains and maps, parameterised by the bridge they serve.
pub struct Layout<'a> {
    pub bridge: &'a str,
    pub subnet: Ipv4Network,
}

impl Layout<'_> {
    /// The whole table definition (chains, maps, no elements).
    pub fn table_definition(&self) -> String {
        let (br, net) = (self.bridge, self.subnet);
        format!(
            r#"table ip {TABLE} {{
	map ports {{
		comment "protocol . host port -> container address . port (all host addresses)"
		type inet_proto . inet_service : ipv4_addr . inet_service
	}}
	map ports_ip {{
		comment "host address . protocol . host port -> container address . port (one host address)"
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
	}}
	set mapped {{
		comment "protocol . host port of every mapping, for the loopback guard"
		type inet_proto . inet_service
	}}
	chain guard {{
		comment "drop packets for a mapped port sent to 127.0.0.0/8 from outside the host"
		type filter hook prerouting priority raw; policy accept;
		iifname != "lo" ip daddr 127.0.0.0/8 meta l4proto . th dport @mapped counter drop
	}}
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local meta l4proto {{ tcp, udp }} jump dnat_ports
	}}
	chain output {{
		type nat hook output priority -100; policy accept;
		fib daddr type local meta l4proto {{ tcp, udp }} jump dnat_ports
	}}
	chain dnat_ports {{
		dnat ip to ip daddr . meta l4proto . th dport map @ports_ip
		dnat ip to meta l4proto . th dport map @ports
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "{br}" ip saddr 127.0.0.0/8 masquerade comment "host to 127.0.0.1:hostPort"
		oifname "{br}" ip saddr {net} ct status dnat masquerade comment "hairpin: container to a host port"
		ip saddr {net} oifname != "{br}" masquerade comment "egress"
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		oifname "{br}" ct state established,related accept
		oifname "{br}" ct status dnat accept
		iifname "{br}" accept
	}}
}}
"#
        )
    }

    /// Replaces the table atomically with the definition plus every mapping in `records`
    /// (used when the table is missing, e.g. after a firewall reload, and by `shim reload`).
    pub fn rebuild_script<'r>(
        &self,
        records: impl IntoIterator<Item = &'r ContainerRecord>,
    ) -> String {
        let mut s = format!("add table ip {TABLE}\ndelete table ip {TABLE}\n");
        s += &self.table_definition();
        for r in records {
            if let Some(ip) = r.ip {
                s += &add_elements(ip, &r.ports);
            }
        }
        s
    }
}

fn key(p: &PortRecord) -> (String, &'static str) {
    match p.host_ip {
        Some(hip) => (
            format!("{hip} . {} . {}", p.protocol, p.host_port),
            "ports_ip",
        ),
        None => (format!("{} . {}", p.protocol, p.host_port), "ports"),
    }
}

/// `add element` commands for one container's mappings ("" if none).
pub fn add_elements(ip: Ipv4Addr, ports: &[PortRecord]) -> String {
    let mut s = String::new();
    for p in ports {
        let (k, map) = key(p);
        let _ = writeln!(
            s,
            "add element ip {TABLE} {map} {{ {k} : {ip} . {} }}",
            p.container_port
        );
        let _ = writeln!(
            s,
            "add element ip {TABLE} mapped {{ {} . {} }}",
            p.protocol, p.host_port
        );
    }
    s
}

/// `delete element` commands for one container's mappings.
///
/// The `mapped` set entry (protocol . port) may be shared by mappings of other containers on
/// other host addresses; `still_mapped` says which of them must stay.
pub fn delete_elements(
    ports: &[PortRecord],
    still_mapped: &dyn Fn(&PortRecord) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for p in ports {
        let (k, map) = key(p);
        out.push(format!("delete element ip {TABLE} {map} {{ {k} }}\n"));
        if !still_mapped(p) {
            out.push(format!(
                "delete element ip {TABLE} mapped {{ {} . {} }}\n",
                p.protocol, p.host_port
            ));
        }
    }
    out
}

/// The table netshim puts inside a task's own network namespace.
pub const TASK_TABLE: &str = "netshim_task";

/// Instance-metadata addresses a task must not reach unless allowed.
pub const METADATA_V4: [&str; 2] = ["169.254.169.254", "100.100.100.200"];
pub const METADATA_V6: &str = "fd00:ec2::254";

/// The firewall inside a task's netns: metadata blocked (unless `allow_metadata`), and with
/// `ingress` rules, new inbound connections dropped unless a rule admits them. `None` when
/// there is nothing to enforce.
pub fn task_script(ingress: Option<&[IngressRule]>, allow_metadata: bool) -> Option<String> {
    if ingress.is_none() && allow_metadata {
        return None;
    }
    let mut s = format!(
        "add table inet {TASK_TABLE}\ndelete table inet {TASK_TABLE}\ntable inet {TASK_TABLE} {{\n"
    );
    if !allow_metadata {
        let _ = writeln!(
            s,
            "\tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\t\tip daddr {{ {} }} drop\n\t\tip6 daddr {METADATA_V6} drop\n\t}}",
            METADATA_V4.join(", ")
        );
    }
    if let Some(rules) = ingress {
        s += "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tct state established,related accept\n\t\tiifname \"lo\" accept\n";
        for r in rules {
            let fam = if r.cidr.is_ipv4() { "ip" } else { "ip6" };
            let _ = writeln!(
                s,
                "\t\t{fam} saddr {} {} dport {} accept",
                r.cidr, r.protocol, r.ports
            );
        }
        s += "\t\tct state new drop\n\t}\n";
    }
    s += "}\n";
    Some(s)
}

/// Deletes the whole table (for `shim reset`).
pub fn delete_table_script() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Protocol;

    fn rec(proto: Protocol, host: u16, hip: Option<Ipv4Addr>) -> PortRecord {
        PortRecord {
            protocol: proto,
            container_port: 80,
            host_port: host,
            host_ip: hip,
            name: None,
            dynamic: false,
        }
    }

    #[test]
    fn elements_are_keyed_by_protocol_and_port() {
        let s = add_elements(
            Ipv4Addr::new(10, 213, 0, 2),
            &[
                rec(Protocol::Tcp, 8080, None),
                rec(Protocol::Udp, 53, Some(Ipv4Addr::LOCALHOST)),
            ],
        );
        assert!(
            s.contains("add element ip netshim ports { tcp . 8080 : 10.213.0.2 . 80 }"),
            "{s}"
        );
        assert!(
            s.contains(
                "add element ip netshim ports_ip { 127.0.0.1 . udp . 53 : 10.213.0.2 . 80 }"
            ),
            "{s}"
        );
        assert!(s.contains("add element ip netshim mapped { udp . 53 }"));
    }

    #[test]
    fn delete_keeps_shared_guard_entries() {
        let d = delete_elements(
            &[rec(Protocol::Tcp, 8080, Some(Ipv4Addr::LOCALHOST))],
            &|_| true,
        );
        assert_eq!(
            d,
            vec!["delete element ip netshim ports_ip { 127.0.0.1 . tcp . 8080 }\n".to_string()]
        );
        let d = delete_elements(&[rec(Protocol::Tcp, 8080, None)], &|_| false);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn task_table_blocks_metadata_and_admits_only_listed_sources() {
        assert_eq!(task_script(None, true), None);
        let rules = crate::request::parse_ingress(r#"[{"protocol":"tcp","port":80,"cidr":"10.0.1.50/32"},{"protocol":"udp","portRange":"8000-8010","cidr":"fd00::/8"}]"#).unwrap();
        let s = task_script(Some(&rules), false).unwrap();
        assert!(
            s.contains("ip daddr { 169.254.169.254, 100.100.100.200 } drop"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr 10.0.1.50/32 tcp dport 80 accept"),
            "{s}"
        );
        assert!(
            s.contains("ip6 saddr fd00::/8 udp dport 8000-8010 accept"),
            "{s}"
        );
        assert!(
            s.trim_end().ends_with("ct state new drop\n\t}\n}") || s.contains("ct state new drop")
        );
        let only_meta = task_script(None, false).unwrap();
        assert!(!only_meta.contains("chain input"));
    }

    #[test]
    fn definition_names_bridge_and_subnet_and_has_no_per_mapping_rules() {
        let l = Layout {
            bridge: "br7",
            subnet: "10.7.0.0/16".parse().unwrap(),
        };
        let t = l.table_definition();
        assert!(t.contains("oifname \"br7\" ip saddr 10.7.0.0/16 ct status dnat masquerade"));
        assert_eq!(
            t.matches("dnat ip to").count(),
            2,
            "a constant number of DNAT rules"
        );
    }
}
