//! The daemon's live state, in one place, as operators see it: `berth status` (through the
//! admin socket), `/metrics`, and the systemd status line all read from [`Live`].
//!
//! Parts arrive at different times (secrets after the first fetch, the supervisor after
//! Docker answers), so they sit in `OnceLock`s and every reader copes with "not yet".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use berth_proxy::health::Health;
use berth_proxy::routes::Router;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::secrets::SecretsHandle;
use crate::supervisor::{AppStatus, StatusBoard, Supervisor};

pub struct Live {
    /// The config in force; replaced by a reload. A watch, so the parts a reload changes
    /// in place (certificates, the secrets source) can follow it.
    config: watch::Sender<Arc<Config>>,
    pub health: Health,
    /// What `:443` routes by; its backends carry each app's connection counts.
    pub router: Router,
    pub apps: StatusBoard,
    pub secrets: OnceLock<SecretsHandle>,
    pub supervisor: OnceLock<Arc<Supervisor>>,
    /// The certificate task; a reload of `[tls]` may replace it.
    pub acme: ArcSwapOption<crate::acme::AcmeHandle>,
    /// What supervision is waiting for, when it is (e.g. "waiting for SSM: throttled").
    pub waiting: std::sync::Mutex<Option<String>>,
    pub started: Instant,
}

