//! Instance metadata: the facts of an ENI given only by MAC, in the AWS or the Alibaba layout.
//!
//! The service is trusted no more than the tenant: every answer is capped ([`MAX_BODY`]), every
//! lookup has one overall deadline ([`DEADLINE`]) however slowly the server drips bytes, a token
//! with control characters is refused (it would inject a header), and no error repeats more of
//! a body than a short, escaped excerpt. HTTP through `ureq` (no TLS, no redirects).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::config::{AwsvpcConfig, MetadataLayout};
use crate::request::quote;
use crate::types::MacAddr;

/// What the metadata service says about one ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniFacts {
    pub ipv4: Vec<Ipv4Network>,
    pub ipv6: Vec<Ipv6Network>,
    pub gateway4: Option<Ipv4Addr>,
}

const ATTEMPTS: u32 = 3;
/// Longest answer read; the facts netshim asks for are a few hundred bytes.
pub const MAX_BODY: u64 = 64 * 1024;
/// One lookup (all its requests and retries) ends by then.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// A connection attempt.
const CONNECT: Duration = Duration::from_millis(1000);

/// One lookup's client and what is left of its deadline.
struct Client {
    endpoint: String,
    end: Instant,
}

impl Client {
    fn new(endpoint: &str) -> Client {
        Client::within(endpoint, DEADLINE)
    }

    /// A client whose requests all end within `d`.
    fn within(endpoint: &str, d: Duration) -> Client {
        Client {
            endpoint: endpoint.to_string(),
            end: Instant::now() + d,
        }
    }

    fn left(&self) -> anyhow::Result<Duration> {
        let now = Instant::now();
        if now >= self.end {
            bail!(
                "instance metadata {}: no complete answer within {}s",
                self.endpoint,
                DEADLINE.as_secs()
            );
        }
        Ok(self.end - now)
    }

    /// One request: (status, body), the body capped at [`MAX_BODY`].
    fn request(
        &self,
        method: &str,
        path: &str,
        header: Option<(&str, &str)>,
    ) -> anyhow::Result<(u16, String)> {
        let left = self.left()?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(left))
            .timeout_connect(Some(CONNECT.min(left)))
            .http_status_as_error(false)
            .max_redirects(0)
            .max_response_header_size(16 * 1024)
            .build()
            .into();
        let url = format!("http://{}{path}", self.endpoint);
        let mut resp = match method {
            "PUT" => {
                let mut r = agent.put(&url);
                if let Some((k, v)) = header {
                    r = r.header(k, v);
                }
                r.send_empty()
            }
            _ => {
                let mut r = agent.get(&url);
                if let Some((k, v)) = header {
                    r = r.header(k, v);
                }
                r.call()
            }
        }
        .map_err(|e| anyhow!("{e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| anyhow!("reading the answer: {e} (at most {MAX_BODY} bytes are read)"))?;
        Ok((status, body))
    }

    /// GET with retries on connection errors and 5xx; `Ok(None)` on 404.
    fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<Option<String>> {
        let header = token.map(|t| ("X-aws-ec2-metadata-token", t));
        let ep = &self.endpoint;
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let pause = Duration::from_millis(200 * u64::from(attempt));
                std::thread::sleep(pause.min(self.left()?));
            }
            match self.request("GET", path, header) {
                Ok((200, body)) => return Ok(Some(body)),
                Ok((404, _)) => return Ok(None),
                Ok((code, _)) if code < 500 => bail!("instance metadata {ep}{path}: HTTP {code}"),
                Ok((code, _)) => last = Some(anyhow!("HTTP {code}")),
                Err(e) => {
                    if self.left().is_err() {
                        return Err(e.context(format!("instance metadata {ep}{path}")));
                    }
                    last = Some(e)
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no answer"))).with_context(|| {
            format!("instance metadata {ep}{path}: no answer after {ATTEMPTS} attempts")
        })
    }
}

