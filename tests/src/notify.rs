//! A stand-in for systemd's notification socket: bind a datagram socket, pass its path as
//! `NOTIFY_SOCKET`, read what berth sends (`READY=1`, `STATUS=...`, `WATCHDOG=1`, ...).
//! This is exactly the protocol systemd speaks; only the reader is ours.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
    pub received: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        NotifySocket { sock, path, received: Vec::new() }
    }

    /// Reads datagrams until one contains a line equal to (or starting with) `want`, or
    /// `timeout` passes. Every message is kept in `received`, in order, split into lines.
    pub fn wait_for(&mut self, want: &str, timeout: Duration) -> bool {
        if self.received.iter().any(|l| l.starts_with(want)) {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let mut hit = false;
                for line in msg.lines() {
                    hit |= line.starts_with(want);
                    self.received.push(line.to_string());
                }
                if hit {
                    return true;
                }
            }
        }
        false
    }
}
