//! Instance metadata: the facts of an ENI given only by MAC, in the AWS or the Alibaba layout.
//! A minimal HTTP/1.0 client over one TCP connection per request, with bounded retries.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::config::{AwsvpcConfig, MetadataLayout};
use crate::types::MacAddr;

/// What the metadata service says about one ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniFacts {
    pub ipv4: Vec<Ipv4Network>,
    pub ipv6: Vec<Ipv6Network>,
    pub gateway4: Option<Ipv4Addr>,
}

const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(2);

/// One HTTP request: (status, body).
fn http(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let addr = endpoint
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {endpoint}\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "Content-Length: 0\r\n\r\n";
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    Ok((status, body.to_string()))
}

/// GET with retries on connection errors and 5xx; `Ok(None)` on 404.
fn get(endpoint: &str, path: &str, token: Option<&str>) -> anyhow::Result<Option<String>> {
    let headers: Vec<(&str, &str)> = token
        .map(|t| vec![("X-aws-ec2-metadata-token", t)])
        .unwrap_or_default();
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
        }
        match http(endpoint, "GET", path, &headers) {
            Ok((200, body)) => return Ok(Some(body)),
            Ok((404, _)) => return Ok(None),
            Ok((code, _)) if code < 500 => bail!("instance metadata {endpoint}{path}: HTTP {code}"),
            Ok((code, _)) => last = Some(anyhow!("HTTP {code}")),
            Err(e) => last = Some(anyhow!(e)),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no answer"))).with_context(|| {
        format!("instance metadata {endpoint}{path}: no answer after {ATTEMPTS} attempts")
    })
}

fn unknown(mac: &MacAddr, endpoint: &str) -> anyhow::Error {
    anyhow!(
        "instance metadata at {endpoint} has no interface with MAC {}: is the ENI attached to this instance?",
        mac
    )
}

/// Looks an ENI up by MAC.
pub fn lookup(cfg: &AwsvpcConfig, mac: &MacAddr) -> anyhow::Result<EniFacts> {
    let ep = cfg.metadata_endpoint.as_str();
    let base = format!("/latest/meta-data/network/interfaces/macs/{}/", mac);
    match cfg.metadata_layout {
        MetadataLayout::Aws => {
            // IMDSv2 first; an endpoint without tokens (IMDSv1) is used without one.
            let token = match http(
                ep,
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
            ) {
                Ok((200, t)) => Some(t.trim().to_string()),
                _ => None,
            };
            let t = token.as_deref();
            let ips =
                get(ep, &(base.clone() + "local-ipv4s"), t)?.ok_or_else(|| unknown(mac, ep))?;
            let cidr =
                get(ep, &(base.clone() + "subnet-ipv4-cidr-block"), t)?.ok_or_else(|| {
                    anyhow!("instance metadata: no subnet-ipv4-cidr-block for {}", mac)
                })?;
            let subnet: Ipv4Network = cidr
                .trim()
                .parse()
                .with_context(|| format!("instance metadata: subnet {cidr:?}"))?;
            let mut facts = EniFacts {
                ipv4: parse_v4_list(&ips, subnet.prefix())?,
                ipv6: vec![],
                gateway4: Some(Ipv4Addr::from(u32::from(subnet.network()) + 1)),
            };
            if let Some(v6) = get(ep, &(base + "ipv6s"), t)? {
                for a in v6.split_whitespace() {
                    facts.ipv6.push(
                        format!("{a}/64")
                            .parse()
                            .with_context(|| format!("instance metadata: ipv6 {a:?}"))?,
                    );
                }
            }
            Ok(facts)
        }
        MetadataLayout::Alibaba => {
            let ips = get(ep, &(base.clone() + "private-ipv4s"), None)?
                .ok_or_else(|| unknown(mac, ep))?;
            let mask = get(ep, &(base.clone() + "netmask"), None)?.unwrap_or_default();
            let mask: Ipv4Addr = mask
                .trim()
                .parse()
                .with_context(|| format!("instance metadata: netmask {mask:?}"))?;
            let prefix = u32::from(mask).leading_ones() as u8;
            let gw = get(ep, &(base + "gateway"), None)?.and_then(|g| g.trim().parse().ok());
            // A JSON array of strings, or one address per line.
            let list: Vec<String> = serde_json::from_str(ips.trim())
                .unwrap_or_else(|_| ips.split_whitespace().map(String::from).collect());
            Ok(EniFacts {
                ipv4: parse_v4_list(&list.join("\n"), prefix)?,
                ipv6: vec![],
                gateway4: gw,
            })
        }
    }
}

fn parse_v4_list(text: &str, prefix: u8) -> anyhow::Result<Vec<Ipv4Network>> {
    text.split_whitespace()
        .map(|a| {
            let ip: Ipv4Addr = a
                .parse()
                .with_context(|| format!("instance metadata: address {a:?}"))?;
            Ok(Ipv4Network::new(ip, prefix)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_get_the_subnet_prefix() {
        let l = parse_v4_list("10.0.1.5\n10.0.1.6\n", 24).unwrap();
        assert_eq!(l[1].to_string(), "10.0.1.6/24");
        assert!(parse_v4_list("nope", 24).is_err());
    }
}
