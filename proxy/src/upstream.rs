//! Keep-alive HTTP/1.1 connections to one app container.
//!
//! Each [`Backend`](crate::routes::Backend) owns one [`ConnPool`], so connections live and die
//! with the container address they point at: when a rollout swaps the backend and the last
//! in-flight request on the old one finishes, its idle connections are dropped with it.
//!
//! Why not hyper-util's pooled `Client`: it keys its pool by scheme and authority (an
//! absolute URI rebuilt per request), moves large futures through several layers and takes
//! a global pool lock twice per request; profiling showed it as the proxy's largest cost
//! after TLS and HTTP parsing. Here a request costs one short lock to pop an idle sender and
//! one to push it back when the response body is done.
//!
//! The pool also caps the connections to one container (`max_connections` per app, default
//! [`DEFAULT_MAX_CONNS`]). Every connection serves one request at a time, so requests in
//! flight are capped (a semaphore), and a request past the cap waits for a connection to
//! come free instead of opening yet another one: an HTTP/2 client multiplexing hundreds of
//! streams cannot make us open hundreds of sockets. Idle connections are kept per thread, so
//! a thread that finds none of its own could still open one while other threads' sit idle;
//! open connections are therefore counted too (a connection takes its place before it is
//! opened and keeps it until its socket is closed), and at the cap a request takes an idle
//! connection from any thread, or waits for one being closed to go.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Connections to one container at most unless the app sets its own cap, idle or carrying a
/// request (so also requests in flight; WebSocket tunnels aside).
pub const DEFAULT_MAX_CONNS: usize = 256;

/// The most an app connection's read buffer may hold, and so the largest response head an
/// app may send (nginx's default `proxy_buffer_size` is 4 KiB; hyper's default, about
/// 400 KiB, would let one app connection hold that much of our memory). Bodies are read
/// through it in pieces of at most this size.
pub const MAX_READ_BUF: usize = 16 * 1024;

/// Why a request could not be sent to the app.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP/1.1 handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("{source}")]
    Request { source: hyper::Error },
    #[error("the connection pool was shut down")]
    PoolClosed,
}

impl UpstreamError {
    /// The app was not there at all (nothing listening, or too slow to accept).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. })
    }

    /// The app's response head did not fit in [`MAX_READ_BUF`].
    pub fn is_head_too_large(&self) -> bool {
        matches!(self, UpstreamError::Request { source } if source.is_parse_too_large())
    }
}

/// How long idle connections are kept and how long a connect may take.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimeouts {
    pub connect: Duration,
    pub idle: Duration,
}

/// Idle connections to one address, and the cap on connections in use.
///
/// The idle connections are kept per proxy thread ([`use_pool_slot`]): a connection's task
/// runs on the runtime of the thread that opened it, and a request from another thread
/// would cost two cross-thread wakeups (request over, response back). The cap is shared,
/// and at the cap a thread uses another thread's idle connection rather than open one.
#[derive(Debug)]
pub struct ConnPool {
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// One permit per connection allowed to carry a request; `limit` permits in all, less
    /// any being withdrawn after the cap was lowered.
    in_use: Arc<Semaphore>,
    limit: AtomicUsize,
    /// Connections open to the app now, idle or busy (upgraded tunnels leave the count).
    open: Arc<AtomicUsize>,
    /// Requests waiting for a connection because the cap is reached.
    waiting: Arc<AtomicUsize>,
    /// When the journal was last told this pool is at its cap, so a burst is reported once
    /// a minute, not once per request. Only requests that must wait touch it.
    last_at_cap_warning: Mutex<Option<Instant>>,
    /// For a request that may start but finds the cap's worth of connections open and none
    /// idle (the others are being closed): woken when one goes idle or is closed.
    freed: Arc<Freed>,
}

/// A wakeup for requests waiting on a connection to go idle or be closed. Those who make one
/// free look at `waiters` first, so the common case (nobody waits) costs a read.
#[derive(Debug, Default)]
struct Freed {
    notify: Notify,
    waiters: Arc<AtomicUsize>,
}

