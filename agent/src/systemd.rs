//! Talking to systemd: readiness, status line, watchdog, and socket activation.
//!
//! Every function is a no-op outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`), so the
//! same binary runs under systemd, in a test, or in a terminal.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context};
use berth_proxy::liveness::Liveness;
use sd_notify::NotifyState;

/// `READY=1`: listeners are up and supervision has started. `Type=notify` units count as
/// started only now, so `systemctl start` returns when berth can actually serve.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The one-line summary `systemctl status berth` shows.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `RELOADING=1` … `READY=1` around a config reload, so `systemctl reload` waits for it.
pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// If the unit has `WatchdogSec=`, pings at half the interval for as long as the daemon
/// makes progress: this runtime (the ping task runs on it) and every proxy thread (their
/// hearts in `proxy_threads`). A wedged runtime or proxy thread stops the pings, and
/// systemd restarts us rather than leave connections hanging on a thread that never
/// answers them.
pub fn spawn_watchdog(proxy_threads: Liveness) -> Option<Duration> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_stalled = false;
        loop {
            tick.tick().await;
            let stalled = proxy_threads.stalled(period);
            if stalled.is_empty() {
                if was_stalled {
                    tracing::warn!("proxy threads are turning again; watchdog pings resumed");
                    was_stalled = false;
                }
                notify(&[NotifyState::Watchdog]);
            } else if !was_stalled {
                // Said once: the next thing in the journal is systemd's restart.
                tracing::error!(
                    threads = stalled.join(","),
                    stalled_for_more_than = ?period,
                    "proxy threads stopped turning; withholding the watchdog ping so systemd restarts berth"
                );
                was_stalled = true;
            }
        }
    });
    Some(period)
}

/// Listening sockets passed by systemd (`berth.socket`), by `FileDescriptorName=`.
///
/// Socket activation is what makes `systemctl restart berth` lossless: systemd keeps the
/// sockets open across the restart and the kernel queues connections meanwhile.
pub fn activated_listeners() -> anyhow::Result<HashMap<String, std::net::TcpListener>> {
    let fds: Vec<(RawFd, String)> = match sd_notify::listen_fds_with_names(true) {
        Ok(fds) => fds.collect(),
        Err(e) => {
            if std::env::var_os("LISTEN_FDS").is_some() {
                bail!("LISTEN_FDS is set but unusable: {e}");
            }
            return Ok(HashMap::new());
        }
    };
    let mut out = HashMap::new();
    let unnamed = fds.iter().all(|(_, n)| n.is_empty() || n == "unknown");
    for (i, (fd, name)) in fds.into_iter().enumerate() {
        // Without FileDescriptorName= (e.g. a bare systemd-socket-activate), take them in
        // the order the socket unit lists them: http first, https second.
        let name = if unnamed {
            match i {
                0 => "http".to_string(),
                1 => "https".to_string(),
                _ => bail!("socket activation passed {} sockets without names; name them http and https", i + 1),
            }
        } else {
            name
        };
        // SAFETY: systemd hands us ownership of these descriptors; each is used once.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener.set_nonblocking(true).with_context(|| format!("socket-activated descriptor {fd} ({name})"))?;
        listener
            .local_addr()
            .with_context(|| format!("socket-activated descriptor {fd} ({name}) is not a TCP listener"))?;
        if out.insert(name.clone(), listener).is_some() {
            bail!("socket activation passed two sockets named {name}");
        }
    }
    Ok(out)
}
