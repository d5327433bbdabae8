//! The `:443` handler: health path, then route by host and path, then forward.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Response, StatusCode};
use hyper::body::Incoming;

use crate::access::Decision;
use crate::forward::Forwarder;
use crate::health::Health;
use crate::routes::Router;
use crate::server::{ConnInfo, Handler};
use crate::{text_response, Body};

/// One answered request, as metrics and access logs see it.
#[derive(Debug)]
pub struct RequestRecord<'a> {
    pub app: Option<&'a str>,
    pub status: StatusCode,
    /// From the request head to the response head (the body may still be streaming).
    pub elapsed: Duration,
    pub method: &'a http::Method,
    pub host: &'a str,
    pub path: &'a str,
    pub peer: std::net::SocketAddr,
    /// The peer's IP, already formatted (once per connection).
    pub peer_ip: &'a str,
    /// The container's `ip:port`, already formatted (once per backend).
    pub upstream: Option<&'a str>,
    /// The response's Content-Length, when it has one.
    pub bytes: Option<u64>,
}

/// Told about every request answered on `:443`, for metrics and access logs.
/// Implementations must be cheap: they run on the request path.
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, record: &RequestRecord<'_>);
}

/// Several observers as one.
pub struct Observers(pub Vec<Arc<dyn Observer>>);

impl Observer for Observers {
    fn observe(&self, record: &RequestRecord<'_>) {
        for o in &self.0 {
            o.observe(record);
        }
    }
}

pub struct Https {
    pub health_path: String,
    pub health: Health,
    pub router: Router,
    pub forwarder: Forwarder,
    pub observer: Option<Arc<dyn Observer>>,
}

impl Handler for Https {
    async fn handle(&self, req: http::Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        let started = Instant::now();
        if req.uri().path() == self.health_path {
            return self.health.response();
        }
        let Some(observer) = &self.observer else {
            return self.route(req, conn).await.1;
        };
        // Keep what the record needs before the request is moved into the forwarder. These
        // clones share the request's buffers (no copy, no allocation for common methods).
        let method = req.method().clone();
        let uri = req.uri().clone();
        let host_header = req.headers().get(header::HOST).cloned();
        let (route, resp) = self.route(req, conn).await;
        let host = match uri.authority() {
            Some(a) => a.as_str(),
            None => host_header.as_ref().and_then(|h| h.to_str().ok()).unwrap_or_default(),
        };
        // The app's Content-Length, or the exact size of a body we made (error pages).
        let bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .or_else(|| hyper::body::Body::size_hint(resp.body()).exact());
        observer.observe(&RequestRecord {
            app: route.app.as_deref(),
            status: resp.status(),
            elapsed: started.elapsed(),
            method: &method,
            host,
            path: uri.path(),
            peer: conn.peer,
            peer_ip: conn.peer_header.to_str().unwrap_or_default(),
            upstream: route.upstream.as_ref().map(|b| &*b.addr_text),
            bytes,
        });
        resp
    }
}

impl Https {
    async fn route(&self, req: http::Request<Incoming>, conn: &ConnInfo) -> (Routed, Response<Body>) {
        let mut routed = Routed::default();
        let Some(host) = request_host(&req) else {
            return (routed, text_response(StatusCode::BAD_REQUEST, "missing Host header"));
        };
        let Some(app) = self.router.app_for(crate::http80::strip_port(host), req.uri().path()) else {
            // 421: this server is not the one for that name; the client may retry elsewhere.
            return (routed, text_response(StatusCode::MISDIRECTED_REQUEST, "no app is configured for this host"));
        };
        routed.app = Some(app.clone());
        // Access control before anything touches the app.
        if let Some(policy) = self.router.policy(&app) {
            match policy.check(conn.peer.ip(), req.headers()) {
                Decision::Allow => {}
                Decision::Forbidden { client } => {
                    tracing::debug!(app = %app, %client, "denied: address not allowed");
                    return (routed, text_response(StatusCode::FORBIDDEN, "forbidden"));
                }
                Decision::Unauthorized { client, basic } => {
                    tracing::debug!(app = %app, %client, "denied: missing or wrong credentials");
                    let mut resp = text_response(StatusCode::UNAUTHORIZED, "unauthorized");
                    let challenge = if basic { "Basic realm=\"berth\"" } else { "Bearer" };
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static(challenge));
                    return (routed, resp);
                }
            }
        }
        let Some(in_flight) = self.router.acquire(&app) else {
            let mut resp = text_response(StatusCode::SERVICE_UNAVAILABLE, "the app has no healthy container right now");
            resp.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("2"));
            return (routed, resp);
        };
        routed.upstream = Some(in_flight.backend_arc());
        let resp = self.forwarder.forward(req, conn, in_flight).await;
        (routed, resp)
    }
}

/// Where a request went.
#[derive(Default)]
struct Routed {
    app: Option<Arc<str>>,
    upstream: Option<Arc<crate::routes::Backend>>,
}

/// The host the client asked for: `:authority` (HTTP/2, absolute-form) or `Host`.
pub(crate) fn request_host<B>(req: &http::Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| !h.is_empty())
}
