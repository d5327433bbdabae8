//! Certificates for `:443`: ordered from an ACME CA (HTTP-01 through the `:80` responder),
//! renewed in the background, shared across a fleet through SSM, or loaded from files.
//!
//! The daemon calls [`spawn`] with the proxy's [`CertStore`] (which starts with a
//! self-signed certificate) and [`ChallengeResponder`]; everything after that happens in one
//! background task per mode, which never fails the daemon: every error is logged, shown in
//! [`AcmeHandle::status`], and retried with capped exponential backoff and jitter, for as
//! long as the CA says when it says (`Retry-After`, rate limits).
//!
//! A reload hands the ACME task its new settings ([`AcmeHandle::reconfigure`]): it keeps its
//! account, its backoff and what the CA said about rate limits, and orders only if the
//! certificate no longer fits. Another mode means another task: [`AcmeHandle::stop`] the old
//! one (it releases a fleet lock it holds) and [`spawn`] anew.
//!
//! - `tls.mode = "acme"`: [`manager`]. Account and certificate persist in `state_dir/acme/`
//!   ([`local`]); with `tls.acme.shared`, in SSM instead, one order per fleet ([`fleet`]).
//!   Renewal inside the CA's ARI window when it offers `renewalInfo`, else at two thirds of
//!   the lifetime.
//! - `tls.mode = "files"`: [`files`] polls `cert_file`/`key_file` and installs changes.
//! - `tls.mode = "self-signed"`: nothing to do; the handle reports the mode.
//!
//! Installing goes through [`CertStore::install`], an atomic swap: handshakes after it get
//! the new certificate, established connections keep theirs, nothing is dropped.

mod cert;
mod files;
mod fleet;
mod http;
mod local;
mod manager;
mod order;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::SdkConfig;
use berth_proxy::challenge::ChallengeResponder;
use berth_proxy::tls::CertStore;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cert::CertInfo;

use crate::config::{AcmeConfig, AwsConfig, Config, TlsConfig, TlsMode};

/// Everything the certificate task needs from the config, plus test knobs.
#[derive(Clone)]
pub struct AcmeSetup {
    pub tls: TlsConfig,
    pub acme: AcmeConfig,
    pub state_dir: PathBuf,
    pub aws: AwsConfig,
    /// The SDK configuration for fleet mode; built from `aws` when `None` (and only when
    /// `tls.acme.shared` is set, so a single instance never needs AWS credentials).
    pub sdk: Option<SdkConfig>,
    pub(crate) timing: Timing,
}

impl AcmeSetup {
    pub fn from_config(config: &Config) -> AcmeSetup {
        AcmeSetup {
            tls: config.tls.clone(),
            acme: config.acme(),
            state_dir: config.agent.state_dir.clone(),
            aws: config.aws.clone(),
            sdk: None,
            timing: Timing::default(),
        }
    }
}

/// `berth check --online`: does the ACME directory answer, through the same client (system
/// roots plus `tls.acme.ca_bundle`) the certificate task will use? `None` unless `tls.mode` is
/// acme. Only the directory is fetched: no account is created and no order placed, so the
/// check is free to run on every instance at boot and never counts against a rate limit.
pub async fn online_check(config: &Config) -> Option<anyhow::Result<String>> {
    if config.tls.mode != TlsMode::Acme {
        return None;
    }
    let acme = config.acme();
    let url = acme.directory.as_str();
    let check = async {
        let client = http::AcmeHttp::new(acme.ca_bundle.as_deref(), http::RetryAfter::default())?;
        let start = std::time::Instant::now();
        let (status, body) = client.get(url).await?;
        let ms = start.elapsed().as_millis();
        anyhow::ensure!(status.is_success(), "answered {status}");
        let dir: serde_json::Value = serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("not JSON: {e}"))?;
        let missing: Vec<&str> =
            ["newNonce", "newAccount", "newOrder"].into_iter().filter(|k| !dir[*k].is_string()).collect();
        anyhow::ensure!(missing.is_empty(), "not an ACME directory (no {})", missing.join(", "));
        let ari = if dir["renewalInfo"].is_string() { "offers" } else { "does not offer" };
        let mut line = format!("acme: the directory at {url} answers in {ms} ms; the CA {ari} ARI renewal windows");
        if let Some(terms) = dir["meta"]["termsOfService"].as_str() {
            line.push_str(&format!("\n  terms of service (agreed to when berth creates its account): {terms}"));
        }
        Ok(line)
    };
    Some(check.await.map_err(|e: anyhow::Error| e.context(format!("acme: tls.acme.directory {url}"))))
}

