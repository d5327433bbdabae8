//! ACME through the real `berth` binary, against real Pebble CAs (and moto + an nginx
//! "ALB" for fleet mode).
//!
//! Every scenario starts its own Pebble on free ports, with Pebble's HTTP-01 port set to the
//! `:80` of the berth under test (or of the nginx in front of a fleet). So order counts read
//! from that Pebble's log are exact, Pebble can be started late or with its own
//! `certificateValidityPeriod` and nonce-rejection rate, and no scenario needs the shared
//! Pebble's fixed port 5002 (which other suites and sessions may hold). Validation resolves
//! every name to 127.0.0.1 through the shared pebble-challtestsrv DNS (`scripts/testenv up`).
//!
//! The scenarios run one at a time (a lock): the renewal one puts wrk load on both cores,
//! and the others' timings would suffer next to it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_tests::moto::{aws_env, moto_url, unique_prefix, REGION};
use berth_tests::{config_toml, curl, env, free_port, load, wait_for, Berth, Ports, TestApp, TestDir};

/// pebble-challtestsrv's DNS, started by `scripts/testenv up`.
const TEST_DNS: &str = "127.0.0.1:8053";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

struct PebbleEnv {
    bin: String,
    cert: String,
    key: String,
    ca: String,
}

/// Pebble's binary and API certificate from `scripts/testenv up`; skip outside CI without them.
fn pebble_env() -> Option<PebbleEnv> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("BERTH_TEST_PEBBLE_BIN"),
        get("BERTH_TEST_PEBBLE_CERT"),
        get("BERTH_TEST_PEBBLE_KEY"),
        get("BERTH_TEST_PEBBLE_CA"),
    ) {
        (Some(bin), Some(cert), Some(key), Some(ca)) => Some(PebbleEnv { bin, cert, key, ca }),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("BERTH_TEST_PEBBLE_* not set under CI=true: scripts/test must start Pebble (scripts/testenv up)")
        }
        _ => {
            eprintln!(
                "skipped: BERTH_TEST_PEBBLE_* not set (run through scripts/test, or source /tmp/berth-testenv/env.sh)"
            );
            None
        }
    }
}

/// A Pebble of the scenario's own, killed when dropped.
struct Pebble {
    env: PebbleEnv,
    dir: TestDir,
    child: Option<Child>,
    listen: u16,
    mgmt: u16,
    /// `None`: Pebble's default rejection rate (5 %).
    nonce_reject: Option<u32>,
}

impl Pebble {
    /// Configured to validate HTTP-01 on `http01`; not started yet.
    fn configure(http01: u16, validity_secs: Option<u64>, nonce_reject: Option<u32>) -> Option<Pebble> {
        let env = pebble_env()?;
        let dir = TestDir::new();
        let (listen, mgmt) = (free_port(), free_port());
        let mut cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": env.cert, "privateKey": env.key,
            "httpPort": http01, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        if let Some(v) = validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        dir.write("pebble.json", &cfg.to_string());
        Some(Pebble { env, dir, child: None, listen, mgmt, nonce_reject })
    }

