//! The certificate task against real Pebble CAs (and moto for fleet mode).
//!
//! Each test starts its own Pebble on free ports, with its HTTP-01 port pointed at a `:80`
//! server of the test's own (the proxy's real `PlainHttp` handler), so the tests neither
//! share Pebble's state (order counts are exact) nor fight over port 5002. Pebble's
//! validation resolves every name to 127.0.0.1 through the shared pebble-challtestsrv
//! (`scripts/testenv up`). Without Pebble the tests skip, except under `CI=true`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proxy::challenge::ChallengeResponder;
use berth_proxy::health::Health;
use berth_proxy::server::{self, Limits};
use berth_proxy::tls::CertStore;
use berth_tests::{free_port, TestDir};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::{AcmeConfig, TlsConfig, TlsMode};

mod ari;

/// pebble-challtestsrv's DNS, started by `scripts/testenv up`.
const TEST_DNS: &str = "127.0.0.1:8053";

fn pebble_env() -> Option<(String, String, String, String)> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("BERTH_TEST_PEBBLE_BIN"),
        get("BERTH_TEST_PEBBLE_CERT"),
        get("BERTH_TEST_PEBBLE_KEY"),
        get("BERTH_TEST_PEBBLE_CA"),
    ) {
        (Some(b), Some(c), Some(k), Some(ca)) => Some((b, c, k, ca)),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("BERTH_TEST_PEBBLE_* not set under CI=true: scripts/test must start the ACME parts")
        }
        _ => {
            eprintln!("skipped: BERTH_TEST_PEBBLE_BIN etc. not set (source /tmp/berth-testenv/env.sh)");
            None
        }
    }
}

/// One Pebble process of the test's own; killed when dropped.
struct Pebble {
    child: Option<Child>,
    dir: TestDir,
    pub listen: u16,
    pub mgmt: u16,
    /// Where Pebble sends HTTP-01 validation requests.
    pub http01: u16,
    ca: String,
    bin: String,
    nonce_reject: Option<u32>,
}

impl Pebble {
    /// A Pebble configured but not started (for "CA down at start").
    fn configure(validity_secs: Option<u64>, nonce_reject: Option<u32>) -> Option<Pebble> {
        let (bin, cert, key, ca) = pebble_env()?;
        let dir = TestDir::new();
        let (listen, mgmt, http01, tls) = (free_port(), free_port(), free_port(), free_port());
        let mut cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http01, "tlsPort": tls,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        if let Some(v) = validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        dir.write("pebble.json", &cfg.to_string());
        Some(Pebble { child: None, dir, listen, mgmt, http01, ca, bin, nonce_reject })
    }

