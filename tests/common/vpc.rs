//! The awsvpc rig: a "VPC" namespace V whose bridge is the subnet switch (10.0.1.0/24, with the
//! gateway, the metadata addresses and a web page on port 80), peer machines on it, veth "ENIs"
//! whose host end appears in a chosen host namespace H with a chosen MAC, and a fake
//! instance-metadata service on H's loopback; plus readers of the kernel's view (`ip -j`).
//!
//! [`VpcNet`] is the subnet around any host namespace (the runtime end-to-end tests' H);
//! [`Vpc`] is a [`Rig`] with a `VpcNet`, metadata and an `[awsvpc]` config (tests/awsvpc.rs).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

/// The subnet gateway (the VPC router's address on the subnet switch).
pub const SUBNET_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// Other machines in the subnet.
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 50);
pub const PEER2_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 51);
/// The metadata addresses tasks must not reach (AWS, Alibaba).
pub const AWS_METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// The subnet's IPv6 prefix (2001:db8:1::/64) after [`VpcNet::enable_ipv6`]: the gateway, a
/// second address of the VPC router (another source), and AWS's IPv6 metadata address.
pub const SUBNET_GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const VPC_OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const AWS_METADATA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// An interface standing in for an ENI: a veth whose host end is `name` (in H) with `mac`, and
/// whose other end `vpc_end` is a port of the subnet switch in V.
#[derive(Clone, Debug)]
pub struct Eni {
    pub name: String,
    pub mac: String,
    pub vpc_end: String,
}

/// The VPC around host namespace H: V with the subnet switch, peers on it, and ENIs plugged into
/// H. Names are `prefix` plus at most two characters. Dropping it deletes V and the peers.
pub struct VpcNet {
    pub prefix: String,
    /// The host namespace (H) the ENIs appear in.
    pub host: String,
    /// The VPC namespace (V).
    pub ns: String,
    /// The subnet switch in V.
    pub switch: String,
    /// The first peer machine (10.0.1.50).
    pub peer: String,
    peers: usize,
    enis: u8,
    mac_base: [u8; 2],
    /// V and the peers, for cleanup.
    namespaces: Vec<String>,
}

impl VpcNet {
    /// V with its switch, gateway, metadata addresses and web page, and the first peer.
    pub fn new(prefix: &str, host: &str) -> VpcNet {
        // Link names are the prefix plus two characters; the kernel allows 15.
        assert!(
            prefix.len() <= 13,
            "prefix {prefix} too long for link names"
        );
        let p = prefix;
        let vpc = format!("{p}vpc");
        ip(&["netns", "add", &vpc]);
        let mut h = DefaultHasher::new();
        p.hash(&mut h);
        let hv = h.finish().to_be_bytes();
        let mac_base = [hv[0], hv[1]];
        let mut net = VpcNet {
            prefix: p.to_string(),
            host: host.to_string(),
            ns: vpc.clone(),
            switch: format!("{p}sw"),
            peer: String::new(),
            peers: 0,
            enis: 0,
            mac_base,
            namespaces: vec![vpc.clone()],
        };
        // From here on, Drop deletes what was made.
        let switch = net.switch.clone();
        ip(&["-n", &vpc, "link", "set", "lo", "up"]);
        ip(&["-n", &vpc, "link", "add", &switch, "type", "bridge"]);
        let switch_mac = format!("02:00:{:02x}:{:02x}:ff:fe", mac_base[0], mac_base[1]);
        ip(&["-n", &vpc, "link", "set", &switch, "address", &switch_mac]);
        for a in [
            format!("{SUBNET_GW}/24"),
            format!("{AWS_METADATA}/32"),
            format!("{ALIBABA_METADATA}/32"),
        ] {
            ip(&["-n", &vpc, "addr", "add", &a, "dev", &switch]);
        }
        ip(&["-n", &vpc, "link", "set", &switch, "up"]);
        // The metadata service in the VPC (and the router's own web page): answers on port 80.
        tcp_server(
            &vpc,
            80,
            "HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\nvpc metadata\n",
        );
        net.peer = net.add_peer(PEER_IP);
        net
    }

