//! Logs: journald with structured fields under systemd, readable stderr elsewhere.
//!
//! Field names are chosen for `journalctl -u berth APP=web`: tracing-journald upper-cases
//! field names, and we turn off its `F_` prefix, so `app = "web"` becomes `APP=web`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. The level comes from `BERTH_LOG` (EnvFilter syntax,
/// e.g. `info,berth::secrets=debug`), default `info`.
pub fn init() {
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal; only then is the
    // native protocol worth using (and only then does it keep our fields).
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                let journald = journald
                    .with_field_prefix(None)
                    .with_syslog_identifier("berth".into());
                tracing_subscriber::registry().with(filter).with(journald).init();
                return;
            }
            Err(e) => eprintln!("berth: journald socket unavailable ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .init();
}