impl Freed {
    /// Called after a connection went idle or closed. SeqCst pairs with [`ConnPool::wait_for_one`]:
    /// either this sees the waiter, or the waiter's second look sees what was freed.
    fn wake(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// Which connection a request takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    /// This thread's idle one, else a new one under the cap, else any thread's idle one.
    Any,
    /// A new one: the request is sent again after a kept-alive connection failed, and the
    /// app may have closed all of its idle ones at once (its keep-alive timeout). At the cap,
    /// one idle connection is closed to make room.
    Fresh,
    /// A new one, room made already: waits for the place rather than close another.
    FreshRoomMade,
    /// Woken while waiting for that place: a new one if there is room, else any idle one
    /// (the top of a list is the most recently checked in, likely the one that woke it).
    FreshOrIdle,
}

/// Where a request's connection comes from.
enum Ready {
    Idle(Sender),
    /// A new one, its place under the cap taken already.
    Open(OpenPlace),
}

/// A pool's counts at one moment (for metrics and status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open to the app, idle or carrying a request.
    pub open: usize,
    /// Of those, idle ones kept for reuse.
    pub idle: usize,
    /// Requests waiting for a connection to come free (the cap is reached).
    pub waiting: usize,
    /// The cap (`max_connections`).
    pub limit: usize,
}

