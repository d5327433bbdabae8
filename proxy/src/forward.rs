//! Forwarding one request to an app container over a pooled HTTP/1.1 connection
//! (the pool is in [`crate::upstream`]).
//!
//! Bodies stream in both directions (a 100 MB upload never sits in our memory), hop-by-hop
//! headers are dropped, `X-Forwarded-*` are set, and `Upgrade` requests (WebSocket) become a
//! byte tunnel once the app answers 101. HTTP/2 clients are forwarded as HTTP/1.1, which is
//! what app servers speak best.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::routes::InFlight;
use crate::server::ConnInfo;
use crate::upstream::{PoolTimeouts, UpstreamError};
use crate::{text_response, Body};

#[derive(Debug, Clone)]
pub struct ForwardLimits {
    /// Time to open a connection to the app. Loopback: anything slow means it is not there.
    pub connect_timeout: Duration,
    /// Time for the app to send its response head.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept. Below common app keep-alive timeouts
    /// (Node's default is 5 s) so we rarely reuse a connection the app is closing.
    pub pool_idle_timeout: Duration,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(4),
        }
    }
}

#[derive(Clone)]
pub struct Forwarder {
    limits: ForwardLimits,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). Forwarding them
/// would let a client steer our pooled upstream connections.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Forwarder {
    pub fn new(limits: ForwardLimits) -> Self {
        Forwarder { limits }
    }

    /// Sends `req` to `upstream` and returns the app's response (or an error page).
    /// `in_flight` is released when the response body has been fully sent.
    pub async fn forward(&self, mut req: Request<Incoming>, conn: &ConnInfo, in_flight: InFlight) -> Response<Body> {
        let upstream = in_flight.addr();
        let upgrade = upgrade_protocol(&req);
        let client_version = req.version();
        // Must be taken before the request is moved: it resolves once our client's side of
        // the connection is handed over after we answer 101.
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        // HTTP/2 has no Host header (it is :authority); the app still expects one.
        if !parts.headers.contains_key(header::HOST) {
            if let Some(v) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        // Origin-form on the wire (`/path?query`); the Host header says whom it is for.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            parts.uri = Uri::from(pq);
        }
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(proto) = &upgrade {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto.clone());
        }
        set_forwarded(&mut parts.headers, conn);

        let upstream_req = Request::from_parts(parts, body);
        let timeouts = PoolTimeouts { connect: self.limits.connect_timeout, idle: self.limits.pool_idle_timeout };
        let pool = &in_flight.backend().conns;
        let sent = pool.send(upstream, upstream_req, timeouts, upgrade.is_some());
        let mut resp = match tokio::time::timeout(self.limits.response_timeout, sent).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return upstream_error(&e, upstream),
            Err(_) => {
                tracing::warn!(%upstream, timeout = ?self.limits.response_timeout, "upstream did not answer in time");
                return text_response(StatusCode::GATEWAY_TIMEOUT, "the app did not answer in time");
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                conn.tasks.spawn(async move {
                    let _in_flight = in_flight;
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => {
                            let mut client = TokioIo::new(client);
                            let mut upstream = TokioIo::new(upstream);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, crate::full_body(""));
            }
        }

        let (mut parts, body) = resp.into_parts();
        if response_head_len(&parts.headers) > crate::upstream::MAX_READ_BUF {
            // hyper refuses a larger head only when it arrives in pieces; this makes the
            // limit the same whatever the packets were. Dropping `body` closes the connection.
            return head_too_large(upstream);
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::UPGRADE);
        if client_version == Version::HTTP_2 {
            detach_header_values(&mut parts.headers);
        }
        // The in-flight guard rides along with the body: the request counts until the last
        // byte of the response has gone out (or the client went away).
        let body = body.map_frame(move |frame| {
            let _ = &in_flight;
            frame
        });
        Response::from_parts(parts, body.boxed())
    }
}

