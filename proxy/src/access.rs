//! Who may reach an app: a client-address allowlist and API keys or HTTP Basic
//! credentials, checked before any upstream call (a denied request never reaches the app).
//!
//! The client address is the TCP peer, unless the peer is a trusted proxy (the ALB's
//! subnets): then it is the right-most `X-Forwarded-For` entry that is not itself trusted.
//! Taking the right-most untrusted entry matters: everything left of it was written by the
//! client and can be forged; an ALB appends the address it saw.

use std::net::IpAddr;

use base64::Engine;
use http::header::{HeaderMap, AUTHORIZATION};
use ipnet::IpNet;
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Client networks allowed in; empty means any address.
    pub allow: Vec<IpNet>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Accepted `Authorization: Bearer <key>` / `X-Api-Key: <key>` values.
    pub api_keys: Vec<Vec<u8>>,
    /// Accepted HTTP Basic user/password pairs.
    pub basic: Vec<(String, Vec<u8>)>,
    /// Credentials are configured but not available (their secrets are missing): refuse
    /// everyone rather than let anyone in.
    pub closed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// 403: the address is not allowed; credentials would not help.
    Forbidden {
        client: IpAddr,
    },
    /// 401: credentials are required and were missing or wrong.
    Unauthorized {
        client: IpAddr,
        basic: bool,
    },
}

impl AccessPolicy {
    pub fn is_open(&self) -> bool {
        !self.closed && self.allow.is_empty() && self.api_keys.is_empty() && self.basic.is_empty()
    }

    pub fn check(&self, peer: IpAddr, headers: &HeaderMap) -> Decision {
        let client = self.client_address(peer, headers);
        if self.closed {
            return Decision::Unauthorized { client, basic: !self.basic.is_empty() };
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&client)) {
            return Decision::Forbidden { client };
        }
        if self.api_keys.is_empty() && self.basic.is_empty() {
            return Decision::Allow;
        }
        if self.credentials_match(headers) {
            Decision::Allow
        } else {
            Decision::Unauthorized { client, basic: !self.basic.is_empty() }
        }
    }

    /// The address the request came from, as far as we can trust it.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusted_proxies.iter().any(|n| n.contains(&peer)) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            .collect();
        hops.iter().rev().find(|a| !self.trusted_proxies.iter().any(|n| n.contains(*a))).copied().unwrap_or(peer)
    }

    /// Compares every configured credential in constant time and never stops early, so the
    /// response time says nothing about which key (or how much of one) was close.
    fn credentials_match(&self, headers: &HeaderMap) -> bool {
        let auth = headers.get(AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        let bearer = strip_scheme(auth, b"bearer ");
        let api_key = headers.get("x-api-key").map(|v| v.as_bytes());
        let mut ok = subtle::Choice::from(0);
        for key in &self.api_keys {
            if let Some(b) = bearer {
                ok |= b.ct_eq(key);
            }
            if let Some(k) = api_key {
                ok |= k.ct_eq(key);
            }
        }
        if let Some(encoded) = strip_scheme(auth, b"basic ") {
            if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) {
                if let Some(colon) = decoded.iter().position(|&b| b == b':') {
                    let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
                    for (u, p) in &self.basic {
                        ok |= u.as_bytes().ct_eq(user) & p.ct_eq(pass);
                    }
                }
            }
        }
        ok.into()
    }
}

fn strip_scheme<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    (value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme))
        .then(|| value[scheme.len()..].trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let p = AccessPolicy {
            allow: vec!["203.0.113.0/24".parse().unwrap()],
            trusted_proxies: vec!["10.0.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let spoof = headers(&[("x-forwarded-for", "203.0.113.5")]);
        // An untrusted peer's header is ignored.
        assert!(matches!(p.check("198.51.100.1".parse().unwrap(), &spoof), Decision::Forbidden { .. }));
        // Through the ALB: right-most untrusted entry; a forged left part does not help.
        let via_alb = headers(&[("x-forwarded-for", "203.0.113.5, 198.51.100.9")]);
        assert!(matches!(p.check("10.0.1.2".parse().unwrap(), &via_alb), Decision::Forbidden { .. }));
        let via_alb = headers(&[("x-forwarded-for", "198.51.100.9, 203.0.113.5")]);
        assert_eq!(p.check("10.0.1.2".parse().unwrap(), &via_alb), Decision::Allow);
    }

    #[test]
    fn keys_and_basic_credentials() {
        let p = AccessPolicy {
            api_keys: vec![b"k-123".to_vec()],
            basic: vec![("admin".into(), b"pw".to_vec())],
            ..Default::default()
        };
        let peer = "127.0.0.1".parse().unwrap();
        assert_eq!(p.check(peer, &headers(&[("authorization", "Bearer k-123")])), Decision::Allow);
        assert_eq!(p.check(peer, &headers(&[("x-api-key", "k-123")])), Decision::Allow);
        assert_eq!(p.check(peer, &headers(&[("authorization", "Basic YWRtaW46cHc=")])), Decision::Allow);
        assert!(matches!(p.check(peer, &headers(&[("authorization", "Bearer k-124")])), Decision::Unauthorized { .. }));
        assert!(matches!(p.check(peer, &headers(&[])), Decision::Unauthorized { basic: true, .. }));
    }
}