/// A session token as the service sent it, if it is one a header can carry.
fn token(body: &str) -> anyhow::Result<String> {
    let t = body.trim();
    if t.is_empty() || t.len() > 1024 || t.chars().any(|c| c.is_control()) {
        bail!(
            "instance metadata: the session token {} is not one a header can carry (empty, too long or with control characters)",
            quote(t)
        );
    }
    Ok(t.to_string())
}

fn unknown(mac: &MacAddr, endpoint: &str) -> anyhow::Error {
    anyhow!(
        "instance metadata at {endpoint} has no interface with MAC {}: is the ENI attached to this instance?",
        mac
    )
}

/// One metadata value (`/latest/meta-data/<rel>`), asked once within half a second, so a host
/// without a metadata service falls back quickly; `None` when it does not answer or has no
/// such value.
pub fn quick_value(cfg: &AwsvpcConfig, rel: &str) -> Option<String> {
    let c = Client::within(&cfg.metadata_endpoint, Duration::from_millis(500));
    let token = match cfg.metadata_layout {
        MetadataLayout::Aws => match c.request(
            "PUT",
            "/latest/api/token",
            Some(("X-aws-ec2-metadata-token-ttl-seconds", "60")),
        ) {
            Ok((200, t)) => token(&t).ok(),
            Ok(_) => None,
            Err(_) => return None,
        },
        MetadataLayout::Alibaba => None,
    };
    let header = token.as_deref().map(|t| ("X-aws-ec2-metadata-token", t));
    match c.request("GET", &format!("/latest/meta-data/{rel}"), header) {
        Ok((200, body)) if !body.trim().is_empty() => Some(body.trim().to_string()),
        _ => None,
    }
}

/// The IPv4 addresses instance metadata lists for the ENI with this MAC, primary first, asked
/// within half a second: `None` when no metadata service answers or it does not know the MAC
/// (a host without one, a test rig), so the caller checks only what metadata can vouch for.
pub fn listed_ipv4(cfg: &AwsvpcConfig, mac: &MacAddr) -> Option<Vec<Ipv4Addr>> {
    let mac = mac.to_string().to_ascii_lowercase();
    let key = match cfg.metadata_layout {
        MetadataLayout::Aws => "local-ipv4s",
        MetadataLayout::Alibaba => "private-ipv4s",
    };
    let text = quick_value(cfg, &format!("network/interfaces/macs/{mac}/{key}"))?;
    // A JSON array of strings (Alibaba), or one address per line.
    let list: Vec<String> = serde_json::from_str(&text)
        .unwrap_or_else(|_| text.split_whitespace().map(String::from).collect());
    let ips: Vec<Ipv4Addr> = list.iter().filter_map(|s| s.trim().parse().ok()).collect();
    (!ips.is_empty()).then_some(ips)
}

/// The ENI id of the interface with this MAC (AWS `interface-id`, Alibaba
/// `network-interface-id`), for exports that name the ENI.
pub fn eni_id(cfg: &AwsvpcConfig, mac: &str) -> Option<String> {
    let key = match cfg.metadata_layout {
        MetadataLayout::Aws => "interface-id",
        MetadataLayout::Alibaba => "network-interface-id",
    };
    let mac = mac.to_ascii_lowercase();
    quick_value(cfg, &format!("network/interfaces/macs/{mac}/{key}"))
}

