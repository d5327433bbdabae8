//! A private Docker Engine for a test that must stop and restart Docker, which the shared
//! daemon other tests run on must never be.
//!
//! It is the real `dockerd` with everything of its own under a temp dir: socket, data-root,
//! exec-root (and so its own containerd), pidfile. Its network is a bridge the test creates
//! (the shared daemon owns `docker0`) with `--iptables=false`, so it never touches the shared
//! daemon's rules: published `127.0.0.1` ports go through docker-proxy, which needs no NAT.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wait_for;

pub struct PrivateDockerd {
    dir: PathBuf,
    bridge: String,
    child: Option<Child>,
    pub host: String,
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Outside CI a machine that cannot run a second dockerd skips the caller (`None`) with the
/// reason; under `CI=true` that is a failure, so CI never passes by skipping.
fn cannot(why: String) -> Option<PrivateDockerd> {
    if under_ci() {
        panic!("cannot start a private dockerd under CI=true: {why}");
    }
    eprintln!("skipped: cannot start a private dockerd: {why}");
    None
}

impl PrivateDockerd {
    /// Starts a private dockerd, `live_restore` as given, and waits until it answers.
    pub fn start(live_restore: bool) -> Option<PrivateDockerd> {
        if Command::new("dockerd").arg("--version").output().is_err() {
            return cannot("dockerd is not installed".into());
        }
        let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if uid.as_deref().ok() != Some("0") {
            return cannot("dockerd needs root".into());
        }
        // Short: a unix socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new().prefix("bd-").tempdir_in("/tmp").unwrap().keep();
        let n = std::process::id() % 100_000;
        let bridge = format!("bbr{n}");
        // A /24 in 10.213.0.0/16 no interface on this host uses yet.
        let used = String::from_utf8_lossy(
            &Command::new("ip").args(["-o", "addr"]).output().map(|o| o.stdout).unwrap_or_default(),
        )
        .to_string();
        let Some(subnet) = (0..250u32).map(|i| (n + i) % 250).find(|x| !used.contains(&format!("10.213.{x}."))) else {
            return cannot("no free 10.213.x.0/24".into());
        };
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &format!("10.213.{subnet}.1/24"), "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            if !out.status.success() {
                let _ = std::fs::remove_dir_all(&dir);
                return cannot(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
            }
        }
        let mut d =
            PrivateDockerd { host: format!("unix://{}", dir.join("docker.sock").display()), dir, bridge, child: None };
        match d.spawn(live_restore) {
            Ok(()) => Some(d),
            Err(why) => {
                drop(d);
                cannot(why)
            }
        }
    }

    fn spawn(&mut self, live_restore: bool) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("dockerd.log")).unwrap();
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(&self.host)
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .args(["--bridge", &self.bridge, "--iptables=false", "--ip-masq=false"])
            .arg(format!("--live-restore={live_restore}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("spawning dockerd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.docker(&["info", "--format", "{{.ServerVersion}}"]).output().is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("dockerd exited with {st}: {}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("dockerd did not answer within 30s: {}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `docker -H <this daemon> ARGS`.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(&self.host).args(args);
        c
    }

    /// `docker ARGS` that must succeed; its stdout, trimmed.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.docker(args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Copies `image` from the shared daemon (`docker save | docker load`).
    pub fn load_image(&self, image: &str) {
        let mut save = Command::new("docker").args(["save", image]).stdout(Stdio::piped()).spawn().unwrap();
        let out = self.docker(&["load"]).stdin(save.stdout.take().unwrap()).output().unwrap();
        assert!(save.wait().unwrap().success(), "docker save {image}");
        assert!(out.status.success(), "docker load: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// SIGTERM, as systemd stops docker.service, and waits until the process is gone.
    /// Without live-restore dockerd stops its containers first.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dockerd did not stop within 60s: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts dockerd again on the same root, socket and bridge.
    pub fn restart(&mut self, live_restore: bool) {
        assert!(self.child.is_none(), "dockerd still runs");
        if let Err(why) = self.spawn(live_restore) {
            panic!("restarting the private dockerd: {why}");
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits until a container of this daemon answers `format` with something.
    pub fn inspect(&self, id: &str, format: &str) -> String {
        wait_for("docker inspect", Duration::from_secs(10), || {
            let o = self.docker(&["inspect", "--format", format, id]).output().ok()?;
            o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
    }

    /// Whether containerd's shim for container `id` runs: the container runs, whether or not
    /// dockerd does.
    pub fn shim_running(&self, id: &str) -> bool {
        let Ok(procs) = std::fs::read_dir("/proc") else { return false };
        procs.flatten().any(|p| {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("containerd-shim")
                && cmdline.contains(id)
                && cmdline.contains(&*self.dir.to_string_lossy())
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // Remove every container while dockerd runs (after a failed test it may not), so no
        // shim or docker-proxy outlives the test; then stop it and take everything down.
        if !self.is_running() && self.dir.join("data").exists() {
            let _ = self.spawn(false);
        }
        if self.is_running() {
            let ids = self
                .docker(&["ps", "-aq"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            for id in ids.lines() {
                let _ = self.docker(&["rm", "-f", id]).output();
            }
            self.stop();
        }
        // dockerd leaves its data-root bind-mounted onto itself (and overlays, if it died).
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let prefix = self.dir.to_string_lossy().to_string();
        let mut ours: Vec<&str> =
            mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&prefix)).collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        if std::env::var_os("BERTH_TEST_KEEP").is_some() {
            eprintln!("kept private dockerd dir {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
