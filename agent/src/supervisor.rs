//! Running the app containers through the Docker Engine API, and replacing them without
//! dropping a request.
//!
//! One task per app owns that app's container. It adopts a matching container left by a
//! previous berth (same `berth.config-hash`: same ID, no restart), otherwise rolls out a new
//! one; probes health and feeds the result to the `:80` health path and the route table;
//! restarts a crashed container with capped exponential backoff; and performs rollouts
//! (new container on a new loopback port, wait healthy, switch the route, drain, stop the old).
//!
//! berth never touches a container whose `berth.app` label is not one of its apps.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context};
use berth_proxy::health::Health;
use berth_proxy::routes::Router;
use bollard::auth::DockerCredentials;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig, HostConfigLogConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{parse_memory, AppConfig, OnChange, PullPolicy, RegistryAuth};
use crate::secrets::SecretSet;

pub const LABEL_APP: &str = "berth.app";
pub const LABEL_HASH: &str = "berth.config-hash";

/// What `berth status` and `/metrics` show about one app.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct AppStatus {
    pub state: String,
    pub healthy: bool,
    pub container_id: Option<String>,
    pub image: String,
    pub image_id: Option<String>,
    /// The port Docker published on 127.0.0.1 (for `curl` while debugging).
    pub port: Option<u16>,
    /// Where berth sends the app's requests: the container's own address.
    #[serde(default)]
    pub upstream: Option<String>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub last_rollout: Option<String>,
}

pub type StatusBoard = Arc<Mutex<BTreeMap<String, AppStatus>>>;

/// Asks an app's task to roll out (`berth deploy`).
#[derive(Debug)]
pub struct DeployRequest {
    pub image: Option<String>,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// What the daemon can ask of an app's task.
#[derive(Debug)]
pub enum AppCommand {
    Deploy(DeployRequest),
    /// A reloaded config: roll out if what defines the container changed.
    Reconfigure(Box<AppConfig>),
    /// The app left the config: stop routing to it, leave its container alone.
    Retire,
}

/// The running app tasks, and what it takes to start more after a reload.
pub struct Supervisor {
    shared: Shared,
    events: broadcast::Sender<ContainerEvent>,
    /// `Some(why)` while the Docker Engine does not answer (set by the events watcher).
    docker_down: watch::Receiver<Option<String>>,
    secrets: watch::Receiver<Arc<SecretSet>>,
    apps: Mutex<BTreeMap<String, mpsc::Sender<AppCommand>>>,
}

impl Supervisor {
    /// Why the Docker Engine is unreachable, while it is: for status and the status line.
    pub fn docker_problem(&self) -> Option<String> {
        self.docker_down.borrow().clone()
    }

    pub fn app_names(&self) -> Vec<String> {
        self.apps.lock().unwrap().keys().cloned().collect()
    }

    /// `berth deploy`: roll out `app` (optionally another image) and wait for the outcome.
    pub async fn deploy(&self, app: &str, image: Option<String>) -> Result<String, String> {
        let tx = self.apps.lock().unwrap().get(app).cloned().ok_or_else(|| format!("no app named {app}"))?;
        let (reply, rx) = oneshot::channel();
        tx.send(AppCommand::Deploy(DeployRequest { image, reply }))
            .await
            .map_err(|_| "the app's supervisor is not running".to_string())?;
        rx.await.map_err(|_| "the rollout was interrupted (berth stopping?)".to_string())?
    }

    /// Applies a reloaded `[apps]`: new apps start, changed ones roll out, removed ones are
    /// retired (their containers keep running, untouched, as for any unknown app).
    pub fn apply(&self, apps: &BTreeMap<String, AppConfig>) {
        let mut running = self.apps.lock().unwrap();
        let gone: Vec<String> = running.keys().filter(|n| !apps.contains_key(*n)).cloned().collect();
        for name in gone {
            if let Some(tx) = running.remove(&name) {
                let _ = tx.try_send(AppCommand::Retire);
            }
        }
        for (name, config) in apps {
            match running.get(name) {
                Some(tx) => {
                    let _ = tx.try_send(AppCommand::Reconfigure(Box::new(config.clone())));
                }
                None => {
                    let tx = self.spawn_app(name, config);
                    running.insert(name.clone(), tx);
                }
            }
        }
    }

