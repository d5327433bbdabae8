//! Accept loops with the limits a public listener needs, and a graceful stop.
//!
//! One function, [`serve`], runs a listener (plain or TLS) until its shutdown token fires,
//! then stops accepting, tells every connection to finish its in-flight requests, and waits
//! for them (and for upgraded tunnels such as WebSockets) up to a deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::liveness::Liveness;
use crate::write_batch::{write_batch, BatchFlusher};
use crate::Body;

/// Protection against slow and greedy clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for a request's head, counted from when the connection starts waiting
    /// for it. hyper starts this clock at the end of the previous response, so it is also
    /// the keep-alive idle timeout for HTTP/1.1. Keep it above the load balancer's idle
    /// timeout (ALB: 60 s), or the ALB reuses a connection we just closed and answers 502.
    pub header_read_timeout: Duration,
    /// TLS handshake deadline: a client that opens a socket and says nothing is dropped.
    pub handshake_timeout: Duration,
    /// Maximum size of a request head (request line + headers), in bytes.
    pub max_header_bytes: usize,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// HTTP/2 PING interval; a peer that stops answering is disconnected.
    pub h2_keep_alive: Duration,
    /// A connection that starts no request for this long is asked to close (HTTP/2:
    /// GOAWAY; streams still running finish). PINGs keep an idle HTTP/2 connection alive
    /// forever otherwise, each holding one of `max_connections`. HTTP/1.1 already closes
    /// after `header_read_timeout` without a request.
    pub idle_timeout: Duration,
    /// On stop, how long a connection accepted just before, which has not sent its first
    /// request yet, still waits for it. The client connected while we were accepting and
    /// its request is on the way; closing would fail it (an empty reply or a reset).
    pub first_request_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(75),
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            h2_keep_alive: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            first_request_grace: Duration::from_secs(1),
        }
    }
}

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as a header value, for `X-Forwarded-For`: made once per connection
    /// rather than per request.
    pub peer_header: http::HeaderValue,
    pub local: SocketAddr,
    pub tls: bool,
    /// Spawn long-lived work tied to this listener (upgraded tunnels) here, so a graceful
    /// stop waits for it.
    pub tasks: TaskTracker,
}

/// A request handler. Implementations never fail: errors become responses.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: http::Request<Incoming>,
        conn: &ConnInfo,
    ) -> impl Future<Output = http::Response<Body>> + Send;
}

/// Serves `listener` with `handler` until `shutdown` fires, then drains for up to `drain`.
///
/// With `tls` set, connections are TLS with ALPN (h2 or http/1.1); without, plain HTTP/1.1
/// (and h2c prior knowledge, which hyper-util's auto builder detects for free).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    handler: Arc<H>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    serve_with_permits(listener, tls, limits, handler, shutdown, drain, permits).await
}

/// [`serve`] from `threads` OS threads, each running its own single-threaded tokio runtime
/// that accepts on the same socket and serves the connections it accepted.
///
/// Why not the multi-thread runtime the rest of the daemon uses: measured with the same
/// binary, its scheduler costs 11 % more CPU per proxied HTTP/1.1 request than a
/// current-thread runtime (docs/benchmarks.md), with the same instruction count: work
/// stealing, cross-thread wakeups and shared timer state cost cache traffic on every
/// request. A connection never moves between threads here, and the app connections it uses
/// are pooled per thread ([`crate::upstream`]). Idle threads share the listener: the kernel
/// wakes them all for a new connection and one wins the accept; with a few threads per
/// instance that is cheap. `max_connections` counts across all threads.
///
/// Each thread beats a heart in `liveness` from its event loop (see [`crate::liveness`]), so
/// a watchdog can see a thread that has stopped turning.
///
/// Returns when every thread has drained (as [`serve`] does). A thread that cannot start
/// its runtime is logged and the others serve; with none, it returns at once.
#[allow(clippy::too_many_arguments)]
pub async fn serve_per_core<H: Handler>(
    listener: std::net::TcpListener,
    threads: usize,
    liveness: Liveness,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    handler: Arc<H>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut done = Vec::new();
    for index in 0..threads.max(1) {
        let listener = match listener.try_clone().and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listening socket with a proxy thread");
                continue;
            }
        };
        let (tls, limits, handler, shutdown, permits) =
            (tls.clone(), limits.clone(), handler.clone(), shutdown.clone(), permits.clone());
        let name = format!("berth-proxy-{index}");
        let heart = liveness.add(name.clone());
        let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
        let started = std::thread::Builder::new().name(name).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, thread = index, "cannot start a proxy thread's runtime");
                    return;
                }
            };
            crate::upstream::use_pool_slot(index);
            // Dropped with the runtime when this thread ends, which marks the heart stopped.
            runtime.spawn(heart.keep_beating());
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve_with_permits(listener, tls, limits, handler, shutdown, drain, permits).await,
                    Err(e) => tracing::error!(error = %e, thread = index, "cannot register the listening socket"),
                }
            });
            let _ = finished.send(());
        });
        match started {
            Ok(_) => done.push(finished_rx),
            Err(e) => tracing::error!(error = %e, "cannot start a proxy thread"),
        }
    }
    drop(listener);
    for rx in done {
        // Err: the thread ended without saying so (it could not build its runtime).
        let _ = rx.await;
    }
}

