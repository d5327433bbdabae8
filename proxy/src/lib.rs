//! berth's front door: TLS termination, the `:80` server, routing and forwarding.
//!
//! This crate knows nothing of AWS or Docker. The agent hands it listeners and four shared
//! handles and then only *swaps* what is behind them:
//!
//! - [`tls::CertStore`]: the certificates served by SNI (self-signed until ACME delivers);
//! - [`health::Health`]: what the health path answers (and whether we are draining);
//! - [`challenge::ChallengeResponder`]: answers to ACME HTTP-01 requests;
//! - the route table (added with the forwarding layer).
//!
//! Every swap is lock-free on the request path (arc-swap), so a rollout or a renewal never
//! stalls traffic.

pub mod access;
pub mod challenge;
pub mod forward;
pub mod health;
pub mod http80;
pub mod https;
pub mod liveness;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod write_batch;

/// Body type of every response this crate produces.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

/// A small, complete response body (error pages, health JSON, redirects).
pub fn full_body(data: impl Into<bytes::Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(data.into()).map_err(|never| match never {}).boxed()
}

/// A short text response: errors should be cheap to produce and impossible to misread.
pub fn text_response(status: http::StatusCode, text: &str) -> http::Response<Body> {
    let mut resp = http::Response::new(full_body(format!("{text}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
