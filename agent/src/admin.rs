//! The admin socket: how `berth status`, `berth deploy` and `berth renew` talk to the daemon.
//!
//! A Unix socket (mode 0600, so only root can use it; no network exposure at all) speaking
//! one JSON request per connection and one JSON response back. Deploy and renew answer when
//! they are done, so the CLI's exit code tells a script whether the new container serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::status::{Live, StatusReport};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Deploy { app: Option<String>, image: Option<String> },
    Renew { domain: Option<String> },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

impl Response {
    fn ok(message: impl Into<String>) -> Self {
        Response { ok: true, message: message.into(), status: None }
    }
    fn err(message: impl Into<String>) -> Self {
        Response { ok: false, message: message.into(), status: None }
    }
}

/// Binds the socket (replacing a stale one from a previous run) and serves until shutdown.
pub async fn serve(path: PathBuf, live: Arc<Live>, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed berth would make bind fail; nobody listens on it.
    if UnixStream::connect(&path).await.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("binding admin socket {}", path.display()))?;
    set_mode(&path, 0o600)?;
    tracing::info!(socket = %path.display(), "admin socket ready");
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let live = live.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, live).await {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

async fn handle(stream: UnixStream, live: Arc<Live>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => answer(req, &live).await,
        Err(e) => Response::err(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

async fn answer(req: Request, live: &Live) -> Response {
    match req {
        Request::Status => Response { ok: true, message: live.status_line(), status: Some(live.report()) },
        Request::Deploy { app, image } => deploy(live, app, image).await,
        Request::Renew { domain } => renew(live, domain).await,
    }
}

async fn deploy(live: &Live, app: Option<String>, image: Option<String>) -> Response {
    let Some(supervisor) = live.supervisor.get() else {
        return Response::err("supervision has not started yet (waiting for secrets or Docker); see `berth status`");
    };
    let names = supervisor.app_names();
    let targets: Vec<String> = match &app {
        Some(a) if names.contains(a) => vec![a.clone()],
        Some(a) => return Response::err(format!("no app named {a}; configured apps: {}", names.join(", "))),
        None if image.is_some() && names.len() > 1 => {
            return Response::err("--image needs an app name when several apps are configured");
        }
        None => names,
    };
    let mut messages = Vec::new();
    let mut ok = true;
    for name in targets {
        match supervisor.deploy(&name, image.clone()).await {
            Ok(id) => messages.push(format!("{name}: now serving container {}", &id[..id.len().min(12)])),
            Err(e) => {
                ok = false;
                messages.push(format!("{name}: rollout failed, the previous container keeps serving: {e}"));
            }
        }
    }
    Response { ok, message: messages.join("\n"), status: None }
}

async fn renew(live: &Live, domain: Option<String>) -> Response {
    let Some(acme) = live.acme() else {
        return Response::err("certificates are not managed yet");
    };
    match acme.renew_now(domain).await {
        Ok(Ok(i)) => Response::ok(format!(
            "installed certificate {} for {} (expires {})",
            i.serial,
            i.names.join(", "),
            humantime::format_rfc3339_seconds(i.not_after)
        )),
        Ok(Err(e)) => Response::err(e),
        Err(_) => Response::err("the certificate task has stopped"),
    }
}

/// The CLI side: send one request, wait for the answer. `Err` means no daemon answered.
pub async fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("no berth daemon answers on {}: {e}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| format!("writing to {}: {e}", socket.display()))?;
    let mut answer = String::new();
    tokio::time::timeout(timeout, BufReader::new(read).read_line(&mut answer))
        .await
        .map_err(|_| format!("berth did not answer within {timeout:?}"))?
        .map_err(|e| format!("reading from {}: {e}", socket.display()))?;
    serde_json::from_str(&answer).map_err(|e| format!("unreadable answer from berth: {e}"))
}