    fn spawn_app(&self, name: &str, config: &AppConfig) -> mpsc::Sender<AppCommand> {
        let (tx, rx) = mpsc::channel(4);
        self.shared.status.lock().unwrap().insert(
            name.to_string(),
            AppStatus { state: "starting".into(), image: config.image.clone(), ..Default::default() },
        );
        self.shared.health.set(name, Some("starting".into()));
        let task = AppTask {
            name: name.to_string(),
            config: config.clone(),
            shared: self.shared.clone(),
            secrets: self.secrets.clone(),
            events: self.events.subscribe(),
            docker_down: self.docker_down.clone(),
            commands: rx,
            current: None,
            probe: Probe::new(),
            engine_went_away: None,
        };
        tokio::spawn(task.run());
        tx
    }
}

/// Everything an app task needs from the rest of the daemon.
#[derive(Clone)]
pub struct Shared {
    pub docker: Docker,
    pub router: Router,
    pub health: Health,
    pub status: StatusBoard,
    pub shutdown: CancellationToken,
    pub drain_timeout: Duration,
    /// `secrets.on_change`, which a reload may change.
    pub on_change: watch::Receiver<OnChange>,
    /// Keys the config-hash label (see `state::hash_key`).
    pub hash_key: Arc<[u8]>,
    /// For registry credentials kept in SSM (`registry_auth = { username, password }`).
    pub ssm: Option<aws_sdk_ssm::Client>,
    /// `registry_auth = "ecr"`: tokens from GetAuthorizationToken, cached.
    pub ecr: Arc<crate::ecr::EcrAuth>,
}

/// Connects to the local Docker Engine, retrying with backoff while it is not up (berth
/// may start before docker.service has finished). Returns `None` only on shutdown.
pub async fn connect(shutdown: &CancellationToken, mut report: impl FnMut(&str)) -> Option<Docker> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let attempt = async {
            let docker = Docker::connect_with_local_defaults()?;
            // bollard speaks the newest API unless told otherwise; Debian's Engine 20.10 is 1.41.
            let docker = docker.negotiate_version().await?;
            docker.ping().await?;
            Ok::<_, bollard::errors::Error>(docker)
        };
        match attempt.await {
            Ok(d) => return Some(d),
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "Docker Engine not reachable; retrying");
                report(&format!("waiting for Docker: {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// `berth check --online`: is the Docker Engine there, and which version?
pub async fn online_check() -> anyhow::Result<String> {
    let docker = Docker::connect_with_local_defaults().context("docker: connecting to the local Engine")?;
    let docker =
        docker.negotiate_version().await.context("docker: the Engine does not answer (is docker.service running?)")?;
    let v = docker.version().await.context("docker: version")?;
    Ok(format!("docker: Engine {} (API {}) answers", v.version.unwrap_or_default(), v.api_version.unwrap_or_default()))
}

/// At start, before the secrets are fetched (which the config hash needs): routes each app
/// to a running container labelled for it whose published port answers its health probe.
/// After `systemctl restart berth` that is the container the new process is about to adopt;
/// routing to it at once closes the gap in which requests would get 503. Provisional: the
/// app's task then adopts it (same config hash), or rolls out its replacement while it keeps
/// serving, or takes the route away if it turns out unhealthy.
pub async fn route_running(docker: &Docker, apps: &BTreeMap<String, AppConfig>, router: &Router) {
    let probe = Probe::new();
    for (name, config) in apps {
        let Ok(list) = docker
            .list_containers(Some(ListContainersOptions {
                filters: Some(HashMap::from([("label".to_string(), vec![format!("{LABEL_APP}={name}")])])),
                ..Default::default()
            }))
            .await
        else {
            continue;
        };
        // The same choice adoption makes: the first running one with the port published.
        for c in list {
            let id = c.id.unwrap_or_default();
            let Ok(info) = docker.inspect_container(&id, None::<InspectContainerOptions>).await else { continue };
            let Some(addr) = app_addr(&info, config.port) else { continue };
            let healthy = match &config.health.path {
                Some(path) => probe.get(addr, path, config.health.timeout.0.min(Duration::from_secs(1))).await,
                None => true,
            };
            if healthy {
                tracing::info!(app = %name, container_id = %short(&id), "routing to the running container until supervision confirms it");
                router.set_backend(name, Some(addr));
            }
            break;
        }
    }
}

/// Starts one task per app plus the Docker events watcher.
pub fn start(
    shared: Shared,
    apps: &BTreeMap<String, AppConfig>,
    secrets: watch::Receiver<Arc<SecretSet>>,
) -> Arc<Supervisor> {
    let (events, _) = broadcast::channel(256);
    let (down_tx, docker_down) = watch::channel(None);
    tokio::spawn(watch_events(shared.docker.clone(), events.clone(), down_tx, shared.shutdown.clone()));
    tokio::spawn(log_foreign_containers(shared.docker.clone(), apps.keys().cloned().collect()));
    let supervisor = Arc::new(Supervisor { shared, events, docker_down, secrets, apps: Mutex::new(BTreeMap::new()) });
    supervisor.apply(apps);
    supervisor
}

/// A container event that matters to supervision.
#[derive(Debug, Clone)]
struct ContainerEvent {
    id: String,
    action: String,
    exit_code: Option<String>,
}

/// Sent to every app task after the events stream was re-established: events may have been
/// missed meanwhile (a Docker restart), so each app checks its container at once.
const RESYNC: &str = "berth-resync";

/// One events stream for all apps. It is also how berth notices that the Docker Engine went
/// away (the stream breaks): it then pings with capped exponential backoff and jitter,
/// reports the outage through `down` (status, status line), and once Docker answers again
/// resubscribes and tells every app to reconcile.
async fn watch_events(
    docker: Docker,
    tx: broadcast::Sender<ContainerEvent>,
    down: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut first = true;
    loop {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![LABEL_APP.to_string()]),
        ]);
        let mut stream = docker.events(Some(EventsOptions { filters: Some(filters), ..Default::default() }));
        if !first {
            let _ = tx.send(ContainerEvent { id: String::new(), action: RESYNC.into(), exit_code: None });
        }
        first = false;
        let broke = loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(ev)) => {
                        backoff.reset();
                        let Some(actor) = ev.actor else { continue };
                        let action = ev.action.unwrap_or_default();
                        let attrs = actor.attributes.unwrap_or_default();
                        let _ = tx.send(ContainerEvent {
                            id: actor.id.unwrap_or_default(),
                            action,
                            exit_code: attrs.get("exitCode").cloned(),
                        });
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the events stream ended".to_string(),
                },
                _ = shutdown.cancelled() => return,
            }
        };
        // The stream can end while Docker is fine; only a failed ping means it is gone.
        loop {
            match docker.ping().await {
                Ok(_) => break,
                Err(e) => {
                    let wait = backoff.next_delay();
                    if down.borrow().is_none() {
                        tracing::warn!(error = %e, events_error = %broke, "the Docker Engine is unreachable; containers that still run are left alone; reconnecting with backoff");
                    } else {
                        tracing::debug!(error = %e, retry_in = ?wait, "Docker Engine still unreachable");
                    }
                    down.send_replace(Some(format!("Docker Engine unreachable: {e}")));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
        if down.send_replace(None).is_some() {
            tracing::info!("the Docker Engine answers again; reconciling every app");
            backoff.reset();
        } else {
            // Docker is fine but the stream broke: resubscribe, but never in a tight loop.
            tracing::warn!(error = %broke, "Docker events stream failed; resubscribing");
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Whether a Docker API error means the Engine did not answer at all (down, restarting, its
/// socket gone), as opposed to an answer about the container (404, 409, ...).
fn docker_unreachable(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        e,
        E::IOError { .. }
            | E::HyperResponseError { .. }
            | E::HyperLegacyError { .. }
            | E::HttpClientError { .. }
            | E::RequestTimeoutError
            | E::SocketNotFoundError(_)
    )
}

/// What Docker says about a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Running,
    /// Exited, or gone.
    NotRunning,
    /// Docker did not answer: nothing is known, nothing is to be done about the container.
    Unknown,
}

/// Containers labelled for an app we no longer run are left alone, but said out loud.
async fn log_foreign_containers(docker: Docker, ours: Vec<String>) {
    let Ok(list) = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), vec![LABEL_APP.to_string()])])),
            ..Default::default()
        }))
        .await
    else {
        return;
    };
    for c in list {
        let app = c.labels.as_ref().and_then(|l| l.get(LABEL_APP)).cloned().unwrap_or_default();
        if !ours.contains(&app) {
            tracing::warn!(
                app,
                container_id = c.id.as_deref().unwrap_or(""),
                "container belongs to an app that is not in the config; leaving it alone"
            );
        }
    }
}

/// The container an app task currently serves from.
#[derive(Debug, Clone)]
struct Running {
    id: String,
    addr: SocketAddr,
    hash: String,
}