    /// Makes this Pebble register only accounts bound to `kid` with MAC key `key`.
    fn require_eab(&self, kid: &str, key: &str) {
        let path = self.dir.path().join("pebble.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["pebble"]["externalAccountBindingRequired"] = true.into();
        cfg["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        self.dir.write("pebble.json", &cfg.to_string());
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-config")
            .arg(self.dir.path().join("pebble.json"))
            .arg("-dnsserver")
            .arg(TEST_DNS)
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match self.nonce_reject {
            Some(n) => cmd.env("PEBBLE_WFE_NONCEREJECT", n.to_string()),
            // Pebble's default: 5 % of nonces rejected, as real CAs do now and then.
            None => cmd.env_remove("PEBBLE_WFE_NONCEREJECT"),
        };
        self.child = Some(cmd.spawn().expect("start pebble"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.listen)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pebble did not listen: {}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen)
    }

    /// newOrder requests Pebble received: the ground truth for "how many orders".
    fn orders(&self) -> usize {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("POST /order-plz"))
            .count()
    }

    /// Pebble's root, new at every start.
    fn root(&self) -> CertificateDer<'static> {
        let out = Command::new("curl")
            .args(["-sS", "--cacert", &self.ca, &format!("https://127.0.0.1:{}/roots/0", self.mgmt)])
            .output()
            .expect("curl");
        CertificateDer::from_pem_slice(&out.stdout).expect("pebble root PEM")
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

/// The proxy's real `:80` handler on `port`, answering from `responder`.
async fn serve_http01(port: u16, responder: ChallengeResponder, shutdown: CancellationToken) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(server::serve(
        listener,
        None,
        Limits::default(),
        Arc::new(berth_proxy::http80::PlainHttp {
            health_path: "/_berth/health".into(),
            health: Health::new(),
            challenges: responder,
            https_port: 443,
        }),
        shutdown,
        Duration::from_millis(100),
    ));
}

fn fast_timing() -> Timing {
    Timing {
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        validation_floor: Duration::from_secs(1),
        rate_limit_floor: Duration::from_secs(2),
        files_poll: Duration::from_millis(100),
        fleet_poll: Duration::from_secs(1),
        fleet_busy_poll: Duration::from_millis(300),
        lock_ttl: Duration::from_secs(60),
        lock_settle: Duration::from_millis(500),
        max_sleep: Duration::from_secs(1),
    }
}

fn setup(pebble: &Pebble, state_dir: &Path, domains: &[&str]) -> AcmeSetup {
    AcmeSetup {
        tls: TlsConfig {
            mode: TlsMode::Acme,
            domains: domains.iter().map(|d| d.to_string()).collect(),
            cert_file: None,
            key_file: None,
            acme: None,
        },
        acme: AcmeConfig {
            directory: pebble.directory(),
            contact: vec!["mailto:ops@example.com".into()],
            ca_bundle: Some(pebble.ca.clone().into()),
            shared: None,
            ..Default::default()
        },
        state_dir: state_dir.to_owned(),
        aws: Default::default(),
        sdk: None,
        timing: fast_timing(),
    }
}

async fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Verifies what `certs` serves for `domain` against Pebble's root, as a client would.
fn verify_served(certs: &CertStore, domain: &str, root: CertificateDer<'static>) {
    let served = certs.lookup(Some(domain)).expect("a certificate for the domain");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    verifier
        .verify_server_cert(
            &served.cert[0],
            &served.cert[1..],
            &ServerName::try_from(domain.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("served certificate for {domain} does not verify against Pebble's root: {e}"));
}

fn ordered_cert(handle: &AcmeHandle) -> Option<CertificateStatus> {
    handle.status().certificate
}

/// `Some` once the task has decided its certificate needs nothing now: it publishes the next
/// renewal before it acts on it, and one more than a minute away means it goes to sleep.
fn not_due(handle: &AcmeHandle) -> Option<()> {
    let soonest = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 60;
    handle.status().next_renewal.filter(|&t| t > soonest).map(|_| ())
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_stores_and_reuses_after_restart() {
    let Some(mut pebble) = Pebble::configure(None, Some(0)) else { return };
    pebble.start();
    let stop = CancellationToken::new();
    let responder = ChallengeResponder::new();
    serve_http01(pebble.http01, responder.clone(), stop.clone()).await;
    let dir = TestDir::new();
    let domains = ["one.berth.test", "two.berth.test"];

    let certs = CertStore::new();
    let started = Instant::now();
    let stop1 = CancellationToken::new();
    let handle = spawn(setup(&pebble, dir.path(), &domains), certs.clone(), responder.clone(), stop1.clone());
    let cert = wait_until("the first certificate", Duration::from_secs(30), || ordered_cert(&handle)).await;
    eprintln!("first certificate after {:?}", started.elapsed());
    assert_eq!(cert.source, CertSource::Ordered);
    assert_eq!(cert.info.names, vec!["one.berth.test", "two.berth.test"]);
    let root = pebble.root();
    verify_served(&certs, "one.berth.test", root.clone());
    verify_served(&certs, "two.berth.test", root.clone());
    let s = handle.status();
    assert_eq!((s.orders_ok, s.orders_error), (1, 0), "{s:?}");
    assert!(s.last_order.as_ref().is_some_and(|o| o.ok));
    assert_eq!(s.renewal_basis.as_deref(), Some("two thirds of the lifetime"), "Pebble 2.4 offers no ARI");
    let expiry = handle.expiry_by_domain();
    assert_eq!(expiry.len(), 2, "{expiry:?}");
    assert!(expiry.iter().all(|(_, t)| *t == unix(cert.info.not_after)));
    assert_eq!(pebble.orders(), 1);

    // Private files, and the fleet's thumbprint formula agrees with instant-acme's.
    let acme_dir = dir.path().join("acme");
    for f in ["account.json", "cert.pem", "key.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(acme_dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let creds = std::fs::read_to_string(acme_dir.join("account.json")).unwrap();
    let account = instant_acme::Account::builder_with_http(Box::new(
        http::AcmeHttp::new(Some(Path::new(&pebble.ca)), Default::default()).unwrap(),
    ))
    .from_credentials(serde_json::from_str(&creds).unwrap())
    .await
    .unwrap();
    let parsed: instant_acme::AccountCredentials = serde_json::from_str(&creds).unwrap();
    assert_eq!(order::thumbprint(parsed.private_key()).unwrap(), account.key_thumbprint());

    // A restart (a new task on the same state_dir) serves the stored certificate at once
    // and orders nothing.
    stop1.cancel();
    let stop2 = CancellationToken::new();
    let certs2 = CertStore::new();
    let handle2 = spawn(setup(&pebble, dir.path(), &domains), certs2.clone(), responder.clone(), stop2.clone());
    let again = wait_until("the stored certificate", Duration::from_secs(5), || ordered_cert(&handle2)).await;
    assert_eq!(again.source, CertSource::StateDir);
    assert_eq!(again.info.serial, cert.info.serial);
    verify_served(&certs2, "one.berth.test", root);
    wait_until("the decision not to order", Duration::from_secs(10), || not_due(&handle2)).await;
    assert_eq!(handle2.status().orders_ok, 0);
    assert_eq!(pebble.orders(), 1, "a restart must not order again");
    // The account was reused too: exactly one newAccount ever.
    let accounts = std::fs::read_to_string(pebble.log_path()).unwrap().matches("POST /sign-me-up").count();
    assert_eq!(accounts, 1);

    // `berth renew` orders now even though nothing is due, and answers with the new one.
    let renewed = handle2.renew_now(Some("two.berth.test".into())).await.unwrap().unwrap();
    assert_ne!(renewed.serial, cert.info.serial);
    assert_eq!(pebble.orders(), 2);
    let err = handle2.renew_now(Some("other.test".into())).await.unwrap().unwrap_err();
    assert!(err.contains("not one of tls.domains"), "{err}");
    stop2.cancel();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn succeeds_with_pebble_rejecting_nonces() {
    // 5 % is Pebble's default; 30 % makes a rejection all but certain in every order.
    for reject in [None, Some(30)] {
        let Some(mut pebble) = Pebble::configure(None, reject) else { return };
        pebble.start();
        let stop = CancellationToken::new();
        let responder = ChallengeResponder::new();
        serve_http01(pebble.http01, responder.clone(), stop.clone()).await;
        let dir = TestDir::new();
        let certs = CertStore::new();
        let before = http::BAD_NONCES.load(std::sync::atomic::Ordering::Relaxed);
        let handle = spawn(setup(&pebble, dir.path(), &["nonce.berth.test"]), certs.clone(), responder, stop.clone());
        wait_until("a certificate despite bad nonces", Duration::from_secs(60), || ordered_cert(&handle)).await;
        verify_served(&certs, "nonce.berth.test", pebble.root());
        // Other tests in this process run against Pebbles that reject nothing, so the
        // difference is this Pebble's. One order uses only a handful of nonces, so at 30 %
        // it can pass without a single rejection (about 1 run in 20): order again until
        // Pebble has rejected one, so the test proves success *despite* a rejection.
        let rejected_now = || http::BAD_NONCES.load(std::sync::atomic::Ordering::Relaxed) - before;
        if reject == Some(30) {
            for _ in 0..5 {
                if rejected_now() > 0 {
                    break;
                }
                let renewed = handle.renew_now(None).await.expect("renew answers");
                assert!(renewed.is_ok(), "a renewal despite bad nonces: {renewed:?}");
            }
        }
        let rejected = rejected_now();
        eprintln!(
            "reject={reject:?}: badNonce answers {rejected}, orders ok {}, failed attempts {}",
            handle.status().orders_ok,
            handle.status().orders_error
        );
        if reject == Some(30) {
            assert!(rejected > 0, "at 30 % some nonce must have been rejected");
        }
        stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_at_start_then_up() {
    let Some(mut pebble) = Pebble::configure(None, Some(0)) else { return };
    let stop = CancellationToken::new();
    let responder = ChallengeResponder::new();
    serve_http01(pebble.http01, responder.clone(), stop.clone()).await;
    let dir = TestDir::new();
    let certs = CertStore::new();
    let self_signed = berth_proxy::tls::self_signed(&["down.berth.test".into()]).unwrap().key;
    certs.install(&["down.berth.test".into()], self_signed.clone());
    let handle = spawn(setup(&pebble, dir.path(), &["down.berth.test"]), certs.clone(), responder, stop.clone());
    let waiting = wait_until("a retry to be reported", Duration::from_secs(10), || {
        let s = handle.status();
        (s.orders_error >= 2).then_some(s)
    })
    .await;
    assert!(waiting.waiting.as_deref().is_some_and(|w| w.contains("retry in")), "{waiting:?}");
    assert!(handle.status_line().is_some_and(|l| l.contains("self-signed")), "{:?}", handle.status_line());
    assert!(Arc::ptr_eq(&certs.lookup(Some("down.berth.test")).unwrap(), &self_signed), "self-signed keeps serving");
    pebble.start();
    wait_until("the certificate after the CA came up", Duration::from_secs(30), || ordered_cert(&handle)).await;
    verify_served(&certs, "down.berth.test", pebble.root());
    assert!(handle.status().waiting.is_none());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_two_thirds_of_a_short_lifetime() {
    let Some(mut pebble) = Pebble::configure(Some(15), Some(0)) else { return };
    pebble.start();
    let stop = CancellationToken::new();
    let responder = ChallengeResponder::new();
    serve_http01(pebble.http01, responder.clone(), stop.clone()).await;
    let dir = TestDir::new();
    let certs = CertStore::new();
    let handle = spawn(setup(&pebble, dir.path(), &["short.berth.test"]), certs.clone(), responder, stop.clone());
    let first = wait_until("the first certificate", Duration::from_secs(30), || ordered_cert(&handle)).await;
    // notAfter is inclusive: Pebble makes a 15 s period 14 s from notBefore to notAfter.
    let lifetime = first.info.lifetime();
    assert!((14..=15).contains(&lifetime.as_secs()), "Pebble honours certificateValidityPeriod: {lifetime:?}");
    let next = handle.status().next_renewal.unwrap();
    assert_eq!(next, unix(first.info.not_before + lifetime * 2 / 3));
    wait_until("two renewals", Duration::from_secs(40), || (handle.status().orders_ok >= 3).then_some(())).await;
    let now = handle.status().certificate.unwrap();
    assert!(now.info.not_before > first.info.not_before);
    verify_served(&certs, "short.berth.test", pebble.root());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_mode_reloads_and_keeps_the_old_on_a_bad_file() {
    use super::cert::tests::issue;
    let dir = TestDir::new();
    let (chain, key) = issue(&["files.berth.test"], 0, 90);
    let cert_file = dir.write("cert.pem", &chain);
    let key_file = dir.write("key.pem", &key);
    let certs = CertStore::new();
    let stop = CancellationToken::new();
    let setup = AcmeSetup {
        tls: TlsConfig {
            mode: TlsMode::Files,
            domains: vec!["files.berth.test".into()],
            cert_file: Some(cert_file.clone()),
            key_file: Some(key_file.clone()),
            acme: None,
        },
        acme: Default::default(),
        state_dir: dir.path().join("state"),
        aws: Default::default(),
        sdk: None,
        timing: fast_timing(),
    };
    let handle = spawn(setup, certs.clone(), ChallengeResponder::new(), stop.clone());
    let first = wait_until("the file certificate", Duration::from_secs(5), || ordered_cert(&handle)).await;
    assert_eq!(first.source, CertSource::Files);
    let served = certs.lookup(Some("files.berth.test")).unwrap();

    // A broken file: logged, reported, and the old certificate stays.
    std::fs::write(&cert_file, "not a certificate").unwrap();
    wait_until("the bad file to be reported", Duration::from_secs(5), || handle.status().waiting).await;
    assert!(Arc::ptr_eq(&certs.lookup(Some("files.berth.test")).unwrap(), &served));

    // A new pair, written one file after the other: installed once both are there.
    let (chain2, key2) = issue(&["files.berth.test"], 0, 30);
    std::fs::write(&cert_file, &chain2).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&key_file, key2.as_bytes()).unwrap();
    let second = wait_until("the new file certificate", Duration::from_secs(5), || {
        handle.status().certificate.filter(|c| c.info.serial != first.info.serial)
    })
    .await;
    assert_eq!(second.info.lifetime(), Duration::from_secs(30 * 86_400));
    assert!(handle.status().waiting.is_none());
    assert!(!Arc::ptr_eq(&certs.lookup(Some("files.berth.test")).unwrap(), &served));
    let reloaded = handle.renew_now(None).await.unwrap().unwrap();
    assert_eq!(reloaded.serial, second.info.serial);
    stop.cancel();
}

#[tokio::test]
async fn self_signed_mode_has_nothing_to_renew() {
    let handle = spawn(
        AcmeSetup {
            tls: TlsConfig { mode: TlsMode::SelfSigned, domains: vec!["a.test".into()], ..Default::default() },
            acme: Default::default(),
            state_dir: "/nonexistent".into(),
            aws: Default::default(),
            sdk: None,
            timing: fast_timing(),
        },
        CertStore::new(),
        ChallengeResponder::new(),
        CancellationToken::new(),
    );
    let err = handle.renew_now(None).await.unwrap().unwrap_err();
    assert!(err.contains("self-signed"), "{err}");
    assert!(handle.expiry_by_domain().is_empty());
    assert_eq!(handle.status().orders_ok, 0);
}

// ---------------------------------------------------------------------------------------
// Fleet mode: moto for SSM.

async fn moto_sdk() -> Option<aws_config::SdkConfig> {
    let url = berth_tests::moto::moto_url()?;
    let real = crate::aws::sdk_config(&crate::config::AwsConfig {
        region: Some(berth_tests::moto::REGION.into()),
        endpoint_url: Some(url),
    })
    .await;
    Some(real.into_builder().credentials_provider(crate::aws::test_credentials()).build())
}

/// A round-robin TCP "ALB" on `port` in front of `backends`, like the ALB in front of a fleet.
async fn round_robin(port: u16, backends: Vec<SocketAddr>, shutdown: CancellationToken) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            let (mut inbound, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                _ = shutdown.cancelled() => return,
            };
            let backend = backends[next % backends.len()];
            next += 1;
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_orders_once_and_shares() {
    let Some(sdk) = moto_sdk().await else { return };
    let Some(mut pebble) = Pebble::configure(None, Some(0)) else { return };
    pebble.start();
    let stop = CancellationToken::new();
    let prefix = berth_tests::moto::unique_prefix("acme-fleet");
    let domains = ["fleet.berth.test"];

    // Three instances, each with its own :80 behind the round-robin ALB on Pebble's port.
    let mut backends = Vec::new();
    let mut instances = Vec::new();
    let dirs: Vec<TestDir> = (0..4).map(|_| TestDir::new()).collect();
    for dir in &dirs[..3] {
        let responder = ChallengeResponder::new();
        let port = free_port();
        serve_http01(port, responder.clone(), stop.clone()).await;
        backends.push(SocketAddr::from(([127, 0, 0, 1], port)));
        let mut s = setup(&pebble, dir.path(), &domains);
        s.acme.shared = Some(prefix.clone());
        s.sdk = Some(sdk.clone());
        let certs = CertStore::new();
        instances.push((spawn(s, certs.clone(), responder.clone(), stop.clone()), certs, responder));
    }
    round_robin(pebble.http01, backends, stop.clone()).await;

    let serials: Vec<String> = {
        let mut out = Vec::new();
        for (h, _, _) in &instances {
            let c = wait_until("every instance to serve the fleet's certificate", Duration::from_secs(60), || {
                ordered_cert(h)
            })
            .await;
            out.push(c.info.serial);
        }
        out
    };
    assert!(serials.iter().all(|s| *s == serials[0]), "one certificate for the fleet: {serials:?}");
    assert_eq!(pebble.orders(), 1, "exactly one order for the whole fleet");
    let ordered: u64 = instances.iter().map(|(h, _, _)| h.status().orders_ok).sum();
    assert_eq!(ordered, 1);
    // Every instance answers any token statelessly with the shared account's thumbprint.
    let answers: Vec<_> =
        instances.iter().map(|(_, _, r)| r.answer("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")).collect();
    assert!(answers[0].is_some() && answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    for (_, certs, _) in &instances {
        verify_served(certs, "fleet.berth.test", pebble.root());
    }
    assert_ssm_storage(&sdk, &prefix).await;

    // A fourth instance started later loads the certificate from SSM and orders nothing.
    let mut s = setup(&pebble, dirs[3].path(), &domains);
    s.acme.shared = Some(prefix.clone());
    s.sdk = Some(sdk.clone());
    let late = spawn(s, CertStore::new(), ChallengeResponder::new(), stop.clone());
    let c =
        wait_until("the late instance to load the certificate", Duration::from_secs(20), || ordered_cert(&late)).await;
    assert_eq!(c.source, CertSource::Fleet);
    assert_eq!(c.info.serial, serials[0]);
    wait_until("the decision not to order", Duration::from_secs(10), || not_due(&late)).await;
    assert_eq!(pebble.orders(), 1);
    assert_eq!(late.status().orders_ok, 0);
    stop.cancel();
}

#[tokio::test]
async fn fleet_lock_is_exclusive_and_a_stale_one_is_taken_over() {
    let Some(sdk) = moto_sdk().await else { return };
    let prefix = berth_tests::moto::unique_prefix("acme-lock");
    let a = fleet::Fleet::new(&sdk, &prefix, SETTLE);
    let b = fleet::Fleet::new(&sdk, &prefix, SETTLE);
    assert_eq!(a.try_lock(Duration::from_secs(60)).await.unwrap(), fleet::Lock::Acquired);
    match b.try_lock(Duration::from_secs(60)).await.unwrap() {
        fleet::Lock::HeldBy { holder, .. } => assert_eq!(holder, a.holder),
        other => panic!("{other:?}"),
    }
    // b cannot release a's lock.
    b.unlock().await.unwrap();
    assert!(matches!(b.try_lock(Duration::from_secs(60)).await.unwrap(), fleet::Lock::HeldBy { .. }));
    a.unlock().await.unwrap();
    assert_eq!(b.try_lock(Duration::ZERO).await.unwrap(), fleet::Lock::Acquired);
    // b "died" holding a lock that expired at once: a takes it over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(a.try_lock(Duration::from_secs(60)).await.unwrap(), fleet::Lock::Acquired);
    a.unlock().await.unwrap();

    // Account key: create-only, the first offer wins.
    let first = fleet::FleetAccount::generate("https://ca.test/dir").unwrap();
    let second = fleet::FleetAccount::generate("https://ca.test/dir").unwrap();
    assert!(a.offer_account(&first).await.unwrap());
    assert!(!b.offer_account(&second).await.unwrap());
    assert_eq!(b.account().await.unwrap().unwrap().as_str(), first.as_str());
    let (directory, key) = fleet::FleetAccount::parse(&first).unwrap();
    assert_eq!(directory, "https://ca.test/dir");
    assert_eq!(order::thumbprint(&key).unwrap().len(), 43);
}

const SETTLE: Duration = Duration::from_millis(800);

/// Puts a lock value by hand, as a dead (or confused) instance left it.
async fn put_lock(sdk: &aws_config::SdkConfig, prefix: &str, holder: &str, expires: u64) {
    aws_sdk_ssm::Client::new(sdk)
        .put_parameter()
        .name(format!("{prefix}/lock"))
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .value(serde_json::json!({"holder": holder, "expires": expires}).to_string())
        .overwrite(true)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn two_takeovers_of_one_stale_lock_leave_one_holder() {
    let Some(sdk) = moto_sdk().await else { return };
    let prefix = berth_tests::moto::unique_prefix("acme-lock-race");
    // The first half needs both takeovers to land within the settle time of their reads:
    // a few moto calls, which a loaded test machine can stretch past SETTLE.
    let patient = Duration::from_secs(3);
    let a = fleet::Fleet::new(&sdk, &prefix, patient);
    let b = fleet::Fleet::new(&sdk, &prefix, patient);
    let ttl = Duration::from_secs(60);
    put_lock(&sdk, &prefix, "dead-instance", 1).await;

    // Both read the same stale lock; a takes it over, then b (acting on its earlier read)
    // takes over a's fresh lock: the interleaving in which both used to think they held it.
    let seen_a = a.observe_lock().await.unwrap();
    let seen_b = b.observe_lock().await.unwrap();
    let claim_a = a.take_over(&seen_a, ttl).await.unwrap().expect("a's takeover was quick");
    let claim_b = b.take_over(&seen_b, ttl).await.unwrap().expect("b's takeover was quick");
    let (ra, rb) = tokio::join!(a.confirm(&claim_a), b.confirm(&claim_b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(rb, Some(fleet::Lock::Acquired), "the last takeover holds it");
    match ra {
        Some(fleet::Lock::HeldBy { holder, .. }) => assert_eq!(holder, b.holder),
        other => panic!("a must step back, got {other:?}"),
    }
    b.unlock().await.unwrap();

    // A takeover that lands later than the settle time after its read may have clobbered a
    // lock its holder already confirmed: it must not count, and must keep others out.
    let (a, b) = (fleet::Fleet::new(&sdk, &prefix, SETTLE), fleet::Fleet::new(&sdk, &prefix, SETTLE));
    put_lock(&sdk, &prefix, "dead-instance", 1).await;
    let seen_b = b.observe_lock().await.unwrap();
    assert_eq!(a.try_lock(ttl).await.unwrap(), fleet::Lock::Acquired);
    tokio::time::sleep(SETTLE).await;
    assert!(b.take_over(&seen_b, ttl).await.unwrap().is_none(), "a slow takeover must not count");
    // b's leftover value is a guard, not a lock b holds: b neither uses nor releases it.
    match b.try_lock(ttl).await.unwrap() {
        fleet::Lock::HeldBy { holder, .. } => assert_ne!(holder, b.holder),
        other => panic!("b must not hold its guard: {other:?}"),
    }
    b.unlock().await.unwrap();
    let c = fleet::Fleet::new(&sdk, &prefix, SETTLE);
    assert!(matches!(c.try_lock(ttl).await.unwrap(), fleet::Lock::HeldBy { .. }));
}

#[tokio::test]
async fn an_instance_never_waits_on_its_own_lock_or_a_far_future_one() {
    let Some(sdk) = moto_sdk().await else { return };
    let prefix = berth_tests::moto::unique_prefix("acme-lock-own");
    let a = fleet::Fleet::new(&sdk, &prefix, SETTLE);
    let b = fleet::Fleet::new(&sdk, &prefix, SETTLE);
    let ttl = Duration::from_secs(60);
    // a took the lock and then lost track of it (an SSM error after the put): its next
    // attempt takes it again instead of waiting up to the TTL for itself.
    assert_eq!(a.try_lock(ttl).await.unwrap(), fleet::Lock::Acquired);
    assert_eq!(a.try_lock(ttl).await.unwrap(), fleet::Lock::Acquired);
    assert!(matches!(b.try_lock(ttl).await.unwrap(), fleet::Lock::HeldBy { .. }));
    a.unlock().await.unwrap();

    // A holder whose clock is years ahead, or a value no clock can hold, does not block
    // the fleet: such an expiry is not believed.
    let year_3000 = 32_503_680_000;
    for expires in [year_3000, u64::MAX] {
        put_lock(&sdk, &prefix, "clock-in-the-future", expires).await;
        assert_eq!(b.try_lock(ttl).await.unwrap(), fleet::Lock::Acquired, "expires {expires}");
        b.unlock().await.unwrap();
    }
    // One a little ahead (within the skew margin) still holds.
    put_lock(&sdk, &prefix, "slightly-ahead", unix(SystemTime::now()) + 90).await;
    assert!(matches!(b.try_lock(ttl).await.unwrap(), fleet::Lock::HeldBy { .. }));
}

/// A server that accepts connections and never answers: an SSM endpoint or CA that hangs.
async fn black_hole(shutdown: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                Ok((c, _)) = listener.accept() => held.push(c),
                _ = shutdown.cancelled() => return,
            }
        }
    });
    addr
}

#[tokio::test]
async fn stop_is_prompt_while_ssm_and_the_ca_hang() {
    let hang = CancellationToken::new();
    let addr = black_hole(hang.clone()).await;
    let dir = TestDir::new();
    let sdk = crate::aws::sdk_config(&crate::config::AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(format!("http://{addr}")),
    })
    .await
    .into_builder()
    .credentials_provider(crate::aws::test_credentials())
    .build();
    let setup = AcmeSetup {
        tls: TlsConfig {
            mode: TlsMode::Acme,
            domains: vec!["hang.berth.test".into()],
            cert_file: None,
            key_file: None,
            acme: None,
        },
        acme: AcmeConfig {
            directory: format!("http://{addr}/dir"),
            contact: vec![],
            ca_bundle: None,
            shared: Some("/berth-test/hang".into()),
            ..Default::default()
        },
        state_dir: dir.path().to_owned(),
        aws: Default::default(),
        sdk: Some(sdk),
        timing: fast_timing(),
    };
    let handle = spawn(setup, CertStore::new(), ChallengeResponder::new(), CancellationToken::new());
    // Let the task get stuck in its first SSM poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), handle.stop()).await.expect("stop() returned");
    assert!(started.elapsed() < Duration::from_secs(2), "stop took {:?}", started.elapsed());
    hang.cancel();
}

/// A parameter's type and tier, as `aws ssm describe-parameters` shows them.
async fn describe_parameter(
    sdk: &aws_config::SdkConfig,
    name: String,
) -> (Option<aws_sdk_ssm::types::ParameterType>, Option<aws_sdk_ssm::types::ParameterTier>) {
    let filter = aws_sdk_ssm::types::ParameterStringFilter::builder()
        .key("Name")
        .option("Equals")
        .values(&name)
        .build()
        .unwrap();
    let out = aws_sdk_ssm::Client::new(sdk).describe_parameters().parameter_filters(filter).send().await.unwrap();
    let p = out.parameters().first().unwrap_or_else(|| panic!("no parameter {name}"));
    (p.r#type().cloned(), p.tier().cloned())
}

/// What an operator sees in Parameter Store: the private keys encrypted, the certificate in
/// the free tier unless it does not fit there.
async fn assert_ssm_storage(sdk: &aws_config::SdkConfig, prefix: &str) {
    use aws_sdk_ssm::types::{ParameterTier, ParameterType};
    let ssm = aws_sdk_ssm::Client::new(sdk);
    let describe = |name: String| describe_parameter(sdk, name);
    for leaf in ["key", "account"] {
        let (kind, _) = describe(format!("{prefix}/{leaf}")).await;
        assert_eq!(kind, Some(ParameterType::SecureString), "{prefix}/{leaf} holds a private key");
    }
    let (kind, tier) = describe(format!("{prefix}/cert")).await;
    assert_eq!(kind, Some(ParameterType::String));
    assert_ne!(tier, Some(ParameterTier::Advanced), "a chain under 4 KB must not cost Advanced-tier money");
    // Intelligent-Tiering is what berth asks for; real SSM reports the Standard it picks.
    assert!(matches!(tier, Some(ParameterTier::Standard | ParameterTier::IntelligentTiering)), "{tier:?}");
    let chain = ssm.get_parameter().name(format!("{prefix}/cert")).send().await.unwrap();
    assert!(chain.parameter().unwrap().value().unwrap().len() <= 4096);
}

#[tokio::test]
async fn a_long_chain_goes_to_the_advanced_tier() {
    use aws_sdk_ssm::types::{ParameterTier, ParameterType};
    let Some(sdk) = moto_sdk().await else { return };
    let prefix = berth_tests::moto::unique_prefix("acme-tier");
    let fleet = fleet::Fleet::new(&sdk, &prefix, SETTLE);
    // A chain with many intermediates: one self-signed leaf, padded with copies of itself.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["long.berth.test".to_owned()]).unwrap();
    let leaf = params.self_signed(&key).unwrap().pem();
    let chain = leaf.repeat(4096 / leaf.len() + 2);
    assert!(chain.len() > 4096);
    let issued = cert::Issued::from_pem(chain, zeroize::Zeroizing::new(key.serialize_pem())).unwrap();
    fleet.store_certificate(&issued).await.unwrap();
    let (kind, tier) = describe_parameter(&sdk, format!("{prefix}/cert")).await;
    assert_eq!((kind, tier), (Some(ParameterType::String), Some(ParameterTier::Advanced)));
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let key_param = ssm.get_parameter().name(format!("{prefix}/key")).send().await.unwrap();
    assert_eq!(key_param.parameter().unwrap().r#type(), Some(&ParameterType::SecureString));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_requiring_eab_refuses_berth_without_the_key_and_accepts_it_with() {
    const KID: &str = "berth-kid-1";
    const KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let Some(mut pebble) = Pebble::configure(None, Some(0)) else { return };
    pebble.require_eab(KID, KEY);
    pebble.start();
    let stop = CancellationToken::new();
    let responder = ChallengeResponder::new();
    serve_http01(pebble.http01, responder.clone(), stop.clone()).await;
    let domains = ["eab.berth.test"];
    let root = pebble.root();

    // Without EAB, and with the wrong MAC key: no account, so no order.
    let wrong = "AAAAZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    for (what, key, refusal) in [
        ("without EAB", None, "externalAccountRequired"),
        ("with the wrong MAC key", Some(wrong), "external account binding"),
    ] {
        let dir = TestDir::new();
        let mut s = setup(&pebble, dir.path(), &domains);
        s.acme.eab_kid = key.map(|_| KID.to_owned());
        s.acme.eab_hmac_key = key.map(|k| crate::secrets::Secret::new(k.to_owned()));
        let handle = spawn(s, CertStore::new(), responder.clone(), CancellationToken::new());
        let err = wait_until("the account to be refused", Duration::from_secs(20), || {
            handle.status().last_order.and_then(|o| o.error)
        })
        .await;
        assert!(err.contains("creating the ACME account") && err.contains(refusal), "{what}: {err}");
        assert!(!err.contains(wrong), "{what}: the key must not be in the message: {err}");
        assert!(ordered_cert(&handle).is_none(), "{what}");
        handle.stop().await;
    }
    assert_eq!(pebble.orders(), 0);

    // With the key, inline in the config: an account, an order, a certificate that verifies.
    let dir = TestDir::new();
    let mut s = setup(&pebble, dir.path(), &domains);
    s.acme.eab_kid = Some(KID.into());
    s.acme.eab_hmac_key = Some(crate::secrets::Secret::new(KEY.into()));
    let certs = CertStore::new();
    let handle = spawn(s, certs.clone(), responder.clone(), CancellationToken::new());
    wait_until("a certificate with EAB", Duration::from_secs(30), || ordered_cert(&handle)).await;
    verify_served(&certs, "eab.berth.test", root.clone());
    handle.stop().await;

    // And from an SSM parameter.
    if let Some(sdk) = moto_sdk().await {
        let name = format!("{}/eab-hmac-key", berth_tests::moto::unique_prefix("acme-eab"));
        aws_sdk_ssm::Client::new(&sdk)
            .put_parameter()
            .name(&name)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .value(KEY)
            .send()
            .await
            .unwrap();
        let dir = TestDir::new();
        let mut s = setup(&pebble, dir.path(), &domains);
        s.acme.eab_kid = Some(KID.into());
        s.acme.eab_hmac_key_parameter = Some(name);
        s.sdk = Some(sdk);
        let certs = CertStore::new();
        let handle = spawn(s, certs.clone(), responder.clone(), CancellationToken::new());
        wait_until("a certificate with EAB from SSM", Duration::from_secs(30), || ordered_cert(&handle)).await;
        verify_served(&certs, "eab.berth.test", root.clone());
        handle.stop().await;

        // Fleet mode registers the shared account key with EAB too.
        let dir = TestDir::new();
        let mut s = setup(&pebble, dir.path(), &domains);
        s.acme.eab_kid = Some(KID.into());
        s.acme.eab_hmac_key = Some(crate::secrets::Secret::new(KEY.into()));
        s.acme.shared = Some(berth_tests::moto::unique_prefix("acme-eab-fleet"));
        s.sdk = moto_sdk().await;
        let certs = CertStore::new();
        let handle = spawn(s, certs.clone(), responder.clone(), CancellationToken::new());
        wait_until("a fleet certificate with EAB", Duration::from_secs(30), || ordered_cert(&handle)).await;
        verify_served(&certs, "eab.berth.test", root);
        handle.stop().await;
    }
    stop.cancel();
}