    fn start(&mut self) {
        let log = fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(&self.env.bin);
        cmd.arg("-config")
            .arg(self.dir.path().join("pebble.json"))
            .args(["-dnsserver", TEST_DNS])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match self.nonce_reject {
            Some(n) => cmd.env("PEBBLE_WFE_NONCEREJECT", n.to_string()),
            None => cmd.env_remove("PEBBLE_WFE_NONCEREJECT"),
        };
        self.child = Some(cmd.spawn().expect("start pebble"));
        wait_for("pebble to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", self.listen)).ok()
        });
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen)
    }

    /// newOrder requests Pebble received.
    fn orders(&self) -> usize {
        fs::read_to_string(self.log_path()).unwrap_or_default().matches("POST /order-plz").count()
    }

    /// Pebble's root (new at every start), written to a file for curl's `--cacert`.
    fn root_file(&self) -> PathBuf {
        let out = Command::new("curl")
            .args(["-sS", "--cacert", &self.env.ca, &format!("https://127.0.0.1:{}/roots/0", self.mgmt)])
            .output()
            .expect("curl");
        assert!(String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"), "no root from Pebble");
        let path = self.dir.path().join("root.pem");
        fs::write(&path, &out.stdout).unwrap();
        path
    }

    /// `[tls]` for `domains` from this Pebble, plus `extra` lines in `[tls.acme]`.
    fn tls_toml(&self, domains: &[&str], extra: &str) -> String {
        let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
        format!(
            "[tls]\nmode = \"acme\"\ndomains = [{}]\n\n[tls.acme]\ndirectory = \"{}\"\ncontact = [\"mailto:ops@example.com\"]\nca_bundle = \"{}\"\n{extra}\n",
            list.join(", "),
            self.directory(),
            self.env.ca
        )
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Does `https://domain:port/` verify against `root` (curl, as a client would)? The health
/// path answers 200 (no apps configured).
fn verifies(port: u16, domain: &str, root: &Path) -> bool {
    let (code, _) = curl(&[
        "--cacert",
        &root.display().to_string(),
        "--resolve",
        &format!("{domain}:{port}:127.0.0.1"),
        &format!("https://{domain}:{port}/_berth/health"),
    ]);
    code == 200
}

/// (serial, issuer) of the certificate served for `domain` on `port`, unverified.
fn served(port: u16, domain: &str) -> Option<(String, String)> {
    let s_client = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", domain])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-issuer"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    use std::io::Write;
    x509.stdin.take()?.write_all(&s_client.stdout).ok()?;
    let out = String::from_utf8(x509.wait_with_output().ok()?.stdout).ok()?;
    let serial = out.lines().find_map(|l| l.strip_prefix("serial="))?.to_owned();
    let issuer = out.lines().find_map(|l| l.strip_prefix("issuer="))?.trim().to_owned();
    Some((serial, issuer))
}

fn start_berth(dir: &TestDir, ports: Ports, rest: &str) -> Berth {
    let config = dir.write("berth.toml", &config_toml(dir, ports, "0s", "5s", rest));
    let mut cmd = Berth::command(&config);
    aws_env(&mut cmd);
    Berth::spawn(cmd, dir)
}

fn stop(berth: &mut Berth) {
    berth.signal("TERM");
    let st = berth.wait_timeout(Duration::from_secs(15)).expect("berth stops on SIGTERM");
    assert!(st.success(), "berth exited {st:?}\n{}", berth.logs());
}

fn orders_in_log(berth: &Berth) -> usize {
    berth.logs().matches("placing ACME order").count()
}

// ---------------------------------------------------------------------------------------

#[test]
fn first_certificate_verifies_and_a_restart_reuses_it_without_ordering() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    let Some(mut pebble) = Pebble::configure(ports.http, None, Some(0)) else { return };
    pebble.start();
    let dir = TestDir::new();
    let domains = ["www.berth.test", "api.berth.test"];
    let tls = pebble.tls_toml(&domains, "");

    let started = Instant::now();
    let mut berth = start_berth(&dir, ports, &tls);
    let root = pebble.root_file();
    wait_for("a certificate that verifies against Pebble's root", Duration::from_secs(30), || {
        verifies(ports.https, "www.berth.test", &root).then_some(())
    });
    eprintln!("berth run -> trusted certificate: {:?}", started.elapsed());
    assert!(verifies(ports.https, "api.berth.test", &root), "one certificate for every domain");
    let (serial, issuer) = served(ports.https, "api.berth.test").unwrap();
    assert!(issuer.contains("Pebble"), "{issuer}");
    assert_eq!(pebble.orders(), 1, "orders Pebble received\n{}", berth.logs());
    assert_eq!(orders_in_log(&berth), 1, "orders berth placed\n{}", berth.logs());

    // The account, chain and key are private files in state_dir.
    for f in ["account.json", "cert.pem", "key.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join("state/acme").join(f);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
    }
    // Never a key in the logs.
    assert!(!berth.logs().contains("PRIVATE KEY"));
    stop(&mut berth);

    // Restart: the stored certificate serves at once and nothing is ordered. This time with
    // /metrics on, to watch the order counter move on `berth renew`.
    let metrics_port = berth_tests::free_port();
    let config = dir.write(
        "berth.toml",
        &config_toml(&dir, ports, "0s", "5s", &tls)
            .replace("metrics_listen = \"\"", &format!("metrics_listen = \"127.0.0.1:{metrics_port}\"")),
    );
    let mut cmd = Berth::command(&config);
    aws_env(&mut cmd);
    let mut again = Berth::spawn(cmd, &dir);
    wait_for("the stored certificate after a restart", Duration::from_secs(10), || {
        verifies(ports.https, "www.berth.test", &root).then_some(())
    });
    assert_eq!(served(ports.https, "www.berth.test").unwrap().0, serial);
    wait_for("the decision not to order", Duration::from_secs(10), || {
        again.logs().contains("next renewal scheduled").then_some(())
    });
    assert_eq!(pebble.orders(), 1, "a restart must not order again:\n{}", again.logs());
    assert_eq!(orders_in_log(&again), 0);
    assert_eq!(
        fs::read_to_string(pebble.log_path()).unwrap().matches("POST /sign-me-up").count(),
        1,
        "the account is reused"
    );
    assert!(again.logs().contains("StateDir"), "{}", again.logs());

    // `berth renew` orders now, installs without a restart, and says what it installed.
    let orders_metric = |result: &str| -> f64 {
        let (_, body) = berth_tests::curl(&[&format!("http://127.0.0.1:{metrics_port}/metrics")]);
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        scrape
            .samples
            .iter()
            .find(|x| x.metric == "berth_acme_orders_total" && x.labels.get("result") == Some(result))
            .map(|x| match x.value {
                // OpenMetrics counters (`_total` samples under a `counter` family) may parse
                // as untyped; the number is the same.
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or(0.0)
    };
    let before = orders_metric("ok");
    let out = std::process::Command::new(berth_tests::berth_bin()).args(["renew", "-c"]).arg(&config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "berth renew: {text}\n{}", again.logs());
    assert!(text.contains("installed certificate"), "{text}");
    assert_eq!(pebble.orders(), 2);
    let (renewed, _) = served(ports.https, "www.berth.test").unwrap();
    assert_ne!(renewed, serial, "the renewed certificate serves without a restart");
    let plain = |s: &str| s.replace(':', "").to_ascii_lowercase();
    assert!(plain(&text).contains(&plain(&renewed)), "renew names the serial it installed: {text}");
    assert_eq!(orders_metric("ok"), before + 1.0, "berth_acme_orders_total{{result=ok}} moved by one");
    let status =
        std::process::Command::new(berth_tests::berth_bin()).args(["status", "-c"]).arg(&config).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(plain(&status).contains(&plain(&renewed)), "berth status shows the certificate:\n{status}");
    stop(&mut again);
}

#[test]
fn succeeds_against_pebble_rejecting_nonces_at_its_default_rate() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    // One order sends about ten signed requests, so at 5 % most orders see no rejection at
    // all. Short-lived certificates make berth order five times (some 50 requests), which
    // makes at least one rejection likely (~90 %) while keeping Pebble's own default rate.
    // What this test asserts is that no attempt fails at that rate; that berth survives a
    // rejection for certain is shown by `succeeds_with_pebble_rejecting_nonces` in
    // agent/src/acme/tests.rs, which raises the rate until one happens.
    let Some(mut pebble) = Pebble::configure(ports.http, Some(9), None) else { return };
    pebble.start();
    let dir = TestDir::new();
    // Debug logs for the ACME module only: they say when a nonce was rejected (Pebble
    // itself does not log it).
    let config =
        dir.write("berth.toml", &config_toml(&dir, ports, "0s", "5s", &pebble.tls_toml(&["nonce.berth.test"], "")));
    let mut cmd = Berth::command(&config);
    cmd.env("BERTH_LOG", "info,berth::acme=debug");
    let mut berth = Berth::spawn(cmd, &dir);
    let root = pebble.root_file();
    wait_for("a certificate despite rejected nonces", Duration::from_secs(60), || {
        verifies(ports.https, "nonce.berth.test", &root).then_some(())
    });
    wait_for("five orders", Duration::from_secs(60), || (pebble.orders() >= 5).then_some(()));
    assert!(verifies(ports.https, "nonce.berth.test", &root));
    let logs = berth.logs();
    let failed = logs.matches("could not get a certificate").count();
    eprintln!(
        "orders: {}, badNonce answers survived: {}, failed attempts: {failed}",
        pebble.orders(),
        logs.matches("rejected a nonce").count(),
    );
    assert_eq!(failed, 0, "an attempt failed at Pebble's default nonce rejection rate:\n{logs}");
    stop(&mut berth);
}

#[test]
fn ca_down_at_start_serves_self_signed_then_the_acme_certificate_without_a_restart() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    let Some(mut pebble) = Pebble::configure(ports.http, None, Some(0)) else { return };
    let dir = TestDir::new();
    let mut berth = start_berth(&dir, ports, &pebble.tls_toml(&["down.berth.test"], ""));

    // Serving and healthy while the CA is unreachable.
    wait_for("health 200 on :80", Duration::from_secs(10), || {
        (curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0 == 200).then_some(())
    });
    let (_, issuer) =
        wait_for("the self-signed certificate", Duration::from_secs(10), || served(ports.https, "down.berth.test"));
    assert!(issuer.contains("berth self-signed"), "{issuer}");
    wait_for("a logged retry", Duration::from_secs(10), || {
        berth.logs().contains("could not get a certificate; retrying").then_some(())
    });

    pebble.start();
    let root = pebble.root_file();
    wait_for("the ACME certificate once the CA is up", Duration::from_secs(60), || {
        verifies(ports.https, "down.berth.test", &root).then_some(())
    });
    assert!(berth.child.try_wait().unwrap().is_none(), "same process, no restart");
    stop(&mut berth);
}

#[test]
fn renews_twice_under_load_with_zero_failed_requests() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    // 20 s certificates: renewed every ~13 s (two thirds; Pebble offers no ARI).
    let Some(mut pebble) = Pebble::configure(ports.http, Some(20), Some(0)) else { return };
    pebble.start();
    let dir = TestDir::new();
    // The load goes through the proxy to an app container, as a fleet's traffic does.
    let app = TestApp::new("renew");
    let app_toml = format!(
        "[apps.{name}]\nimage = \"{image}\"\nport = 8080\npull = \"never\"\nstop_timeout = \"2s\"\n[apps.{name}.health]\npath = \"/health\"\ninterval = \"500ms\"\n",
        name = app.name,
        image = env("BERTH_TEST_APP_IMAGE"),
    );
    let mut berth = start_berth(&dir, ports, &format!("{}\n{app_toml}", pebble.tls_toml(&["renew.berth.test"], "")));
    let root = pebble.root_file();
    wait_for("the first certificate (and a healthy app)", Duration::from_secs(40), || {
        verifies(ports.https, "renew.berth.test", &root).then_some(())
    });
    let (first, _) = served(ports.https, "renew.berth.test").unwrap();
    let url = format!("https://127.0.0.1:{}/headers", ports.https);
    let (code, body) = curl(&["-k", &url]);
    assert!(code == 200 && body.contains("\"_path\""), "the app answers through the proxy: {code} {body}");

    // Keep-alive connections (the old certificate stays on them) and a new TLS connection
    // per request (each handshake picks whatever is installed at that instant).
    const LOAD_SECS: u32 = 36;
    let load_started = Instant::now();
    let keep_alive = load(&url, LOAD_SECS, 8);
    let close = wrk_connection_close(&url, LOAD_SECS, 2);
    wait_for("two renewals", Duration::from_secs(40), || (pebble.orders() >= 3).then_some(()));
    let renewed_after = load_started.elapsed();
    let (ka, cl) = (keep_alive.join().unwrap(), close.join().unwrap());
    eprintln!(
        "keep-alive: {ka:?}; connection-close: {cl:?}; orders: {}; two renewals after {renewed_after:?}",
        pebble.orders()
    );
    assert!(
        renewed_after < Duration::from_secs(u64::from(LOAD_SECS) - 2),
        "both renewals must happen while the load runs ({LOAD_SECS} s); the second came after {renewed_after:?}"
    );
    assert!(ka.requests > 1000 && cl.requests > 100, "the load ran: {ka:?} {cl:?}");
    assert_eq!((ka.failures, cl.failures), (0, 0), "no failed request during renewals");
    let (now, _) = served(ports.https, "renew.berth.test").unwrap();
    assert_ne!(now, first);
    assert!(verifies(ports.https, "renew.berth.test", &root));
    assert!(berth.logs().matches("source=Ordered").count() >= 3, "{}", berth.logs());
    stop(&mut berth);
}

