//! The package and its systemd units, end to end on a real systemd (issue 7).
//!
//! `deb_on_real_systemd` follows an instance's boot: in a container running systemd as
//! PID 1 (the recipe in TESTING.md: a debootstrapped bookworm with systemd, the host's Docker
//! socket, host networking), the launch template's steps run in order: write
//! /etc/berth/berth.toml (0600), install the `.deb` (`--force-confold`, as the user data
//! does), `systemctl enable --now --no-block berth.socket berth.service`. Then it checks what
//! an operator relies on: the unit is active with a status line, https through the socket-
//! activated :443 reaches the app with its SSM secrets in its environment, journald holds
//! structured fields, the watchdog is armed and fed, `systemctl reload` checks the config
//! first, `systemctl restart` and a package upgrade under load refuse no connection and leave
//! the app container alone, `systemctl stop` drains (503 first, in-flight requests finish,
//! exit 0), and an invalid config fails the unit once with 78.
//!
//! berth runs in the container, the app on the host's Docker, which has no journald: the app
//! only starts once berth falls back from Docker's journald log driver when Docker refuses it
//! (docs/packaging.md, "What berth itself needs").
//!
//! The units are the packaged ones, with one drop-in per socket that moves :80/:443 to free
//! ports on 127.0.0.1 (host networking: the host's :80/:443 are not the test's to take), the
//! same drop-in an operator writes to listen on one address.
//!
//! TLS: `tls.mode = "acme"` against a Pebble of the test's own (validating HTTP-01 on the
//! test's :80 port, so no fixed port is shared with other suites), and the certificate served
//! on :443 must verify against that Pebble's root. `BERTH_TEST_PACKAGING_TLS=self-signed`
//! runs everything else with the self-signed certificate instead (see `acme_mode`).
//!
//! Costs: the systemd image is built once per machine (debootstrap, one to several minutes;
//! cached in /var/cache/berth-test/ and as the Docker image `berth-test-systemd:v1`). The
//! packages are built by `packaging/build --bin` around the berth the suites run (about 40 s);
//! `BERTH_TEST_PACKAGING_RELEASE=1` packages a fresh static release build instead, and
//! `BERTH_TEST_DEB`/`BERTH_TEST_RPM` name prebuilt ones.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_tests::{free_port, wait_for, TestApp};

