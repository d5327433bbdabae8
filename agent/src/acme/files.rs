//! `tls.mode = "files"`: a certificate some other tool maintains (a corporate CA, certbot on
//! a bastion, a secrets agent), reloaded when it changes.
//!
//! The files are polled (mtime, size, inode) rather than watched: an inotify watch breaks
//! when a tool replaces the file by rename, which is exactly how careful tools write. A
//! pair that does not load (half written, key not yet replaced, garbage) is logged and the
//! certificate already serving stays; the next poll tries again, so a cert and key written
//! one after the other end up installed together.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_proxy::tls::CertStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::cert::Issued;
use super::{rfc3339, unix, AcmeSetup, AcmeStatus, CertSource, CertificateStatus, RenewRequest};

/// What identifies one version of a file without reading it.
type Stamp = Option<(i128, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = fs::metadata(path).ok()?;
    let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i128);
    Some((mtime, m.len(), m.ino()))
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<Issued> {
    use anyhow::Context;
    let chain = fs::read_to_string(cert).with_context(|| format!("reading tls.cert_file {}", cert.display()))?;
    let key_pem =
        Zeroizing::new(fs::read_to_string(key).with_context(|| format!("reading tls.key_file {}", key.display()))?);
    Issued::from_pem(chain, key_pem)
}

pub(crate) async fn run(
    setup: AcmeSetup,
    certs: CertStore,
    status: Arc<Mutex<AcmeStatus>>,
    mut renew: mpsc::Receiver<RenewRequest>,
    shutdown: CancellationToken,
) {
    // Validation guarantees both are set in this mode.
    let (Some(cert_file), Some(key_file)) = (setup.tls.cert_file.clone(), setup.tls.key_file.clone()) else {
        tracing::error!(
            "tls.mode = \"files\" without tls.cert_file and tls.key_file; serving the self-signed certificate"
        );
        return;
    };
    let domains = setup.tls.domains.clone();
    let label = domains.join(",");
    let mut seen: (Stamp, Stamp) = (None, None);
    let mut loaded_ok = false;
    let mut replies: Vec<RenewRequest> = Vec::new();
    loop {
        let now = (stamp(&cert_file), stamp(&key_file));
        // Reload on any change, on request, and after a failed load (the pair may have
        // been caught half written).
        if now != seen || !loaded_ok || !replies.is_empty() {
            let changed = now != seen;
            seen = now;
            match load(&cert_file, &key_file) {
                Ok(issued) => {
                    let info = issued.info.clone();
                    let same = status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .certificate
                        .as_ref()
                        .is_some_and(|c| c.info == info);
                    if !same {
                        // Install for the configured domains; with none configured, for the
                        // names the certificate carries (it is also the default for no SNI).
                        let names = if domains.is_empty() { info.names.clone() } else { domains.clone() };
                        certs.install(&names, issued.certified.clone());
                        tracing::info!(domain = %label, serial = %info.serial, not_after = %rfc3339(info.not_after),
                            file = %cert_file.display(), "certificate from tls.cert_file installed");
                        if !domains.is_empty() && !info.matches(&domains) {
                            tracing::warn!(domain = %label, names = %info.names.join(","),
                                "the certificate's names differ from tls.domains; clients may see a name mismatch");
                        }
                    }
                    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
                    if !same {
                        s.certificate = Some(CertificateStatus {
                            info: info.clone(),
                            source: CertSource::Files,
                            installed_at: unix(SystemTime::now()),
                        });
                    }
                    s.waiting = None;
                    drop(s);
                    loaded_ok = true;
                    for r in replies.drain(..) {
                        let _ = r.reply.send(Ok(info.clone()));
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    // Log a given failure once per change of the files, not every 5 seconds.
                    if changed || !replies.is_empty() {
                        tracing::warn!(domain = %label, error = %msg, "cannot load tls.cert_file/key_file; keeping the certificate already serving");
                    }
                    status.lock().unwrap_or_else(|e| e.into_inner()).waiting =
                        Some(format!("cannot load the certificate files: {msg}"));
                    loaded_ok = false;
                    for r in replies.drain(..) {
                        let _ = r.reply.send(Err(msg.clone()));
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(setup.timing.files_poll) => {}
            Some(r) = renew.recv() => replies.push(r),
            _ = shutdown.cancelled() => return,
        }
    }
}