/// Looks an ENI up by MAC.
pub fn lookup(cfg: &AwsvpcConfig, mac: &MacAddr) -> anyhow::Result<EniFacts> {
    let c = Client::new(&cfg.metadata_endpoint);
    let ep = cfg.metadata_endpoint.as_str();
    let base = format!("/latest/meta-data/network/interfaces/macs/{mac}/");
    match cfg.metadata_layout {
        MetadataLayout::Aws => {
            // IMDSv2 first; an endpoint without tokens (IMDSv1) is used without one.
            let token = match c.request(
                "PUT",
                "/latest/api/token",
                Some(("X-aws-ec2-metadata-token-ttl-seconds", "60")),
            ) {
                Ok((200, t)) => Some(token(&t)?),
                _ => None,
            };
            let t = token.as_deref();
            let ips = c
                .get(&(base.clone() + "local-ipv4s"), t)?
                .ok_or_else(|| unknown(mac, ep))?;
            let cidr = c
                .get(&(base.clone() + "subnet-ipv4-cidr-block"), t)?
                .ok_or_else(|| anyhow!("instance metadata: no subnet-ipv4-cidr-block for {mac}"))?;
            let subnet: Ipv4Network = cidr.trim().parse().map_err(|_| {
                anyhow!(
                    "instance metadata: subnet {} is not a CIDR",
                    quote(cidr.trim())
                )
            })?;
            let gateway4 = u32::from(subnet.network())
                .checked_add(1)
                .map(Ipv4Addr::from)
                .filter(|g| subnet.prefix() <= 30 && subnet.contains(*g));
            let mut facts = EniFacts {
                ipv4: parse_v4_list(&ips, subnet.prefix())?,
                ipv6: vec![],
                gateway4,
            };
            if let Some(v6) = c.get(&(base + "ipv6s"), t)? {
                for a in v6.split_whitespace() {
                    facts.ipv6.push(format!("{a}/64").parse().map_err(|_| {
                        anyhow!("instance metadata: {} is not an IPv6 address", quote(a))
                    })?);
                }
            }
            Ok(facts)
        }
        MetadataLayout::Alibaba => {
            let ips = c
                .get(&(base.clone() + "private-ipv4s"), None)?
                .ok_or_else(|| unknown(mac, ep))?;
            let mask = c
                .get(&(base.clone() + "netmask"), None)?
                .unwrap_or_default();
            let mask: Ipv4Addr = mask.trim().parse().map_err(|_| {
                anyhow!(
                    "instance metadata: netmask {} is not an address",
                    quote(mask.trim())
                )
            })?;
            let bits = u32::from(mask);
            let prefix = bits.leading_ones();
            if bits.checked_shl(prefix).unwrap_or(0) != 0 {
                bail!("instance metadata: netmask {mask} is not contiguous");
            }
            let gw = c
                .get(&(base + "gateway"), None)?
                .and_then(|g| g.trim().parse().ok());
            // A JSON array of strings, or one address per line.
            let list: Vec<String> = serde_json::from_str(ips.trim())
                .unwrap_or_else(|_| ips.split_whitespace().map(String::from).collect());
            Ok(EniFacts {
                ipv4: parse_v4_list(&list.join("\n"), prefix as u8)?,
                ipv6: vec![],
                gateway4: gw,
            })
        }
    }
}

fn parse_v4_list(text: &str, prefix: u8) -> anyhow::Result<Vec<Ipv4Network>> {
    text.split_whitespace()
        .take(256)
        .map(|a| {
            let ip: Ipv4Addr = a
                .parse()
                .map_err(|_| anyhow!("instance metadata: {} is not an IPv4 address", quote(a)))?;
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

    #[test]
    fn tokens_that_would_inject_a_header_are_refused() {
        assert_eq!(token("  abc-DEF==\n").unwrap(), "abc-DEF==");
        for bad in ["a\r\nX-Evil: 1", "", "\u{1b}[2J", &"t".repeat(2000)] {
            let e = token(bad).unwrap_err().to_string();
            assert!(e.contains("not one a header can carry"), "{bad:?}: {e}");
            assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
        }
    }

    #[test]
    fn bodies_reach_errors_only_as_short_escaped_excerpts() {
        let e = parse_v4_list(&format!("{}\u{1b}[2J", "x".repeat(10_000)), 24)
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{} bytes", e.len());
        assert!(!e.contains('\u{1b}'), "{e:?}");
    }
}
