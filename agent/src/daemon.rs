//! `berth run`: the daemon's wiring, top to bottom.
//!
//! 1. listeners: from systemd socket activation, or bound from the config;
//! 2. shared handles the proxy serves from (health, certificates, ACME challenges);
//! 3. the `:80` and `:443` servers (`:443` accepts once app containers still running from
//!    before a restart are routed again, so a restart answers no request with 503);
//! 4. READY=1 and the watchdog;
//! 5. wait for SIGTERM/SIGINT, then the stop sequence: health 503, `drain_delay` (so the
//!    ALB notices), close the listeners, finish in-flight requests up to `drain_timeout`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use berth_proxy::challenge::ChallengeResponder;
use berth_proxy::forward::{ForwardLimits, Forwarder};
use berth_proxy::health::Health;
use berth_proxy::https::Observers;
use berth_proxy::liveness::Liveness;
use berth_proxy::routes::{Route, RouteTable, Router};
use berth_proxy::server::{self, Limits};
use berth_proxy::tls::{self, CertStore};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::access;
use crate::acme;
use crate::admin;
use crate::config::Config;
use crate::metrics::{Metrics, MetricsEndpoint};
use crate::reload;
use crate::secrets;
use crate::state;
use crate::status::Live;
use crate::supervisor::{self, StatusBoard};
use crate::systemd;
use tokio::sync::watch;