/// wrk with `Connection: close`: (requests, failures), counted like `berth_tests::load`.
fn wrk_connection_close(url: &str, secs: u32, conns: u32) -> std::thread::JoinHandle<berth_tests::LoadResult> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let out = Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{secs}s"),
                "--timeout",
                "5s",
                "-H",
                "Connection: close",
                &url,
            ])
            .output()
            .expect("wrk");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let requests = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read wrk output:\n{text}"));
        let mut failures = 0;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
                failures += rest.trim().parse::<u64>().unwrap_or(0);
            }
            if let Some(rest) = line.strip_prefix("Socket errors:") {
                failures +=
                    rest.split(',').filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
            }
        }
        berth_tests::LoadResult { requests, failures }
    })
}

// ---------------------------------------------------------------------------------------
// Fleet: three instances behind an nginx round-robin "ALB" on Pebble's HTTP-01 port.

struct Nginx {
    child: Child,
    dir: TestDir,
}

impl Nginx {
    /// Round-robin from 127.0.0.1:`port` to `backends`, logging which backend answered.
    fn round_robin(port: u16, backends: &[u16]) -> Nginx {
        let dir = TestDir::new();
        let d = dir.path().display();
        let servers: String = backends.iter().map(|b| format!("server 127.0.0.1:{b};\n")).collect();
        let conf = format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format alb '$request_uri $upstream_addr $upstream_status';
  access_log {d}/access.log alb;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream fleet {{ {servers} }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fleet;
      proxy_set_header Host $host;
      # An ALB does not retry a 404 on another target; neither does this one.
      proxy_next_upstream off;
    }}
  }}
}}
"#
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let child = Command::new("nginx")
            .args(["-p", &d.to_string(), "-c"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (installed by scripts/testenv)");
        wait_for("nginx to listen", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Nginx { child, dir }
    }

    fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM (nginx's fast shutdown: the master stops its workers); SIGKILL on the master
    /// alone would leave the worker running and holding the port.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_fleet_orders_one_certificate_and_every_instance_serves_it() {
    let _one = one_at_a_time();
    let Some(moto) = moto_url() else { return };
    let alb_port = free_port();
    let Some(mut pebble) = Pebble::configure(alb_port, None, Some(0)) else { return };
    pebble.start();
    let prefix = unique_prefix("acme-fleet");
    let domain = "fleet.berth.test";
    let tls = pebble.tls_toml(&[domain], &format!("shared = \"{prefix}\"\n"));
    let rest = format!("[aws]\nregion = \"{REGION}\"\nendpoint_url = \"{moto}\"\n\n{tls}");

    let ports: Vec<Ports> = (0..4).map(|_| Ports::pick()).collect();
    let dirs: Vec<TestDir> = (0..4).map(|_| TestDir::new()).collect();
    let _alb = Nginx::round_robin(alb_port, &ports[..3].iter().map(|p| p.http).collect::<Vec<_>>());
    let mut fleet: Vec<Berth> = (0..3).map(|i| start_berth(&dirs[i], ports[i], &rest)).collect();
    let root = pebble.root_file();
    for p in &ports[..3] {
        wait_for("every instance to serve the fleet's certificate", Duration::from_secs(60), || {
            verifies(p.https, domain, &root).then_some(())
        });
    }
    let serials: Vec<String> = ports[..3].iter().map(|p| served(p.https, domain).unwrap().0).collect();
    assert!(serials.iter().all(|s| *s == serials[0]), "the same certificate everywhere: {serials:?}");
    assert_eq!(pebble.orders(), 1, "exactly one order for the fleet");
    assert_eq!(fleet.iter().map(orders_in_log).sum::<usize>(), 1);
    // The CA's validation requests went through the ALB to more than one instance, and
    // every one answered (stateless key authorizations).
    let log = _alb.access_log();
    let challenge_lines: Vec<&str> = log.lines().filter(|l| l.starts_with("/.well-known/acme-challenge/")).collect();
    let backends: std::collections::BTreeSet<&str> =
        challenge_lines.iter().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert!(challenge_lines.iter().all(|l| l.ends_with(" 200")), "{log}");
    assert!(backends.len() >= 2, "validation reached several instances: {log}");

    // An instance started later loads the certificate from SSM and orders nothing.
    let mut late = start_berth(&dirs[3], ports[3], &rest);
    wait_for("the late instance to serve the fleet's certificate", Duration::from_secs(30), || {
        verifies(ports[3].https, domain, &root).then_some(())
    });
    assert_eq!(served(ports[3].https, domain).unwrap().0, serials[0]);
    wait_for("the decision not to order", Duration::from_secs(10), || {
        late.logs().contains("next renewal scheduled").then_some(())
    });
    assert_eq!(pebble.orders(), 1, "{}", late.logs());
    assert_eq!(orders_in_log(&late), 0);
    assert!(late.logs().contains("source=Fleet"), "{}", late.logs());
    stop(&mut late);
    for b in &mut fleet {
        stop(b);
    }
}

/// `systemctl reload` with another domain: the new name gets a self-signed certificate at
/// once and a certificate from the CA moments later, with no restart of berth or the app;
/// `berth status` shows it. A reload that leaves the names alone orders nothing.
#[test]
fn reload_with_a_new_domain_orders_for_it_without_restarting_the_app() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    let Some(mut pebble) = Pebble::configure(ports.http, None, Some(0)) else { return };
    pebble.start();
    let dir = TestDir::new();
    let app = TestApp::new("acme-reload");
    let app_toml = format!(
        "[apps.{name}]\nimage = \"{image}\"\nport = 8080\npull = \"never\"\nstop_timeout = \"2s\"\n[apps.{name}.health]\npath = \"/health\"\ninterval = \"500ms\"\n",
        name = app.name,
        image = env("BERTH_TEST_APP_IMAGE"),
    );
    let (a, b) = ("a.reload.berth.test", "b.reload.berth.test");
    let mut berth = start_berth(&dir, ports, &format!("{}\n{app_toml}", pebble.tls_toml(&[a], "")));
    let root = pebble.root_file();
    wait_for("the first certificate (and a healthy app)", Duration::from_secs(40), || {
        verifies(ports.https, a, &root).then_some(())
    });
    assert_eq!(pebble.orders(), 1);
    let container = app.containers(true);
    assert_eq!(container.len(), 1);
    let started_at = TestApp::inspect(&container[0], "{{.State.StartedAt}}");

    let config = dir.write(
        "berth.toml",
        &config_toml(&dir, ports, "0s", "5s", &format!("{}\n{app_toml}", pebble.tls_toml(&[a, b], ""))),
    );
    berth.signal("HUP");
    wait_for("a certificate for the new domain", Duration::from_secs(30), || {
        verifies(ports.https, b, &root).then_some(())
    });
    assert!(verifies(ports.https, a, &root), "the old domain keeps verifying");
    assert_eq!(pebble.orders(), 2, "one order for the new name set");
    let (serial, _) = served(ports.https, b).unwrap();
    assert_eq!(served(ports.https, a).unwrap().0, serial, "one certificate for both names");
    assert!(
        berth
            .logs()
            .lines()
            .any(|l| l.contains("self-signed certificate installed") && l.contains(b) && !l.contains(&format!("{a},"))),
        "the new name alone gets a self-signed certificate at once:\n{}",
        berth.logs()
    );

    let out = std::process::Command::new(berth_tests::berth_bin())
        .args(["status", "--json", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let cert = &status["tls"]["certificate"];
    let names: Vec<&str> = cert["names"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    assert!(names.contains(&a) && names.contains(&b), "{status}");
    let plain = |s: &str| s.replace(':', "").to_ascii_lowercase();
    assert_eq!(plain(cert["serial"].as_str().unwrap()), plain(&serial), "{status}");
    assert_eq!(status["domains"], serde_json::json!([a, b]));

    assert!(berth.child.try_wait().unwrap().is_none(), "SIGHUP must not end berth");
    assert_eq!(app.containers(true), container, "the app container stays");
    assert_eq!(TestApp::inspect(&container[0], "{{.State.StartedAt}}"), started_at, "the app was not restarted");

    // Same names, another contact: the certificate still fits, nothing is ordered.
    dir.write(
        "berth.toml",
        &std::fs::read_to_string(&config).unwrap().replace("mailto:ops@example.com", "mailto:sec@example.com"),
    );
    berth.signal("HUP");
    wait_for("the reload to reach the ACME task", Duration::from_secs(10), || {
        berth.logs().contains("the certificate serving still fits, nothing to order").then_some(())
    });
    assert!(verifies(ports.https, b, &root));
    assert_eq!(pebble.orders(), 2, "an unchanged name set is not ordered again:\n{}", berth.logs());
    stop(&mut berth);
}

/// `berth check --online -c <config>`: (exit code, stdout, stderr).
fn check_online(dir: &TestDir, ports: Ports, tls: &str) -> (Option<i32>, String, String) {
    let config = dir.write("berth.toml", &config_toml(dir, ports, "0s", "5s", tls));
    let mut cmd = Command::new(berth_tests::berth_bin());
    aws_env(&mut cmd).args(["check", "--online", "-c"]).arg(&config);
    let out = cmd.output().expect("run berth check --online");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_online_reaches_the_acme_directory_without_ordering() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    let Some(mut pebble) = Pebble::configure(ports.http, None, Some(0)) else { return };
    pebble.start();
    let dir = TestDir::new();
    let (code, stdout, stderr) = check_online(&dir, ports, &pebble.tls_toml(&["www.berth.test"], ""));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let line = format!("acme: the directory at {} answers in", pebble.directory());
    assert!(stdout.contains(&line), "no {line:?} in:\n{stdout}{stderr}");
    assert!(stdout.contains("ARI renewal windows"), "{stdout}");
    // Only the directory: no account, no order, nothing written.
    assert_eq!(pebble.orders(), 0);
    let log = fs::read_to_string(pebble.log_path()).unwrap_or_default();
    assert!(!log.contains("new-acct"), "the check created an account:\n{log}");
    assert!(!dir.path().join("state/acme/account.json").exists());
}

#[test]
fn check_online_names_the_acme_directory_it_cannot_use() {
    let _one = one_at_a_time();
    let ports = Ports::pick();
    let Some(mut pebble) = Pebble::configure(ports.http, None, Some(0)) else { return };
    pebble.start();
    let dir = TestDir::new();
    let good = pebble.directory();

    // Nothing listening there: the operator sees the key, the URL and why.
    let nobody = format!("https://127.0.0.1:{}/dir", free_port());
    let tls = pebble.tls_toml(&["www.berth.test"], "").replace(&good, &nobody);
    let (code, stdout, stderr) = check_online(&dir, ports, &tls);
    assert_eq!(code, Some(69), "{stdout}{stderr}");
    assert!(stderr.contains(&format!("acme: tls.acme.directory {nobody}")), "{stderr}");
    assert!(stderr.to_lowercase().contains("connect"), "says it could not connect: {stderr}");

    // A server that answers, but not with a directory (a wrong path).
    let wrong = good.replace("/dir", "/no-such-directory");
    let tls = pebble.tls_toml(&["www.berth.test"], "").replace(&good, &wrong);
    let (code, stdout, stderr) = check_online(&dir, ports, &tls);
    assert_eq!(code, Some(69), "{stdout}{stderr}");
    assert!(stderr.contains(&format!("acme: tls.acme.directory {wrong}: answered 404")), "{stderr}");

    // Without Pebble's root in ca_bundle its certificate is not trusted, as berth run would find.
    let tls = pebble.tls_toml(&["www.berth.test"], "").replace(&format!("ca_bundle = \"{}\"\n", pebble.env.ca), "");
    assert!(!tls.contains("ca_bundle"), "{tls}");
    let (code, stdout, stderr) = check_online(&dir, ports, &tls);
    assert_eq!(code, Some(69), "{stdout}{stderr}");
    assert!(stderr.contains(&format!("acme: tls.acme.directory {good}")), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "says the certificate is the problem: {stderr}");
}
