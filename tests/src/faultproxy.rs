//! A small HTTP proxy in front of moto that answers chosen requests with an AWS JSON error
//! instead of forwarding them. moto models neither throttling nor IAM, and real SSM sends
//! both; this is how berth's handling of them is tested against otherwise real responses.
//!
//! It runs on its own thread with its own Tokio runtime, so a plain `#[test]` driving the
//! `berth` binary and a `#[tokio::test]` calling the library can both use it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An error answer, shaped like the AWS JSON 1.1 protocol's (SSM, Secrets Manager, KMS).
#[derive(Debug, Clone)]
pub struct Fault {
    pub status: u16,
    pub error_type: String,
    pub message: String,
    /// Only requests for this action (the part after the dot in `X-Amz-Target`, e.g.
    /// `GetParameters`) get the fault; `None`: every request.
    pub action: Option<String>,
}

impl Fault {
    pub fn new(status: u16, error_type: &str, message: &str) -> Fault {
        Fault { status, error_type: error_type.into(), message: message.into(), action: None }
    }

    /// What SSM answers when a caller exceeds its request rate.
    pub fn throttling() -> Fault {
        Fault::new(400, "ThrottlingException", "Rate exceeded")
    }

    /// What SSM answers when the role lacks the action, with IAM's usual message.
    pub fn access_denied(action: &str, resource_arn: &str) -> Fault {
        Fault::new(
            400,
            "AccessDeniedException",
            &format!(
                "User: arn:aws:sts::123456789012:assumed-role/berth-instance/i-0123456789abcdef0 is not \
                 authorized to perform: {action} on resource: {resource_arn} because no identity-based \
                 policy allows the {action} action"
            ),
        )
    }

    /// An internal error, as SSM sends during a partial outage.
    pub fn internal() -> Fault {
        Fault::new(500, "InternalServerError", "An internal error occurred")
    }

    /// Restricts the fault to requests for `action`, e.g. `"GetParameters"`.
    pub fn for_action(mut self, action: &str) -> Fault {
        self.action = Some(action.into());
        self
    }

    fn applies_to(&self, action: &str) -> bool {
        self.action.as_deref().is_none_or(|a| a == action)
    }
}

#[derive(Debug, Clone)]
enum Mode {
    Forward,
    /// The next `n` matching requests get the fault, then forwarding resumes.
    FailNext(usize, Fault),
    FailAlways(Fault),
}

#[derive(Debug, Default)]
struct Counters {
    /// `X-Amz-Target` action of every request, in order.
    actions: Vec<String>,
    faults: usize,
}

struct Shared {
    mode: Mutex<Mode>,
    counters: Mutex<Counters>,
}

/// The running proxy. Dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts forwarding everything to `upstream` (e.g. moto's `http://127.0.0.1:5000`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: http::Uri = upstream.parse().expect("upstream URL");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared { mode: Mutex::new(Mode::Forward), counters: Mutex::new(Counters::default()) });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(serve(listener, upstream, state, stop_rx));
            })
            .unwrap();
        FaultProxy { addr, shared, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// The URL to give berth as `[aws] endpoint_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next `n` requests (matching the fault's action, if it has one) get `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        *self.shared.mode.lock().unwrap() = Mode::FailNext(n, fault);
    }

    /// Every matching request gets `fault` until [`forward`](Self::forward).
    pub fn fail_always(&self, fault: Fault) {
        *self.shared.mode.lock().unwrap() = Mode::FailAlways(fault);
    }

    /// Back to forwarding everything.
    pub fn forward(&self) {
        *self.shared.mode.lock().unwrap() = Mode::Forward;
    }

    /// How many requests arrived (answered with a fault or forwarded).
    pub fn requests(&self) -> usize {
        self.shared.counters.lock().unwrap().actions.len()
    }

    /// How many requests were answered with a fault.
    pub fn faults(&self) -> usize {
        self.shared.counters.lock().unwrap().faults
    }

    /// The action of every request so far, e.g. `["GetParametersByPath", "GetParameters"]`.
    pub fn actions(&self) -> Vec<String> {
        self.shared.counters.lock().unwrap().actions.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    upstream: http::Uri,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let (client, upstream, shared) = (client.clone(), upstream.clone(), shared.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| handle(req, client.clone(), upstream.clone(), shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: http::Uri,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let action = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_string();
    let fault = {
        let mut mode = shared.mode.lock().unwrap();
        match &mut *mode {
            Mode::FailAlways(f) if f.applies_to(&action) => Some(f.clone()),
            Mode::FailNext(n, f) if *n > 0 && f.applies_to(&action) => {
                *n -= 1;
                Some(f.clone())
            }
            _ => None,
        }
    };
    {
        let mut c = shared.counters.lock().unwrap();
        c.actions.push(action);
        c.faults += usize::from(fault.is_some());
    }
    if let Some(f) = fault {
        // Drain the request so the client can reuse the connection, as AWS would allow.
        let _ = req.into_body().collect().await;
        let body = serde_json::json!({ "__type": f.error_type, "message": f.message }).to_string();
        return Ok(Response::builder()
            .status(f.status)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amzn-errortype", &f.error_type)
            .header("x-amzn-requestid", "00000000-0000-0000-0000-000000000000")
            .body(Full::new(Bytes::from(body)))
            .unwrap());
    }
    Ok(forward(req, &client, &upstream).await.unwrap_or_else(|e| {
        Response::builder()
            .status(502)
            .body(Full::new(Bytes::from(format!("fault proxy: upstream failed: {e}"))))
            .unwrap()
    }))
}

async fn forward(
    req: Request<Incoming>,
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &http::Uri,
) -> Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri =
        format!("{}://{}{}", upstream.scheme_str().unwrap_or("http"), upstream.authority().unwrap(), path).parse()?;
    // The signed Host header stays as the client sent it: moto does not check signatures.
    let resp = client.request(Request::from_parts(parts, Full::new(body))).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
