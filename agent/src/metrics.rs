//! `/metrics` in the OpenMetrics text format (which Prometheus scrapes as is), with
//! prometheus-client doing the encoding.
//!
//! Two kinds of metric live here:
//! - request metrics, updated on the hot path by the proxy through [`RequestMetrics`]
//!   (the proxy's `Observer` hook): one counter increment and one histogram observation;
//! - state metrics (health, restarts, secrets refreshes, certificates), read from [`Live`]
//!   at scrape time by a collector, so there is no second copy of the state to keep in sync.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use berth_proxy::https::{Observer, RequestRecord};
use berth_proxy::server::{ConnInfo, Handler};
use berth_proxy::{text_response, Body};
use http::StatusCode;
use hyper::body::Incoming;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::status::{ConnectionsReport, Live};

type RequestLabels = [(&'static str, String); 2];
type AppLabel = [(&'static str, String); 1];

/// Request counters and latency, fed by the proxy.
///
/// The families are what `/metrics` encodes; looking a label set up in them hashes and
/// allocates label strings, too much for every request. So each app's handles (a counter
/// per status code, its histogram) are looked up once and kept in `by_app`; the handles
/// share their values with the families, so a scrape sees every increment.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<AppLabel, Histogram>,
    by_app: Arc<ArcSwap<HashMap<Box<str>, Arc<AppHandles>>>>,
}

/// One app's request metrics, ready to update without a lookup by label.
struct AppHandles {
    app: Box<str>,
    /// Status codes 100..=599; others (rare, non-standard) go through the family.
    by_code: Box<[OnceLock<Counter>]>,
    duration: Histogram,
}

const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 599;

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestMetrics")
    }
}

impl RequestMetrics {
    fn new() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 1 ms .. ~16 s: proxy overhead is sub-millisecond, apps are slower.
                Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            by_app: Default::default(),
        }
    }

    fn handles(&self, app: &str) -> Arc<AppHandles> {
        if let Some(h) = self.by_app.load().get(app) {
            return h.clone();
        }
        // First request for this app (or after a reload added it): slow path, once.
        let handles = Arc::new(AppHandles {
            app: app.into(),
            by_code: (FIRST_CODE..=LAST_CODE).map(|_| OnceLock::new()).collect(),
            duration: self.duration.get_or_create(&[("app", app.to_owned())]).clone(),
        });
        self.by_app.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(app.into()).or_insert_with(|| handles.clone());
            next
        });
        self.by_app.load().get(app).cloned().unwrap_or(handles)
    }

    fn count(&self, handles: &AppHandles, status: StatusCode) {
        let create = || {
            self.requests
                .get_or_create(&[("app", handles.app.to_string()), ("code", status.as_str().to_owned())])
                .clone()
        };
        match status.as_u16() {
            code @ FIRST_CODE..=LAST_CODE => handles.by_code[usize::from(code - FIRST_CODE)].get_or_init(create).inc(),
            _ => create().inc(),
        };
    }
}

impl Observer for RequestMetrics {
    fn observe(&self, r: &RequestRecord<'_>) {
        // Requests no app took (421, bad requests) count under app="" so the totals add up.
        let handles = self.handles(r.app.unwrap_or(""));
        self.count(&handles, r.status);
        handles.duration.observe(r.elapsed.as_secs_f64());
    }
}

/// The registry behind `/metrics`.
pub struct Metrics {
    registry: Registry,
    pub requests: RequestMetrics,
}

