//! `tls.mode = "acme"`: the task that keeps a valid certificate installed.
//!
//! One loop: work out when the current certificate is due (none, wrong names, other CA:
//! now; else the ARI window or two thirds of the lifetime), sleep until then (or a `berth
//! renew`, or shutdown), attempt, and on failure back off. In fleet mode the loop also polls
//! SSM for a certificate another instance stored, and an attempt first takes the fleet's
//! order lock.
//!
//! A reload sends new settings through a watch channel; the loop takes them between
//! attempts (an order in flight finishes first), and the next `due` decides whether the
//! certificate still fits. Account, backoff and rate-limit state stay: a reload is never a
//! way around what the CA asked for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use berth_proxy::challenge::ChallengeResponder;
use berth_proxy::tls::CertStore;
use instant_acme::{Account, ExternalAccountKey, NewAccount};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::cert::Issued;
use super::fleet::{Fleet, FleetAccount, Lock};
use super::http::{cap_retry_after, AcmeHttp, RetryAfter};
use super::local::LocalStore;
use super::order::{self, Failure, FailureKind};
use super::{jittered, rfc3339, unix, AcmeSetup, AcmeStatus, CertSource, CertificateStatus, OrderResult, RenewRequest};
use crate::backoff::Backoff;

/// ARI lookups that fail (CA down) are retried this often; meanwhile the two-thirds rule holds.
const ARI_RETRY: Duration = Duration::from_secs(600);

pub(crate) struct Manager {
    setup: AcmeSetup,
    certs: CertStore,
    responder: ChallengeResponder,
    status: Arc<Mutex<AcmeStatus>>,
    renew: mpsc::Receiver<RenewRequest>,
    /// New settings from a reload.
    setups: watch::Receiver<AcmeSetup>,
    shutdown: CancellationToken,
    /// What the last failed attempt was; a rate limit outlives a reload.
    last_failure: Option<FailureKind>,
    /// `tls.domains`, in config order; the first is the certificate's primary name.
    domains: Vec<String>,
    /// `domains` joined, the `domain` field of every log line here.
    label: String,
    local: LocalStore,
    retry_after: RetryAfter,
    account: Option<Account>,
    /// Local mode: the CA said our account does not exist; make a new one.
    recreate_account: bool,
    current: Option<Issued>,
    /// The directory `current` was issued by, when known.
    current_directory: Option<String>,
    ari: Ari,
    backoff: Backoff,
    fleet: Option<Fleet>,
    /// Fleet: the account credentials last read from SSM (to notice a replaced account).
    fleet_account: Option<Zeroizing<String>>,
    next_fleet_poll: Instant,
    /// Fleet: the last SSM error logged, so a long outage logs once, not every poll.
    last_fleet_error: Option<String>,
}

#[derive(Default)]
struct Ari {
    /// `None` until the CA answered once; `Some(false)` when its directory has no `renewalInfo`.
    supported: Option<bool>,
    plan: Option<AriPlan>,
    retry_at: Option<Instant>,
}

/// The renewal basis when the CA's ARI window sets the time.
const ARI_WINDOW: &str = "ari window";

struct AriPlan {
    /// The certificate the plan is for.
    id: String,
    window: (SystemTime, SystemTime),
    /// A uniformly random moment in the window, as RFC 9773 §4.2 asks, so a fleet of
    /// independent clients does not renew in one burst.
    chosen: SystemTime,
    recheck_at: Instant,
    /// The CA's `explanationURL` for this window, if it gave one.
    explanation: Option<String>,
}

/// What an attempt ended with, when it did not fail.
enum Outcome {
    /// We ordered and installed a new certificate.
    Ordered(Issued),
    /// Fleet: under the lock we found a certificate another instance had just stored.
    Found(Issued),
    /// Fleet: another instance holds the order lock.
    Busy { holder: String },
}

impl Manager {
    pub(crate) fn new(
        setup: AcmeSetup,
        certs: CertStore,
        responder: ChallengeResponder,
        status: Arc<Mutex<AcmeStatus>>,
        renew: mpsc::Receiver<RenewRequest>,
        setups: watch::Receiver<AcmeSetup>,
        shutdown: CancellationToken,
    ) -> Manager {
        let domains = setup.tls.domains.clone();
        let label = domains.join(",");
        let local = LocalStore::new(&setup.state_dir);
        let backoff = Backoff::new(setup.timing.backoff_initial, setup.timing.backoff_max);
        Manager {
            setup,
            certs,
            responder,
            status,
            renew,
            setups,
            shutdown,
            last_failure: None,
            domains,
            label,
            local,
            retry_after: RetryAfter::default(),
            account: None,
            recreate_account: false,
            current: None,
            current_directory: None,
            ari: Ari::default(),
            backoff,
            fleet: None,
            fleet_account: None,
            next_fleet_poll: Instant::now(),
            last_fleet_error: None,
        }
    }