struct AppTask {
    name: String,
    config: AppConfig,
    shared: Shared,
    secrets: watch::Receiver<Arc<SecretSet>>,
    events: broadcast::Receiver<ContainerEvent>,
    docker_down: watch::Receiver<Option<String>>,
    commands: mpsc::Receiver<AppCommand>,
    current: Option<Running>,
    probe: Probe,
    /// When the Docker Engine was seen going away (its shutdown stops containers unless
    /// live-restore is on). Until the resync after its return (bounded by
    /// [`ENGINE_STOP_GRACE`]), an exit is the Engine's doing, not a crash: neither the `die`
    /// event Docker replays on reconnect nor a health tick that sees the container stopped
    /// may restart it with crash backoff before the resync does, under the right name.
    engine_went_away: Option<Instant>,
}

/// How long an exit seen while the Docker Engine went away is left to the resync that
/// follows its return; past it (the resync never came), exits are crashes again.
const ENGINE_STOP_GRACE: Duration = Duration::from_secs(60);

impl AppTask {
    async fn run(mut self) {
        let mut crash_backoff = Backoff::new(self.config.restart.initial_backoff.0, self.config.restart.max_backoff.0);
        let mut healthy_since: Option<Instant> = None;

        // Adopt what is already running, or roll out.
        if let Err(e) = self.adopt_or_rollout(None).await {
            tracing::error!(app = %self.name, error = format!("{e:#}"), "could not start the app; will retry");
            self.set_state(&format!("failed to start: {e:#}"), false);
        }

        let mut secrets_open = true;
        // `watch_image = "0s"` turns polling off; the interval then never fires usefully.
        let watch_every = if self.config.watch_image.is_zero() {
            Duration::from_secs(86400 * 365)
        } else {
            self.config.watch_image.0
        };
        let mut watch = tokio::time::interval_at(tokio::time::Instant::now() + watch_every, watch_every);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(self.config.health.interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => {
                    // The container keeps running: a restarted berth adopts it.
                    return;
                }
                ev = self.events.recv() => {
                    let Ok(ev) = ev else { continue };
                    if ev.action == RESYNC {
                        self.resync(&mut crash_backoff, &mut healthy_since).await;
                        continue;
                    }
                    let ours = self.current.as_ref().is_some_and(|c| c.id == ev.id);
                    if ours && (ev.action == "die" || ev.action == "oom") {
                        self.on_crash(&ev, &mut crash_backoff, &mut healthy_since).await;
                    }
                }
                _ = tick.tick() => {
                    self.reconcile(&mut crash_backoff, &mut healthy_since).await;
                }
                _ = watch.tick(), if !self.config.watch_image.is_zero() => {
                    match self.image_moved().await {
                        Ok(true) => {
                            tracing::info!(app = %self.name, image = %self.config.image, "the image tag moved in the registry; rolling out");
                            if let Err(e) = self.rollout(None, true).await {
                                tracing::error!(app = %self.name, error = format!("{e:#}"), "rollout of the new image failed; the old container keeps serving");
                            }
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(app = %self.name, error = format!("{e:#}"), "cannot check the registry for a new image"),
                    }
                }
                changed = self.secrets.changed(), if secrets_open => {
                    if changed.is_err() {
                        secrets_open = false;
                        continue;
                    }
                    if *self.shared.on_change.borrow() == OnChange::Redeploy && self.current.as_ref().is_some_and(|c| c.hash != self.desired_hash(None)) {
                        tracing::info!(app = %self.name, "secrets changed; rolling out");
                        if let Err(e) = self.rollout(None, false).await {
                            tracing::error!(app = %self.name, error = format!("{e:#}"), "rollout after a secrets change failed; the old container keeps serving");
                        }
                    }
                }
                Some(cmd) = self.commands.recv() => match cmd {
                    AppCommand::Deploy(req) => {
                        let result = self.rollout(req.image.clone(), true).await;
                        let _ = req.reply.send(result.map(|r| r.id).map_err(|e| format!("{e:#}")));
                    }
                    AppCommand::Reconfigure(config) => {
                        if *config == self.config {
                            continue;
                        }
                        if config.health.interval != self.config.health.interval {
                            tick = tokio::time::interval(config.health.interval.0);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        self.config = *config;
                        crash_backoff = Backoff::new(self.config.restart.initial_backoff.0, self.config.restart.max_backoff.0);
                        if self.current.as_ref().is_some_and(|c| c.hash != self.desired_hash(None)) {
                            tracing::info!(app = %self.name, "config changed; rolling out");
                            if let Err(e) = self.rollout(None, false).await {
                                tracing::error!(app = %self.name, error = format!("{e:#}"), "rollout after a config reload failed; the old container keeps serving");
                            }
                        } else {
                            tracing::info!(app = %self.name, "config reloaded; the container is unchanged");
                        }
                    }
                    AppCommand::Retire => {
                        tracing::warn!(app = %self.name, container_id = self.current.as_ref().map(|c| short(&c.id)).unwrap_or(""), "app removed from the config; its container is left running and no longer routed");
                        self.shared.router.set_backend(&self.name, None);
                        self.shared.health.remove(&self.name);
                        self.shared.status.lock().unwrap().remove(&self.name);
                        return;
                    }
                },
            }
        }
    }

    /// On start: a running container with our label and the desired hash is adopted as is.
    /// A running one with another hash keeps serving while its replacement starts.
    async fn adopt_or_rollout(&mut self, image: Option<String>) -> anyhow::Result<()> {
        let want = self.desired_hash(image.as_deref());
        let list = self
            .shared
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("label".to_string(), vec![format!("{LABEL_APP}={}", self.name)])])),
                ..Default::default()
            }))
            .await
            .context("listing containers")?;
        let mut stale = Vec::new();
        for c in list {
            let id = c.id.clone().unwrap_or_default();
            let hash = c.labels.as_ref().and_then(|l| l.get(LABEL_HASH)).cloned().unwrap_or_default();
            let running = c.state.map(|s| s.to_string() == "running").unwrap_or(false);
            if running && self.current.is_none() {
                let info = self.inspect(&id).await?;
                if let Some(addr) = app_addr(&info, self.config.port) {
                    if hash == want {
                        tracing::info!(app = %self.name, container_id = %short(&id), "adopting the running container");
                    } else {
                        tracing::info!(app = %self.name, container_id = %short(&id), "running container has another config; it serves until its replacement is healthy");
                    }
                    self.current = Some(Running { id, addr, hash });
                    self.update_status(&info);
                    continue;
                }
            }
            stale.push(id);
        }
        for id in stale {
            tracing::info!(app = %self.name, container_id = %short(&id), "removing a stale container of this app");
            self.remove(&id, true).await;
        }
        match self.current.clone() {
            Some(c) if c.hash == want => {
                // Adopted: route to it as soon as it proves healthy (it may already be, by
                // `route_running`; then take that route back if it is not).
                if self.wait_healthy(c.addr, &c.id).await {
                    self.serve_from(c.addr);
                } else {
                    self.shared.router.set_backend(&self.name, None);
                }
                Ok(())
            }
            _ => self.rollout(image, false).await.map(|_| ()),
        }
    }

    /// New container on a new loopback port; wait healthy; switch; drain; stop the old one.
    /// If the new one never gets healthy it is removed and the old one keeps serving.
    async fn rollout(&mut self, image: Option<String>, force_pull: bool) -> anyhow::Result<Running> {
        let started = Instant::now();
        let image_ref = image.clone().unwrap_or_else(|| self.config.image.clone());
        self.set_state(&format!("rolling out {image_ref}"), self.current.is_some());
        self.ensure_image(&image_ref, force_pull).await?;
        let hash = self.desired_hash(image.as_deref());
        let new = self.create_and_start(&image_ref, &hash).await?;
        tracing::info!(app = %self.name, container_id = %short(&new.id), image = %image_ref, port = new.addr.port(), "new container started; waiting until healthy");

        if !self.wait_healthy(new.addr, &new.id).await {
            if let Some(old) = &self.current {
                tracing::error!(app = %self.name, container_id = %short(&new.id), "new container never became healthy; keeping the old one");
                self.remove(&new.id, true).await;
                self.set_state(&format!("rollout of {image_ref} failed: never healthy"), true);
                self.serve_from(old.addr);
            } else {
                // Nothing else to serve from: keep this container and supervise it like any
                // other, so a crash loop is restarted with backoff and visible in status.
                tracing::error!(app = %self.name, container_id = %short(&new.id), "container is not healthy; supervising it until it is");
                self.shared.health.set(&self.name, Some("unhealthy: not passing health checks".into()));
                self.set_state(&format!("{image_ref} is not healthy"), false);
                self.current = Some(new);
            }
            return Err(anyhow!("container from {image_ref} never became healthy"));
        }

        // The switch is one atomic swap: requests already sent to the old container finish
        // there, new ones go to the new container.
        let old = self.current.replace(new.clone());
        let previous = self.shared.router.set_backend(&self.name, Some(new.addr));
        self.shared.health.set(&self.name, None);
        let info = self.inspect(&new.id).await.ok();
        if let Some(info) = &info {
            self.update_status(info);
        }
        self.set_state("serving", true);
        if let Some(old) = old {
            if let Some(previous) = previous {
                let deadline = Instant::now() + self.shared.drain_timeout;
                while previous.in_flight() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tracing::info!(app = %self.name, container_id = %short(&old.id), "stopping the replaced container");
            self.remove(&old.id, false).await;
        }
        let took = started.elapsed();
        tracing::info!(app = %self.name, container_id = %short(&new.id), image = %image_ref, elapsed_ms = took.as_millis() as u64, "rollout complete");
        if let Some(s) = self.shared.status.lock().unwrap().get_mut(&self.name) {
            s.last_rollout = Some(format!("{} in {} ms", image_ref, took.as_millis()));
        }
        Ok(new)
    }

    async fn ensure_image(&self, image: &str, force_pull: bool) -> anyhow::Result<()> {
        let present = self.shared.docker.inspect_image(image).await.is_ok();
        let pull = force_pull && self.config.pull != PullPolicy::Never
            || match self.config.pull {
                PullPolicy::Always => true,
                PullPolicy::Missing => !present,
                PullPolicy::Never => false,
            };
        if !pull {
            if !present {
                return Err(anyhow!("image {image} is not present and pull = \"never\""));
            }
            return Ok(());
        }
        tracing::info!(app = %self.name, image, "pulling image");
        let registry = registry_host(image);
        let ecr = self.config.registry_auth == RegistryAuth::Ecr;
        let mut credentials = self.registry_credentials(image).await?;
        let mut retried = false;
        loop {
            let Err(e) = self.pull(image, credentials).await else {
                return Ok(());
            };
            let failure = PullFailure::classify(&e.to_string());
            // A cached ECR token the registry no longer takes (revoked session, skewed
            // clock): drop it and try once more with a fresh one, never in a loop.
            if ecr && failure == PullFailure::Auth && !retried {
                retried = true;
                tracing::warn!(app = %self.name, image, registry, "the registry refused the ECR token; fetching a fresh one and retrying once");
                self.shared.ecr.invalidate(registry);
                credentials = self.registry_credentials(image).await?;
                continue;
            }
            let why = failure.describe(registry, &self.config.registry_auth);
            if present && !force_pull {
                tracing::warn!(app = %self.name, image, error = %e, "pull failed ({why}); using the local image");
                return Ok(());
            }
            return Err(anyhow!("pulling {image} failed ({why}): {e}"));
        }
    }

    /// One pull, progress to the debug log; the first error ends it.
    async fn pull(&self, image: &str, credentials: Option<DockerCredentials>) -> Result<(), bollard::errors::Error> {
        let (repo, tag) = split_image(image);
        let mut stream = self.shared.docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(repo.to_string()),
                tag: Some(tag.to_string()),
                ..Default::default()
            }),
            None,
            credentials,
        );
        while let Some(item) = stream.next().await {
            if let Some(status) = item?.status {
                tracing::debug!(app = %self.name, image, progress = %status, "pull");
            }
        }
        Ok(())
    }

    /// Registry credentials per `registry_auth`. Basic credentials are read from SSM at each
    /// pull (never stored), so a rotated registry password needs no berth restart.
    async fn registry_credentials(&self, image: &str) -> anyhow::Result<Option<DockerCredentials>> {
        match &self.config.registry_auth {
            RegistryAuth::None => Ok(None),
            // Cached in memory until 30 minutes before the token expires (see `ecr`).
            RegistryAuth::Ecr => {
                let registry = registry_host(image);
                let creds = self
                    .shared
                    .ecr
                    .credentials(registry)
                    .await
                    .with_context(|| format!("registry_auth = \"ecr\": no token for {registry}"))?;
                Ok(Some(creds))
            }
            RegistryAuth::Basic { username, password } => {
                let ssm = self
                    .shared
                    .ssm
                    .as_ref()
                    .ok_or_else(|| anyhow!("registry_auth needs SSM, but no AWS client is configured"))?;
                let out =
                    ssm.get_parameters().names(username).names(password).with_decryption(true).send().await.map_err(
                        |e| {
                            anyhow!(
                                "reading registry credentials {username} and {password} from SSM: {}",
                                aws_sdk_ssm::error::DisplayErrorContext(&e)
                            )
                        },
                    )?;
                let value = |name: &str| {
                    out.parameters()
                        .iter()
                        .find(|p| p.name() == Some(name))
                        .and_then(|p| p.value())
                        .map(str::to_owned)
                        .ok_or_else(|| anyhow!("SSM parameter {name} (registry_auth) not found"))
                };
                Ok(Some(DockerCredentials {
                    username: Some(value(username)?),
                    password: Some(value(password)?),
                    serveraddress: Some(registry_host(image).to_string()),
                    ..Default::default()
                }))
            }
        }
    }

    /// `watch_image`: has the tag moved in the registry since our image was pulled?
    async fn image_moved(&self) -> anyhow::Result<bool> {
        let image = &self.config.image;
        let credentials = self.registry_credentials(image).await?;
        let remote = self
            .shared
            .docker
            .inspect_registry_image(image, credentials)
            .await
            .with_context(|| format!("asking the registry for {image}"))?;
        let Some(digest) = remote.descriptor.digest else {
            return Ok(false);
        };
        let local = self.shared.docker.inspect_image(image).await.ok();
        let known =
            local.and_then(|i| i.repo_digests).unwrap_or_default().iter().any(|d| d.ends_with(&format!("@{digest}")));
        Ok(!known)
    }

    async fn create_and_start(&self, image: &str, hash: &str) -> anyhow::Result<Running> {
        let env = self.container_env()?;
        let port_key = format!("{}/tcp", self.config.port);
        // Docker picks a free port on 127.0.0.1 (an empty HostPort): no race with another
        // process between our choosing a port and Docker binding it.
        let bindings = HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
        )]);
        // The journald driver needs journald on *Docker's* host, and berth sees only its own
        // (they differ when berth runs in a container, or Docker on another host). Docker
        // says so when the container starts; then fall back to Docker's default driver.
        let mut use_journald = journald_available() && !JOURNALD_REFUSED.load(Ordering::Relaxed);
        loop {
            let log_config = use_journald.then(|| HostConfigLogConfig {
                typ: Some("journald".into()),
                config: Some(HashMap::from([("tag".to_string(), format!("berth-{}", self.name))])),
            });
            let body = ContainerCreateBody {
                image: Some(image.to_string()),
                env: Some(env.clone()),
                labels: Some(HashMap::from([
                    (LABEL_APP.to_string(), self.name.clone()),
                    (LABEL_HASH.to_string(), hash.to_string()),
                ])),
                exposed_ports: Some(vec![port_key.clone()]),
                stop_timeout: Some(self.config.stop_timeout.0.as_secs() as i64),
                host_config: Some(HostConfig {
                    port_bindings: Some(bindings.clone()),
                    // PID 1 in a container ignores SIGTERM unless it installs a handler; an init
                    // forwards it, so `stop_timeout` is a limit, not the usual wait.
                    init: Some(true),
                    memory: self.config.memory.as_deref().and_then(|m| parse_memory(m).ok()),
                    nano_cpus: self.config.cpus.map(|c| (c * 1e9) as i64),
                    log_config,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let name = format!("berth-{}-{}", self.name, unique_suffix());
            let created = self
                .shared
                .docker
                .create_container(Some(CreateContainerOptions { name: Some(name), ..Default::default() }), body)
                .await
                .with_context(|| format!("creating a container from {image}"))?;
            if let Err(e) = self.shared.docker.start_container(&created.id, None::<StartContainerOptions>).await {
                self.remove(&created.id, true).await;
                if use_journald && e.to_string().contains("logging driver") {
                    JOURNALD_REFUSED.store(true, Ordering::Relaxed);
                    tracing::warn!(app = %self.name, error = %e, "Docker cannot use the journald log driver on its host; using its default driver");
                    use_journald = false;
                    continue;
                }
                return Err(anyhow!(e).context(format!("starting the container from {image}")));
            }
            let info = self.inspect(&created.id).await?;
            let running = info.state.as_ref().and_then(|s| s.running).unwrap_or(false);
            let addr = match app_addr(&info, self.config.port) {
                Some(addr) => addr,
                // Exited already: no port until it runs again. The caller sees it unhealthy and
                // crash handling restarts it, re-reading the port.
                None if !running => SocketAddr::from(([127, 0, 0, 1], 0)),
                None => {
                    self.remove(&created.id, true).await;
                    return Err(anyhow!("container {} has no published port", short(&created.id)));
                }
            };
            return Ok(Running { id: created.id, addr, hash: hash.to_string() });
        }
    }

    /// The container's environment: plain `env` plus the selected secrets. It goes to Docker
    /// in the create call only, never to a file.
    fn container_env(&self) -> anyhow::Result<Vec<String>> {
        let secrets = self.secrets.borrow().clone();
        let selected = secrets.select(&self.config.secrets).map_err(|missing| {
            anyhow!("secrets {} are selected for this app but were not fetched", missing.join(", "))
        })?;
        let mut env: Vec<String> = self.config.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for (name, value) in selected {
            env.push(format!("{name}={}", value.expose()));
        }
        Ok(env)
    }

    /// A digest of everything that defines the container. Secrets enter only as a digest of
    /// the selected values, so the label reveals nothing.
    fn desired_hash(&self, image: Option<&str>) -> String {
        #[derive(Serialize)]
        struct Defining<'a> {
            image: &'a str,
            port: u16,
            env: &'a BTreeMap<String, String>,
            secrets: String,
            memory: Option<&'a str>,
            cpus: Option<f64>,
            stop_timeout: u64,
        }
        let secrets = self.secrets.borrow().clone();
        let mut h = Sha256::new();
        h.update(&self.shared.hash_key[..]);
        if let Ok(selected) = secrets.select(&self.config.secrets) {
            for (name, value) in selected {
                h.update(name.as_bytes());
                h.update([0]);
                h.update(value.expose().as_bytes());
                h.update([0]);
            }
        }
        let secrets_digest = hex(&h.finalize()[..]);
        let defining = Defining {
            image: image.unwrap_or(&self.config.image),
            port: self.config.port,
            env: &self.config.env,
            secrets: secrets_digest,
            memory: self.config.memory.as_deref(),
            cpus: self.config.cpus,
            stop_timeout: self.config.stop_timeout.0.as_secs(),
        };
        let json = serde_json::to_vec(&defining).unwrap_or_default();
        hex(&Sha256::digest(&json)[..8])
    }

    /// Waits for `healthy_threshold` passing probes. Failures inside `start_period` do not
    /// count; after it, `unhealthy_threshold` consecutive failures give up.
    async fn wait_healthy(&self, addr: SocketAddr, id: &str) -> bool {
        let h = self.config.health.clone();
        let start = Instant::now();
        let (mut ok, mut failed) = (0u32, 0u32);
        loop {
            if self.shared.shutdown.is_cancelled() {
                return false;
            }
            let passed = self.probe_once(addr, id).await;
            if passed {
                ok += 1;
                failed = 0;
                if ok >= h.healthy_threshold {
                    return true;
                }
            } else {
                ok = 0;
                if start.elapsed() >= h.start_period.0 {
                    failed += 1;
                    if failed >= h.unhealthy_threshold {
                        return false;
                    }
                }
                if !self.is_running(id).await {
                    return false;
                }
            }
            // Quick successive probes while starting: readiness is what the rollout waits on.
            let pause = if passed {
                Duration::from_millis(100).min(h.interval.0)
            } else {
                h.interval.0.min(Duration::from_millis(250))
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn probe_once(&self, addr: SocketAddr, id: &str) -> bool {
        match &self.config.health.path {
            Some(path) => self.probe.get(addr, path, self.config.health.timeout.0).await,
            None => self.is_running(id).await,
        }
    }

    async fn is_running(&self, id: &str) -> bool {
        self.liveness(id).await == Liveness::Running
    }

    async fn liveness(&self, id: &str) -> Liveness {
        match self.inspect(id).await {
            Ok(info) if info.state.as_ref().and_then(|s| s.running).unwrap_or(false) => Liveness::Running,
            Ok(_) => Liveness::NotRunning,
            Err(e) if docker_unreachable(&e) => Liveness::Unknown,
            Err(_) => Liveness::NotRunning,
        }
    }

    fn docker_is_down(&self) -> bool {
        self.docker_down.borrow().is_some()
    }

    /// Periodic check: the probe drives health and routing; a container that is gone or
    /// stopped without us seeing the event is treated as a crash.
    async fn reconcile(&mut self, backoff: &mut Backoff, healthy_since: &mut Option<Instant>) {
        let Some(cur) = self.current.clone() else {
            // Nothing can start while Docker is away; its return triggers a resync.
            if self.docker_is_down() {
                return;
            }
            // Nothing runs (a failed first start): try again, with backoff.
            let wait = backoff.next_delay();
            tokio::time::sleep(wait).await;
            if let Err(e) = self.adopt_or_rollout(None).await {
                self.set_state(&format!("failed to start: {e:#}"), false);
            }
            return;
        };
        // Docker away (`Unknown`) is no crash: the container may well run on (live-restore),
        // and the HTTP probe below still says whether it answers.
        let liveness = if self.docker_is_down() {
            self.engine_went_away.get_or_insert_with(Instant::now);
            Liveness::Unknown
        } else {
            self.liveness(&cur.id).await
        };
        if liveness == Liveness::NotRunning {
            let ev = ContainerEvent { id: cur.id.clone(), action: "die".into(), exit_code: None };
            self.on_crash(&ev, backoff, healthy_since).await;
            return;
        }
        let passed = match (&self.config.health.path, liveness) {
            // "Running" is the only health there is, and Docker cannot say: keep the verdict.
            (None, Liveness::Unknown) => return,
            (None, _) => true,
            (Some(path), _) => self.probe.get(cur.addr, path, self.config.health.timeout.0).await,
        };
        let verdict = self.probe.record(passed, &self.config.health);
        match verdict {
            Some(true) => {
                healthy_since.get_or_insert_with(Instant::now);
                if self.shared.router.backend(&self.name).map(|b| b.addr) != Some(cur.addr) {
                    self.serve_from(cur.addr);
                }
            }
            Some(false) => {
                *healthy_since = None;
                if self.shared.router.backend(&self.name).is_some() {
                    tracing::warn!(app = %self.name, container_id = %short(&cur.id), "health checks failing; taking the app out of routing");
                    self.shared.router.set_backend(&self.name, None);
                    self.shared.health.set(&self.name, Some("unhealthy: health checks failing".into()));
                    self.set_state("unhealthy", false);
                }
            }
            None => {}
        }
        // A container that has stayed healthy long enough earns a fresh backoff.
        if healthy_since.is_some_and(|t| t.elapsed() >= self.config.restart.max_backoff.0) {
            backoff.reset();
        }
    }

    /// After the Docker Engine came back (or the events stream was re-established): events
    /// may have been missed. A container that kept running (live-restore) is kept as it is;
    /// one that Docker's shutdown stopped is started again at once (the app did not crash,
    /// so no crash backoff); a vanished one is replaced.
    async fn resync(&mut self, backoff: &mut Backoff, healthy_since: &mut Option<Instant>) {
        let Some(cur) = self.current.clone() else {
            if let Err(e) = self.adopt_or_rollout(None).await {
                self.set_state(&format!("failed to start: {e:#}"), false);
            }
            return;
        };
        let info = match self.inspect(&cur.id).await {
            Ok(info) => info,
            Err(e) if docker_unreachable(&e) => return,
            Err(_) => {
                self.engine_went_away = None;
                tracing::warn!(app = %self.name, container_id = %short(&cur.id), "the container is gone after the Docker restart; starting a new one");
                self.replace_container().await;
                return;
            }
        };
        self.engine_went_away = None;
        if info.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            tracing::info!(app = %self.name, container_id = %short(&cur.id), "the container kept running through the Docker restart");
            self.refresh_addr(&info);
            return;
        }
        *healthy_since = None;
        backoff.reset();
        self.shared.router.set_backend(&self.name, None);
        {
            let mut board = self.shared.status.lock().unwrap();
            let s = board.entry(self.name.clone()).or_default();
            s.restarts += 1;
            s.last_exit = Some("stopped by the Docker Engine's restart".into());
        }
        tracing::warn!(app = %self.name, container_id = %short(&cur.id), "the Docker restart stopped the container; starting it again");
        match self.shared.docker.start_container(&cur.id, None::<StartContainerOptions>).await {
            Ok(()) => {
                if let Ok(info) = self.inspect(&cur.id).await {
                    self.refresh_addr(&info);
                }
                self.set_state("restarted after the Docker restart; waiting until healthy", false);
            }
            Err(e) if docker_unreachable(&e) => {}
            Err(e) => {
                tracing::warn!(app = %self.name, error = %e, "cannot start the container again; creating a new one");
                self.replace_container().await;
            }
        }
    }

    /// Re-reads the published port (a restarted container may get another one) and the
    /// status fields; a changed port restarts health checking, whose verdict routes to it.
    fn refresh_addr(&mut self, info: &ContainerInspectResponse) {
        self.update_status(info);
        let Some(addr) = app_addr(info, self.config.port) else {
            return;
        };
        if let Some(c) = self.current.as_mut() {
            if c.addr != addr {
                c.addr = addr;
                self.probe = Probe::new();
            }
        }
    }

    async fn on_crash(&mut self, ev: &ContainerEvent, backoff: &mut Backoff, healthy_since: &mut Option<Instant>) {
        let Some(cur) = self.current.clone() else {
            return;
        };
        if self.engine_went_away.is_some_and(|t| t.elapsed() < ENGINE_STOP_GRACE) {
            // The resync after the Engine's return restarts it (without crash backoff).
            tracing::debug!(app = %self.name, container_id = %short(&cur.id), "exit left to the resync after the Docker Engine's return");
            return;
        }
        let info = match self.inspect(&cur.id).await {
            Ok(info) => Some(info),
            // Docker going away (its shutdown stops containers when live-restore is off):
            // not the app's fault; the resync after Docker returns restarts what is stopped.
            Err(e) if docker_unreachable(&e) => {
                self.engine_went_away = Some(Instant::now());
                tracing::info!(app = %self.name, container_id = %short(&cur.id), "container stopped while the Docker Engine goes away; checking again once it answers");
                return;
            }
            Err(_) => None,
        };
        let state = info.as_ref().and_then(|i| i.state.clone());
        // The periodic reconcile may have seen the exit first and restarted the container;
        // the `die` event that arrives afterwards is stale and must not count twice.
        if state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            tracing::debug!(app = %self.name, container_id = %short(&cur.id), "stale exit event; the container runs");
            return;
        }
        *healthy_since = None;
        self.shared.router.set_backend(&self.name, None);
        let exit_code =
            state.as_ref().and_then(|s| s.exit_code).map(|c| c.to_string()).or_else(|| ev.exit_code.clone());
        let oom = state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false) || ev.action == "oom";
        let wait = backoff.next_delay();
        let restarts = {
            let mut board = self.shared.status.lock().unwrap();
            let s = board.entry(self.name.clone()).or_default();
            s.restarts += 1;
            s.last_exit = Some(match (&exit_code, oom) {
                (_, true) => "killed: out of memory".to_string(),
                (Some(c), _) => format!("exited with code {c}"),
                (None, _) => "stopped".to_string(),
            });
            s.restarts
        };
        tracing::warn!(
            app = %self.name,
            container_id = %short(&cur.id),
            exit_code = %exit_code.as_deref().unwrap_or("unknown"),
            oom,
            restarts,
            restart_in_ms = wait.as_millis() as u64,
            "container stopped; restarting after backoff"
        );
        self.shared.health.set(&self.name, Some(format!("restarting (exit {})", exit_code.as_deref().unwrap_or("?"))));
        self.set_state(&format!("crashed; restarting in {:.1}s", wait.as_secs_f64()), false);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.shared.shutdown.cancelled() => return,
        }
        match self.shared.docker.start_container(&cur.id, None::<StartContainerOptions>).await {
            Ok(()) => {
                tracing::info!(app = %self.name, container_id = %short(&cur.id), "container restarted");
                // The published port can change across a restart.
                if let Ok(info) = self.inspect(&cur.id).await {
                    if let Some(addr) = app_addr(&info, self.config.port) {
                        if let Some(c) = self.current.as_mut() {
                            c.addr = addr;
                        }
                    }
                    self.update_status(&info);
                }
                self.probe = Probe::new();
            }
            Err(e) if docker_unreachable(&e) => {
                // Keep the container: it is still ours once Docker is back (see `resync`).
                tracing::warn!(app = %self.name, container_id = %short(&cur.id), error = %e, "cannot restart the container: the Docker Engine is unreachable; restarting once it answers");
                self.set_state("waiting for Docker to restart the container", false);
            }
            Err(e) => {
                // The container itself is gone (removed by hand): start a fresh one.
                tracing::warn!(app = %self.name, error = %e, "cannot restart the container; creating a new one");
                self.replace_container().await;
            }
        }
    }

    fn serve_from(&self, addr: SocketAddr) {
        self.shared.router.set_backend(&self.name, Some(addr));
        self.shared.health.set(&self.name, None);
        self.set_state("serving", true);
    }

    /// Docker's view of a container; the error stays typed so callers can tell an Engine
    /// that does not answer ([`docker_unreachable`]) from a container that is gone.
    async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, bollard::errors::Error> {
        self.shared.docker.inspect_container(id, None::<InspectContainerOptions>).await
    }

    /// The current container is gone or cannot be started: forget it and roll out a new one.
    async fn replace_container(&mut self) {
        self.current = None;
        if let Err(e) = self.rollout(None, false).await {
            self.set_state(&format!("failed to start: {e:#}"), false);
        }
    }

    /// Stops (gracefully unless `force`) and removes a container of this app.
    async fn remove(&self, id: &str, force: bool) {
        if !force {
            let t = self.config.stop_timeout.0.as_secs() as i32;
            if let Err(e) =
                self.shared.docker.stop_container(id, Some(StopContainerOptions { t: Some(t), signal: None })).await
            {
                tracing::debug!(container_id = %short(id), error = %e, "stop failed");
            }
        }
        if let Err(e) = self
            .shared
            .docker
            .remove_container(id, Some(RemoveContainerOptions { force: true, ..Default::default() }))
            .await
        {
            tracing::warn!(app = %self.name, container_id = %short(id), error = %e, "could not remove container");
        }
    }

    fn update_status(&self, info: &ContainerInspectResponse) {
        let mut board = self.shared.status.lock().unwrap();
        let s = board.entry(self.name.clone()).or_default();
        s.container_id = info.id.clone();
        s.image_id = info.image.clone();
        s.image = info.config.as_ref().and_then(|c| c.image.clone()).unwrap_or_else(|| self.config.image.clone());
        s.port = published_addr(info, self.config.port).map(|a| a.port());
        s.upstream = app_addr(info, self.config.port).map(|a| a.to_string());
    }

    fn set_state(&self, state: &str, healthy: bool) {
        let mut board = self.shared.status.lock().unwrap();
        let s = board.entry(self.name.clone()).or_default();
        s.state = state.to_string();
        s.healthy = healthy;
    }
}