/// Intervals the tests shorten; the defaults are what production runs with.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    /// Backoff after a failed attempt: from `backoff_initial`, doubling, capped at `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// After a failed validation, at least this long (CAs limit failed validations per hour).
    pub validation_floor: Duration,
    /// After a rate-limit answer without `Retry-After`, at least this long.
    pub rate_limit_floor: Duration,
    /// `tls.mode = "files"`: how often the files' mtime is checked.
    pub files_poll: Duration,
    /// Fleet: how often SSM is checked for a certificate another instance stored.
    pub fleet_poll: Duration,
    /// Fleet: how often while another instance holds the order lock (its certificate is
    /// seconds away).
    pub fleet_busy_poll: Duration,
    /// Fleet: how long an order lock is valid; an attempt is cut off before it runs out.
    pub lock_ttl: Duration,
    /// Fleet: how long a new order lock must stand before it counts; well above SSM's
    /// latency (see `fleet::Fleet::take_over`).
    pub lock_settle: Duration,
    /// The longest single sleep: schedules are re-evaluated at least this often, so a wall
    /// clock that jumps (or a suspended VM) never makes a renewal late by more than this.
    pub max_sleep: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            validation_floor: Duration::from_secs(60),
            rate_limit_floor: Duration::from_secs(3600),
            files_poll: Duration::from_secs(5),
            fleet_poll: Duration::from_secs(30),
            fleet_busy_poll: Duration::from_secs(3),
            lock_ttl: Duration::from_secs(600),
            lock_settle: Duration::from_secs(3),
            max_sleep: Duration::from_secs(3600),
        }
    }
}

/// Where the certificate being served came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertSource {
    /// Ordered by this instance just now.
    Ordered,
    /// Read back from `state_dir` at start.
    StateDir,
    /// Stored in SSM by an instance of the fleet.
    Fleet,
    /// `tls.cert_file` / `tls.key_file`.
    Files,
}

#[derive(Debug, Clone, Serialize)]
pub struct CertificateStatus {
    #[serde(flatten)]
    pub info: CertInfo,
    pub source: CertSource,
    /// Unix seconds.
    pub installed_at: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderResult {
    /// Unix seconds.
    pub at: u64,
    pub ok: bool,
    pub error: Option<String>,
    /// Serial of the certificate the order produced.
    pub serial: Option<String>,
}

/// What `berth status` shows about certificates, and what `/metrics` is rendered from.
#[derive(Debug, Clone, Serialize)]
pub struct AcmeStatus {
    pub mode: String,
    pub domains: Vec<String>,
    /// `tls.acme.shared`, in fleet mode.
    pub shared: Option<String>,
    /// `None` while the self-signed certificate serves.
    pub certificate: Option<CertificateStatus>,
    /// Unix seconds of the next renewal attempt.
    pub next_renewal: Option<u64>,
    /// Why then: "ari window", "two thirds of the lifetime", "no certificate yet", ...
    pub renewal_basis: Option<String>,
    /// With an ARI window: the page where the CA explains it (RFC 9773 `explanationURL`),
    /// which CAs give when an incident (a mass revocation, say) moved the window.
    pub renewal_explanation: Option<String>,
    pub last_order: Option<OrderResult>,
    /// `berth_acme_orders_total{result="ok"}` / `{result="error"}`.
    pub orders_ok: u64,
    pub orders_error: u64,
    /// What the task is waiting for, for the systemd status line; `None` when all is well.
    pub waiting: Option<String>,
}

pub(crate) struct RenewRequest {
    pub reply: oneshot::Sender<Result<CertInfo, String>>,
}

/// The daemon's handle on the certificate task: status for `berth status` and `/metrics`,
/// and `berth renew`. Cheap to clone.
#[derive(Clone)]
pub struct AcmeHandle {
    status: Arc<Mutex<AcmeStatus>>,
    renew: Option<mpsc::Sender<RenewRequest>>,
    /// `tls.mode = "acme"`: the manager follows this (a reload sends new settings).
    setup: Option<Arc<watch::Sender<AcmeSetup>>>,
    /// Stops this task only (a child of the daemon's shutdown).
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl AcmeHandle {
    /// A reload changed `[tls]` (or `[aws]`, which fleet mode uses). The ACME task takes
    /// new settings in place and returns `true`: it keeps its account, backoff and the CA's
    /// rate-limit answers, and orders only when the certificate no longer fits the new
    /// names or CA. Any other change of mode or settings returns `false`: the caller stops
    /// this task and spawns one for `setup`.
    pub fn reconfigure(&self, setup: &AcmeSetup) -> bool {
        let Some(tx) = &self.setup else { return false };
        if setup.tls.mode != TlsMode::Acme {
            return false;
        }
        {
            // What `berth status` says follows at once; the certificate when it is installed.
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s.domains = setup.tls.domains.clone();
            s.shared = setup.acme.shared.clone();
        }
        tx.send_replace(setup.clone());
        true
    }

    /// Stops the task and waits until it has (a fleet order lock it holds is released).
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }

    pub fn status(&self) -> AcmeStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Renews now (`tls.mode = "files"`: reloads the files now). `domain` must be one of
    /// `tls.domains` if given; berth keeps one certificate for all of them, so naming one
    /// renews that certificate. The answer comes when the new certificate is installed, or
    /// with the reason it is not.
    pub fn renew_now(&self, domain: Option<String>) -> oneshot::Receiver<Result<CertInfo, String>> {
        let (tx, rx) = oneshot::channel();
        let status = self.status();
        if let Some(d) = &domain {
            if !status.domains.iter().any(|x| x.eq_ignore_ascii_case(d)) {
                let _ = tx.send(Err(format!("{d} is not one of tls.domains ({})", status.domains.join(", "))));
                return rx;
            }
        }
        match &self.renew {
            None => {
                let _ = tx.send(Err(format!("tls.mode is \"{}\": there is no certificate to renew", status.mode)));
            }
            Some(renew) => {
                if let Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) =
                    renew.try_send(RenewRequest { reply: tx })
                {
                    let _ = r.reply.send(Err("the certificate task is busy or stopped; try again".into()));
                }
            }
        }
        rx
    }

    /// One line for `systemctl status berth`, when certificates need attention.
    pub fn status_line(&self) -> Option<String> {
        self.status().waiting.map(|w| format!("tls: {w}"))
    }

    /// `berth_certificate_expiry_timestamp_seconds{domain}`: notAfter (unix seconds) of the
    /// certificate served for each configured domain it covers. Empty while the self-signed
    /// certificate serves: its expiry means nothing to alert on. The orders counter,
    /// `berth_acme_orders_total{result}`, is [`AcmeStatus::orders_ok`] / `orders_error`.
    pub fn expiry_by_domain(&self) -> Vec<(String, u64)> {
        let s = self.status();
        let Some(c) = &s.certificate else {
            return Vec::new();
        };
        s.domains
            .iter()
            .filter(|d| c.info.names.iter().any(|n| n.eq_ignore_ascii_case(d)))
            .map(|d| (d.clone(), unix(c.info.not_after)))
            .collect()
    }
}

/// Starts the certificate task for `setup.tls.mode` and returns its handle. Never fails:
/// problems are retried in the background and reported through the handle and the logs.
pub fn spawn(
    setup: AcmeSetup,
    certs: CertStore,
    challenges: ChallengeResponder,
    shutdown: CancellationToken,
) -> AcmeHandle {
    let status = Arc::new(Mutex::new(AcmeStatus {
        mode: setup.tls.mode.to_string(),
        domains: setup.tls.domains.clone(),
        shared: match setup.tls.mode {
            TlsMode::Acme => setup.acme.shared.clone(),
            _ => None,
        },
        certificate: None,
        next_renewal: None,
        renewal_basis: None,
        renewal_explanation: None,
        last_order: None,
        orders_ok: 0,
        orders_error: 0,
        waiting: None,
    }));
    // Room for a few `berth renew` calls at once; more are told to try again.
    let (tx, rx) = mpsc::channel(8);
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    let mut setup_tx = None;
    let renew = match setup.tls.mode {
        TlsMode::SelfSigned => None,
        TlsMode::Acme => {
            let (stx, srx) = watch::channel(setup.clone());
            setup_tx = Some(Arc::new(stx));
            let mut manager = manager::Manager::new(setup, certs, challenges, status.clone(), rx, srx, stop.clone());
            // A certificate stored by an earlier run serves from the first handshake, not
            // from whenever the task first runs: after a restart, clients that verify never
            // see the self-signed one.
            manager.load_local();
            tasks.spawn(manager.run());
            Some(tx)
        }
        TlsMode::Files => {
            tasks.spawn(files::run(setup, certs, status.clone(), rx, stop.clone()));
            Some(tx)
        }
    };
    tasks.close();
    AcmeHandle { status, renew, setup: setup_tx, stop, tasks }
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `d` ± 20 %, so instances that started together do not poll SSM together.
pub(crate) fn jittered(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::rng().random_range(0.8..=1.2))
}

/// `2026-11-23T11:43:52Z`, for log lines and status text.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
