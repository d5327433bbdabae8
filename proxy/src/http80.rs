//! The `:80` server: ACME HTTP-01 answers, the health path, and a redirect to https for
//! everything else. It never proxies: plain HTTP stays outside the app.

use http::{header, Response, StatusCode};
use hyper::body::Incoming;

use crate::challenge::ChallengeResponder;
use crate::health::Health;
use crate::server::{ConnInfo, Handler};
use crate::{text_response, Body};

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

pub struct PlainHttp {
    pub health_path: String,
    pub health: Health,
    pub challenges: ChallengeResponder,
    /// Port of the public https listener, added to redirects unless it is 443.
    pub https_port: u16,
}

impl Handler for PlainHttp {
    async fn handle(&self, req: http::Request<Incoming>, _conn: &ConnInfo) -> Response<Body> {
        let path = req.uri().path();
        if path == self.health_path {
            return self.health.response();
        }
        if let Some(token) = path.strip_prefix(CHALLENGE_PREFIX) {
            return match self.challenges.answer(token) {
                Some(key_authorization) => {
                    tracing::debug!(token, "answered ACME HTTP-01 challenge");
                    let mut resp = text_response(StatusCode::OK, "");
                    *resp.body_mut() = crate::full_body(key_authorization);
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
                    resp
                }
                None => text_response(StatusCode::NOT_FOUND, "unknown ACME challenge token"),
            };
        }
        self.redirect(&req)
    }
}

impl PlainHttp {
    /// 308 keeps the method and body (a POST stays a POST), unlike 301/302.
    fn redirect(&self, req: &http::Request<Incoming>) -> Response<Body> {
        let host = req
            .uri()
            .host()
            .map(str::to_owned)
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| strip_port(h).to_owned()))
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b)));
        let Some(host) = host else {
            return text_response(StatusCode::BAD_REQUEST, "missing or invalid Host header");
        };
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let location = if self.https_port == 443 {
            format!("https://{host}{path_and_query}")
        } else {
            format!("https://{host}:{}{path_and_query}", self.https_port)
        };
        let mut resp = text_response(StatusCode::PERMANENT_REDIRECT, "redirecting to https");
        match http::HeaderValue::from_str(&location) {
            Ok(v) => {
                resp.headers_mut().insert(header::LOCATION, v);
                resp
            }
            Err(_) => text_response(StatusCode::BAD_REQUEST, "cannot build a redirect for this request"),
        }
    }
}

/// `example.com:80` → `example.com`; `[::1]:80` → `[::1]`.
pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_port_handles_v6() {
        assert_eq!(super::strip_port("a.example:8080"), "a.example");
        assert_eq!(super::strip_port("[::1]:80"), "[::1]");
        assert_eq!(super::strip_port("a.example"), "a.example");
    }
}