impl Metrics {
    pub fn new(live: Arc<Live>) -> Self {
        let mut registry = Registry::default();
        let requests = RequestMetrics::new();
        registry.register(
            "berth_http_requests",
            "HTTPS requests answered, by app and status code",
            requests.requests.clone(),
        );
        registry.register(
            "berth_http_request_duration_seconds",
            "Time from request head to response head, by app",
            requests.duration.clone(),
        );
        registry.register_collector(Box::new(StateCollector { live }));
        Metrics { registry, requests }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// State read from [`Live`] at each scrape.
struct StateCollector {
    live: Arc<Live>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

/// One number from an app's connections report, for a gauge per app.
type ReportField = fn(&ConnectionsReport) -> usize;

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let unhealthy = self.live.health.unhealthy();
        let config = self.live.config();
        let apps = self.live.apps.lock().unwrap().clone();

        let g = ConstGauge::new(0i64);
        let mut m = encoder.encode_descriptor(
            "berth_app_healthy",
            "1 when the app passes its health checks and is routed",
            None,
            g.metric_type(),
        )?;
        for name in config.apps.keys() {
            let healthy = !unhealthy.contains_key(name) && apps.get(name).is_some_and(|s| s.healthy);
            ConstGauge::new(healthy as i64).encode(m.encode_family(&[("app", name.as_str())])?)?;
        }

        // The container serving each app now: its pooled connections, and the requests that
        // wait because all `max_connections` are busy (the sign to raise it, or to scale).
        let conns: Vec<_> = config.apps.keys().filter_map(|name| Some((name, self.live.connections(name)?))).collect();
        let mut m = encoder.encode_descriptor(
            "berth_app_connections",
            "Connections from berth to the app's container, by state (idle: kept for reuse)",
            None,
            g.metric_type(),
        )?;
        for (name, c) in &conns {
            ConstGauge::new(c.open as i64).encode(m.encode_family(&[("app", name.as_str()), ("state", "open")])?)?;
            ConstGauge::new(c.idle as i64).encode(m.encode_family(&[("app", name.as_str()), ("state", "idle")])?)?;
        }
        let per_app: [(&str, &str, ReportField); 3] = [
            ("berth_app_max_connections", "The app's max_connections", |c| c.max),
            (
                "berth_app_requests_waiting",
                "Requests waiting for a connection to the app because max_connections are busy",
                |c| c.waiting,
            ),
            ("berth_app_requests_in_flight", "Requests being forwarded to the app", |c| c.in_flight),
        ];
        for (metric, help, value) in per_app {
            let mut m = encoder.encode_descriptor(metric, help, None, g.metric_type())?;
            for (name, c) in &conns {
                ConstGauge::new(value(c) as i64).encode(m.encode_family(&[("app", name.as_str())])?)?;
            }
        }

        let c = ConstCounter::new(0u64);
        let mut m = encoder.encode_descriptor(
            "berth_container_restarts",
            "Container restarts after a crash, by app",
            None,
            c.metric_type(),
        )?;
        for name in config.apps.keys() {
            let n = apps.get(name).map_or(0, |s| s.restarts);
            ConstCounter::new(n).encode(m.encode_family(&[("app", name.as_str())])?)?;
        }

        if let Some(h) = self.live.secrets.get().filter(|_| config.has_secrets()) {
            let s = h.status();
            let mut m = encoder.encode_descriptor(
                "berth_secrets_refresh",
                "Secrets fetches from SSM, by result",
                None,
                c.metric_type(),
            )?;
            ConstCounter::new(s.refresh_ok).encode(m.encode_family(&[("result", "ok")])?)?;
            ConstCounter::new(s.refresh_error).encode(m.encode_family(&[("result", "error")])?)?;
        }

        if let Some(acme) = self.live.acme() {
            let s = acme.status();
            let mut m = encoder.encode_descriptor(
                "berth_acme_orders",
                "ACME orders placed by this instance, by result",
                None,
                c.metric_type(),
            )?;
            ConstCounter::new(s.orders_ok).encode(m.encode_family(&[("result", "ok")])?)?;
            ConstCounter::new(s.orders_error).encode(m.encode_family(&[("result", "error")])?)?;
            let mut m = encoder.encode_descriptor(
                "berth_certificate_expiry_timestamp_seconds",
                "notAfter of the certificate served for each domain (absent while self-signed)",
                None,
                g.metric_type(),
            )?;
            for (domain, not_after) in acme.expiry_by_domain() {
                ConstGauge::new(not_after as i64).encode(m.encode_family(&[("domain", domain.as_str())])?)?;
            }
        }

        let info = ConstGauge::new(1i64);
        let m = encoder.encode_descriptor(
            "berth_build_info",
            "Version and git revision of the running berth",
            None,
            info.metric_type(),
        )?;
        let mut m = m;
        info.encode(m.encode_family(&[("version", env!("CARGO_PKG_VERSION")), ("revision", env!("BERTH_GIT_REV"))])?)?;
        Ok(())
    }
}

/// Serves `GET /metrics` on `agent.metrics_listen`.
pub struct MetricsEndpoint(pub Arc<Metrics>);

impl Handler for MetricsEndpoint {
    async fn handle(&self, req: http::Request<Incoming>, _conn: &ConnInfo) -> http::Response<Body> {
        if req.uri().path() != "/metrics" {
            return text_response(StatusCode::NOT_FOUND, "metrics are at /metrics");
        }
        let mut resp = http::Response::new(berth_proxy::full_body(self.0.encode()));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(app: Option<&'static str>, status: u16) -> RequestRecord<'static> {
        RequestRecord {
            app,
            status: StatusCode::from_u16(status).unwrap(),
            elapsed: std::time::Duration::from_millis(3),
            method: &http::Method::GET,
            host: "example.com",
            path: "/",
            peer: "127.0.0.1:1".parse().unwrap(),
            peer_ip: "127.0.0.1",
            upstream: None,
            bytes: None,
        }
    }

    /// The cached handles must feed the very series `/metrics` encodes.
    #[test]
    fn cached_handles_count_into_the_encoded_families() {
        let m = RequestMetrics::new();
        let mut registry = Registry::default();
        registry.register("berth_http_requests", "", m.requests.clone());
        registry.register("berth_http_request_duration_seconds", "", m.duration.clone());
        for _ in 0..3 {
            m.observe(&record(Some("web"), 200));
        }
        m.observe(&record(Some("web"), 503));
        m.observe(&record(None, 421));
        m.observe(&record(Some("web"), 999));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for line in [
            r#"berth_http_requests_total{app="web",code="200"} 3"#,
            r#"berth_http_requests_total{app="web",code="503"} 1"#,
            r#"berth_http_requests_total{app="",code="421"} 1"#,
            r#"berth_http_requests_total{app="web",code="999"} 1"#,
            r#"berth_http_request_duration_seconds_count{app="web"} 5"#,
            r#"berth_http_request_duration_seconds_bucket{le="0.005",app="web"} 5"#,
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
    }
}
