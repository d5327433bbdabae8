//! Logs: journald with structured fields under systemd, readable stderr elsewhere.
//!
//! Field names are chosen for `journalctl -u berth APP=web`: tracing-journald upper-cases
//! field names, and we turn off its `F_` prefix, so `app = "web"` becomes `APP=web`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Crates that can log wire contents (bodies, headers) at debug or trace.
const WIRE_LOGGERS: [&str; 10] = [
    "aws_smithy_runtime",
    "aws_sigv4",
    "aws_runtime",
    "aws_smithy_http",
    "aws_smithy_runtime_api",
    "aws_sdk_ssm",
    "aws_config",
    "hyper",
    "hyper_util",
    "h2",
];

/// Installs the global subscriber. The level comes from `BERTH_LOG` (EnvFilter syntax,
/// e.g. `info,berth::secrets=debug`), default `info`.
pub fn init() {
    let spec = std::env::var("BERTH_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_new(if spec.trim().is_empty() { "info" } else { &spec }).unwrap_or_else(|e| {
        eprintln!("berth: BERTH_LOG={spec:?} is not a valid filter ({e}); using info");
        EnvFilter::new("info")
    });
    // The HTTP and AWS layers log whole request and response bodies at debug/trace, and a
    // GetParameters response body *is* the secrets. `BERTH_LOG=trace` means berth's trace;
    // those crates stay at info unless named explicitly.
    for target in WIRE_LOGGERS {
        if !spec.contains(target) {
            if let Ok(d) = format!("{target}=info").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    // The SDK would also print bodies it otherwise redacts when this is set.
    std::env::remove_var("LOG_SENSITIVE_BODIES");
    // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal; only then is the
    // native protocol worth using (and only then does it keep our fields).
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                let journald = journald.with_field_prefix(None).with_syslog_identifier("berth".into());
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
                // Colours only for a human at a terminal, never in files or pipes.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .init();
}
