//! `systemctl reload berth` (SIGHUP): re-read the config and apply what changed, in place.
//!
//! [`reload`] validates the file; an invalid one is rejected with its problems logged and the
//! running config stays. A valid one is applied at once where that is a table swap (routes,
//! access rules, `[apps]`: new image → rollout) and then published through
//! [`Live::set_config`]. Two followers, started by the daemon, react to what they own:
//!
//! - [`follow_tls`]: another `[tls]` → a self-signed certificate for names no real
//!   certificate covers, at once; the ACME task takes the new settings (and orders only if
//!   its certificate no longer fits), or another mode's task replaces it.
//! - [`follow_secrets`]: another `path`, `parameters`, `refresh_interval` or `[aws]` → the
//!   refresh loop switches source and fetches at once; a changed set reaches the app through
//!   `on_change`, like any refresh.
//!
//! What is fixed when the daemon starts (`[agent]`, listen addresses, the health path, the
//! access log) is logged as needing a restart, not silently ignored.

use std::sync::Arc;

use berth_proxy::challenge::ChallengeResponder;
use berth_proxy::routes::Router;
use berth_proxy::tls::{self, CertStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::access;
use crate::acme::{self, AcmeSetup};
use crate::config::{Config, OnChange, RegistryAuth, TlsMode};
use crate::secrets::{self, SecretsHandle};
use crate::state;
use crate::status::Live;
use crate::systemd;

/// Re-reads `path` and applies it, or keeps the running config if it is invalid.
pub fn reload(path: &std::path::Path, live: &Live, router: &Router) {
    systemd::reloading();
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected; the running config stays in force");
            systemd::ready(&format!("reload rejected (config invalid); {}", live.status_line()));
            return;
        }
    };
    let old = live.config();
    let mut applied = Vec::new();
    let mut needs_restart = Vec::new();
    if new.agent != old.agent {
        needs_restart.push("[agent]");
    }
    if new.http.listen != old.http.listen || new.https != old.https {
        needs_restart.push("listeners");
    }
    // Both are handed to the proxy's handlers when they are built at start.
    if new.http.health_path != old.http.health_path {
        needs_restart.push("[http] health_path");
    }
    if new.http.access_log != old.http.access_log || new.http.access_log_sample != old.http.access_log_sample {
        needs_restart.push("[http] access_log");
    }
    if tls_changed(&old, &new) {
        applied.push("[tls]");
    }
    if !same_secrets_source(&old, &new) || new.secrets.on_change != old.secrets.on_change {
        applied.push("[secrets]");
    }
    // Registry credentials in SSM are read through the client made at start.
    if new.aws != old.aws && new.apps.values().any(|a| !matches!(a.registry_auth, RegistryAuth::None)) {
        needs_restart.push("[aws] for registry_auth");
    }
    router.set_routes(crate::daemon::route_table(&new));
    crate::daemon::set_connection_caps(&new, router);
    if let Some(secrets) = live.secrets.get() {
        access::apply(&new, router, &secrets.current());
    } else {
        access::close_until_secrets(&new, router);
    }
    if let Some(supervisor) = live.supervisor.get() {
        supervisor.apply(&new.apps);
    }
    let apps: Vec<&str> = new.apps.keys().map(String::as_str).collect();
    let apps = apps.join(", ");
    // The followers (certificates, secrets) pick the new config up from here.
    live.set_config(new);
    if needs_restart.is_empty() {
        tracing::info!(apps, applying = applied.join(", "), "config reloaded");
    } else {
        tracing::warn!(
            apps,
            applying = applied.join(", "),
            restart_needed_for = needs_restart.join(", "),
            "config reloaded; changes to these sections take effect after `systemctl restart berth`"
        );
    }
    systemd::ready(&live.status_line());
}

/// Does the certificate task need to hear about `new`? Fleet mode also reads `[aws]`.
fn tls_changed(old: &Config, new: &Config) -> bool {
    let fleet = |c: &Config| c.tls.mode == TlsMode::Acme && c.acme().shared.is_some();
    old.tls != new.tls || ((fleet(old) || fleet(new)) && old.aws != new.aws)
}