const IMAGE: &str = "berth-test-systemd:v1";
const UNITS: [&str; 3] = ["berth.service", "berth.socket", "berth-https.socket"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A precondition this machine does not meet: fail under CI=true (CI must never pass by
/// skipping), skip with the reason elsewhere.
fn unavailable(why: &str) {
    if under_ci() {
        panic!("packaging suite cannot run here: {why}");
    }
    eprintln!("skipped: {why}");
}

fn bash(script: &str) -> Output {
    Command::new("bash").arg("-c").arg(script).stdin(Stdio::null()).output().expect("bash")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// Runs `script` on the host; panics with its output unless it succeeded.
fn bash_ok(script: &str) -> String {
    let out = bash(script);
    assert!(out.status.success(), "`{script}` failed ({}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn have(cmd: &str) -> bool {
    bash(&format!("command -v {cmd}")).status.success()
}

// ---------------------------------------------------------------------------------------
// Units, config and packages on the host: no container needed.

/// `systemd-analyze verify` on the three units as the package installs them, under a
/// temporary root: the host's unit tree (for sysinit.target and friends), the units in
/// /usr/lib/systemd/system, and stand-ins for /usr/bin/berth (ExecStart=) and /bin/kill
/// (ExecReload=), which verify only checks are executable. The end-to-end test verifies the
/// installed units with the real binary.
#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return unavailable("systemd-analyze is not installed (apt-get install systemd)");
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path().display().to_string();
    bash_ok(&format!(
        "set -e; mkdir -p {r}/usr/lib/systemd {r}/usr/bin {r}/etc; cp -a /usr/lib/systemd/system {r}/usr/lib/systemd/; \
         ln -s usr/bin {r}/bin; ln -s usr/lib {r}/lib; \
         for b in berth kill; do printf '#!/bin/sh\\n' >{r}/usr/bin/$b; chmod 755 {r}/usr/bin/$b; done"
    ));
    let unit_dir = root.path().join("usr/lib/systemd/system");
    for u in UNITS {
        std::fs::copy(repo_root().join("packaging").join(u), unit_dir.join(u)).unwrap();
    }
    let units: Vec<String> = UNITS.iter().map(|u| unit_dir.join(u).display().to_string()).collect();
    let out = bash(&format!("SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --root={r} {} 2>&1", units.join(" ")));
    let said = text(&out.stdout);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{said}");
    // verify exits 0 on warnings (an unknown key, say); none may concern our units.
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("berth")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify warns about the units:\n{said}");
}

/// The packaged default config is valid as it stands (no apps, self-signed).
#[test]
fn default_config_passes_berth_check() {
    let out = Command::new(berth_tests::berth_bin())
        .args(["check", "-c"])
        .arg(repo_root().join("packaging/berth.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "berth check packaging/berth.toml: {}\n{}", text(&out.stdout), text(&out.stderr));
}

/// The example launch-template user data is valid YAML with the `#cloud-config` header, writes
/// /etc/berth/berth.toml 0600 with a config that passes `berth check`, and ends with the
/// non-blocking enable of both units.
#[test]
fn cloud_config_writes_a_valid_config_and_enables_berth() {
    let path = repo_root().join("packaging/cloud-config.yaml");
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.starts_with("#cloud-config\n"), "cloud-init needs the #cloud-config header");
    let out = bash(&format!(
        "python3 -c 'import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))' {}",
        path.display()
    ));
    if !out.status.success() {
        return unavailable(&format!("python3 with PyYAML is needed to read the YAML: {}", text(&out.stderr)));
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = doc["write_files"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["path"] == "/etc/berth/berth.toml"))
        .unwrap_or_else(|| panic!("write_files has no /etc/berth/berth.toml: {doc}"));
    assert_eq!(file["permissions"], "0600");
    assert_eq!(file["owner"], "root:root");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, file["content"].as_str().unwrap()).unwrap();
    let check = Command::new(berth_tests::berth_bin()).args(["check", "-c"]).arg(&cfg).output().unwrap();
    assert!(check.status.success(), "berth check on the user data's config: {}", text(&check.stderr));
    let cmds: Vec<String> = doc["runcmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().map(str::to_owned).unwrap_or_else(|| c.to_string()))
        .collect();
    assert_eq!(
        cmds.last().map(String::as_str),
        Some("systemctl enable --now --no-block berth.socket berth.service"),
        "runcmd: {cmds:?}"
    );
    assert!(cmds.iter().any(|c| c.starts_with("berth check")), "runcmd checks the config first: {cmds:?}");
}

/// The package of `kind` ("deb" or "rpm") to test: `BERTH_TEST_DEB`/`BERTH_TEST_RPM` if set;
/// else `packaging/build --<kind> --bin <the berth the suites run>` (the units, config and
/// scripts are under test, and a release build takes minutes); with
/// `BERTH_TEST_PACKAGING_RELEASE=1`, the real thing: `packaging/build --<kind>` (static musl
/// release build).
fn package(kind: &str) -> PathBuf {
    // Built once per kind for the whole suite: tests run in parallel, and two builds of the
    // same package write the same file, so one test could read it half-written.
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(k, _)| k == kind) {
        return path.clone();
    }
    let path = build_package(kind);
    built.push((kind.to_owned(), path.clone()));
    path
}

fn build_package(kind: &str) -> PathBuf {
    let var = if kind == "deb" { "BERTH_TEST_DEB" } else { "BERTH_TEST_RPM" };
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let mut cmd = Command::new(repo_root().join("packaging/build"));
    cmd.arg(format!("--{kind}")).current_dir(repo_root());
    if !std::env::var("BERTH_TEST_PACKAGING_RELEASE").is_ok_and(|v| v == "1") {
        cmd.arg("--bin").arg(berth_tests::berth_bin());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "packaging/build --{kind} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    // The script prints the package paths it wrote, one per line, last.
    let path = text(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.ends_with(&format!(".{kind}")))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("packaging/build --{kind} named no .{kind}:\n{}", text(&out.stdout)));
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// The .rpm for Amazon Linux 2023: files, modes, the conffile, and scriptlets that
/// daemon-reload/preset on install, stop/disable on erase, try-restart on upgrade.
#[test]
fn rpm_has_units_conffile_and_scriptlets() {
    if !have("rpm") {
        return unavailable("rpm is not installed (apt-get install rpm) to read the package");
    }
    let rpm = package("rpm");
    let q = |fmt: &str| bash_ok(&format!("rpm -qp --nosignature {fmt} '{}'", rpm.display()));
    let files = q("--queryformat '[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\\n]'");
    for want in [
        "-rwxr-xr-x  /usr/bin/berth",
        "-rw-r--r--  /usr/lib/systemd/system/berth.service",
        "-rw-r--r--  /usr/lib/systemd/system/berth.socket",
        "-rw-r--r--  /usr/lib/systemd/system/berth-https.socket",
        "-rw------- cn /etc/berth/berth.toml",
    ] {
        assert!(files.lines().any(|l| l.trim() == want), "rpm lacks `{want}`:\n{files}");
    }
    let scripts = q("--scripts");
    for want in [
        "systemctl daemon-reload",
        "systemctl --no-reload preset berth.service berth.socket berth-https.socket",
        "systemctl --no-reload disable --now berth.service berth.socket berth-https.socket",
        "systemctl try-restart berth.service",
    ] {
        assert!(scripts.contains(want), "rpm scriptlets lack `{want}`:\n{scripts}");
    }
    // The binary is static: nothing for the dynamic loader of Amazon Linux to resolve.
    let requires = q("--requires");
    assert!(
        !requires.contains("libc.so"),
        "the rpm declares no shared library (the release binary is static):\n{requires}"
    );
}

/// The .deb: files, the conffile, systemd maintainer scripts (enable, start, restart after
/// upgrade), and a static binary.
#[test]
fn deb_has_units_conffile_and_maintainer_scripts() {
    let deb = package("deb");
    let contents = bash_ok(&format!("dpkg-deb -c '{}'", deb.display()));
    for want in [
        "./usr/bin/berth",
        "./usr/lib/systemd/system/berth.service",
        "./usr/lib/systemd/system/berth.socket",
        "./usr/lib/systemd/system/berth-https.socket",
        "./etc/berth/berth.toml",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(want)), "deb lacks {want}:\n{contents}");
    }
    let toml_line = contents.lines().find(|l| l.ends_with("./etc/berth/berth.toml")).unwrap();
    assert!(toml_line.starts_with("-rw-------"), "/etc/berth/berth.toml must be 0600: {toml_line}");
    let dir = tempfile::tempdir().unwrap();
    bash_ok(&format!("dpkg-deb -e '{}' {}", deb.display(), dir.path().display()));
    let conffiles = std::fs::read_to_string(dir.path().join("conffiles")).unwrap_or_default();
    assert!(conffiles.lines().any(|l| l == "/etc/berth/berth.toml"), "conffiles: {conffiles:?}");
    let postinst = std::fs::read_to_string(dir.path().join("postinst")).unwrap_or_default();
    for unit in UNITS {
        assert!(postinst.contains(unit), "postinst does not handle {unit}:\n{postinst}");
    }
    assert!(postinst.contains("deb-systemd-helper"), "postinst does not enable the units:\n{postinst}");
    assert!(postinst.contains("deb-systemd-invoke"), "postinst does not (re)start the units:\n{postinst}");
    let prerm = std::fs::read_to_string(dir.path().join("prerm")).unwrap_or_default();
    let postrm = std::fs::read_to_string(dir.path().join("postrm")).unwrap_or_default();
    assert!(postrm.contains("purge"), "postrm forgets the units on purge:\n{postrm}");
    assert!(prerm.contains("remove"), "prerm stops berth on remove:\n{prerm}");
    let depends = bash_ok(&format!("dpkg-deb -f '{}' Depends", deb.display()));
    assert!(!depends.contains("libc6"), "the deb declares no shared library (the release binary is static): {depends}");
    // The packaged binary runs; a release build (BERTH_TEST_PACKAGING_RELEASE=1) is static.
    bash_ok(&format!("dpkg-deb -x '{}' {}", deb.display(), dir.path().join("root").display()));
    let bin = dir.path().join("root/usr/bin/berth");
    let version = bash_ok(&format!("{} --version", bin.display()));
    assert!(version.starts_with("berth "), "{version}");
    if std::env::var("BERTH_TEST_PACKAGING_RELEASE").is_ok_and(|v| v == "1") {
        let headers = bash_ok(&format!("readelf -lW {}", bin.display()));
        assert!(!headers.contains("program interpreter"), "the release binary must be static:\n{headers}");
    }
}

// ---------------------------------------------------------------------------------------
// The real systemd.

/// The systemd image (built once per machine by `packaging/test-image`, under a lock).
fn ensure_image() -> Result<(), String> {
    let out = Command::new(repo_root().join("packaging/test-image")).output().unwrap();
    let name = text(&out.stdout);
    if out.status.success() && name == IMAGE {
        Ok(())
    } else {
        Err(format!("packaging/test-image failed ({}): {}", out.status, text(&out.stderr)))
    }
}

/// A container running systemd as PID 1. Removed (with `docker rm -f`) when dropped.
struct Sysd {
    name: String,
}

impl Sysd {
    fn start() -> Result<Sysd, String> {
        let name = format!("berth-pkg-{}-{}", std::process::id(), free_port());
        // CAP_SYS_ADMIN lets systemd build the mount namespaces ProtectSystem=, PrivateTmp=
        // etc. need, so the unit's hardening is really applied (without it systemd skips it:
        // "assuming containerized execution"). --privileged fails on this kind of machine.
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--label", "berth.test=packaging"])
            .args(["--network", "host", "--cap-add", "SYS_ADMIN"])
            .args(["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"])
            .args(["--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp"])
            .args(["--stop-signal", "SIGRTMIN+3", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"])
            .args(["-v", "/var/run/docker.sock:/run/docker.sock", IMAGE, "/lib/systemd/systemd"])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!("docker run {IMAGE}: {}", text(&out.stderr)));
        }
        let c = Sysd { name };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = c.sh("systemctl is-system-running 2>/dev/null || true");
            if state == "running" || state == "degraded" {
                return Ok(c);
            }
            if Instant::now() > deadline {
                let logs = text(&Command::new("docker").args(["logs", &c.name]).output().unwrap().stderr);
                return Err(format!("systemd in the container never came up (state {state:?}):\n{logs}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn exec(&self, script: &str) -> Output {
        Command::new("docker").args(["exec", &self.name, "sh", "-c", script]).output().unwrap()
    }

    /// stdout of `script` inside, whatever its exit status.
    fn sh(&self, script: &str) -> String {
        text(&self.exec(script).stdout)
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(
            out.status.success(),
            "in the container, `{script}` failed ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn write(&self, path: &str, mode: &str, contents: &str) {
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.name, "sh", "-c"])
            .arg(format!("mkdir -p \"$(dirname {path})\" && umask 077 && cat > {path} && chmod {mode} {path}"))
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(contents.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "writing {path} in the container");
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.sh(&format!("systemctl show -p {prop} --value {unit}"))
    }

    /// The unit's journal as `MESSAGE FIELD=value ...` lines (berth's structured fields hold
    /// the details, e.g. ERROR), without the per-request access log lines.
    fn journal(&self) -> String {
        let raw = self.sh("journalctl -u berth --no-pager -o json");
        let lines: Vec<String> = raw
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["MESSAGE"] != "request")
            .map(|e| {
                let mut line = e["MESSAGE"].as_str().unwrap_or("").to_string();
                if let Some(fields) = e.as_object() {
                    for (k, v) in fields {
                        let standard = k.starts_with('_')
                            || k.starts_with("CODE_")
                            || ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "TARGET", "INVOCATION_ID", "MESSAGE_ID"]
                                .contains(&k.as_str());
                        if !standard {
                            line.push_str(&format!(" {k}={}", v.as_str().unwrap_or(&v.to_string())));
                        }
                    }
                }
                line
            })
            .collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }
}

impl Drop for Sysd {
    fn drop(&mut self) {
        if std::env::var_os("BERTH_TEST_KEEP").is_some() {
            eprintln!("kept container {}", self.name);
            return;
        }
        let _ = Command::new("docker").args(["rm", "-f", "-v", &self.name]).output();
    }
}

/// A Pebble of this test's own whose HTTP-01 validation goes to the test's :80 port (the
/// shared Pebble validates on 127.0.0.1:5002, which other suites may hold). Names resolve to
/// 127.0.0.1 through the shared pebble-challtestsrv DNS. Killed when dropped.
struct Pebble {
    child: std::process::Child,
    dir: tempfile::TempDir,
    listen: u16,
    mgmt: u16,
}

impl Pebble {
    fn start(http01: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let (listen, mgmt) = (free_port(), free_port());
        let cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": berth_tests::env("BERTH_TEST_PEBBLE_CERT"),
            "privateKey": berth_tests::env("BERTH_TEST_PEBBLE_KEY"),
            "httpPort": http01, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.path().join("pebble.json"), cfg.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let child = Command::new(berth_tests::env("BERTH_TEST_PEBBLE_BIN"))
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", "127.0.0.1:8053"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pebble");
        wait_for("pebble to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", listen)).ok()
        });
        Pebble { child, dir, listen, mgmt }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen)
    }

    /// Pebble's root (new at every start), as a file for curl's `--cacert`.
    fn root_file(&self) -> PathBuf {
        let root = bash_ok(&format!(
            "curl -sS --cacert {} https://127.0.0.1:{}/roots/0",
            berth_tests::env("BERTH_TEST_PEBBLE_CA"),
            self.mgmt
        ));
        assert!(root.contains("BEGIN CERTIFICATE"), "no root from Pebble: {root}");
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, root).unwrap();
        path
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The end-to-end run's `tls.mode`: "acme" unless `BERTH_TEST_PACKAGING_TLS=self-signed`.
fn acme_mode() -> bool {
    match std::env::var("BERTH_TEST_PACKAGING_TLS").as_deref() {
        Ok("self-signed") => false,
        Ok("acme") | Err(_) => true,
        Ok(other) => panic!("BERTH_TEST_PACKAGING_TLS={other:?}: use acme or self-signed"),
    }
}

