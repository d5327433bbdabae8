//! The proxy library wired exactly as `berth run` wires it, without AWS or Docker: every
//! request for any host goes to one upstream address. Used by the proxy's own tests and by
//! the benchmark script, where a container supervisor would only add noise.
//!
//! ```text
//! standalone --http 127.0.0.1:8080 --https 127.0.0.1:8443 --upstream 127.0.0.1:9000 \
//!            [--domain app.test] [--cert-out self-signed.crt] [--header-timeout-ms N] [--idle-timeout-ms N] \
//!            [--response-timeout-ms N] [--swap-cert-every-ms N] [--drain-ms N] \
//!            [--route HOST/PREFIX]...
//! ```
//! Without `--route`, every host goes to the upstream (a catch-all). With one or more
//! `--route app.test/` (host, then the path prefix starting at the first `/`), only those
//! routes do and any other host gets 421.
//! Prints `ready` on stdout once both listeners are bound. SIGTERM drains and exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_proxy::challenge::ChallengeResponder;
use berth_proxy::forward::{ForwardLimits, Forwarder};
use berth_proxy::health::Health;
use berth_proxy::routes::{Route, RouteTable, Router};
use berth_proxy::server::{serve, serve_per_core, Limits};
use berth_proxy::tls::{self_signed, CertStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Args {
    http: SocketAddr,
    https: SocketAddr,
    upstream: SocketAddr,
    domain: String,
    cert_out: Option<String>,
    header_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    swap_every: Option<Duration>,
    drain: Duration,
    routes: Vec<(String, String)>,
    /// Threads serving :443 (default: one per CPU, as the daemon does).
    threads: Option<usize>,
    /// Cap on connections to the upstream (default: the library's).
    max_connections: Option<usize>,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        http: "127.0.0.1:0".parse().unwrap(),
        https: "127.0.0.1:0".parse().unwrap(),
        upstream: "127.0.0.1:9".parse().unwrap(),
        domain: "app.test".into(),
        cert_out: None,
        header_timeout: None,
        idle_timeout: None,
        response_timeout: None,
        swap_every: None,
        drain: Duration::from_secs(5),
        routes: Vec::new(),
        threads: None,
        max_connections: None,
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let ms = |v: String| Duration::from_millis(v.parse().expect("milliseconds"));
        match flag.as_str() {
            "--http" => a.http = val().parse().expect("--http address"),
            "--https" => a.https = val().parse().expect("--https address"),
            "--upstream" => a.upstream = val().parse().expect("--upstream address"),
            "--domain" => a.domain = val(),
            "--cert-out" => a.cert_out = Some(val()),
            "--header-timeout-ms" => a.header_timeout = Some(ms(val())),
            "--idle-timeout-ms" => a.idle_timeout = Some(ms(val())),
            "--response-timeout-ms" => a.response_timeout = Some(ms(val())),
            "--swap-cert-every-ms" => a.swap_every = Some(ms(val())),
            "--drain-ms" => a.drain = ms(val()),
            "--threads" => a.threads = Some(val().parse().expect("--threads count")),
            "--max-connections" => a.max_connections = Some(val().parse().expect("--max-connections count")),
            "--route" => {
                let v = val();
                let (host, prefix) = match v.find('/') {
                    Some(i) => (v[..i].to_owned(), v[i..].to_owned()),
                    None => (v.clone(), "/".to_owned()),
                };
                a.routes.push((host, prefix));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = parse_args();
    let domains = vec![args.domain.clone()];

    let certs = CertStore::new();
    let first = self_signed(&domains).expect("self-signed certificate");
    if let Some(path) = &args.cert_out {
        std::fs::write(path, &first.cert_pem).expect("write certificate");
    }
    certs.install(&domains, first.key);

    let router = Router::new();
    if args.routes.is_empty() {
        router.set_routes(RouteTable::new(vec![], Some("app".into())));
    } else {
        let routes = args
            .routes
            .iter()
            .map(|(host, prefix)| Route { host: host.clone(), prefix: prefix.clone(), app: "app".into() })
            .collect();
        router.set_routes(RouteTable::new(routes, None));
    }
    if let Some(n) = args.max_connections {
        router.set_max_connections("app", n);
    }
    router.set_backend("app", Some(args.upstream));

    let mut limits = Limits::default();
    if let Some(t) = args.header_timeout {
        limits.header_read_timeout = t;
    }
    if let Some(t) = args.idle_timeout {
        limits.idle_timeout = t;
    }
    let mut forward_limits = ForwardLimits::default();
    if let Some(t) = args.response_timeout {
        forward_limits.response_timeout = t;
    }

    let health = Health::new();
    let http = TcpListener::bind(args.http).await.expect("bind http");
    let https = TcpListener::bind(args.https).await.expect("bind https");
    let https_addr = https.local_addr().unwrap();
    println!("ready http={} https={}", http.local_addr().unwrap(), https_addr);

    // Certificate rotation under load, as an ACME renewal does it.
    if let (Some(every), Some(path)) = (args.swap_every, args.cert_out.clone()) {
        let certs = certs.clone();
        let domains = domains.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(every).await;
                let next = self_signed(&domains).expect("self-signed certificate");
                n += 1;
                // Written whole, then renamed: a reader never sees half a certificate.
                let tmp = format!("{path}.{n}.tmp");
                if std::fs::write(&tmp, &next.cert_pem).is_ok() {
                    let _ = std::fs::rename(&tmp, format!("{path}.{n}"));
                }
                certs.install(&domains, next.key);
            }
        });
    }

    let shutdown = CancellationToken::new();
    let plain = tokio::spawn(serve(
        http,
        None,
        limits.clone(),
        Arc::new(berth_proxy::http80::PlainHttp {
            health_path: "/_berth/health".into(),
            health: health.clone(),
            challenges: ChallengeResponder::new(),
            // The bound port: `--https 127.0.0.1:0` picks one.
            https_port: https_addr.port(),
        }),
        shutdown.clone(),
        args.drain,
    ));
    // As the daemon does: one single-threaded runtime per CPU serves :443.
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tls = tokio::spawn(serve_per_core(
        https.into_std().expect("the https listener as a std socket"),
        threads,
        berth_proxy::liveness::Liveness::default(),
        Some(certs.server_config().expect("TLS config")),
        limits,
        Arc::new(berth_proxy::https::Https {
            health_path: "/_berth/health".into(),
            health,
            router,
            forwarder: Forwarder::new(forward_limits),
            observer: None,
        }),
        shutdown.clone(),
        args.drain,
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
    let _ = tokio::join!(plain, tls);
}
