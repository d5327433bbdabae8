//! Turning `[apps.NAME.access]` plus the current secrets into the proxy's access policies,
//! and the access log.
//!
//! Credentials are secrets, so policies are rebuilt whenever the secrets change (a rotated
//! API key takes effect within one `refresh_interval`). A credential whose secret is missing
//! closes the app instead of opening it.

use std::sync::Arc;

use berth_proxy::access::AccessPolicy;
use berth_proxy::https::{Observer, RequestRecord};
use berth_proxy::routes::Router;
use rand::Rng;
use tokio::sync::watch;

use crate::config::{parse_net, AccessConfig, AccessLogMode, Config};
use crate::secrets::SecretSet;
use crate::status::Live;

/// The policy for one app given the current secrets; `closed` when a named secret is missing.
pub fn policy(cfg: &AccessConfig, secrets: &SecretSet) -> (AccessPolicy, Vec<String>) {
    let mut missing = Vec::new();
    let mut value = |name: &str| match secrets.get(name) {
        Some(v) => Some(v.expose().as_bytes().to_vec()),
        None => {
            missing.push(name.to_string());
            None
        }
    };
    let api_keys = cfg.api_keys.iter().filter_map(|n| value(n)).collect();
    let basic = cfg.basic_auth.iter().filter_map(|(user, n)| value(n).map(|p| (user.clone(), p))).collect();
    let policy = AccessPolicy {
        allow: cfg.allow.iter().filter_map(|n| parse_net(n)).collect(),
        trusted_proxies: cfg.trusted_proxies.iter().filter_map(|n| parse_net(n)).collect(),
        api_keys,
        basic,
        closed: !missing.is_empty(),
    };
    (policy, missing)
}

/// Keeps the router's policies in step with the secrets, for as long as the receiver lives.
pub async fn keep_policies(live: Arc<Live>, router: Router, mut secrets: watch::Receiver<Arc<SecretSet>>) {
    loop {
        let current = secrets.borrow_and_update().clone();
        apply(&live.config(), &router, &current);
        if secrets.changed().await.is_err() {
            return;
        }
    }
}

/// Sets every app's policy from `config` and `secrets` (also after a config reload).
pub fn apply(config: &Config, router: &Router, secrets: &SecretSet) {
    for (app, cfg) in &config.apps {
        let Some(access) = &cfg.access else {
            router.set_policy(app, None);
            continue;
        };
        let (p, missing) = policy(access, secrets);
        if !missing.is_empty() {
            tracing::error!(app = %app, missing = missing.join(", "), "access credentials name secrets that were not fetched; refusing all requests to this app");
        }
        router.set_policy(app, Some(p));
    }
}

/// Before secrets arrive, apps with credentials refuse everyone.
pub fn close_until_secrets(config: &Config, router: &Router) {
    for (app, cfg) in &config.apps {
        if cfg.access.is_some() {
            router.set_policy(app, Some(AccessPolicy { closed: true, ..Default::default() }));
        }
    }
}

/// Access log events, under the `berth::access` target so they can be filtered apart.
pub struct AccessLog {
    pub mode: AccessLogMode,
    pub sample: f64,
}

impl Observer for AccessLog {
    fn observe(&self, r: &RequestRecord<'_>) {
        let error = r.status.is_client_error() || r.status.is_server_error();
        let log = match self.mode {
            AccessLogMode::Off => false,
            AccessLogMode::Errors => error,
            AccessLogMode::All => error || self.sample >= 1.0 || rand::rng().random_bool(self.sample.max(0.0)),
        };
        if !log {
            return;
        }
        tracing::info!(
            target: "berth::access",
            app = r.app.unwrap_or(""),
            method = r.method.as_str(),
            host = r.host,
            path = r.path,
            status = r.status.as_u16(),
            // Integer microseconds: formatting a float costs more than the rest of the event.
            duration_us = r.elapsed.as_micros() as u64,
            upstream = r.upstream.unwrap_or(""),
            bytes = r.bytes.unwrap_or(0),
            peer = r.peer_ip,
            "request"
        );
    }
}