/// How often at most the journal hears that one pool is at its cap.
const AT_CAP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Per-thread idle lists in each pool; threads beyond this share lists (still correct,
/// with cross-thread wakeups).
const POOL_SLOTS: usize = 64;

thread_local! {
    static POOL_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread use idle list `index` of every pool (see [`ConnPool`]). Called once
/// by each proxy thread; other threads use list 0.
pub fn use_pool_slot(index: usize) {
    POOL_SLOT.with(|s| s.set(index % POOL_SLOTS));
}

fn local_slot() -> usize {
    POOL_SLOT.with(|s| s.get())
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

type Sender = http1::SendRequest<UpstreamBody>;

impl Default for ConnPool {
    fn default() -> Self {
        ConnPool::new(DEFAULT_MAX_CONNS)
    }
}

impl ConnPool {
    /// A pool that opens at most `max_conns` connections (at least one).
    pub fn new(max_conns: usize) -> Self {
        let max_conns = max_conns.max(1);
        ConnPool {
            idle: (0..POOL_SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
            in_use: Arc::new(Semaphore::new(max_conns)),
            limit: AtomicUsize::new(max_conns),
            open: Arc::new(AtomicUsize::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            last_at_cap_warning: Mutex::new(None),
            freed: Arc::default(),
        }
    }

    /// Open, idle and waiting counts now.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            open: self.open.load(Ordering::Relaxed),
            idle: self.idle_count(),
            waiting: self.waiting.load(Ordering::Relaxed),
            limit: self.limit(),
        }
    }

    /// The cap on connections now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the cap while requests flow (a config reload). Raising it frees permits at
    /// once. Lowering it withdraws permits as requests finish: those in flight run to the end
    /// on the connections they have, and no new request starts until fewer than the new cap
    /// are busy. Idle connections over the cap go unused and are dropped once found idle
    /// past the pool's idle timeout.
    pub fn set_limit(&self, max_conns: usize) {
        let max_conns = max_conns.max(1);
        // A swap: two changes at once each apply the difference from the one before.
        let old = self.limit.swap(max_conns, Ordering::Relaxed);
        if max_conns > old {
            self.in_use.add_permits(max_conns - old);
            self.freed.wake();
        } else if max_conns < old {
            let excess = (old - max_conns) as u32;
            // Permits free now are withdrawn now; the rest as the requests holding them end.
            let free_now = (self.in_use.available_permits() as u32).min(excess);
            // A request may take one of them between the count and here; then all go later.
            let withdrawn = match self.in_use.try_acquire_many(free_now) {
                Ok(p) if free_now > 0 => {
                    p.forget();
                    free_now
                }
                _ => 0,
            };
            let later = excess - withdrawn;
            if later > 0 {
                let in_use = self.in_use.clone();
                let withdraw = async move {
                    if let Ok(p) = in_use.acquire_many_owned(later).await {
                        p.forget();
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn(withdraw)),
                    Err(_) => tracing::warn!("no runtime to lower the app connection cap on; it stays at {old}"),
                }
            }
        }
    }

    /// Idle connections right now (for tests and status).
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|slot| slot.lock().map_or(0, |v| v.len())).sum()
    }

    /// Sends `req` (origin-form URI, `Host` set) to `addr`, on an idle connection when
    /// there is one. Returns the response with a body that gives the connection back to the
    /// pool once the app has sent all of it.
    ///
    /// A kept-alive connection can be closed by the app at the moment we reuse it (its
    /// keep-alive timeout fires, or it closes after each response without saying so). A
    /// request that connection refused before sending a byte is sent again on a new
    /// connection; so is an idempotent request without a body, as nginx and Go's client do,
    /// since sending it twice does no harm. Anything else fails with a 502: the app may have
    /// acted on it.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<Incoming>,
        timeouts: PoolTimeouts,
        upgrade: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let permit = match self.in_use.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.warn_at_cap(addr);
                // Counted down however the wait ends (a client that goes away drops it).
                let _waiting = Counted::new(&self.waiting);
                // The semaphore is never closed, so this waits for a free slot and cannot fail.
                self.in_use.clone().acquire_owned().await.map_err(|_| UpstreamError::PoolClosed)?
            }
        };
        let mut replay = replayable_head(&req);
        let mut req = req.map(UpstreamBody::Client);
        let mut want = Want::Any;
        loop {
            let ready = match self.next_connection(timeouts.idle, &mut want) {
                Some(ready) => ready,
                None => self.wait_for_one(timeouts.idle, &mut want).await,
            };
            let mut sender = match ready {
                Ready::Idle(sender) => sender,
                Ready::Open(place) => {
                    // Boxed: connecting is the cold path, and its future is large; unboxed it
                    // would make every request's future (which hyper moves into a task per
                    // HTTP/2 stream) as large.
                    let mut sender = Box::pin(connect(addr, timeouts.connect, place)).await?;
                    return match sender.send_request(req).await {
                        Ok(resp) => Ok(self.wrap(resp, sender, permit, upgrade)),
                        Err(source) => Err(UpstreamError::Request { source }),
                    };
                }
            };
            if sender.ready().await.is_err() {
                continue; // the app closed it while it sat idle
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender, permit, upgrade)),
                Err(mut e) => {
                    if let Some(unsent) = e.take_message() {
                        req = unsent;
                        continue;
                    }
                    let Some(head) = replay.take() else {
                        return Err(UpstreamError::Request { source: e.into_error() });
                    };
                    tracing::debug!(upstream = %addr, error = %e.error(), "kept-alive connection failed; sending the idempotent request again");
                    req = Request::from_parts(head, UpstreamBody::Empty);
                    want = Want::Fresh;
                }
            }
        }
    }

    /// The connection `want` asks for, or `None`: the cap's worth are open and busy or being
    /// closed. This thread's most recently used idle connection comes first (its socket is
    /// the likeliest to be warm and still open), as its task runs on this thread. Connections
    /// idle past `idle_timeout` are closed on the way.
    fn next_connection(&self, idle_timeout: Duration, want: &mut Want) -> Option<Ready> {
        let local = local_slot();
        if *want == Want::Any {
            if let Some(sender) = self.take_idle(local, idle_timeout) {
                return Some(Ready::Idle(sender));
            }
        }
        if let Some(place) = self.reserve_open() {
            return Some(Ready::Open(place));
        }
        if *want == Want::FreshRoomMade {
            return None;
        }
        let any_idle = (0..self.idle.len())
            .map(|i| (local + i) % self.idle.len())
            .find_map(|slot| self.take_idle(slot, idle_timeout));
        match (any_idle, *want) {
            (Some(sender), Want::Any | Want::FreshOrIdle) => Some(Ready::Idle(sender)),
            (Some(sender), _) => {
                // Closed by its task once dropped, which frees the place this request waits for.
                drop(sender);
                *want = Want::FreshRoomMade;
                None
            }
            (None, _) => None,
        }
    }

    /// Counts a connection about to be opened, unless the cap's worth are open already. One
    /// atomic step, so threads connecting at once cannot both take the last place.
    fn reserve_open(&self) -> Option<OpenPlace> {
        let limit = self.limit();
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| OpenPlace { open: self.open.clone(), freed: self.freed.clone() })
    }

    /// Waits until [`Self::next_connection`] has one: a connection went idle, or one being
    /// closed is gone. Rare (the cap's worth are open, and some of them closing), so the
    /// registration stays off the common path. Counted with the requests waiting at the cap.
    async fn wait_for_one(&self, idle_timeout: Duration, want: &mut Want) -> Ready {
        let _waiting = Counted::new(&self.waiting);
        let _waiter = Counted::new(&self.freed.waiters);
        loop {
            let notified = self.freed.notify.notified();
            tokio::pin!(notified);
            // Registered before looking again, so a wakeup in between is not lost.
            notified.as_mut().enable();
            if let Some(ready) = self.next_connection(idle_timeout, want) {
                return ready;
            }
            notified.await;
            if *want == Want::FreshRoomMade {
                *want = Want::FreshOrIdle;
            }
        }
    }

    fn warn_at_cap(&self, addr: SocketAddr) {
        let mut last = self.last_at_cap_warning.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= AT_CAP_WARNING_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                upstream = %addr,
                max_connections = self.limit(),
                "every connection to the app is busy; requests wait for one to come free (raise the app's max_connections if it can serve more at once)"
            );
        }
    }

    fn take_idle(&self, slot: usize, idle_timeout: Duration) -> Option<Sender> {
        let mut idle = self.idle[slot].lock().ok()?;
        while let Some(c) = idle.pop() {
            if c.since.elapsed() < idle_timeout && !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle[local_slot()].lock() {
            idle.push(Idle { sender, since: Instant::now() });
        }
        self.freed.wake();
    }

    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: Sender,
        permit: OwnedSemaphorePermit,
        upgrade: bool,
    ) -> Response<PooledBody> {
        // An upgraded connection becomes a tunnel and never carries another request. Its
        // permit goes with the (empty) body: tunnels are long-lived and do not count
        // against the cap on requests in flight.
        let reuse = !upgrade && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
        let done = reuse.then(|| (sender, self.clone()));
        resp.map(|body| {
            let mut b = PooledBody { body, done, _permit: permit };
            b.give_back_if_finished();
            b
        })
    }
}