impl Live {
    pub fn new(config: Config, health: Health, router: Router, apps: StatusBoard) -> Self {
        Live {
            config: watch::Sender::new(Arc::new(config)),
            health,
            router,
            apps,
            secrets: OnceLock::new(),
            supervisor: OnceLock::new(),
            acme: ArcSwapOption::empty(),
            waiting: Default::default(),
            started: Instant::now(),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    pub fn set_config(&self, config: Config) {
        self.config.send_replace(Arc::new(config));
    }

    /// Fires after every accepted reload.
    pub fn subscribe_config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }

    /// The certificate task's handle, once started.
    pub fn acme(&self) -> Option<Arc<crate::acme::AcmeHandle>> {
        self.acme.load_full()
    }

    pub fn set_waiting(&self, what: Option<String>) {
        *self.waiting.lock().unwrap() = what;
    }

    /// The whole status as `berth status --json` prints it. Names, digests, times, counts:
    /// never a secret value.
    /// `app`'s connections and requests now; `None` while no container serves it.
    pub fn connections(&self, app: &str) -> Option<ConnectionsReport> {
        let backend = self.router.backend(app)?;
        let pool = backend.conns.stats();
        Some(ConnectionsReport {
            open: pool.open,
            idle: pool.idle,
            waiting: pool.waiting,
            max: pool.limit,
            in_flight: backend.in_flight(),
        })
    }

    pub fn report(&self) -> StatusReport {
        let unhealthy = self.health.unhealthy();
        let apps = self.apps.lock().unwrap().clone();
        let config = self.config();
        let apps = config
            .apps
            .iter()
            .map(|(name, cfg)| {
                let mut s = apps.get(name).cloned().unwrap_or_default();
                s.healthy = !unhealthy.contains_key(name) && s.healthy;
                (
                    name.clone(),
                    AppReport {
                        problem: unhealthy.get(name).cloned(),
                        routes: cfg.routes.clone(),
                        connections: self.connections(name),
                        status: s,
                    },
                )
            })
            .collect();
        // The handle exists (empty) also without `[secrets]`, so a reload can add them.
        let secrets = self.secrets.get().filter(|_| config.has_secrets()).map(|h| {
            let s = h.status();
            SecretsReport {
                source: s.source,
                count: s.count,
                last_success_unix: crate::acme::unix(s.last_success),
                last_error: s.last_error,
                refresh_ok: s.refresh_ok,
                refresh_error: s.refresh_error,
                changes: s.changes,
            }
        });
        StatusReport {
            version: crate::VERSION_LINE.lines().next().unwrap_or_default().to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            healthy: self.health.is_healthy(),
            draining: self.health.is_draining(),
            waiting_for: self.waiting.lock().unwrap().clone().or_else(|| self.docker_problem()),
            apps,
            secrets,
            tls: self.acme().and_then(|a| serde_json::to_value(a.status()).ok()),
            tls_mode: config.tls.mode.to_string(),
            domains: config.tls.domains.clone(),
        }
    }

    /// What `systemctl status berth` shows: the one thing an operator needs to know, e.g.
    /// `serving web (healthy, sha256:ab12cd34ef56)` or what it waits for.
    pub fn status_line(&self) -> String {
        if let Some(w) = self.waiting.lock().unwrap().clone() {
            return w;
        }
        if self.health.is_draining() {
            return "stopping: draining".into();
        }
        // Said first: while Docker is away berth can neither restart nor roll out.
        let docker = self.docker_problem().map(|p| format!("waiting for Docker ({p}); "));
        let config = self.config();
        if config.apps.is_empty() {
            return "serving: no apps configured".into();
        }
        let unhealthy = self.health.unhealthy();
        let board = self.apps.lock().unwrap();
        let parts: Vec<String> = config
            .apps
            .keys()
            .map(|app| {
                let image = board
                    .get(app)
                    .and_then(|s| s.image_id.as_deref())
                    .map(|i| i[..i.len().min(19)].to_string())
                    .unwrap_or_else(|| "no image yet".into());
                match unhealthy.get(app) {
                    None => format!("{app} (healthy, {image})"),
                    Some(why) => format!("{app} ({why})"),
                }
            })
            .collect();
        let verb = if unhealthy.is_empty() { "serving" } else { "waiting:" };
        let mut line = format!("{}{verb} {}", docker.unwrap_or_default(), parts.join(", "));
        if let Some(tls) = self.acme().and_then(|a| a.status_line()) {
            line.push_str(&format!("; {tls}"));
        } else if let Some(cert) = self.cert_summary() {
            line.push_str(&format!(", {cert}"));
        }
        line
    }

    /// Set while the Docker Engine does not answer (berth reconnects with backoff).
    fn docker_problem(&self) -> Option<String> {
        self.supervisor.get()?.docker_problem()
    }

    /// `cert api.example.com valid 61d`, once an ACME or file certificate serves.
    fn cert_summary(&self) -> Option<String> {
        let status = self.acme()?.status();
        let cert = status.certificate?;
        let days = cert.info.not_after.duration_since(SystemTime::now()).ok()?.as_secs() / 86400;
        Some(format!("cert {} valid {days}d", cert.info.names.first()?))
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_seconds: u64,
    pub healthy: bool,
    pub draining: bool,
    pub waiting_for: Option<String>,
    pub apps: BTreeMap<String, AppReport>,
    pub secrets: Option<SecretsReport>,
    /// The certificate task's status (certificate, renewal, orders), as it reports it.
    pub tls: Option<serde_json::Value>,
    pub tls_mode: String,
    pub domains: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AppReport {
    pub problem: Option<String>,
    pub routes: Vec<String>,
    /// berth's connections to the container serving now; none while nothing serves.
    #[serde(default)]
    pub connections: Option<ConnectionsReport>,
    #[serde(flatten)]
    pub status: AppStatus,
}

/// An app's connections and requests at one moment (see `max_connections`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ConnectionsReport {
    pub open: usize,
    pub idle: usize,
    /// Requests waiting because all `max` connections are busy.
    pub waiting: usize,
    pub max: usize,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SecretsReport {
    pub source: String,
    pub count: usize,
    pub last_success_unix: u64,
    pub last_error: Option<String>,
    pub refresh_ok: u64,
    pub refresh_error: u64,
    pub changes: u64,
}

/// `berth status` for a human: one block per app, then secrets and TLS.
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let w = &mut out;
    let state = if r.draining {
        "draining"
    } else if r.healthy {
        "healthy"
    } else {
        "NOT healthy"
    };
    let _ = writeln!(
        w,
        "berth {} — {state}, up {}",
        r.version,
        humantime::format_duration(std::time::Duration::from_secs(r.uptime_seconds))
    );
    if let Some(wf) = &r.waiting_for {
        let _ = writeln!(w, "waiting for: {wf}");
    }
    let _ = writeln!(
        w,
        "\n{:<14} {:<9} {:<14} {:<21} {:>6} {:>8}  STATE",
        "APP", "HEALTH", "CONTAINER", "IMAGE", "PORT", "RESTARTS"
    );
    for (name, a) in &r.apps {
        let health = if a.status.healthy { "healthy" } else { "unhealthy" };
        let container = a.status.container_id.as_deref().map(|c| &c[..c.len().min(12)]).unwrap_or("-");
        let image = a.status.image_id.as_deref().map(|i| &i[..i.len().min(19)]).unwrap_or("-");
        let port = a.status.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            w,
            "{name:<14} {health:<9} {container:<14} {image:<21} {port:>6} {:>8}  {}",
            a.status.restarts,
            a.problem.as_deref().unwrap_or(&a.status.state)
        );
        if let Some(u) = &a.status.upstream {
            let _ = writeln!(w, "{:<14} requests go to {u}", "");
        }
        if let Some(c) = &a.connections {
            let at_cap = if c.waiting > 0 { " — at max_connections" } else { "" };
            let _ = writeln!(
                w,
                "{:<14} connections: {} open ({} idle) of max {}; {} requests in flight, {} waiting{at_cap}",
                "", c.open, c.idle, c.max, c.in_flight, c.waiting
            );
        }
        if let Some(e) = &a.status.last_exit {
            let _ = writeln!(w, "{:<14} last exit: {e}", "");
        }
        if let Some(ro) = &a.status.last_rollout {
            let _ = writeln!(w, "{:<14} last rollout: {ro}", "");
        }
    }
    match &r.secrets {
        Some(s) => {
            let ago = SystemTime::now()
                .duration_since(UNIX_EPOCH + std::time::Duration::from_secs(s.last_success_unix))
                .map(|d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string())
                .unwrap_or_else(|_| "just now".into());
            let _ = writeln!(
                w,
                "\nsecrets: {} from {}, last refreshed {ago} ago ({} ok, {} failed)",
                s.count, s.source, s.refresh_ok, s.refresh_error
            );
            if let Some(e) = &s.last_error {
                let _ = writeln!(w, "  last refresh FAILED: {e}");
            }
        }
        None => {
            let _ = writeln!(w, "\nsecrets: none fetched");
        }
    }
    let domains = if r.domains.is_empty() { "(no domains)".to_string() } else { r.domains.join(", ") };
    let _ = writeln!(w, "tls: {} for {domains}", r.tls_mode);
    if let Some(tls) = &r.tls {
        match tls.get("certificate").filter(|c| !c.is_null()) {
            Some(c) => {
                let names = c["names"]
                    .as_array()
                    .map(|n| n.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                let left = c["not_after"].as_u64().map(|t| {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    format!("{}d", t.saturating_sub(now) / 86400)
                });
                let _ = writeln!(
                    w,
                    "  certificate: {names}, serial {}, from {}, expires in {}",
                    c["serial"].as_str().unwrap_or("?"),
                    c["source"].as_str().unwrap_or("?"),
                    left.unwrap_or_else(|| "?".into())
                );
            }
            None => {
                let _ = writeln!(w, "  certificate: self-signed (no ACME or file certificate installed)");
            }
        }
        if let Some(wait) = tls.get("waiting").and_then(|v| v.as_str()) {
            let _ = writeln!(w, "  waiting for: {wait}");
        }
        if let Some(basis) = tls.get("renewal_basis").and_then(|v| v.as_str()) {
            let when = tls.get("next_renewal").and_then(|v| v.as_u64()).map(|t| {
                let at = UNIX_EPOCH + std::time::Duration::from_secs(t);
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                format!("in {} ({}), ", days_hours(left), humantime::format_rfc3339_seconds(at))
            });
            let _ = writeln!(w, "  next renewal: {}{basis}", when.unwrap_or_default());
        }
        if let Some(url) = tls.get("renewal_explanation").and_then(|v| v.as_str()) {
            let _ = writeln!(w, "  the CA explains its renewal window: {url}");
        }
    }
    out
}

/// A wait as an operator reads it at a glance: `29d 23h`, `5h 3m`, `4m`, or `now`.
fn days_hours(d: std::time::Duration) -> String {
    let m = d.as_secs() / 60;
    match (m / 1440, m / 60 % 24, m % 60) {
        (0, 0, 0) => "now".into(),
        (0, 0, min) => format!("{min}m"),
        (0, h, min) => format!("{h}h {min}m"),
        (days, h, _) => format!("{days}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_says_why_the_next_renewal_is_when_it_is() {
        let report = |tls: serde_json::Value| StatusReport {
            version: "test".into(),
            uptime_seconds: 60,
            healthy: true,
            draining: false,
            waiting_for: None,
            apps: BTreeMap::new(),
            secrets: None,
            tls: Some(tls),
            tls_mode: "acme".into(),
            domains: vec!["app.example.com".into()],
        };
        let url = "https://ca.example/incidents/renew-early";
        // 2 days, 3 hours and a few seconds from now (the seconds absorb the test's own time).
        let due = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 2 * 86400 + 3 * 3600 + 30;
        let text = render(&report(serde_json::json!({
            "renewal_basis": "ari window",
            "next_renewal": due,
            "renewal_explanation": url,
        })));
        let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(due));
        assert!(text.contains(&format!("next renewal: in 2d 3h ({at}), ari window")), "{text}");
        assert!(text.contains(&format!("the CA explains its renewal window: {url}")), "{text}");

        let text = render(&report(serde_json::json!({"renewal_basis": "two thirds of the lifetime"})));
        assert!(!text.contains("explains"), "{text}");
    }

    #[test]
    fn waits_read_in_days_and_hours_or_less() {
        let d = |s| days_hours(std::time::Duration::from_secs(s));
        assert_eq!(d(0), "now");
        assert_eq!(d(59), "now");
        assert_eq!(d(4 * 60 + 5), "4m");
        assert_eq!(d(5 * 3600 + 3 * 60), "5h 3m");
        assert_eq!(d(29 * 86400 + 23 * 3600 + 59 * 60), "29d 23h");
    }
}