    /// IPv6 on the subnet switch: the gateway [`SUBNET_GW6`] and [`VPC_OTHER6`] (2001:db8:1::/64)
    /// and the metadata address [`AWS_METADATA6`], all without duplicate address detection, each
    /// answering on port 80 with "vpc6 <address>".
    pub fn enable_ipv6(&self) {
        for a in [
            format!("{SUBNET_GW6}/64"),
            format!("{VPC_OTHER6}/64"),
            format!("{AWS_METADATA6}/128"),
        ] {
            ip(&[
                "-n",
                &self.ns,
                "addr",
                "add",
                &a,
                "dev",
                &self.switch,
                "nodad",
            ]);
        }
        for a in [SUBNET_GW6, AWS_METADATA6] {
            tcp_server_on(
                &self.ns,
                SocketAddr::new(IpAddr::V6(a), 80),
                &format!("vpc6 {a}"),
            );
        }
    }

    /// Another machine on the subnet at `addr`/24 (default route via the subnet gateway).
    pub fn add_peer(&mut self, addr: Ipv4Addr) -> String {
        let n = self.peers;
        self.peers += 1;
        let p = self.prefix.clone();
        let ns = format!("{p}p{n}");
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let (port, inside) = (format!("{p}g{n}"), format!("{p}q{n}"));
        ip(&[
            "-n", &self.ns, "link", "add", &port, "type", "veth", "peer", "name", &inside, "netns",
            &ns,
        ]);
        ip(&["-n", &self.ns, "link", "set", &port, "master", &self.switch]);
        ip(&["-n", &self.ns, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inside,
        ]);
        ip(&["-n", &ns, "link", "set", &inside, "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &SUBNET_GW.to_string(),
        ]);
        ns
    }

    /// Names and a MAC for the next ENI, without attaching it.
    pub fn next_eni(&mut self) -> Eni {
        self.enis += 1;
        let n = self.enis;
        let p = &self.prefix;
        Eni {
            name: format!("{p}e{n}"),
            mac: format!(
                "02:00:{:02x}:{:02x}:00:{n:02x}",
                self.mac_base[0], self.mac_base[1]
            ),
            vpc_end: format!("{p}f{n}"),
        }
    }

    /// Attaches `eni` to H: its end in H down with no address, the other on the switch.
    pub fn plug(&self, eni: &Eni) {
        let host = &self.host;
        ip(&[
            "-n",
            &self.ns,
            "link",
            "add",
            &eni.vpc_end,
            "type",
            "veth",
            "peer",
            "name",
            &eni.name,
            "netns",
            host,
        ]);
        ip(&[
            "-n", host, "link", "set", "dev", &eni.name, "address", &eni.mac,
        ]);
        ip(&[
            "-n",
            &self.ns,
            "link",
            "set",
            &eni.vpc_end,
            "master",
            &self.switch,
        ]);
        ip(&["-n", &self.ns, "link", "set", &eni.vpc_end, "up"]);
    }

    pub fn attach_eni(&mut self) -> Eni {
        let e = self.next_eni();
        self.plug(&e);
        e
    }
}

impl Drop for VpcNet {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A [`Rig`] (host H with a default route over its link to the client) in a VPC, with fake
/// instance metadata in H and an `[awsvpc]` config.
pub struct Vpc {
    /// Declared first, so V and the peers go before the rig's namespaces.
    pub net: VpcNet,
    pub rig: Rig,
    pub meta: Metadata,
    /// The first peer machine (10.0.1.50): `net.peer`.
    pub peer: String,
}

impl Deref for Vpc {
    type Target = Rig;
    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl DerefMut for Vpc {
    fn deref_mut(&mut self) -> &mut Rig {
        &mut self.rig
    }
}

impl Vpc {
    /// A rig with `[awsvpc]` config: the fake metadata endpoint, layout "aws", eni_wait_seconds 1,
    /// then `overrides` (key, TOML value).
    pub fn new(overrides: &[(&str, &str)]) -> Vpc {
        let rig = Rig::new("");
        let host = rig.host.clone();
        // The host's primary interface: its link to the client, holding the default route.
        ip(&[
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            &CLIENT_IP.to_string(),
        ]);
        let layout = match overrides.iter().find(|(k, _)| *k == "metadata_layout") {
            Some((_, v)) if v.contains("alibaba") => Layout::Alibaba,
            _ => Layout::Aws,
        };
        let meta = metadata_server(&host, layout);
        let net = VpcNet::new(&rig.prefix, &host);
        let v = Vpc {
            peer: net.peer.clone(),
            net,
            rig,
            meta,
        };
        v.configure(overrides);
        v
    }