/// Opens a connection in `place`, which it keeps until its socket is closed (or handed over
/// to an upgrade tunnel), or its connect fails.
async fn connect(addr: SocketAddr, timeout: Duration, place: OpenPlace) -> Result<Sender, UpstreamError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
        Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(MAX_READ_BUF)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    // The connection runs in its own task until the app or we close it; `with_upgrades`
    // lets a 101 response hand the socket over to a WebSocket tunnel.
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %addr, error = %e, "app connection closed with an error");
        }
        // The socket is closed (or a tunnel's now): its place under the cap is free.
        drop(place);
    });
    Ok(sender)
}

/// One connection's place under the cap, from just before it is opened until its socket is
/// closed; then a request waiting for a place hears of it.
struct OpenPlace {
    open: Arc<AtomicUsize>,
    freed: Arc<Freed>,
}

impl Drop for OpenPlace {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.freed.wake();
    }
}

/// One in a pool's count (of waiting requests, of requests waiting for a place) until dropped.
/// Only requests that wait make one, so SeqCst (which [`Freed::wake`] relies on) costs
/// nothing on the common path.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The app's response body. When its last byte has been read, the connection goes back to
/// the pool; dropped before that (the client went away), the connection is closed instead,
/// since it still carries the rest of a response nobody will read.
pub struct PooledBody {
    body: Incoming,
    done: Option<(Sender, Arc<ConnPool>)>,
    _permit: OwnedSemaphorePermit,
}