/// Same parameters read the same way (`on_change` is not about reading).
pub fn same_secrets_source(a: &Config, b: &Config) -> bool {
    a.aws == b.aws
        && a.secrets.path == b.secrets.path
        && a.secrets.parameters == b.secrets.parameters
        && a.secrets.refresh_interval == b.secrets.refresh_interval
}

/// Keeps the certificates in step with `[tls]` across reloads, until shutdown.
pub async fn follow_tls(
    live: Arc<Live>,
    certs: CertStore,
    challenges: ChallengeResponder,
    shutdown: CancellationToken,
) {
    let mut changes = live.subscribe_config();
    let mut applied = changes.borrow_and_update().clone();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        let new = changes.borrow_and_update().clone();
        if tls_changed(&applied, &new) {
            apply_tls(&live, &certs, &challenges, &shutdown, &applied, &new).await;
        }
        applied = new;
    }
}

async fn apply_tls(
    live: &Live,
    certs: &CertStore,
    challenges: &ChallengeResponder,
    shutdown: &CancellationToken,
    old: &Config,
    new: &Config,
) {
    let domains = &new.tls.domains;
    tracing::info!(mode = %new.tls.mode, domain = domains.join(","), "applying the reloaded [tls]");
    let handle = live.acme();
    // Names the certificate serving now covers keep it until its successor is installed;
    // every other name gets a self-signed certificate at once, so a new domain answers
    // TLS from the moment of the reload (an ALB does not verify it).
    let covered: Vec<String> = match &handle {
        Some(h) if new.tls.mode == old.tls.mode && new.tls.mode != TlsMode::SelfSigned => {
            h.status().certificate.map(|c| c.info.names).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let uncovered: Vec<String> =
        domains.iter().filter(|d| !covered.iter().any(|c| c.eq_ignore_ascii_case(d))).cloned().collect();
    certs.retain(domains);
    if !uncovered.is_empty() || domains.is_empty() {
        match tls::self_signed(domains) {
            Ok(ss) => {
                certs.install(if domains.is_empty() { &[] } else { &uncovered }, ss.key);
                let file = new.agent.state_dir.join("self-signed.crt");
                if let Err(e) = state::write_public(&file, ss.cert_pem.as_bytes()) {
                    tracing::warn!(error = format!("{e:#}"), file = %file.display(), "cannot write the self-signed certificate");
                }
                tracing::info!(
                    domain = uncovered.join(","),
                    "self-signed certificate installed for these names until a real one is"
                );
            }
            Err(e) => tracing::error!(error = %e, "cannot create a self-signed certificate for the reloaded domains"),
        }
    }
    let setup = AcmeSetup::from_config(new);
    if handle.as_ref().is_some_and(|h| h.reconfigure(&setup)) {
        return;
    }
    // Another mode (or files/self-signed settings): another task. The old one stops first
    // so a fleet order lock it holds is released before the new one may take it.
    if let Some(h) = handle {
        h.stop().await;
    }
    if new.tls.mode != TlsMode::Acme {
        challenges.set_thumbprint(None);
    }
    let h = acme::spawn(setup, certs.clone(), challenges.clone(), shutdown.clone());
    live.acme.store(Some(Arc::new(h)));
}

/// Keeps the secrets refresh loop (and `on_change`) in step with `[secrets]`/`[aws]`,
/// starting from `applied`, the config the loop was started with.
pub async fn follow_secrets(
    live: Arc<Live>,
    handle: SecretsHandle,
    mut applied: Arc<Config>,
    on_change: watch::Sender<OnChange>,
) {
    let mut changes = live.subscribe_config();
    changes.mark_changed();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        let new = changes.borrow_and_update().clone();
        on_change.send_if_modified(|v| std::mem::replace(v, new.secrets.on_change) != new.secrets.on_change);
        if same_secrets_source(&applied, &new) {
            applied = new;
            continue;
        }
        let source = if new.has_secrets() {
            let sdk = crate::aws::sdk_config(&new.aws).await;
            Some(secrets::SecretsSource::new(&sdk, &new.secrets))
        } else {
            None
        };
        handle.reconfigure(source, new.secrets.refresh_interval.0);
        applied = new;
    }
}