    /// Rewrites the config: the defaults of `new`, then `overrides`.
    pub fn configure(&self, overrides: &[(&str, &str)]) {
        let mut keys: Vec<(String, String)> = vec![
            (
                "metadata_endpoint".into(),
                format!("\"http://127.0.0.1:{}\"", self.meta.port),
            ),
            ("metadata_layout".into(), "\"aws\"".into()),
            ("eni_wait_seconds".into(), "1".into()),
            // The rig's ENIs are veth ends.
            ("interface_kinds".into(), "[\"veth\"]".into()),
        ];
        for (k, v) in overrides {
            match keys.iter_mut().find(|(key, _)| key == k) {
                Some(kv) => kv.1 = v.to_string(),
                None => keys.push((k.to_string(), v.to_string())),
            }
        }
        let mut text = String::from("[awsvpc]\n");
        for (k, v) in keys {
            text.push_str(&format!("{k} = {v}\n"));
        }
        fs::write(self.config_path(), text).expect("config");
    }

    /// Another machine on the subnet (see [`VpcNet::add_peer`]).
    pub fn add_peer(&mut self, addr: Ipv4Addr) -> String {
        self.net.add_peer(addr)
    }

    pub fn next_eni(&mut self) -> Eni {
        self.net.next_eni()
    }

    pub fn plug(&self, eni: &Eni) {
        self.net.plug(eni)
    }

    pub fn attach_eni(&mut self) -> Eni {
        self.net.attach_eni()
    }

    /// H's primary interface (the one holding the default route) as an ENI.
    pub fn primary(&self) -> Eni {
        let name = format!("{}a", self.prefix);
        let l = link(&self.host, &name).expect("primary link");
        Eni {
            mac: l["address"].as_str().expect("mac").to_string(),
            vpc_end: String::new(),
            name,
        }
    }

    /// A new task: a container namespace with a process in it.
    pub fn task(&mut self) -> usize {
        self.rig.container()
    }

    pub fn ns(&self, i: usize) -> String {
        self.containers[i].ns.clone()
    }

    /// createRuntime for task `i` in awsvpc mode (`mappings` "" = no annotation).
    pub fn setup(&self, i: usize, eni: &str, mappings: &str, ingress: Option<&str>) -> Output {
        let mut ann = vec![("netshim.network-mode", "awsvpc"), ("netshim.eni", eni)];
        if !mappings.is_empty() {
            ann.push(("netshim.port-mappings", mappings));
        }
        if let Some(g) = ingress {
            ann.push(("netshim.ingress", g));
        }
        self.shim(&["hook", "createRuntime"], &self.oci_state(i, &ann))
    }