impl PooledBody {
    fn give_back_if_finished(&mut self) {
        if self.body.is_end_stream() {
            if let Some((sender, pool)) = self.done.take() {
                pool.checkin(sender);
            }
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                if let Some((sender, pool)) = this.done.take() {
                    pool.checkin(sender);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.give_back_if_finished(),
            Poll::Ready(Some(Err(_))) => this.done = None,
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The head of a request that may be sent twice: an idempotent method (RFC 9110 §9.2.2)
/// and no body. Cloned only for such requests, before they go out on a reused connection.
fn replayable_head(req: &Request<Incoming>) -> Option<http::request::Parts> {
    use http::Method;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = req.method().clone();
    head.uri = req.uri().clone();
    head.version = req.version();
    head.headers = req.headers().clone();
    Some(head)
}

/// What we send to the app: the client's body, or nothing when a bodiless request is
/// replayed.
pub enum UpstreamBody {
    Client(Incoming),
    Empty,
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Client(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(b) => b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(b) => b.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive app on a free port: `200 ok` to every request, and `204` with no body to
    /// `/empty`. In-process rather than the test app: these tests poll the pool by hand to
    /// stop between a connection being dropped and its task closing it, a moment no client
    /// outside the process can hold still.
    async fn app() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut chunk).await {
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            let answer: &[u8] = if head.starts_with("GET /empty ") {
                                b"HTTP/1.1 204 No Content\r\n\r\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// A request for `app` as the proxy hands one to the pool. Its body is an empty
    /// [`Incoming`], which only hyper can make: taken from a bodiless answer of the app.
    async fn request(app: SocketAddr) -> Request<Incoming> {
        let stream = TcpStream::connect(app).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let empty = Request::get("/empty").header("host", "app").body(http_body_util::Empty::<Bytes>::new()).unwrap();
        let body = sender.send_request(empty).await.unwrap().into_body();
        assert!(body.is_end_stream());
        Request::get("/").header("host", "app").body(body).unwrap()
    }

    /// The cap holds for connections berth is closing too: one dropped for sitting idle too
    /// long is still open until its task has closed it, so its replacement waits for that
    /// instead of making the cap's worth plus one.
    #[tokio::test]
    async fn a_connection_being_closed_still_counts_until_it_is() {
        let app = app().await;
        let pool = Arc::new(ConnPool::new(1));
        let keep = PoolTimeouts { connect: Duration::from_secs(5), idle: Duration::from_secs(60) };
        let resp = pool.send(app, request(app).await, keep, false).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!((pool.stats().open, pool.stats().idle), (1, 1));

        // Idle past a zero idle timeout: the next request drops that connection and needs a
        // new one. Polled once, so the dropped connection's task has not run yet.
        let expire = PoolTimeouts { idle: Duration::ZERO, ..keep };
        let mut next = Box::pin(pool.send(app, request(app).await, expire, false));
        tokio::select! {
            biased;
            _ = &mut next => panic!("answered before the old connection could close"),
            () = std::future::ready(()) => {}
        }
        assert!(pool.stats().open <= 1, "{} connections open to the app; the cap is 1", pool.stats().open);

        let resp = next.await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(pool.stats().open, 1);
    }

    /// A request sent again on a new connection at the cap closes one idle connection to
    /// make room, and waits for that one to close rather than closing more.
    #[tokio::test]
    async fn a_retry_at_the_cap_closes_one_idle_connection_not_more() {
        let app = app().await;
        let pool = Arc::new(ConnPool::new(3));
        let keep = PoolTimeouts { connect: Duration::from_secs(5), idle: Duration::from_secs(60) };
        let (a, b, c) = tokio::join!(
            pool.send(app, request(app).await, keep, false),
            pool.send(app, request(app).await, keep, false),
            pool.send(app, request(app).await, keep, false),
        );
        for resp in [a, b, c] {
            resp.unwrap().into_body().collect().await.unwrap();
        }
        assert_eq!((pool.stats().open, pool.stats().idle), (3, 3));

        let mut want = Want::Fresh;
        assert!(pool.next_connection(keep.idle, &mut want).is_none(), "no place at the cap");
        assert_eq!(want, Want::FreshRoomMade);
        assert_eq!(pool.stats().idle, 2, "one idle connection closed to make room");
        let mut wait = Box::pin(pool.wait_for_one(keep.idle, &mut want));
        tokio::select! {
            biased;
            _ = &mut wait => panic!("a place before the closed connection's task ran"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(pool.stats().idle, 2, "no second idle connection closed while the first closes");
        let ready = wait.await;
        assert!(matches!(ready, Ready::Open(_)), "the freed place, for a new connection");
        assert_eq!((pool.stats().open, pool.stats().idle), (3, 2), "the new one in the closed one's place");
    }

    #[tokio::test]
    async fn lowering_the_cap_waits_for_busy_connections_and_raising_it_frees_at_once() {
        let pool = ConnPool::new(4);
        // Three requests in flight.
        let busy = pool.in_use.clone().acquire_many_owned(3).await.unwrap();
        pool.set_limit(2);
        assert_eq!(pool.in_use.available_permits(), 0, "no new request may start while 3 > 2 are busy");
        drop(busy);
        tokio::task::yield_now().await;
        assert_eq!(pool.in_use.available_permits(), 2, "once they finish, the new cap holds");

        pool.set_limit(5);
        assert_eq!(pool.in_use.available_permits(), 5);
        assert_eq!(pool.limit(), 5);
        pool.set_limit(0);
        assert_eq!(pool.limit(), 1, "a cap of 0 would stop every request; it means 1");
        assert_eq!(pool.in_use.available_permits(), 1);
    }
}