/// `Some(protocol)` for an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade:`).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Drops hop-by-hop headers, including any the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none of them and most responses only `Connection: keep-alive`:
    // find the few present in one pass over the names instead of a hashed removal for each
    // of the nine (that was 6% of the proxy's instructions).
    let is_hop = |k: &HeaderName| k == header::UPGRADE || HOP_BY_HOP.contains(k);
    if !headers.keys().any(is_hop) {
        return;
    }
    // Names the `Connection` header lists, beyond its usual `keep-alive` / `close` /
    // `upgrade` (which name no header, or one removed below anyway): rare, so only then
    // do we parse and allocate.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !["keep-alive", "close", "upgrade", ""].iter().any(|c| t.eq_ignore_ascii_case(c)))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // Remove only the hop-by-hop names present (each removal hashes), gathered without a
    // heap allocation: there are at most nine.
    let mut present: [Option<HeaderName>; 9] = Default::default();
    for (slot, name) in present.iter_mut().zip(headers.keys().filter(|k| is_hop(k))) {
        *slot = Some(name.clone());
    }
    for name in present.into_iter().flatten() {
        headers.remove(name);
    }
}

/// Moves the response's header values out of the app connection's read buffer into one
/// small buffer of their own.
///
/// hyper parses a response head in place: every header value is a slice of the connection's
/// 8-16 KiB read buffer and keeps all of it alive. HTTP/1.1 writes the headers out and drops
/// them, but h2's HPACK encoder keeps values it indexes (`date`, `etag`, `last-modified`…)
/// in its dynamic table for the life of the client connection. Measured with DHAT under
/// HTTP/2 load: 2,440 read buffers (20 MB) kept alive by 50 client connections' tables,
/// growing as `date` changed every second. A copy of the values, about 200 bytes per
/// response, ends that.
fn detach_header_values(headers: &mut HeaderMap) {
    let total = headers.values().map(HeaderValue::len).sum();
    let mut copy = bytes::BytesMut::with_capacity(total);
    for value in headers.values_mut() {
        copy.extend_from_slice(value.as_bytes());
        // Shares `copy`'s allocation: one buffer for all the values of this response.
        let own = copy.split().freeze();
        if let Ok(mut detached) = HeaderValue::from_maybe_shared(own) {
            detached.set_sensitive(value.is_sensitive());
            *value = detached;
        }
    }
}

/// The size of a response head as the app sent it, near enough: a status line of
/// `HTTP/1.1 200 OK`, then `name: value` and CRLF per header, then the blank line.
fn response_head_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    "HTTP/1.1 200 OK\r\n".len() + lines + 2
}

fn head_too_large(upstream: SocketAddr) -> Response<Body> {
    let limit = crate::upstream::MAX_READ_BUF;
    tracing::warn!(%upstream, limit, "the app sent a response head (status line and headers) larger than {limit} bytes");
    text_response(StatusCode::BAD_GATEWAY, "the app's response headers are too large")
}

/// `X-Forwarded-For` gets the peer appended (an ALB in front already put the client first),
/// `-Proto` and `-Host` describe the request as we received it.
fn set_forwarded(headers: &mut HeaderMap, conn: &ConnInfo) {
    let peer = &conn.peer_header;
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = if prior.is_empty() {
        Some(peer.clone())
    } else {
        let joined = format!("{}, {}", prior.join(", "), peer.to_str().unwrap_or_default());
        HeaderValue::from_str(&joined).ok()
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

fn upstream_error(e: &UpstreamError, upstream: SocketAddr) -> Response<Body> {
    if e.is_connect() {
        tracing::warn!(%upstream, error = %e, "app refused the connection");
        return text_response(StatusCode::BAD_GATEWAY, "the app is not accepting connections");
    }
    if e.is_head_too_large() {
        return head_too_large(upstream);
    }
    tracing::warn!(%upstream, error = %e, "app connection failed");
    text_response(StatusCode::BAD_GATEWAY, "the app closed the connection")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get(header::TE).is_none());
        assert!(h.get("x-end-to-end").is_some());
    }
}
