//! The harness the end-to-end suites share: find the real `berth` binary, give each test
//! its own directory and ports, run berth as a child process and read what it says.
//!
//! The real parts (dockerd, moto, Pebble) are started by `scripts/testenv up`, which writes
//! their addresses to an env file that `scripts/test` sources; [`env`] reads them.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod dockerd;
pub mod faultproxy;
pub mod moto;
pub mod notify;

/// The `berth` binary built by `cargo build` (scripts/test builds it before the tests).
pub fn berth_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_BIN") {
        return p.into();
    }
    // target/debug/deps/<suite>-<hash> → target/debug/berth
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("berth");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build -p berth`, which scripts/test does)",
        bin.display()
    );
    bin
}

/// A variable written by `scripts/testenv up`. Panics with the fix if it is missing.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suites through scripts/test (it starts the real parts and sets it)")
    })
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A temporary directory for one test: config, state dir, logs. Kept on failure when
/// `BERTH_TEST_KEEP` is set, for a post-mortem.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("berth-test-").tempdir().unwrap();
        TestDir { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("BERTH_TEST_KEEP").is_some() {
            let p = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("kept test dir {}", p.display());
        }
    }
}

/// The ports a test's berth listens on, on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub https: u16,
}

impl Ports {
    pub fn pick() -> Self {
        Ports { http: free_port(), https: free_port() }
    }
}

/// A config with the test's own ports, state dir and admin socket, plus `rest`.
pub fn config_toml(dir: &TestDir, ports: Ports, drain_delay: &str, drain_timeout: &str, rest: &str) -> String {
    format!(
        r#"[agent]
state_dir = "{state}"
admin_socket = "{state}/admin.sock"
metrics_listen = ""
drain_delay = "{drain_delay}"
drain_timeout = "{drain_timeout}"

[http]
listen = "127.0.0.1:{http}"

[https]
listen = "127.0.0.1:{https}"

{rest}
"#,
        state = dir.path().join("state").display(),
        http = ports.http,
        https = ports.https,
    )
}

/// A running `berth run`, its stderr going to a file the test can read.
pub struct Berth {
    pub child: Child,
    pub log: PathBuf,
}

impl Berth {
    pub fn command(config: &Path) -> Command {
        let mut cmd = Command::new(berth_bin());
        cmd.arg("run").arg("-c").arg(config);
        cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("JOURNAL_STREAM");
        cmd
    }

    /// Starts `cmd` with stderr captured in `<dir>/berth-<n>.log`.
    pub fn spawn(mut cmd: Command, dir: &TestDir) -> Berth {
        let mut n = 0;
        let log = loop {
            let p = dir.path().join(format!("berth-{n}.log"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("spawn berth");
        Berth { child, log }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// Waits for exit up to `timeout`; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Plain-HTTP GET with curl (a real client, as an operator would use): (status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// One SSM API call against moto, signed with SigV4 by curl exactly as the SDK signs it.
pub fn ssm(target: &str, body: serde_json::Value) -> serde_json::Value {
    aws_json("ssm", &format!("AmazonSSM.{target}"), body)
}

/// One AWS JSON-protocol call against moto: `service` is the SigV4 signing name (`ssm`,
/// `ecr`), `target` the full `X-Amz-Target` (`AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken`).
pub fn aws_json(service: &str, target: &str, body: serde_json::Value) -> serde_json::Value {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--aws-sigv4",
            &format!("aws:amz:us-east-1:{service}"),
            "-u",
            "testing:testing",
            "-H",
            &format!("X-Amz-Target: {target}"),
            "-H",
            "Content-Type: application/x-amz-json-1.1",
            "--data",
            &body.to_string(),
            &env("BERTH_TEST_MOTO_URL"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{target}: {e}: {text}"))
}

/// Puts (overwrites) a SecureString parameter.
pub fn ssm_put(name: &str, value: &str) {
    let r = ssm(
        "PutParameter",
        serde_json::json!({"Name": name, "Value": value, "Type": "SecureString", "Overwrite": true}),
    );
    assert!(r.get("Version").is_some(), "PutParameter {name}: {r}");
}

/// A unique name for this test's app, so tests sharing one Docker daemon never touch each
/// other's containers. Removes every container labelled with it when dropped.
pub struct TestApp {
    pub name: String,
}

impl TestApp {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}-{}-{}", std::process::id(), tag, N.fetch_add(1, Ordering::SeqCst));
        TestApp { name }
    }

    /// IDs of this app's containers (running and stopped).
    pub fn containers(&self, only_running: bool) -> Vec<String> {
        let mut cmd = Command::new("docker");
        cmd.args(["ps", "-q", "--no-trunc", "--filter", &format!("label=berth.app={}", self.name)]);
        if !only_running {
            cmd.arg("-a");
        }
        let out = cmd.output().expect("docker ps");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// `docker inspect --format` on one container.
    pub fn inspect(id: &str, format: &str) -> String {
        let out = Command::new("docker").args(["inspect", "--format", format, id]).output().expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for id in self.containers(false) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
    }
}

/// What a load run saw: every request is counted, and anything but a 2xx is a failure.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    pub requests: u64,
    pub failures: u64,
}

/// Runs `wrk` (a real HTTP/1.1 keep-alive client) against `url` for `secs` seconds with
/// `conns` connections, in the background; join the handle for the result.
pub fn load(url: &str, secs: u32, conns: u32) -> std::thread::JoinHandle<LoadResult> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let out = Command::new("wrk")
            .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--timeout", "5s", &url])
            .output()
            .expect("wrk (installed by scripts/testenv)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        parse_wrk(&text).unwrap_or_else(|| panic!("cannot read wrk output:\n{text}"))
    })
}

fn parse_wrk(text: &str) -> Option<LoadResult> {
    let requests: u64 = text.lines().find(|l| l.contains("requests in"))?.split_whitespace().next()?.parse().ok()?;
    let mut failures = 0;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            failures += rest.trim().parse::<u64>().ok()?;
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in rest.split(',') {
                failures += part.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    Some(LoadResult { requests, failures })
}

/// Whether a log line (berth's stderr format) has `key=value…`, quoted or not: strings are
/// quoted (`path="/x"`), numbers are not (`status=200`). `value` may be a prefix.
pub fn log_field(line: &str, key: &str, value: &str) -> bool {
    line.contains(&format!(" {key}={value}")) || line.contains(&format!(" {key}=\"{value}"))
}