pub fn main(config: Config, path: PathBuf) -> ExitCode {
    // rustls needs one process-wide crypto provider; aws-lc-rs is the one we build with.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    tracing::info!(config = %path.display(), version = crate::VERSION_LINE.lines().next(), "berth starting");
    // Signal handlers before anything else: a SIGHUP's default action is to terminate, and
    // `systemctl reload` can arrive as soon as the listeners answer.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    // 1. Listeners first: the earliest moment the load balancer can reach us.
    let (http_listener, https_listener) = listeners(&config)?;
    let https_port = https_listener.local_addr()?.port();
    tracing::info!(http = %http_listener.local_addr()?, https = %https_listener.local_addr()?, "listening");

    // 2. Shared state the proxy serves from. Apps are unhealthy until supervision proves
    //    otherwise: the health path answers 503 meanwhile.
    let health = Health::new();
    for app in config.apps.keys() {
        health.set(app, Some("starting".into()));
    }
    let challenges = ChallengeResponder::new();
    let certs = CertStore::new();
    let self_signed = tls::self_signed(&config.tls.domains).context("creating the self-signed certificate")?;
    certs.install(&config.tls.domains, self_signed.key);
    state::prepare(&config.agent.state_dir)?;
    // The certificate (public, never the key) goes to disk so a client can pin it with
    // `curl --cacert`; it changes at every start.
    state::write_public(&config.agent.state_dir.join("self-signed.crt"), self_signed.cert_pem.as_bytes())?;
    let tls_config = certs.server_config()?;
    // Certificates (ACME / files) in the background, never fatal; the self-signed one serves
    // until a real one is installed. The handle is for status, metrics and `berth renew`.
    let router = Router::new();
    router.set_routes(route_table(&config));
    set_connection_caps(&config, &router);
    access::close_until_secrets(&config, &router);

    let status: StatusBoard = Default::default();
    let live = Arc::new(Live::new(config.clone(), health.clone(), router.clone(), status.clone()));
    let metrics = Arc::new(Metrics::new(live.clone()));

    // 3. Servers. They run until `shutdown` fires, then drain.
    let shutdown = CancellationToken::new();
    // Certificates: ACME orders and renewals (or file reloads) swap into `certs`; until then
    // the self-signed certificate serves.
    let acme = acme::spawn(acme::AcmeSetup::from_config(&config), certs.clone(), challenges.clone(), shutdown.clone());
    live.acme.store(Some(Arc::new(acme)));
    tokio::spawn(reload::follow_tls(live.clone(), certs.clone(), challenges.clone(), shutdown.clone()));
    let drain = config.agent.drain_timeout.0;
    let http_server = tokio::spawn(server::serve(
        http_listener,
        None,
        Limits::default(),
        Arc::new(berth_proxy::http80::PlainHttp {
            health_path: config.http.health_path.clone(),
            health: health.clone(),
            challenges: challenges.clone(),
            https_port,
        }),
        shutdown.clone(),
        drain,
    ));
    // After a restart the app container is still running, but routed only once supervision
    // has found it again: until then `:443` does not accept (the kernel queues connections,
    // in systemd's socket when activated), so they are served instead of answered 503.
    // Bounded, for a first boot or a Docker that does not answer.
    let routes_settled = CancellationToken::new();
    // :443 is served from one single-threaded runtime per CPU (see `serve_per_core`); the
    // rest of the daemon stays on this runtime.
    let proxy_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let proxy_liveness = Liveness::default();
    let https_listener = https_listener.into_std().context("taking the :443 listener off the main runtime")?;
    let https_server = tokio::spawn({
        let serve_https = server::serve_per_core(
            https_listener,
            proxy_threads,
            proxy_liveness.clone(),
            Some(tls_config),
            Limits::default(),
            Arc::new(berth_proxy::https::Https {
                health_path: config.http.health_path.clone(),
                health: health.clone(),
                router: router.clone(),
                forwarder: Forwarder::new(ForwardLimits::default()),
                observer: request_observer(&config, &metrics),
            }),
            shutdown.clone(),
            drain,
        );
        let settled = routes_settled.clone();
        async move {
            if tokio::time::timeout(ROUTES_HOLD, settled.cancelled()).await.is_err() {
                tracing::warn!(hold = ?ROUTES_HOLD, "running containers not found in time; serving :443 anyway");
            }
            serve_https.await
        }
    });

    let mut side_servers = Vec::new();
    if !config.agent.metrics_listen.is_empty() {
        let listener = TcpListener::from_std(
            bind(&config.agent.metrics_listen)
                .with_context(|| format!("binding metrics listener {}", config.agent.metrics_listen))?,
        )?;
        tracing::info!(addr = %config.agent.metrics_listen, "metrics at /metrics");
        side_servers.push(tokio::spawn(server::serve(
            listener,
            None,
            Limits::default(),
            Arc::new(MetricsEndpoint(metrics.clone())),
            shutdown.clone(),
            std::time::Duration::from_secs(1),
        )));
    }
    {
        let (path, live, shutdown) = (config.agent.admin_socket.clone(), live.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = admin::serve(path, live, shutdown).await {
                // berth still serves traffic without it; say so loudly.
                tracing::error!(
                    error = format!("{e:#}"),
                    "admin socket unavailable: berth status/deploy/renew will not work"
                );
            }
        });
    }

    // 4. Supervision: secrets first (the containers need them), then Docker, then one task
    //    per app. It runs in the background so that a slow SSM or Docker never holds up
    //    READY=1; it says what it waits for in the status line instead.
    let boot =
        tokio::spawn(start_supervision(config.clone(), router.clone(), live.clone(), shutdown.clone(), routes_settled));

    // 5. Ready: listeners are up and supervision has started.
    systemd::ready(&live.status_line());
    tokio::spawn(report_status(live.clone(), shutdown.clone()));
    if let Some(period) = systemd::spawn_watchdog(proxy_liveness) {
        tracing::info!(period = ?period, "systemd watchdog armed");
    }
    tracing::info!("ready");

    // 6. Wait for a stop signal; SIGHUP (`systemctl reload berth`) re-reads the config.
    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => reload::reload(&path, &live, &router),
        }
    };

    // The stop sequence. The app container keeps running so a restarted berth adopts it.
    let delay = config.agent.drain_delay.0;
    tracing::info!(signal = signal_name, drain_delay = ?delay, drain_timeout = ?drain, "stopping: health now answers 503");
    health.start_draining();
    systemd::stopping(&format!("stopping: draining for {}", config.agent.drain_delay));
    tokio::time::sleep(delay).await;
    tracing::info!("closing listeners; finishing in-flight requests");
    shutdown.cancel();
    let _ = tokio::join!(http_server, https_server);
    for s in side_servers {
        let _ = s.await;
    }
    boot.abort();
    tracing::info!("stopped");
    Ok(())
}

/// How long `:443` waits, at start, for running app containers to be routed.
const ROUTES_HOLD: std::time::Duration = std::time::Duration::from_secs(3);