/// HTTP health probes over a small keep-alive pool of their own.
struct Probe {
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
    ok: u32,
    failed: u32,
    healthy: Option<bool>,
}

impl Probe {
    fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Probe { client: Client::builder(TokioExecutor::new()).build(connector), ok: 0, failed: 0, healthy: None }
    }

    async fn get(&self, addr: SocketAddr, path: &str, timeout: Duration) -> bool {
        let Ok(uri) = format!("http://{addr}{path}").parse::<http::Uri>() else {
            return false;
        };
        let req = http::Request::get(uri).header(http::header::USER_AGENT, "berth-health-check").body(Empty::new());
        let Ok(req) = req else { return false };
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                ok
            }
            _ => false,
        }
    }

    /// Applies the thresholds; returns a new verdict only when it changes.
    fn record(&mut self, passed: bool, h: &crate::config::HealthConfig) -> Option<bool> {
        if passed {
            self.ok += 1;
            self.failed = 0;
        } else {
            self.failed += 1;
            self.ok = 0;
        }
        let verdict = if self.ok >= h.healthy_threshold {
            Some(true)
        } else if self.failed >= h.unhealthy_threshold {
            Some(false)
        } else {
            None
        };
        match verdict {
            Some(v) if self.healthy != Some(v) => {
                self.healthy = Some(v);
                Some(v)
            }
            _ => None,
        }
    }
}