    pub fn must_setup(&self, i: usize, eni: &str, mappings: &str, ingress: Option<&str>) {
        let out = self.setup(i, eni, mappings, ingress);
        assert!(
            out.status.success(),
            "setup of task {i} with {eni}: {} (metadata requests: {:?})",
            stderr(&out),
            self.meta.requests()
        );
    }
}

impl Drop for Vpc {
    /// Task namespaces netshim still holds (a failed test skipped poststop) are unmounted so the
    /// state dir can go; `Rig`'s drop then removes the namespaces and the directory.
    fn drop(&mut self) {
        unmount_under(&self.rig.dir);
    }
}

pub fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("IPv4 address")
}

/// An ENI spec with everything given.
pub fn eni_spec(mac: &str, ips: &[&str], attachment: &str) -> Value {
    json!({
        "macAddress": mac,
        "ipv4Addresses": ips,
        "ipv6Addresses": [],
        "subnetGatewayIpv4Address": SUBNET_GW.to_string(),
        "mtu": 1500,
        "attachment": attachment,
    })
}

/// An exclusive ENI spec with IPv4 addresses `v4` (gateway [`SUBNET_GW`] when any) and IPv6
/// addresses `v6` (gateway [`SUBNET_GW6`] when any).
pub fn eni_spec_dual(mac: &str, v4: &[&str], v6: &[&str], attachment: &str) -> Value {
    let mut v = json!({
        "macAddress": mac,
        "ipv4Addresses": v4,
        "ipv6Addresses": v6,
        "mtu": 1500,
        "attachment": attachment,
    });
    if !v4.is_empty() {
        v["subnetGatewayIpv4Address"] = json!(SUBNET_GW.to_string());
    }
    if !v6.is_empty() {
        v["subnetGatewayIpv6Address"] = json!(SUBNET_GW6.to_string());
    }
    v
}

pub fn exclusive(eni: &Eni, ips: &[&str]) -> String {
    eni_spec(&eni.mac, ips, "exclusive").to_string()
}

pub fn shared(eni: &Eni, ips: &[&str]) -> String {
    eni_spec(&eni.mac, ips, "shared").to_string()
}

/// The smallest exclusive request: MAC, one address, the subnet gateway (nothing from metadata).
pub fn eni_annotation(eni: &Eni, cidr: &str) -> String {
    json!({
        "macAddress": eni.mac,
        "ipv4Addresses": [cidr],
        "subnetGatewayIpv4Address": SUBNET_GW.to_string(),
    })
    .to_string()
}

// --- reading the kernel's view with `ip -j` ---

/// `ip -j -n ns args...` parsed; None when ip fails (no such device, no such namespace).
pub fn ip_json(ns: &str, args: &[&str]) -> Option<Value> {
    let out = Command::new("/usr/sbin/ip")
        .args(["-j", "-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

pub fn ip_text(ns: &str, args: &[&str]) -> String {
    let out = Command::new("/usr/sbin/ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn link(ns: &str, name: &str) -> Option<Value> {
    ip_json(ns, &["link", "show", "dev", name]).and_then(|v| v.get(0).cloned())
}

pub fn links(ns: &str) -> Vec<Value> {
    ip_json(ns, &["link", "show"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

pub fn link_names(ns: &str) -> Vec<String> {
    links(ns)
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect()
}

pub fn link_by_mac(ns: &str, mac: &str) -> Option<String> {
    links(ns)
        .iter()
        .find(|l| {
            l["address"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(mac))
        })
        .and_then(|l| l["ifname"].as_str().map(String::from))
}

/// Links in `ns` named like netshim's own (nsa…, nse…, nsh…); the rig's are nsi….
pub fn netshim_links(ns: &str) -> Vec<String> {
    link_names(ns)
        .into_iter()
        .filter(|n| ["nsa", "nse", "nsh"].iter().any(|p| n.starts_with(p)))
        .collect()
}

pub fn flags(l: &Value) -> Vec<String> {
    l["flags"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Addresses on `dev` as "addr/len"; `family` "-4", "-6" or "" for both.
pub fn addrs(ns: &str, dev: &str, family: &str) -> Vec<String> {
    let mut args = vec![];
    if !family.is_empty() {
        args.push(family);
    }
    args.extend(["addr", "show", "dev", dev]);
    ip_json(ns, &args)
        .and_then(|v| v.get(0).cloned())
        .and_then(|l| l["addr_info"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect()
}

/// The IPv4 default route as (gateway, dev).
pub fn default_route(ns: &str) -> Option<(String, String)> {
    let r = ip_json(ns, &["-4", "route", "show", "default"])?;
    let r = r.get(0)?;
    Some((r["gateway"].as_str()?.into(), r["dev"].as_str()?.into()))
}

/// The IPv6 default route as (gateway, dev).
pub fn default_route6(ns: &str) -> Option<(String, String)> {
    let r = ip_json(ns, &["-6", "route", "show", "default"])?;
    let r = r.get(0)?;
    Some((r["gateway"].as_str()?.into(), r["dev"].as_str()?.into()))
}

/// The IPv6 addresses on `dev` with global scope, as `ip -j` reports them (flags included).
pub fn global_addrs6(ns: &str, dev: &str) -> Vec<Value> {
    ip_json(ns, &["-6", "addr", "show", "dev", dev, "scope", "global"])
        .and_then(|v| v.get(0).cloned())
        .and_then(|l| l["addr_info"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        // `ip -j` leaves an empty object for each address the scope filter dropped.
        .filter(|a| a.get("local").is_some())
        .collect()
}

/// The ENI is back in host namespace `host` under its own name, with its MAC, down, with no
/// address.
pub fn assert_eni_home(host: &str, eni: &Eni, when: &str) {
    let l = link(host, &eni.name).unwrap_or_else(|| {
        panic!(
            "{when}: {} is not in the host namespace (host links: {:?}; by MAC: {:?})",
            eni.name,
            link_names(host),
            link_by_mac(host, &eni.mac)
        )
    });
    assert_eq!(l["address"], eni.mac.as_str(), "{when}: MAC changed: {l}");
    assert!(
        !flags(&l).contains(&"UP".to_string()),
        "{when}: left up: {l}"
    );
    assert_eq!(
        addrs(host, &eni.name, ""),
        Vec::<String>::new(),
        "{when}: addresses left on {}",
        eni.name
    );
}

// --- fake instance metadata, on 127.0.0.1 inside H ---

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Layout {
    Aws,
    Alibaba,
}

pub const TOKEN: &str = "netshim-test-token";
pub const MACS_PATH: &str = "/latest/meta-data/network/interfaces/macs/";

/// The fake metadata service: which MACs it knows (with their IPv4 addresses), and a log of the
/// requests it answered ("METHOD path -> status"), for failure messages.
pub struct Metadata {
    pub port: u16,
    known: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Metadata {
    pub fn know(&self, mac: &str, ips: &[Ipv4Addr]) {
        self.known
            .lock()
            .unwrap()
            .insert(mac.to_ascii_lowercase(), ips.to_vec());
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Starts the metadata service on 127.0.0.1:<any> in netns `ns`; a thread per connection.
pub fn metadata_server(ns: &str, layout: Layout) -> Metadata {
    let l = in_ns(ns, || {
        TcpListener::bind(("127.0.0.1", 0)).expect("bind metadata")
    });
    let m = Metadata {
        port: l.local_addr().expect("local addr").port(),
        known: Arc::default(),
        log: Arc::default(),
    };
    let (known, log) = (m.known.clone(), m.log.clone());
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (known, log) = (known.clone(), log.clone());
            thread::spawn(move || serve_metadata(s, layout, &known, &log));
        }
    });
    m
}

pub struct HttpRequest {
    method: String,
    path: String,
    version: String,
    /// Lower-cased names.
    headers: HashMap<String, String>,
}

impl HttpRequest {
    fn keep_alive(&self) -> bool {
        let conn = self
            .headers
            .get("connection")
            .map(|c| c.to_ascii_lowercase())
            .unwrap_or_default();
        if self.version == "HTTP/1.0" {
            conn == "keep-alive"
        } else {
            conn != "close"
        }
    }
}

/// Serves requests on one connection until the client closes it or asks to.
pub fn serve_metadata(
    s: TcpStream,
    layout: Layout,
    known: &Mutex<HashMap<String, Vec<Ipv4Addr>>>,
    log: &Mutex<Vec<String>>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(r) = s.try_clone() else { return };
    let mut r = BufReader::new(r);
    let mut w = s;
    while let Some(req) = read_request(&mut r) {
        let (code, body) = metadata_answer(layout, &req, &known.lock().unwrap());
        log.lock()
            .unwrap()
            .push(format!("{} {} -> {code}", req.method, req.path));
        let keep = req.keep_alive();
        let reason = match code {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            405 => "Method Not Allowed",
            _ => "Not Found",
        };
        let head = format!(
            "{} {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            req.version,
            body.len(),
            if keep { "keep-alive" } else { "close" }
        );
        if w.write_all(head.as_bytes()).is_err() || w.write_all(body.as_bytes()).is_err() {
            return;
        }
        if !keep {
            return;
        }
    }
}

pub fn read_request(r: &mut impl BufRead) -> Option<HttpRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let version = parts.next().unwrap_or("HTTP/1.0").to_string();
    // Origin form, or absolute form (http://host/path).
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(HttpRequest {
        method,
        path,
        version,
        headers,
    })
}

/// (status, body) for one request. AWS is IMDSv2: a token from `PUT /latest/api/token` (which
/// needs the TTL header) is required on every GET. Alibaba needs no token.
pub fn metadata_answer(
    layout: Layout,
    req: &HttpRequest,
    known: &HashMap<String, Vec<Ipv4Addr>>,
) -> (u16, String) {
    if req.path == "/latest/api/token" {
        if req.method != "PUT" {
            return (405, String::new());
        }
        let ttl = match layout {
            Layout::Aws => "x-aws-ec2-metadata-token-ttl-seconds",
            Layout::Alibaba => "x-aliyun-ecs-metadata-token-ttl-seconds",
        };
        if layout == Layout::Aws && !req.headers.contains_key(ttl) {
            return (400, format!("missing {ttl}"));
        }
        return (200, TOKEN.into());
    }
    if req.method != "GET" {
        return (405, String::new());
    }
    if layout == Layout::Aws
        && req
            .headers
            .get("x-aws-ec2-metadata-token")
            .map(String::as_str)
            != Some(TOKEN)
    {
        return (401, String::new());
    }
    let Some(rest) = req.path.strip_prefix(MACS_PATH) else {
        return (404, String::new());
    };
    if rest.is_empty() {
        let macs: Vec<String> = known.keys().map(|m| format!("{m}/")).collect();
        return (200, macs.join("\n"));
    }
    let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
    let mac = mac.to_ascii_lowercase();
    let Some(ips) = known.get(&mac) else {
        return (404, String::new());
    };
    let ips_s: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    let id = format!("eni-{}", mac.replace(':', ""));
    let ok = |b: String| (200, b);
    match (layout, key.trim_end_matches('/')) {
        (Layout::Aws, "") => ok(
            "device-number\ninterface-id\nlocal-ipv4s\nmac\nsubnet-id\nsubnet-ipv4-cidr-block\nvpc-ipv4-cidr-block"
                .into(),
        ),
        (Layout::Alibaba, "") => ok(
            "gateway\nmac\nnetmask\nnetwork-interface-id\nprimary-ip-address\nprivate-ipv4s\nvpc-cidr-block\nvswitch-cidr-block"
                .into(),
        ),
        (_, "mac") => ok(mac.clone()),
        (Layout::Aws, "local-ipv4s") => ok(ips_s.join("\n")),
        (Layout::Aws, "subnet-ipv4-cidr-block") => ok("10.0.1.0/24".into()),
        (Layout::Aws, "vpc-ipv4-cidr-block") => ok("10.0.0.0/16".into()),
        (Layout::Aws, "interface-id") => ok(id),
        (Layout::Aws, "device-number") => ok("1".into()),
        (Layout::Aws, "subnet-id") => ok("subnet-0123456789abcdef0".into()),
        (Layout::Alibaba, "private-ipv4s") => ok(serde_json::to_string(&ips_s).unwrap()),
        (Layout::Alibaba, "primary-ip-address") => ok(ips_s.first().cloned().unwrap_or_default()),
        (Layout::Alibaba, "netmask") => ok("255.255.255.0".into()),
        (Layout::Alibaba, "gateway") => ok(SUBNET_GW.to_string()),
        (Layout::Alibaba, "vswitch-cidr-block") => ok("10.0.1.0/24".into()),
        (Layout::Alibaba, "vpc-cidr-block") => ok("10.0.0.0/16".into()),
        (Layout::Alibaba, "network-interface-id") => ok(id),
        _ => (404, String::new()), // ipv6s among them: these ENIs have no IPv6 address
    }
}