async fn serve_with_permits<H: Handler>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    handler: Arc<H>,
    shutdown: CancellationToken,
    drain: Duration,
    permits: Arc<Semaphore>,
) {
    let local = listener.local_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let tasks = TaskTracker::new();
    let builder = Arc::new(http_builder(&limits));

    loop {
        // Take a connection slot before accepting: at the limit, new clients queue in the
        // kernel instead of being accepted and starved.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: log, breathe, go on. Never exit the accept loop.
                    tracing::warn!(error = %e, %local, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ConnInfo {
            peer,
            peer_header: http::HeaderValue::from_str(&peer.ip().to_canonical().to_string())
                .unwrap_or(http::HeaderValue::from_static("unknown")),
            local,
            tls: acceptor.is_some(),
            tasks: tasks.clone(),
        });
        let handler = handler.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        let handshake_timeout = limits.handshake_timeout;
        let header_read_timeout = limits.header_read_timeout;
        let first_request_grace = limits.first_request_grace;
        let idle_timeout = limits.idle_timeout;
        tasks.spawn(async move {
            let _permit = permit;
            // Set when the first request's head has arrived (see the stop below).
            let first_request = Arc::new(tokio::sync::Notify::new());
            // Requests started on this connection, for the idle timeout.
            let started = Arc::new(AtomicU64::new(0));
            let service = {
                let conn = conn.clone();
                let first_request = first_request.clone();
                let started = started.clone();
                hyper::service::service_fn(move |req| {
                    // Stores a permit: a stop that looks later finds it.
                    first_request.notify_one();
                    started.fetch_add(1, Ordering::Relaxed);
                    let handler = handler.clone();
                    let conn = conn.clone();
                    // Boxed: hyper runs each HTTP/2 stream's future in a task of its own, and
                    // tokio moves a task's future (spawn, completion) by copying it whole. The
                    // forwarding future is a few kilobytes; one allocation costs less than
                    // copying it several times per request.
                    Box::pin(async move { Ok::<_, std::convert::Infallible>(handler.handle(req, &conn).await) })
                })
            };
            // The handshake is not cut short by a stop: it is bounded by its own timeout,
            // and the client is about to send a request we will answer.
            let mut h2 = false;
            let io = match acceptor {
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                        Either::Right(s)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                None => Either::Left(stream),
            };
            let io = SniffDeadline::new(io, header_read_timeout);
            let (io, flusher) = if h2 {
                let (io, flusher) = write_batch(io);
                (Either::Right(io), Some(flusher))
            } else {
                (Either::Left(io), None)
            };
            let mut conn =
                Served { conn: Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service)), flusher };
            // On shutdown, ask the connection to finish in-flight requests (HTTP/1.1 closes
            // after the current response, HTTP/2 sends GOAWAY) and wait for that. A
            // connection that has not delivered its first request yet gets a short grace
            // for it first: asked to stop before that, hyper closes it unanswered (the
            // client connected in the moment before the stop and sees its request fail).
            let mut seen = 0;
            let result = loop {
                tokio::select! {
                    r = &mut conn => break r,
                    _ = shutdown.cancelled() => {
                        let grace = tokio::time::sleep(first_request_grace);
                        let finished = tokio::select! {
                            r = &mut conn => Some(r),
                            _ = first_request.notified() => None,
                            _ = grace => None,
                        };
                        break match finished {
                            Some(r) => r,
                            None => {
                                conn.conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                    }
                    _ = tokio::time::sleep(idle_timeout) => {
                        let now = started.load(Ordering::Relaxed);
                        if now == seen {
                            tracing::debug!(%peer, "closing a connection idle for {idle_timeout:?}");
                            conn.conn.as_mut().graceful_shutdown();
                            break conn.await;
                        }
                        seen = now;
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    // Stop accepting: dropping the listener closes the socket (a systemd-provided socket
    // stays open in systemd, which queues new connections for our successor).
    drop(listener);
    tasks.close();
    let drained = tokio::time::timeout(drain, tasks.wait()).await;
    match drained {
        Ok(()) => tracing::debug!(%local, "listener drained"),
        Err(_) => {
            tracing::warn!(%local, remaining = tasks.len(), "drain deadline reached; closing remaining connections")
        }
    }
}

/// hyper's connection future, and the flush its HTTP/2 write batch is owed whenever a poll of
/// it ends (see [`crate::write_batch`]).
struct Served<C, I> {
    conn: Pin<Box<C>>,
    flusher: Option<BatchFlusher<I>>,
}

impl<C: Future, I: AsyncWrite + Unpin> Future for Served<C, I> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let polled = self.conn.as_mut().poll(cx);
        if polled.is_pending() {
            if let Some(flusher) = &self.flusher {
                flusher.flush(cx);
            }
        }
        polled
    }
}

/// The first bytes of an HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Closes a connection that has not shown which protocol it speaks within the header read
/// timeout.
///
/// hyper-util's auto builder reads the first bytes itself to tell HTTP/1.1 from an h2 preface,
/// and hyper's header read timeout only starts once it has decided. Without this deadline a
/// client that connects (or completes a TLS handshake) and then sends nothing, or only part of
/// the h2 preface, holds its connection slot forever. The deadline ends as soon as a byte
/// differs from the preface (HTTP/1.1: hyper's own timer takes over) or the whole preface has
/// arrived (h2).
struct SniffDeadline<I> {
    io: I,
    /// `None` once the protocol is known.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes of [`H2_PREFACE`] seen so far.
    matched: usize,
}

impl<I> SniffDeadline<I> {
    fn new(io: I, timeout: Duration) -> Self {
        SniffDeadline { io, deadline: Some(Box::pin(tokio::time::sleep(timeout))), matched: 0 }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SniffDeadline<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return poll;
        };
        match &poll {
            Poll::Ready(Ok(())) => {
                for &b in &buf.filled()[before..] {
                    if b != H2_PREFACE[this.matched] {
                        this.deadline = None;
                        break;
                    }
                    this.matched += 1;
                    if this.matched == H2_PREFACE.len() {
                        this.deadline = None;
                        break;
                    }
                }
            }
            Poll::Pending => {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the header read timeout",
                    )));
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SniffDeadline<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.h2_keep_alive)
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(250);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers with the name of the thread that served the request.
    struct WhichThread;

    impl Handler for WhichThread {
        async fn handle(&self, _req: http::Request<Incoming>, _conn: &ConnInfo) -> http::Response<crate::Body> {
            let name = std::thread::current().name().unwrap_or("unnamed").to_owned();
            crate::text_response(http::StatusCode::OK, &name)
        }
    }

    /// Blocks its thread (as a handler doing blocking I/O by mistake would) for `/block`.
    struct BlocksOnRequest;

    impl Handler for BlocksOnRequest {
        async fn handle(&self, req: http::Request<Incoming>, _conn: &ConnInfo) -> http::Response<crate::Body> {
            if req.uri().path() == "/block" {
                std::thread::sleep(Duration::from_millis(1500));
            }
            crate::text_response(http::StatusCode::OK, "done")
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_proxy_thread_that_stops_turning_is_reported_stalled() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let liveness = Liveness::new(Duration::from_millis(100));
        let server = tokio::spawn(serve_per_core(
            listener,
            1,
            liveness.clone(),
            None,
            Limits::default(),
            Arc::new(BlocksOnRequest),
            shutdown.clone(),
            Duration::from_secs(2),
        ));
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 200"));
        assert!(liveness.stalled(Duration::from_millis(400)).is_empty(), "a serving thread is alive");

        let blocked = tokio::spawn(async move { get(addr, "/block").await });
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(liveness.stalled(Duration::from_millis(400)), vec!["berth-proxy-0".to_string()]);

        assert!(blocked.await.unwrap().starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(liveness.stalled(Duration::from_millis(400)).is_empty(), "beating again once unblocked");

        shutdown.cancel();
        server.await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(liveness.stalled(Duration::from_millis(400)).is_empty(), "a drained thread is not stalled");
    }

    #[tokio::test]
    async fn per_core_threads_serve_every_connection_and_stop_together() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_per_core(
            listener,
            2,
            Liveness::default(),
            None,
            Limits::default(),
            Arc::new(WhichThread),
            shutdown.clone(),
            Duration::from_secs(2),
        ));

        // Many connections at once, so both threads get to accept some.
        let clients: Vec<_> = (0..40)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    out
                })
            })
            .collect();
        let mut threads = std::collections::BTreeSet::new();
        for c in clients {
            let out = c.await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            let name = out.rsplit("\r\n\r\n").next().unwrap().trim().to_owned();
            assert!(name.starts_with("berth-proxy-"), "served on {name:?}, not a proxy thread");
            threads.insert(name);
        }
        assert!(threads.len() <= 2, "{threads:?}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("every proxy thread stopped and drained")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed once serve_per_core returns"
        );
    }
}