    fn directory(&self) -> &str {
        &self.setup.acme.directory
    }

    fn update(&self, f: impl FnOnce(&mut AcmeStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Fleet mode: the SSM side, from `tls.acme.shared` and `[aws]`.
    async fn connect_fleet(&mut self) {
        self.fleet = match self.setup.acme.shared.clone() {
            Some(prefix) => {
                let sdk = match self.setup.sdk.take() {
                    Some(sdk) => sdk,
                    None => crate::aws::sdk_config(&self.setup.aws).await,
                };
                Some(Fleet::new(&sdk, &prefix, self.setup.timing.lock_settle))
            }
            None => None,
        };
        self.fleet_account = None;
        self.next_fleet_poll = Instant::now();
    }

    /// Takes the settings a reload sent. Returns whether a backoff in force should be
    /// dropped: for new names or another CA an earlier failure says little, except a rate
    /// limit, which the CA keeps counting.
    async fn take_new_setup(&mut self) -> bool {
        let mut new = self.setups.borrow_and_update().clone();
        let old = &self.setup;
        let names_changed = new.tls.domains != old.tls.domains;
        let ca_changed = new.acme.directory != old.acme.directory || new.acme.ca_bundle != old.acme.ca_bundle;
        let fleet_changed = new.acme.shared != old.acme.shared || (new.acme.shared.is_some() && new.aws != old.aws);
        // The SDK config given at start belongs to the old settings.
        new.sdk = if fleet_changed { None } else { self.setup.sdk.take() };
        // Test knobs are not in the config file.
        new.timing = self.setup.timing.clone();
        self.setup = new;
        self.domains = self.setup.tls.domains.clone();
        self.label = self.domains.join(",");
        if ca_changed {
            self.account = None;
            self.ari = Ari::default();
        }
        if fleet_changed {
            self.account = None;
            if self.setup.acme.shared.is_none() {
                // No fleet: answer only the tokens of our own orders again.
                self.responder.set_thumbprint(None);
            }
            self.connect_fleet().await;
        }
        let fits = self.current.as_ref().is_some_and(|c| c.info.matches(&self.domains))
            && self.current_directory.as_deref().is_none_or(|d| d == self.directory());
        if fits {
            tracing::info!(domain = %self.label, "tls settings reloaded; the certificate serving still fits, nothing to order");
        } else {
            tracing::info!(domain = %self.label, "tls settings reloaded; ordering a certificate for these names");
        }
        (names_changed || ca_changed || fleet_changed) && self.last_failure != Some(FailureKind::RateLimited)
    }

    pub(crate) async fn run(mut self) {
        // Everything that may talk to SSM or the CA races shutdown: with either unresponsive,
        // a few request timeouts in a row would outlast systemd's stop timeout.
        let stop = self.shutdown.clone();
        tokio::select! {
            () = self.connect_fleet() => {}
            () = stop.cancelled() => return,
        }
        let mut retry_at: Option<Instant> = None;
        let mut pending: Vec<RenewRequest> = Vec::new();
        let mut logged_plan: Option<(SystemTime, &'static str)> = None;
        loop {
            if self.setups.has_changed().unwrap_or(false) {
                let reset = tokio::select! {
                    r = self.take_new_setup() => r,
                    () = stop.cancelled() => return,
                };
                if reset {
                    self.backoff.reset();
                    retry_at = None;
                }
            }
            let checked = async {
                if self.fleet.is_some() {
                    self.fleet_sync().await;
                }
                self.due().await
            };
            let (due, basis) = tokio::select! {
                d = checked => d,
                () = stop.cancelled() => return,
            };
            let explanation = self.ari_explanation().filter(|_| basis == ARI_WINDOW);
            self.update(|s| {
                s.next_renewal = Some(unix(due.max(SystemTime::now())));
                s.renewal_basis = Some(basis.to_owned());
                s.renewal_explanation = explanation;
            });
            let forced = !pending.is_empty();
            let backing_off = retry_at.is_some_and(|t| Instant::now() < t);
            if forced || (!backing_off && due <= SystemTime::now()) {
                if forced {
                    tracing::info!(domain = %self.label, "renewal requested");
                }
                // Anything the CA said about an earlier attempt is stale now.
                self.retry_after.take();
                let result = tokio::select! {
                    r = self.attempt(forced) => r,
                    _ = stop.cancelled() => {
                        self.release_lock().await;
                        return;
                    }
                };
                let reply = match result {
                    Ok(Outcome::Ordered(issued)) | Ok(Outcome::Found(issued)) => {
                        self.backoff.reset();
                        self.last_failure = None;
                        retry_at = None;
                        Ok(issued.info.clone())
                    }
                    Ok(Outcome::Busy { holder }) => {
                        // Not a failure: the holder's certificate is moments away; look for
                        // it in SSM soon, and try the lock again if the holder vanished.
                        let wait = jittered(self.setup.timing.fleet_busy_poll);
                        tracing::info!(domain = %self.label, holder = %holder, "another instance is ordering; waiting for its certificate");
                        self.update(|s| {
                            s.waiting = Some(format!("waiting for {holder} to store the fleet's certificate"))
                        });
                        self.next_fleet_poll = Instant::now() + wait;
                        retry_at = Some(Instant::now() + wait);
                        Err(format!("another instance ({holder}) is renewing now; its certificate is installed here when stored"))
                    }
                    Err(f) => {
                        self.last_failure = Some(f.kind);
                        let wait = self.delay_after(&f);
                        tracing::warn!(domain = %self.label, error = %f.message, retry_in = ?wait, "could not get a certificate; retrying");
                        let serving = if self.current.is_some() {
                            "current certificate still serving"
                        } else {
                            "self-signed certificate serving"
                        };
                        self.update(|s| {
                            s.waiting =
                                Some(format!("ACME failed ({serving}), retry in {}s: {}", wait.as_secs(), f.message))
                        });
                        retry_at = Some(Instant::now() + wait);
                        Err(f.message)
                    }
                };
                for r in pending.drain(..) {
                    let _ = r.reply.send(reply.clone());
                }
                continue;
            }

            // Nothing to order now: the journal says when the next renewal is, once per change
            // of plan (the loop wakes at least hourly, which would otherwise repeat it).
            if !backing_off && logged_plan != Some((due, basis)) {
                logged_plan = Some((due, basis));
                tracing::info!(domain = %self.label, next_renewal = %rfc3339(due), basis, "certificate in place; next renewal scheduled");
            }

            // Sleep until the renewal is due and any backoff has passed, but wake for SSM
            // polls, `berth renew`, shutdown, and at least every `max_sleep`.
            let now = SystemTime::now();
            let mut wake = due.duration_since(now).unwrap_or_default();
            if let Some(t) = retry_at {
                wake = wake.max(t.saturating_duration_since(Instant::now()));
            }
            if self.fleet.is_some() {
                wake = wake.min(self.next_fleet_poll.saturating_duration_since(Instant::now()));
            }
            if let Some(plan) = &self.ari.plan {
                wake = wake.min(plan.recheck_at.saturating_duration_since(Instant::now()));
            }
            wake = wake.min(self.setup.timing.max_sleep);
            tokio::select! {
                _ = tokio::time::sleep(wake) => {}
                Some(r) = self.renew.recv() => pending.push(r),
                // `changed` marks the settings seen; the top of the loop looks for unseen ones.
                Ok(()) = self.setups.changed() => self.setups.mark_changed(),
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// At start: a certificate stored by an earlier run serves at once, and unless it is
    /// due, no order is placed.
    pub(crate) fn load_local(&mut self) {
        match self.local.certificate() {
            Ok(Some((issued, directory))) => {
                let info = &issued.info;
                if info.expired(SystemTime::now()) {
                    tracing::info!(domain = %self.label, not_after = %rfc3339(info.not_after), "the stored certificate has expired; ordering a new one");
                } else if !info.matches(&self.domains) {
                    tracing::info!(domain = %self.label, names = %info.names.join(","), "the stored certificate is for other names; ordering a new one");
                } else {
                    self.install(issued, CertSource::StateDir, directory);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(domain = %self.label, error = format!("{e:#}"), "ignoring the stored certificate"),
        }
    }

    fn install(&mut self, issued: Issued, source: CertSource, directory: Option<String>) {
        self.certs.install(&self.domains, issued.certified.clone());
        let info = issued.info.clone();
        tracing::info!(
            domain = %self.label,
            serial = %info.serial,
            not_after = %rfc3339(info.not_after),
            source = ?source,
            "certificate installed"
        );
        self.update(|s| {
            s.certificate = Some(CertificateStatus { info, source, installed_at: unix(SystemTime::now()) });
            s.waiting = None;
        });
        self.current = Some(issued);
        self.current_directory = directory;
    }

    /// When the current certificate should be renewed, and why then.
    async fn due(&mut self) -> (SystemTime, &'static str) {
        let now = SystemTime::now();
        let Some(cur) = &self.current else {
            return (now, "no certificate yet");
        };
        if !cur.info.matches(&self.domains) {
            return (now, "tls.domains changed");
        }
        if self.current_directory.as_deref().is_some_and(|d| d != self.directory()) {
            return (now, "tls.acme.directory changed");
        }
        if cur.info.expired(now) {
            return (now, "expired");
        }
        let (lifetime_due, not_after) = (cur.info.lifetime_renewal(), cur.info.not_after);
        match self.ari_due().await {
            // A CA window later than expiry would be a CA bug; never trust it past that.
            Some(t) => (t.min(not_after), ARI_WINDOW),
            None => (lifetime_due, "two thirds of the lifetime"),
        }
    }

    /// The renewal moment from the CA's ARI window, if it offers one.
    async fn ari_due(&mut self) -> Option<SystemTime> {
        if self.ari.supported == Some(false) {
            return None;
        }
        let id = self.current.as_ref()?.info.ari_id.clone()?;
        // Only certificates of the configured CA can be asked about.
        if self.current_directory.as_deref().is_some_and(|d| d != self.directory()) {
            return None;
        }
        let now = Instant::now();
        if let Some(plan) = self.ari.plan.as_ref().filter(|p| p.id == id) {
            if now < plan.recheck_at {
                return Some(plan.chosen);
            }
        }
        let old = self.ari.plan.as_ref().filter(|p| p.id == id).map(|p| p.chosen);
        if self.ari.retry_at.is_some_and(|t| now < t) {
            return old;
        }
        let account = match self.ensure_account().await {
            Ok(a) => a,
            Err(f) => {
                tracing::debug!(domain = %self.label, error = %f.message, "no ARI lookup without the account");
                self.ari.retry_at = Some(now + ARI_RETRY);
                return old;
            }
        };
        let cert_id = order::ari_identifier(&id)?;
        match account.renewal_info(&cert_id).await {
            Ok((info, recheck)) => {
                self.ari.supported = Some(true);
                let to_sys = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
                let window = (
                    to_sys(info.suggested_window.start.unix_timestamp()),
                    to_sys(info.suggested_window.end.unix_timestamp()),
                );
                let chosen = match &self.ari.plan {
                    Some(p) if p.id == id && p.window == window => p.chosen,
                    _ => pick_in_window(window, SystemTime::now()),
                };
                // Re-ask when the CA says; bounded so a missing or absurd hint neither
                // hammers the CA nor leaves an incident-driven window change unseen for days.
                let recheck = recheck.clamp(Duration::from_secs(60), Duration::from_secs(6 * 3600));
                tracing::info!(domain = %self.label, window_start = %rfc3339(window.0), window_end = %rfc3339(window.1),
                    renew_at = %rfc3339(chosen), "ACME renewal window (ARI)");
                let explained_before =
                    self.ari.plan.as_ref().filter(|p| p.id == id).and_then(|p| p.explanation.as_ref());
                if let Some(url) = info.explanation_url.as_ref().filter(|url| explained_before != Some(*url)) {
                    // A CA explains a window when something moved it: worth an operator's look.
                    tracing::warn!(domain = %self.label, explanation = %url, renew_at = %rfc3339(chosen),
                        "the CA explains this certificate's renewal window");
                }
                let explanation = info.explanation_url;
                self.ari.plan = Some(AriPlan { id, window, chosen, recheck_at: now + recheck, explanation });
                self.ari.retry_at = None;
                Some(chosen)
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                tracing::debug!(domain = %self.label, "the CA offers no ARI; renewing at two thirds of the lifetime");
                self.ari.supported = Some(false);
                None
            }
            Err(e) => {
                tracing::debug!(domain = %self.label, error = %order::error_chain(&e), "ARI lookup failed; retrying later");
                self.ari.retry_at = Some(now + ARI_RETRY);
                old
            }
        }
    }

    /// After a failure: capped exponential backoff with jitter, but never sooner than the CA
    /// asked, and slower for failures that fast retries would make worse.
    fn delay_after(&mut self, f: &Failure) -> Duration {
        let t = &self.setup.timing;
        let mut wait = self.backoff.next_delay();
        match f.kind {
            FailureKind::Transient => {}
            FailureKind::Validation => wait = wait.max(t.validation_floor),
            FailureKind::RateLimited => wait = wait.max(t.backoff_max),
            FailureKind::AccountGone => {
                self.account = None;
                self.recreate_account = true;
            }
        }
        let said = f.retry_at.or_else(|| self.retry_after.take());
        match said {
            Some(at) => wait = wait.max(cap_retry_after(at.duration_since(SystemTime::now()).unwrap_or_default())),
            None if f.kind == FailureKind::RateLimited => wait = wait.max(t.rate_limit_floor),
            None => {}
        }
        wait
    }

    async fn attempt(&mut self, forced: bool) -> Result<Outcome, Failure> {
        self.update(|s| s.waiting = Some("ordering a certificate".into()));
        let result = if self.fleet.is_some() { self.attempt_fleet(forced).await } else { self.attempt_single().await };
        let now = unix(SystemTime::now());
        match &result {
            Ok(Outcome::Ordered(issued)) => self.update(|s| {
                s.orders_ok += 1;
                s.last_order =
                    Some(OrderResult { at: now, ok: true, error: None, serial: Some(issued.info.serial.clone()) });
            }),
            Err(f) => self.update(|s| {
                s.orders_error += 1;
                s.last_order = Some(OrderResult { at: now, ok: false, error: Some(f.message.clone()), serial: None });
            }),
            Ok(_) => {}
        }
        result
    }

    async fn attempt_single(&mut self) -> Result<Outcome, Failure> {
        let account = self.ensure_account().await?;
        let replaces = self.replaces();
        let issued = order::order(&account, &self.domains, replaces.as_deref(), &self.responder).await?;
        if let Err(e) = self.local.save_certificate(&issued, self.directory()) {
            // Serving it matters more than keeping it; the next start orders again.
            tracing::error!(domain = %self.label, error = format!("{e:#}"), "cannot store the new certificate in state_dir");
        }
        let directory = Some(self.directory().to_owned());
        self.install(issued.clone(), CertSource::Ordered, directory);
        Ok(Outcome::Ordered(issued))
    }

    async fn attempt_fleet(&mut self, forced: bool) -> Result<Outcome, Failure> {
        let account = self.ensure_account().await?;
        let ttl = self.setup.timing.lock_ttl;
        let fleet = self.fleet.as_ref().expect("fleet mode");
        match fleet.try_lock(ttl).await.map_err(ssm_failure)? {
            Lock::Acquired => {}
            Lock::HeldBy { holder, .. } => return Ok(Outcome::Busy { holder }),
        }
        tracing::info!(domain = %self.label, prefix = %fleet.prefix(), holder = %fleet.holder, "took the fleet's ACME order lock");
        // Finish (or give up) well before the lock expires, so nobody takes it over while
        // we still work under it.
        let budget = ttl.mul_f64(0.8);
        let result = match tokio::time::timeout(budget, self.under_lock(&account, forced)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::transient(format!("the order took longer than {budget:?}"))),
        };
        self.release_lock().await;
        result
    }

    async fn under_lock(&mut self, account: &Account, forced: bool) -> Result<Outcome, Failure> {
        // Someone may have renewed while we waited for the lock: then there is nothing to order.
        if !forced {
            if let Some(theirs) = self.fleet_certificate().await.map_err(ssm_failure)? {
                if self.is_better(&theirs) && theirs.info.lifetime_renewal() > SystemTime::now() {
                    tracing::info!(domain = %self.label, serial = %theirs.info.serial, "another instance already renewed; using its certificate");
                    self.adopt_fleet(theirs.clone());
                    return Ok(Outcome::Found(theirs));
                }
            }
        }
        let replaces = self.replaces();
        let issued = order::order(account, &self.domains, replaces.as_deref(), &self.responder).await?;
        // Publish before installing: if SSM refuses, the others would order again; retry a
        // few times, and serve the certificate here either way.
        let fleet = self.fleet.as_ref().expect("fleet mode");
        let mut publish = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        for attempt in 1..=4 {
            match fleet.store_certificate(&issued).await {
                Ok(()) => {
                    tracing::info!(domain = %self.label, prefix = %fleet.prefix(), serial = %issued.info.serial, "stored the certificate for the fleet");
                    break;
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(domain = %self.label, error = format!("{e:#}"), "cannot store the certificate in SSM; retrying");
                    tokio::time::sleep(publish.next_delay()).await;
                }
                Err(e) => tracing::error!(domain = %self.label, error = format!("{e:#}"),
                    "cannot store the certificate in SSM; serving it here only, the other instances will order their own"),
            }
        }
        if let Err(e) = self.local.save_certificate(&issued, self.directory()) {
            tracing::error!(domain = %self.label, error = format!("{e:#}"), "cannot store the new certificate in state_dir");
        }
        let directory = Some(self.directory().to_owned());
        self.install(issued.clone(), CertSource::Ordered, directory);
        Ok(Outcome::Ordered(issued))
    }

    async fn release_lock(&self) {
        if let Some(fleet) = &self.fleet {
            match tokio::time::timeout(Duration::from_secs(10), fleet.unlock()).await {
                Ok(Ok(())) => {}
                // It expires on its own; the next instance takes it over then.
                Ok(Err(e)) => {
                    tracing::warn!(domain = %self.label, error = format!("{e:#}"), "cannot release the ACME order lock")
                }
                Err(_) => tracing::warn!(domain = %self.label, "releasing the ACME order lock timed out"),
            }
        }
    }

    /// The CA's explanation of the current certificate's ARI window, if it gave one.
    fn ari_explanation(&self) -> Option<String> {
        let id = self.current.as_ref()?.info.ari_id.as_ref()?;
        self.ari.plan.as_ref().filter(|p| &p.id == id)?.explanation.clone()
    }

    /// ARI `replaces`: the identifier of the certificate being renewed, when the CA that
    /// issued it is the one we order from and it offers ARI.
    fn replaces(&self) -> Option<String> {
        if self.ari.supported != Some(true) || self.current_directory.as_deref() != Some(self.directory()) {
            return None;
        }
        self.current.as_ref()?.info.ari_id.clone()
    }

    /// Is `candidate` worth installing over what serves now?
    fn is_better(&self, candidate: &Issued) -> bool {
        let info = &candidate.info;
        if !info.matches(&self.domains) || info.expired(SystemTime::now()) {
            return false;
        }
        match &self.current {
            None => true,
            Some(cur) => !cur.info.matches(&self.domains) || info.newer_than(&cur.info),
        }
    }

    // -- account ---------------------------------------------------------------------

    fn http(&self) -> Result<Box<AcmeHttp>, Failure> {
        AcmeHttp::new(self.setup.acme.ca_bundle.as_deref(), self.retry_after.clone())
            .map(Box::new)
            .map_err(|e| Failure::transient(format!("{e:#}")))
    }

    /// The account to order with: loaded once per run from state_dir, or registered from
    /// the fleet's key in SSM; created with the CA only if there is none.
    async fn ensure_account(&mut self) -> Result<Account, Failure> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let account = if self.fleet.is_some() { self.fleet_account().await? } else { self.local_account().await? };
        self.account = Some(account.clone());
        Ok(account)
    }

    async fn local_account(&mut self) -> Result<Account, Failure> {
        if !self.recreate_account {
            match self.local.account() {
                Ok(Some(json)) if directory_of(&json).as_deref() == Some(self.directory()) => {
                    let parsed: instant_acme::AccountCredentials = serde_json::from_str(&json)
                        .map_err(|e| Failure::transient(format!("the stored ACME account is unreadable: {e}")))?;
                    return Account::builder_with_http(self.http()?)
                        .from_credentials(parsed)
                        .await
                        .map_err(|e| Failure::from_acme("loading the ACME account", e));
                }
                Ok(Some(_)) => {
                    tracing::info!(domain = %self.label, "the stored ACME account is for another directory; creating one")
                }
                Ok(None) => {}
                Err(e) => return Err(Failure::transient(format!("{e:#}"))),
            }
        }
        let (account, credentials) = self.create_account().await?;
        let json = Zeroizing::new(
            serde_json::to_string(&credentials)
                .map_err(|e| Failure::transient(format!("serializing the account: {e}")))?,
        );
        self.local.save_account(&json).map_err(|e| Failure::transient(format!("storing the ACME account: {e:#}")))?;
        tracing::info!(domain = %self.label, account = %account.id(), directory = %self.directory(), "ACME account created");
        self.recreate_account = false;
        Ok(account)
    }

    /// Registers a new account (new key) with the CA, bound to the CA's external account
    /// when `tls.acme.eab_kid` is set.
    async fn create_account(&self) -> Result<(Account, instant_acme::AccountCredentials), Failure> {
        let eab = self.external_account_key().await?;
        let contact: Vec<&str> = self.setup.acme.contact.iter().map(String::as_str).collect();
        Account::builder_with_http(self.http()?)
            .create(
                &NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false },
                self.directory().to_owned(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| Failure::from_acme("creating the ACME account", e))
    }

    /// The EAB key from `tls.acme.eab_hmac_key` or the SSM parameter named by
    /// `eab_hmac_key_parameter`; read only when an account is created, which is rare.
    async fn external_account_key(&self) -> Result<Option<ExternalAccountKey>, Failure> {
        let acme = &self.setup.acme;
        let Some(kid) = &acme.eab_kid else {
            return Ok(None);
        };
        let text = match (&acme.eab_hmac_key, &acme.eab_hmac_key_parameter) {
            (Some(key), _) => Zeroizing::new(key.expose().to_owned()),
            (None, Some(name)) => self.eab_key_from_ssm(name).await?,
            (None, None) => return Err(Failure::transient("tls.acme.eab_kid is set without its MAC key")),
        };
        // Never quote `text` in a message: it is the secret.
        let bytes = crate::config::eab_hmac_key_bytes(&text)
            .map_err(|why| Failure::transient(format!("the EAB MAC key {why}")))?;
        Ok(Some(ExternalAccountKey::new(kid.clone(), &bytes)))
    }

    async fn eab_key_from_ssm(&self, name: &str) -> Result<Zeroizing<String>, Failure> {
        let sdk = match &self.setup.sdk {
            Some(sdk) => sdk.clone(),
            None => crate::aws::sdk_config(&self.setup.aws).await,
        };
        let out =
            aws_sdk_ssm::Client::new(&sdk).get_parameter().name(name).with_decryption(true).send().await.map_err(
                |e| {
                    Failure::transient(format!(
                        "reading tls.acme.eab_hmac_key_parameter {name}: {}",
                        aws_sdk_ssm::error::DisplayErrorContext(&e)
                    ))
                },
            )?;
        out.parameter.and_then(|p| p.value).map(Zeroizing::new).ok_or_else(|| {
            Failure::transient(format!("SSM returned no value for tls.acme.eab_hmac_key_parameter {name}"))
        })
    }

    /// Fleet: the account key from SSM (generated and offered create-only if there is none;
    /// losing that race just means using the winner's), registered with the CA. For a key
    /// the CA knows, registering returns the existing account, so every instance ends up
    /// with the same one.
    async fn fleet_account(&mut self) -> Result<Account, Failure> {
        let json = self.fleet_key().await?;
        let (directory, key) = FleetAccount::parse(&json).map_err(|e| Failure::transient(format!("{e:#}")))?;
        if directory != self.directory() {
            return Err(Failure::transient(format!(
                "the fleet's ACME account in SSM is for {directory}, not tls.acme.directory {}; use another tls.acme.shared prefix for another CA",
                self.directory()
            )));
        }
        let signing = instant_acme::Key::from_pkcs8_der(key.clone_key())
            .map_err(|e| Failure::transient(format!("the fleet's account key is unusable: {e}")))?;
        let (account, _) = Account::builder_with_http(self.http()?)
            .create_from_key((signing, rustls::pki_types::PrivateKeyDer::Pkcs8(key)), directory)
            .await
            .map_err(|e| Failure::from_acme("registering the fleet's ACME account", e))?;
        // Registering from a key sends no contact; set ours (the same for every instance).
        if !self.setup.acme.contact.is_empty() {
            let contact: Vec<&str> = self.setup.acme.contact.iter().map(String::as_str).collect();
            if let Err(e) = account.update_contacts(&contact).await {
                tracing::warn!(domain = %self.label, error = %order::error_chain(&e), "could not set the ACME account's contact");
            }
        }
        tracing::info!(domain = %self.label, account = %account.id(), "using the fleet's ACME account");
        self.responder.set_thumbprint(Some(account.key_thumbprint().to_owned()));
        Ok(account)
    }

    async fn fleet_key(&mut self) -> Result<Zeroizing<String>, Failure> {
        let fleet = self.fleet.as_ref().expect("fleet mode");
        if !self.recreate_account {
            if let Some(json) = fleet.account().await.map_err(ssm_failure)? {
                self.note_fleet_account(&json);
                return Ok(json);
            }
        }
        let ours = if self.setup.acme.eab_kid.is_some() {
            // A CA that wants EAB registers no bare key, and instant-acme binds only a key it
            // generates itself: register first, then share that key. An instance that loses
            // the race below uses the winner's key, which the CA then knows already.
            let (_, credentials) = self.create_account().await?;
            FleetAccount::encode(self.directory(), credentials.private_key())
        } else {
            FleetAccount::generate(self.directory())
        }
        .map_err(|e| Failure::transient(format!("{e:#}")))?;
        let fleet = self.fleet.as_ref().expect("fleet mode");
        let stored = if self.recreate_account {
            fleet.replace_account(&ours).await.map(|()| true)
        } else {
            fleet.offer_account(&ours).await
        };
        let json = if stored.map_err(ssm_failure)? {
            tracing::info!(domain = %self.label, prefix = %fleet.prefix(), "stored a new ACME account key for the fleet in SSM");
            ours
        } else {
            tracing::info!(domain = %self.label, prefix = %fleet.prefix(), "another instance stored the fleet's account key first; using it");
            fleet
                .account()
                .await
                .map_err(ssm_failure)?
                .ok_or_else(|| Failure::transient("the fleet's account key vanished from SSM"))?
        };
        self.recreate_account = false;
        self.note_fleet_account(&json);
        Ok(json)
    }

    /// Turns on stateless HTTP-01 answers for the fleet's account key: any instance behind
    /// the ALB can then answer a validation request for an order another instance placed.
    fn note_fleet_account(&mut self, json: &Zeroizing<String>) {
        if self.fleet_account.as_ref().is_some_and(|old| old.as_str() == json.as_str()) {
            return;
        }
        match FleetAccount::parse(json).and_then(|(_, key)| order::thumbprint(&key)) {
            Ok(thumb) => self.responder.set_thumbprint(Some(thumb)),
            Err(e) => {
                tracing::warn!(domain = %self.label, error = format!("{e:#}"), "the fleet's ACME account key is unusable")
            }
        }
        if self.fleet_account.is_some() {
            // Replaced by another instance (the CA refused the old key): register the new one.
            self.account = None;
        }
        self.fleet_account = Some(json.clone());
    }

    // -- fleet polling -----------------------------------------------------------------

    async fn fleet_certificate(&self) -> anyhow::Result<Option<Issued>> {
        let fleet = self.fleet.as_ref().expect("fleet mode");
        let Some((chain, key)) = fleet.certificate().await? else {
            return Ok(None);
        };
        match Issued::from_pem(chain, key) {
            Ok(i) => Ok(Some(i)),
            // Mid-update (new key, old chain) or damaged: not now; the next poll sees more.
            Err(e) => {
                tracing::debug!(domain = %self.label, error = format!("{e:#}"), "the fleet's certificate in SSM is not usable right now");
                Ok(None)
            }
        }
    }

    fn adopt_fleet(&mut self, issued: Issued) {
        if let Err(e) = self.local.save_certificate(&issued, self.directory()) {
            tracing::warn!(domain = %self.label, error = format!("{e:#}"), "cannot store the fleet's certificate in state_dir");
        }
        let directory = Some(self.directory().to_owned());
        self.install(issued, CertSource::Fleet, directory);
    }

    /// Every `fleet_poll`: the account (for stateless HTTP-01 answers, even before we can
    /// reach the CA) and a certificate newer than ours.
    async fn fleet_sync(&mut self) {
        if Instant::now() < self.next_fleet_poll {
            return;
        }
        self.next_fleet_poll = Instant::now() + jittered(self.setup.timing.fleet_poll);
        let fleet = self.fleet.as_ref().expect("fleet mode");
        let result = async {
            let account = fleet.account().await?;
            let cert = self.fleet_certificate().await?;
            anyhow::Ok((account, cert))
        }
        .await;
        match result {
            Ok((account, cert)) => {
                if self.last_fleet_error.take().is_some() {
                    tracing::info!(domain = %self.label, "SSM reachable again");
                }
                if let Some(json) = account {
                    self.note_fleet_account(&json);
                }
                if let Some(theirs) = cert {
                    if self.is_better(&theirs) {
                        tracing::info!(domain = %self.label, serial = %theirs.info.serial, "picked up the fleet's certificate from SSM");
                        self.adopt_fleet(theirs);
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if self.last_fleet_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(domain = %self.label, error = %msg, "cannot read the fleet's certificate from SSM; retrying");
                }
                self.last_fleet_error = Some(msg);
            }
        }
    }
}

/// A random moment in `[start, end]`, or now if the window has begun (RFC 9773 §4.2: a
/// window in the past means renew immediately).
fn pick_in_window((start, end): (SystemTime, SystemTime), now: SystemTime) -> SystemTime {
    use rand::Rng;
    let start = start.max(now);
    match end.duration_since(start) {
        Ok(span) if !span.is_zero() => start + span.mul_f64(rand::rng().random_range(0.0..1.0)),
        _ => start,
    }
}

fn directory_of(credentials_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(credentials_json).ok()?;
    v.get("directory")?.as_str().map(str::to_owned)
}

fn ssm_failure(e: anyhow::Error) -> Failure {
    Failure::transient(format!("SSM: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_choice() {
        let now = SystemTime::now();
        let h = Duration::from_secs(3600);
        for _ in 0..100 {
            let t = pick_in_window((now + h, now + 2 * h), now);
            assert!(t >= now + h && t <= now + 2 * h);
        }
        // Window already open: renew now; window over: renew now.
        assert_eq!(pick_in_window((now - h, now - h / 2), now), now);
        let t = pick_in_window((now - h, now + h), now);
        assert!(t >= now && t <= now + h);
    }

    #[test]
    fn directory_from_credentials() {
        assert_eq!(
            directory_of(r#"{"id":"x","key_pkcs8":"y","directory":"https://d/dir"}"#).as_deref(),
            Some("https://d/dir")
        );
        assert_eq!(directory_of("{}"), None);
    }
}