/// Where the app's traffic goes: the container's own address on its Docker network, at the
/// configured port; the port published on 127.0.0.1 only when it has none (host networking).
///
/// Not the published port: for loopback clients Docker forwards it through docker-proxy, a
/// userland process that copies every byte once more (CPU on every request) and exits with
/// dockerd, so a Docker restart would cut an app that live-restore keeps running. The
/// published port stays, for `curl` while debugging.
fn app_addr(info: &ContainerInspectResponse, port: u16) -> Option<SocketAddr> {
    let on_network = info.network_settings.as_ref().and_then(|n| n.networks.as_ref()).and_then(|nets| {
        let mut ips = nets.values().filter_map(|e| e.ip_address.as_deref()?.parse::<std::net::IpAddr>().ok());
        ips.next()
    });
    match on_network {
        Some(ip) if published_addr(info, port).is_some() => Some(SocketAddr::new(ip, port)),
        _ => published_addr(info, port),
    }
}

fn published_addr(info: &ContainerInspectResponse, port: u16) -> Option<SocketAddr> {
    let ports = info.network_settings.as_ref()?.ports.as_ref()?;
    let bindings = ports.get(&format!("{port}/tcp"))?.as_ref()?;
    bindings.iter().find_map(|b| {
        let host_port: u16 = b.host_port.as_deref()?.parse().ok()?;
        Some(SocketAddr::from(([127, 0, 0, 1], host_port)))
    })
}

