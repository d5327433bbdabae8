//! Which app a request is for, and where that app's container listens right now.
//!
//! Two tables with different lifetimes, both swapped atomically:
//! - [`RouteTable`] maps host + longest path prefix to an app name; it changes only when the
//!   config does.
//! - [`Backends`] maps an app name to the address of the container serving it; a rollout or a
//!   health change swaps one entry while requests keep flowing.
//!
//! Each backend counts its in-flight requests, so a rollout can wait for the old container
//! to go quiet before stopping it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access::AccessPolicy;
use crate::upstream::{ConnPool, DEFAULT_MAX_CONNS};

/// One routing rule: requests for `host` whose path starts with `prefix` go to `app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub prefix: String,
    pub app: Arc<str>,
}

/// An immutable route table. Build a new one and swap it in with [`Router::set_routes`].
#[derive(Debug, Default)]
pub struct RouteTable {
    /// host → rules, longest prefix first.
    by_host: HashMap<String, Vec<(String, Arc<str>)>>,
    /// The app that takes every request when it has no routes of its own.
    catch_all: Option<Arc<str>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>, catch_all: Option<Arc<str>>) -> Self {
        let mut by_host: HashMap<String, Vec<(String, Arc<str>)>> = HashMap::new();
        for r in routes {
            by_host.entry(r.host.to_ascii_lowercase()).or_default().push((r.prefix, r.app));
        }
        for rules in by_host.values_mut() {
            rules.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        }
        RouteTable { by_host, catch_all }
    }

    /// The app for `host` (no port, any case) and `path`, if any.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<str>> {
        let host = host.trim_end_matches('.');
        let rules = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&host.to_ascii_lowercase())
        } else {
            self.by_host.get(host)
        };
        rules
            .and_then(|rules| rules.iter().find(|(prefix, _)| path.starts_with(prefix.as_str())))
            .map(|(_, app)| app)
            .or(self.catch_all.as_ref())
    }
}

/// A container address with its in-flight request count.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `addr` formatted once, for access logs.
    pub addr_text: Box<str>,
    in_flight: AtomicUsize,
    /// Keep-alive connections to this container; dropped with it.
    pub conns: Arc<crate::upstream::ConnPool>,
}

impl Backend {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Held for the life of a proxied request (until its response body is done).
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    pub fn backend(&self) -> &Backend {
        &self.0
    }

    pub fn backend_arc(&self) -> Arc<Backend> {
        self.0.clone()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Route table and backends together: what the `:443` handler consults per request.
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<ArcSwap<RouteTable>>,
    /// app → its backend; an app with no entry has no serving container (503).
    backends: Arc<ArcSwap<HashMap<Arc<str>, Arc<Backend>>>>,
    /// app → who may reach it; an app with no entry is open to everyone.
    policies: Arc<ArcSwap<HashMap<Arc<str>, Arc<AccessPolicy>>>>,
    /// app → the cap on connections to its container, for backends set from now on; an app
    /// with no entry gets [`DEFAULT_MAX_CONNS`]. Read only when a backend is set.
    max_conns: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_routes(&self, table: RouteTable) {
        self.routes.store(Arc::new(table));
    }

    pub fn app_for(&self, host: &str, path: &str) -> Option<Arc<str>> {
        self.routes.load().lookup(host, path).cloned()
    }

    /// Points `app` at `addr` (a new container) or at nothing (`None`: answers 503).
    /// Returns the previous backend, whose [`Backend::in_flight`] tells when it is idle.
    pub fn set_backend(&self, app: &str, addr: Option<SocketAddr>) -> Option<Arc<Backend>> {
        // Held until the new backend is in place, so a cap set meanwhile is not lost between
        // reading it here and the swap (see `set_max_connections`).
        let caps = self.max_conns.lock().unwrap_or_else(|e| e.into_inner());
        let max_conns = caps.get(app).copied().unwrap_or(DEFAULT_MAX_CONNS);
        let mut previous = None;
        self.backends.rcu(|current| {
            let mut next = HashMap::clone(current);
            previous = match addr {
                Some(addr) => next.insert(
                    Arc::from(app),
                    Arc::new(Backend {
                        addr,
                        addr_text: addr.to_string().into(),
                        in_flight: AtomicUsize::new(0),
                        conns: Arc::new(ConnPool::new(max_conns)),
                    }),
                ),
                None => next.remove(app),
            };
            next
        });
        previous
    }

    /// Caps the connections to `app`'s container at `max_conns`: for the container serving
    /// now (see [`ConnPool::set_limit`]) and every one after it.
    pub fn set_max_connections(&self, app: &str, max_conns: usize) {
        let mut caps = self.max_conns.lock().unwrap_or_else(|e| e.into_inner());
        caps.insert(Arc::from(app), max_conns);
        if let Some(backend) = self.backends.load().get(app) {
            backend.conns.set_limit(max_conns);
        }
    }

    /// Sets (or, with `None` or an open policy, clears) the access policy of `app`.
    pub fn set_policy(&self, app: &str, policy: Option<AccessPolicy>) {
        self.policies.rcu(|current| {
            let mut next = HashMap::clone(current);
            match &policy {
                Some(p) if !p.is_open() => next.insert(Arc::from(app), Arc::new(p.clone())),
                _ => next.remove(app),
            };
            next
        });
    }

    pub fn policy(&self, app: &str) -> Option<Arc<AccessPolicy>> {
        self.policies.load().get(app).cloned()
    }

    pub fn backend(&self, app: &str) -> Option<Arc<Backend>> {
        self.backends.load().get(app).cloned()
    }

    /// Takes the app's current backend for one request, counting it as in flight.
    pub fn acquire(&self, app: &str) -> Option<InFlight> {
        let backend = self.backends.load().get(app).cloned()?;
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlight(backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, prefix: &str, app: &str) -> Route {
        Route { host: host.into(), prefix: prefix.into(), app: app.into() }
    }

    #[test]
    fn longest_prefix_wins_and_unknown_hosts_fall_to_catch_all() {
        let t = RouteTable::new(vec![route("example.com", "/", "web"), route("example.com", "/api/", "api")], None);
        assert_eq!(t.lookup("example.com", "/api/users").map(|a| &**a), Some("api"));
        assert_eq!(t.lookup("EXAMPLE.com", "/apix").map(|a| &**a), Some("web"));
        assert_eq!(t.lookup("other.com", "/"), None);
        let t = RouteTable::new(vec![], Some("web".into()));
        assert_eq!(t.lookup("anything", "/x").map(|a| &**a), Some("web"));
    }

    #[test]
    fn in_flight_is_counted_per_backend() {
        let r = Router::new();
        r.set_backend("web", Some("127.0.0.1:1".parse().unwrap()));
        let guard = r.acquire("web").unwrap();
        let old = r.set_backend("web", Some("127.0.0.1:2".parse().unwrap())).unwrap();
        assert_eq!(old.in_flight(), 1);
        drop(guard);
        assert_eq!(old.in_flight(), 0);
        assert!(r.set_backend("web", None).is_some());
        assert!(r.acquire("web").is_none());
    }
}