/// One https request with curl: (exit code, http status, body).
fn https(port: u16, host: &str, path: &str, extra: &[&str]) -> (i32, u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}", "--resolve"])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = t.rsplit_once('\n').unwrap_or(("", "0"));
    (out.status.code().unwrap_or(-1), code.trim().parse().unwrap_or(0), body.to_string())
}

fn http_health(port: u16) -> (i32, u16) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/_berth/health"))
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), text(&out.stdout).parse().unwrap_or(0))
}

fn app_container(app: &TestApp) -> (String, String) {
    let ids = app.containers(true);
    assert_eq!(ids.len(), 1, "one running container for {}: {ids:?}", app.name);
    let started = TestApp::inspect(&ids[0], "{{.State.StartedAt}}");
    (ids[0].clone(), started)
}

#[test]
fn deb_on_real_systemd() {
    let moto = match berth_tests::moto::moto_url() {
        Some(u) => u,
        None => return,
    };
    if !bash("docker info >/dev/null 2>&1").status.success() {
        return unavailable("docker does not answer (scripts/testenv up starts dockerd)");
    }
    let image = std::env::var("BERTH_TEST_APP_IMAGE").unwrap_or_else(|_| "berth-testapp:latest".into());
    if let Err(e) = ensure_image() {
        return unavailable(&e);
    }
    let acme = acme_mode();
    let deb = package("deb");

    // Ports: the socket units' drop-ins move :80/:443 here.
    let http_port = free_port();
    let https_port = free_port();
    let pebble = acme.then(|| Pebble::start(http_port));
    let app = TestApp::new("pkg");
    let prefix = berth_tests::moto::unique_prefix("pkg");
    let secret = berth_tests::moto::random_token(24);
    berth_tests::ssm_put(&format!("{prefix}/db/password"), &secret);
    let domain = format!("{}.pkg.test", app.name);

    let sysd = match Sysd::start() {
        Ok(c) => c,
        Err(e) => return unavailable(&e),
    };

    // --- What the launch template does: the config first (0600), then the package.
    let tls = if acme {
        let ca = std::fs::read_to_string(berth_tests::env("BERTH_TEST_PEBBLE_CA")).unwrap();
        sysd.write("/etc/berth/acme-ca.pem", "0644", &ca);
        format!(
            "[tls]\nmode = \"acme\"\ndomains = [\"{domain}\"]\n[tls.acme]\ndirectory = \"{}\"\nca_bundle = \"/etc/berth/acme-ca.pem\"\n",
            pebble.as_ref().unwrap().directory()
        )
    } else {
        format!("[tls]\nmode = \"self-signed\"\ndomains = [\"{domain}\"]\n")
    };
    let config = format!(
        r#"[agent]
drain_delay = "2s"
drain_timeout = "5s"
metrics_listen = ""

[aws]
region = "us-east-1"
endpoint_url = "{moto}"

[secrets]
path = "{prefix}/"
refresh_interval = "0s"

{tls}
[apps.{name}]
image = "{image}"
port = 8080
pull = "never"
stop_timeout = "2s"
[apps.{name}.health]
path = "/health"
interval = "1s"
healthy_threshold = 1
start_period = "20s"
"#,
        name = app.name,
    );
    sysd.write("/etc/berth/berth.toml", "0600", &config);
    sysd.write(
        "/etc/systemd/system/berth.socket.d/listen.conf",
        "0644",
        &format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{http_port}\n"),
    );
    sysd.write(
        "/etc/systemd/system/berth-https.socket.d/listen.conf",
        "0644",
        &format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{https_port}\n"),
    );
    // moto takes any keys; the instance profile provides them on EC2.
    sysd.write(
        "/etc/systemd/system/berth.service.d/aws.conf",
        "0644",
        "[Service]\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true\n",
    );
    let status = Command::new("docker")
        .args(["cp"])
        .arg(&deb)
        .arg(format!("{}:/var/tmp/berth.deb", sysd.name))
        .status()
        .unwrap();
    assert!(status.success(), "docker cp {}", deb.display());
    sysd.sh_ok("dpkg -i --force-confdef --force-confold /var/tmp/berth.deb");
    sysd.sh_ok("systemctl enable --now --no-block berth.socket berth.service");

    // The package kept the config the launch template wrote, and enabled all three units.
    assert_eq!(sysd.sh("stat -c %a /etc/berth/berth.toml"), "600");
    assert!(sysd.sh("cat /etc/berth/berth.toml").contains(&prefix), "dpkg replaced the launch template's config");
    assert!(sysd.sh("dpkg-query -W -f='${Conffiles}' berth").contains("/etc/berth/berth.toml"));
    for u in UNITS {
        assert_eq!(sysd.sh(&format!("systemctl is-enabled {u}")), "enabled", "{u} after install");
    }

    // --- systemd-analyze verify, on the installed units with the installed binary. (The
    // minimal image has no man pages for Documentation=man:...; the host test checks those.)
    let verify = sysd.exec(
        "cd /lib/systemd/system && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no berth.service berth.socket berth-https.socket 2>&1",
    );
    let said = text(&verify.stdout);
    assert!(verify.status.success(), "systemd-analyze verify in the container:\n{said}");
    assert!(!said.lines().any(|l| l.contains("berth")), "systemd-analyze verify warns:\n{said}");

    // --- Active, and the status line says what berth does.
    let started = Instant::now();
    wait_for("berth.service active", Duration::from_secs(30), || {
        (sysd.sh("systemctl is-active berth") == "active").then_some(())
    });
    let served = wait_for_or_journal(&sysd, "the app behind https", Duration::from_secs(60), || {
        let (rc, code, body) = https(https_port, &domain, "/env", &["-k"]);
        (rc == 0 && code == 200).then_some(body)
    });
    let env: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(env["DB_PASSWORD"], secret.as_str(), "the SSM secret reaches the app's environment");
    let status_text = wait_for_or_journal(&sysd, "StatusText `serving ...`", Duration::from_secs(10), || {
        let s = sysd.show("berth", "StatusText");
        s.starts_with("serving").then_some(s)
    });
    assert!(status_text.contains(&app.name), "status line names the app: {status_text}");
    let main_pid = sysd.show("berth", "MainPID");
    assert_ne!(main_pid, "0");

    // The certificate: Pebble's with ACME, else the self-signed one berth publishes.
    if let Some(pebble) = &pebble {
        let root_arg = pebble.root_file().display().to_string();
        wait_for_or_journal(
            &sysd,
            "a certificate that verifies against Pebble's root",
            Duration::from_secs(60),
            || {
                let (rc, code, _) = https(https_port, &domain, "/health", &["--cacert", &root_arg]);
                (rc == 0 && code == 200).then_some(())
            },
        );
    } else {
        let cert = sysd.sh_ok("cat /var/lib/berth/self-signed.crt");
        let dir = tempfile::tempdir().unwrap();
        let cert_file = dir.path().join("self-signed.crt");
        std::fs::write(&cert_file, cert).unwrap();
        let (rc, code, _) = https(https_port, &domain, "/health", &["--cacert", &cert_file.display().to_string()]);
        assert_eq!((rc, code), (0, 200), "the self-signed certificate verifies for {domain}");
    }
    // The hardening is applied for real (not skipped as "containerized"), and leaves berth
    // what it needs: the state dir (0700), the admin socket, the Docker socket.
    let status = sysd.sh_ok(&format!("cat /proc/{main_pid}/status"));
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("").to_string();
    assert_eq!(field("NoNewPrivs:"), "1", "NoNewPrivileges=yes");
    assert_eq!(field("Seccomp:"), "2", "SystemCallFilter= applies a seccomp filter");
    assert_eq!(field("CapBnd:"), "0000000000000400", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE");
    let mounts = sysd.sh_ok(&format!("cat /proc/{main_pid}/mountinfo"));
    let mount_opts = |at: &str| {
        mounts
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some(at))
            .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(mount_opts("/").starts_with("ro"), "ProtectSystem=strict: / is read-only for berth:\n{mounts}");
    assert!(mount_opts("/var/lib/berth").starts_with("rw"), "StateDirectory= stays writable:\n{mounts}");
    assert_eq!(sysd.sh("stat -c %a /var/lib/berth"), "700");
    let st = sysd.sh_ok("berth status");
    assert!(st.contains(&app.name), "berth status names the app:\n{st}");

    // --- journald: native protocol with structured fields.
    let journal_json = wait_for("journal entries with APP=", Duration::from_secs(10), || {
        let j = sysd.sh("journalctl -u berth -o json --no-pager");
        j.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["APP"] == app.name.as_str())
            .then_some(j)
    });
    assert!(!journal_json.contains(&secret), "a secret value reached the journal");
    let filtered = sysd.sh(&format!("journalctl -u berth APP={} --no-pager -o cat", app.name));
    assert!(!filtered.is_empty(), "`journalctl -u berth APP={}` finds nothing", app.name);

    // --- reload: a bad config fails `systemctl reload` (ExecReload= checks it first) and
    // never reaches berth; a good one is applied in place (SIGHUP), same process.
    sysd.write("/etc/berth/berth.toml", "0600", &format!("{config}\n[agent]\nno_such_key = 1\n"));
    let bad = sysd.exec("systemctl reload berth");
    assert!(!bad.status.success(), "reload with an invalid config must fail");
    assert_eq!(sysd.sh("systemctl is-active berth"), "active", "a failed reload keeps berth:\n{}", sysd.journal());
    sysd.write("/etc/berth/berth.toml", "0600", &config);
    sysd.sh_ok("systemctl reload berth");
    assert_eq!(sysd.sh("systemctl is-active berth"), "active", "after reload:\n{}", sysd.journal());
    assert_eq!(sysd.show("berth", "MainPID"), main_pid, "reload must not restart berth");
    assert_eq!(https(https_port, &domain, "/health", &["-k"]).1, 200, "serving after the reload");

    // --- Watchdog: armed at 30s, and berth's pings keep it alive past that.
    assert_eq!(sysd.show("berth", "WatchdogUSec"), "30s");
    let past = Duration::from_secs(35);
    if started.elapsed() < past {
        std::thread::sleep(past - started.elapsed());
    }
    assert_eq!(sysd.show("berth", "MainPID"), main_pid, "berth was restarted:\n{}", sysd.journal());
    assert_eq!(sysd.show("berth", "NRestarts"), "0");
    assert_ne!(sysd.show("berth", "WatchdogTimestampMonotonic"), "0", "no watchdog ping recorded");
    assert_eq!(sysd.sh("systemctl is-active berth"), "active");

    // `systemctl restart berth` under load refuses no connection (socket activation) and fails
    // no request: the new berth routes the running app container before `:443` accepts (it does
    // not wait for SSM to check the container's config hash), and the old one answers the
    // first request of every connection it accepted before closing its listeners.
    // --- restart and upgrade under load: sockets stay open, nothing is refused; the app stays.
    let (container, started_at) = app_container(&app);
    let stop_load = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<(i32, u16)>>> = Default::default();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, results, domain) = (stop_load.clone(), results.clone(), domain.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (rc, code, _) = https(https_port, &domain, "/health", &["-k"]);
                    results.lock().unwrap().push((rc, code));
                }
            })
        })
        .collect();
    let sockets_since = |u: &str| sysd.show(u, "ActiveEnterTimestampMonotonic");
    let (http_since, https_since) = (sockets_since("berth.socket"), sockets_since("berth-https.socket"));
    std::thread::sleep(Duration::from_secs(1));
    let restart = sysd.exec("systemctl restart berth");
    assert!(restart.status.success(), "systemctl restart berth: {}\n{}", text(&restart.stderr), sysd.journal());
    // Keep loading until the new berth has served a while.
    let served_more = |what: &str| {
        let now = results.lock().unwrap().len();
        wait_for(what, Duration::from_secs(30), || (results.lock().unwrap().len() > now + 30).then_some(()));
    };
    served_more("requests after the restart");
    let restarted_pid = sysd.show("berth", "MainPID");
    // An upgrade (the same package again: postinst configure <old version>) restarts berth
    // the same way, and only berth: the sockets stay open.
    sysd.sh_ok("dpkg -i --force-confdef --force-confold /var/tmp/berth.deb");
    served_more("requests after the upgrade");
    assert_ne!(sysd.show("berth", "MainPID"), restarted_pid, "the upgrade restarts berth (postinst try-restart)");
    assert_eq!(sysd.sh("systemctl is-active berth"), "active");
    assert_eq!(
        (sockets_since("berth.socket"), sockets_since("berth-https.socket")),
        (http_since, https_since),
        "the sockets must stay open across restart and upgrade"
    );
    stop_load.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let results = results.lock().unwrap().clone();
    let refused = results.iter().filter(|(rc, _)| *rc == 7).count();
    let failed: Vec<_> = results.iter().filter(|(rc, code)| *rc != 0 || *code != 200).collect();
    eprintln!("restart and upgrade under load: {} requests, {} failed, {refused} refused", results.len(), failed.len());
    assert!(results.len() > 50, "too little load to judge the restart: {} requests", results.len());
    assert_eq!(refused, 0, "connections refused during `systemctl restart berth` or the upgrade\n{}", sysd.journal());
    if !failed.is_empty() {
        let summary = format!(
            "{} of {} requests failed during the restart and the upgrade (curl exit, status): {:?}",
            failed.len(),
            results.len(),
            &failed[..failed.len().min(20)]
        );
        panic!("{summary}\n{}", sysd.journal());
    }
    assert_ne!(sysd.show("berth", "MainPID"), main_pid, "systemctl restart did restart berth");
    assert_eq!(app_container(&app), (container.clone(), started_at.clone()), "the app container was restarted");
    // The upgrade kept the config the launch template wrote.
    assert!(sysd.sh("cat /etc/berth/berth.toml").contains(&prefix), "the upgrade replaced the config");

    // --- stop: health 503 first, in-flight requests finish, exit 0.
    wait_for("health 200 before the stop", Duration::from_secs(20), || (http_health(http_port).1 == 200).then_some(()));
    let slow = {
        let domain = domain.clone();
        std::thread::spawn(move || https(https_port, &domain, "/sleep?ms=3500", &["-k"]))
    };
    std::thread::sleep(Duration::from_millis(300));
    let stop_name = sysd.name.clone();
    let stopper = std::thread::spawn(move || {
        let t = Instant::now();
        let out =
            Command::new("docker").args(["exec", &stop_name, "systemctl", "stop", "berth.service"]).output().unwrap();
        (out, t.elapsed())
    });
    // The first health answers after the stop began are 503 while the listener still
    // answers (drain_delay = 2s); stop polling then, since a connection after the listeners
    // close would socket-activate berth again.
    let health_seen = wait_for("health 503 during the drain", Duration::from_secs(5), || {
        let h = http_health(http_port);
        (h.1 != 200).then_some(h)
    });
    assert_eq!(health_seen, (0, 503), "health must turn 503 while berth drains");
    let (out, took) = stopper.join().unwrap();
    assert!(out.status.success(), "systemctl stop berth: {}", text(&out.stderr));
    let (rc, code, body) = slow.join().unwrap();
    assert_eq!((rc, code), (0, 200), "the in-flight request must finish during the drain: {body}");
    assert!(took >= Duration::from_secs(2), "stop took {took:?}: berth must wait drain_delay");
    assert_eq!(sysd.show("berth", "ExecMainStatus"), "0", "exit status of a clean stop\n{}", sysd.journal());
    assert_eq!(sysd.show("berth", "Result"), "success");
    assert_eq!(sysd.sh("systemctl is-active berth"), "inactive");
    assert_eq!(app_container(&app).0, container, "the app keeps running while berth is stopped");

    // --- an invalid config: fails once with 78, never restarted.
    sysd.write("/etc/berth/berth.toml", "0600", "[agent]\nno_such_key = 1\n");
    let start = sysd.exec("systemctl start berth.service");
    assert!(!start.status.success(), "start with an invalid config must fail");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(sysd.show("berth", "ExecMainStatus"), "78", "{}", sysd.journal());
    assert_eq!(sysd.show("berth", "ActiveState"), "failed");
    assert_eq!(sysd.show("berth", "NRestarts"), "0", "RestartPreventExitStatus=78 must stop a restart loop");
    let journal = sysd.journal();
    assert!(journal.contains("no_such_key"), "the journal names the bad key:\n{journal}");
}

/// `wait_for`, with the unit's journal in the failure message.
fn wait_for_or_journal<T>(sysd: &Sysd, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; systemctl status:\n{}\njournal:\n{}",
                sysd.sh("systemctl status --no-pager berth.service berth.socket berth-https.socket"),
                sysd.journal()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