/// The registry part of an image reference (`docker.io` when there is none).
fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// `registry/name:tag` → (`registry/name`, `tag`); digests and missing tags handled.
fn split_image(image: &str) -> (&str, &str) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo, digest);
    }
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Why a pull failed, from Docker's message (the registry's answer passes through as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullFailure {
    Auth,
    NotFound,
    Network,
    Other,
}

impl PullFailure {
    fn classify(msg: &str) -> Self {
        let m = msg.to_ascii_lowercase();
        if m.contains("unauthorized")
            || m.contains("authentication")
            || m.contains("no basic auth credentials")
            || m.contains("denied")
            || m.contains("401")
            || m.contains("403")
        {
            PullFailure::Auth
        } else if m.contains("not found") || m.contains("manifest unknown") || m.contains("404") {
            PullFailure::NotFound
        } else if m.contains("timeout") || m.contains("connection") || m.contains("dial") || m.contains("no such host")
        {
            PullFailure::Network
        } else {
            PullFailure::Other
        }
    }

    /// The operator's next step, for the error and the log.
    fn describe(self, registry: &str, auth: &RegistryAuth) -> String {
        match (self, auth) {
            (PullFailure::Auth, RegistryAuth::Ecr) => format!(
                "authentication failed: {registry} refused the ECR token even after a fresh one \
                 (the instance role needs ecr:BatchGetImage and ecr:GetDownloadUrlForLayer on the \
                 repository, and the image must be in the token's account and region)"
            ),
            (PullFailure::Auth, _) => {
                format!("authentication failed: {registry} refused the credentials; check registry_auth")
            }
            (PullFailure::NotFound, _) => "image not found: check the name and tag".into(),
            (PullFailure::Network, _) => {
                format!("network: the registry {registry} is unreachable (NAT gateway or VPC endpoints for ECR?)")
            }
            (PullFailure::Other, _) => "registry error".into(),
        }
    }
}