/// Socket-activated listeners by name, else bind the configured addresses.
fn listeners(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let mut activated = systemd::activated_listeners()?;
    let mut take = |name: &str, addr: &str| -> anyhow::Result<TcpListener> {
        let std_listener = match activated.remove(name) {
            Some(l) => {
                tracing::info!(listener = name, addr = ?l.local_addr().ok(), "using socket from systemd");
                l
            }
            None => bind(addr).with_context(|| format!("binding {name} listener {addr}"))?,
        };
        Ok(TcpListener::from_std(std_listener)?)
    };
    let http = take("http", &config.http.listen)?;
    let https = take("https", &config.https.listen)?;
    for (name, _) in activated {
        tracing::warn!(name, "ignoring an unexpected socket-activated descriptor");
    }
    Ok((http, https))
}

fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let addr: SocketAddr = addr.parse().context("invalid address")?;
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// What watches each request: metrics when /metrics is served, the access log unless it is
/// off. Neither: nothing runs on the request path at all.
fn request_observer(config: &Config, metrics: &Metrics) -> Option<Arc<dyn berth_proxy::https::Observer>> {
    let mut observers: Vec<Arc<dyn berth_proxy::https::Observer>> = Vec::new();
    if !config.agent.metrics_listen.is_empty() {
        observers.push(Arc::new(metrics.requests.clone()));
    }
    if config.http.access_log != crate::config::AccessLogMode::Off {
        observers
            .push(Arc::new(access::AccessLog { mode: config.http.access_log, sample: config.http.access_log_sample }));
    }
    match observers.len() {
        0 => None,
        1 => observers.pop(),
        _ => Some(Arc::new(Observers(observers))),
    }
}

/// The config's routes as the proxy's table. Validation already rejected malformed and
/// duplicate routes and a second catch-all app.
pub(crate) fn route_table(config: &Config) -> RouteTable {
    let mut routes = Vec::new();
    let mut catch_all = None;
    for (name, app) in &config.apps {
        if app.routes.is_empty() {
            catch_all = Some(Arc::from(name.as_str()));
        }
        for r in &app.routes {
            if let Ok((host, prefix)) = crate::config::parse_route(r) {
                routes.push(Route { host, prefix, app: Arc::from(name.as_str()) });
            }
        }
    }
    RouteTable::new(routes, catch_all)
}

/// Each app's `max_connections`, for its container now and the ones after (also after a
/// reload: a lowered cap lets requests in flight finish and starts no more until under it).
pub(crate) fn set_connection_caps(config: &Config, router: &Router) {
    for (name, app) in &config.apps {
        router.set_max_connections(name, app.max_connections as usize);
    }
}

/// Secrets, then Docker, then the app tasks. Never fails: every wait is retried with
/// backoff and reported, and shutdown cancels it.
///
/// Docker is reached alongside SSM, not after it: running containers are routed
/// provisionally (`supervisor::route_running`) as soon as Docker answers, then
/// `routes_settled` lets `:443` accept.
async fn start_supervision(
    config: Config,
    router: Router,
    live: Arc<Live>,
    shutdown: CancellationToken,
    routes_settled: CancellationToken,
) {
    let docker_and_routes = async {
        let docker = if config.apps.is_empty() {
            None
        } else {
            supervisor::connect(&shutdown, |s| live.set_waiting(Some(s.to_string()))).await
        };
        if let Some(docker) = &docker {
            supervisor::route_running(docker, &config.apps, &router).await;
        }
        routes_settled.cancel();
        docker
    };
    let secrets = async {
        let sdk = if needs_aws(&config) { Some(crate::aws::sdk_config(&config.aws).await) } else { None };
        let first = first_secrets(&live, sdk.clone(), &shutdown).await;
        (first, sdk)
    };
    let ((first, mut sdk), docker) = tokio::join!(secrets, docker_and_routes);
    let Some((secrets, fetched_with)) = first else { return };
    let secrets_rx = secrets.subscribe();
    let _ = live.secrets.set(secrets.clone());
    let (on_change, on_change_rx) = watch::channel(fetched_with.secrets.on_change);
    tokio::spawn(reload::follow_secrets(live.clone(), secrets, fetched_with, on_change));
    tokio::spawn(access::keep_policies(live.clone(), router.clone(), secrets_rx.clone()));
    let docker = match docker {
        Some(docker) => docker,
        // Started with no apps: Docker is not needed (nor waited for) until a reload adds one.
        None => {
            if !until_apps_configured(&live, &shutdown).await {
                return;
            }
            let Some(docker) = supervisor::connect(&shutdown, |s| live.set_waiting(Some(s.to_string()))).await else {
                return;
            };
            docker
        }
    };
    // The config may have been reloaded while we waited for SSM or Docker.
    let config = live.config();
    if sdk.is_none() && needs_aws(&config) {
        sdk = Some(crate::aws::sdk_config(&config.aws).await);
    }
    live.set_waiting(None);
    let shared = supervisor::Shared {
        docker,
        router,
        health: live.health.clone(),
        status: live.apps.clone(),
        shutdown,
        drain_timeout: config.agent.drain_timeout.0,
        on_change: on_change_rx,
        ssm: sdk.as_ref().map(aws_sdk_ssm::Client::new),
        ecr: Arc::new(crate::ecr::EcrAuth::new(config.aws.clone(), sdk.clone())),
        hash_key: match state::hash_key(&config.agent.state_dir) {
            Ok(k) => k.into(),
            Err(e) => {
                // A fixed key keeps the label stable across restarts (adoption still works);
                // it only loses the protection against offline guessing.
                tracing::error!(
                    error = format!("{e:#}"),
                    "cannot keep the config-hash key in state_dir; containers will be replaced at every start"
                );
                Arc::from(vec![0u8; 32])
            }
        },
    };
    let apps = config.apps.clone();
    let supervisor = supervisor::start(shared, &apps, secrets_rx);
    let _ = live.supervisor.set(supervisor);
}

