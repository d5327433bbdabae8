//! What the health path says. The ALB (and `systemctl status`) read it, so it must be
//! cheap and always truthful: 200 only when every app is healthy and we are not draining.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::StatusCode;

use crate::Body;

/// Shared, cheaply cloneable handle; the agent writes, the listeners read.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    draining: AtomicBool,
    /// app name → why it is not healthy (e.g. "starting", "unhealthy: 3 failed probes").
    /// An app is healthy exactly when it has no entry here.
    unhealthy: ArcSwap<BTreeMap<String, String>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `app` unhealthy with a reason, or healthy with `None`.
    pub fn set(&self, app: &str, problem: Option<String>) {
        self.inner.unhealthy.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            match &problem {
                Some(why) => next.insert(app.to_owned(), why.clone()),
                None => next.remove(app),
            };
            next
        });
    }

    /// Forgets an app entirely (removed from the config).
    pub fn remove(&self, app: &str) {
        self.set(app, None);
    }

    /// From now on the health path answers 503, so the load balancer stops sending traffic
    /// before the listeners close.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    pub fn is_healthy(&self) -> bool {
        !self.is_draining() && self.inner.unhealthy.load().is_empty()
    }

    pub fn unhealthy(&self) -> BTreeMap<String, String> {
        BTreeMap::clone(&self.inner.unhealthy.load())
    }

    /// The health path's response: a status code for the load balancer and a JSON body
    /// for the human who curls it.
    pub fn response(&self) -> http::Response<Body> {
        let draining = self.is_draining();
        let unhealthy = self.inner.unhealthy.load();
        let ok = !draining && unhealthy.is_empty();
        let body = serde_json::json!({
            "status": if ok { "ok" } else if draining { "draining" } else { "unhealthy" },
            "draining": draining,
            "unhealthy": &**unhealthy,
        });
        let mut resp = http::Response::new(crate::full_body(format!("{body}\n")));
        *resp.status_mut() = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        resp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_without_problems_and_not_draining() {
        let h = Health::new();
        assert!(h.is_healthy());
        h.set("web", Some("starting".into()));
        assert!(!h.is_healthy());
        assert_eq!(h.response().status(), StatusCode::SERVICE_UNAVAILABLE);
        h.set("web", None);
        assert_eq!(h.response().status(), StatusCode::OK);
        h.start_draining();
        assert_eq!(h.response().status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