/// Set once Docker refused the journald log driver: journald is not on Docker's host.
static JOURNALD_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Docker can write container logs to the journal only where the host has one.
fn journald_available() -> bool {
    std::path::Path::new("/run/systemd/journal/socket").exists()
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split() {
        assert_eq!(split_image("web:1.2"), ("web", "1.2"));
        assert_eq!(split_image("registry:5000/web"), ("registry:5000/web", "latest"));
        assert_eq!(split_image("registry:5000/web:2"), ("registry:5000/web", "2"));
        assert_eq!(split_image("web@sha256:ab"), ("web", "sha256:ab"));
    }

    #[test]
    fn only_transport_errors_mean_docker_is_unreachable() {
        use bollard::errors::Error as E;
        assert!(docker_unreachable(&E::SocketNotFoundError("/run/docker.sock".into())));
        assert!(docker_unreachable(&E::RequestTimeoutError));
        // Docker answered: about the container, not about Docker.
        assert!(!docker_unreachable(&E::DockerResponseServerError {
            status_code: 404,
            message: "No such container".into(),
        }));
    }

    #[test]
    fn pull_errors_are_classified() {
        let c = PullFailure::classify;
        assert_eq!(c("unauthorized: authentication required"), PullFailure::Auth);
        assert_eq!(c("Head \"http://127.0.0.1:5000/v2/a/manifests/1\": no basic auth credentials"), PullFailure::Auth);
        assert_eq!(c("manifest unknown"), PullFailure::NotFound);
        assert_eq!(c("dial tcp: connection refused"), PullFailure::Network);
        let why = PullFailure::Auth.describe("127.0.0.1:5000", &RegistryAuth::Ecr);
        assert!(why.starts_with("authentication failed: 127.0.0.1:5000 refused the ECR token"), "{why}");
    }
}