/// Whether starting `config` needs the AWS SDK: SSM for secrets or a registry password.
fn needs_aws(config: &Config) -> bool {
    config.has_secrets()
        || config.apps.values().any(|a| matches!(a.registry_auth, crate::config::RegistryAuth::Basic { .. }))
}

/// Waits until the running config has an app (a reload added one). False on shutdown.
async fn until_apps_configured(live: &Live, shutdown: &CancellationToken) -> bool {
    let mut changes = live.subscribe_config();
    loop {
        if !changes.borrow_and_update().apps.is_empty() {
            return true;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return false },
            _ = shutdown.cancelled() => return false,
        }
    }
}

/// The first set of secrets (the containers need them), retried until it arrives, and the
/// config it was fetched for. A reload that changes the source while we wait restarts the
/// fetch with the new one. Without `[secrets]`: an empty set a reload can fill. `None` on
/// shutdown.
async fn first_secrets(
    live: &Live,
    mut sdk: Option<aws_config::SdkConfig>,
    shutdown: &CancellationToken,
) -> Option<(secrets::SecretsHandle, Arc<Config>)> {
    let mut changes = live.subscribe_config();
    loop {
        let config = changes.borrow_and_update().clone();
        if !config.has_secrets() {
            return Some((secrets::spawn_empty(), config));
        }
        let sdk = match sdk.take() {
            Some(s) => s,
            None => crate::aws::sdk_config(&config.aws).await,
        };
        let source = secrets::SecretsSource::new(&sdk, &config.secrets);
        let first = source.fetch_with_retry(&secrets::RetryPolicy::DAEMON, |e, wait| {
            // The whole message: the grant or the VPC endpoint to add is what the operator
            // looking at `berth status` needs, not just the kind (errors never hold values).
            live.set_waiting(Some(format!("waiting for SSM (retry in {}s): {e}", wait.as_secs())));
        });
        let reloaded = async {
            loop {
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !reload::same_secrets_source(&config, &changes.borrow()) {
                    return;
                }
            }
        };
        let initial = tokio::select! {
            r = first => match r {
                Ok(set) => set,
                Err(e) => {
                    // DAEMON policy retries forever; this is unreachable in practice.
                    tracing::error!(error = %e, "fetching secrets failed");
                    return None;
                }
            },
            () = reloaded => {
                tracing::info!("the secrets source was reloaded while fetching; fetching from the new one");
                continue;
            }
            _ = shutdown.cancelled() => return None,
        };
        tracing::info!(count = initial.len(), "secrets fetched");
        live.set_waiting(None);
        let handle = secrets::spawn_refresh(source, config.secrets.refresh_interval.0, initial);
        return Some((handle, config));
    }
}

/// Keeps the systemd status line current.
async fn report_status(live: Arc<Live>, shutdown: CancellationToken) {
    let mut last = String::new();
    loop {
        let line = live.status_line();
        if line != last {
            systemd::status(&line);
            last = line;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
