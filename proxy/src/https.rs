//! The `:443` handler: health path, then route by host and path, then forward.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Response, StatusCode};
use hyper::body::Incoming;

use crate::forward::Forwarder;
use crate::health::Health;
use crate::routes::Router;
use crate::server::{ConnInfo, Handler};
use crate::{text_response, Body};

/// Told about every proxied request, for metrics and access logs. Implementations must be
/// cheap: they run on the request path.
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, app: Option<&str>, status: StatusCode, elapsed: Duration);
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
        let (app, resp) = self.route(req, conn).await;
        if let Some(o) = &self.observer {
            o.observe(app.as_deref(), resp.status(), started.elapsed());
        }
        resp
    }
}

impl Https {
    async fn route(&self, req: http::Request<Incoming>, conn: &ConnInfo) -> (Option<Arc<str>>, Response<Body>) {
        let Some(host) = request_host(&req) else {
            return (None, text_response(StatusCode::BAD_REQUEST, "missing Host header"));
        };
        let Some(app) = self.router.app_for(crate::http80::strip_port(&host), req.uri().path()) else {
            // 421: this server is not the one for that name; the client may retry elsewhere.
            return (None, text_response(StatusCode::MISDIRECTED_REQUEST, "no app is configured for this host"));
        };
        let Some((upstream, in_flight)) = self.router.acquire(&app) else {
            let mut resp = text_response(StatusCode::SERVICE_UNAVAILABLE, "the app has no healthy container right now");
            resp.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("2"));
            return (Some(app), resp);
        };
        let resp = self.forwarder.forward(req, upstream, &host, conn, in_flight).await;
        (Some(app), resp)
    }
}

/// The host the client asked for: `:authority` (HTTP/2, absolute-form) or `Host`.
fn request_host<B>(req: &http::Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
}
