//! berth-testapp: a tiny HTTP/1.1 + WebSocket app used by berth's end-to-end tests.
//!
//! One OS thread per connection, keep-alive, `httparse` for request heads, `tungstenite`
//! (sync, no TLS) for the WebSocket echo. Built statically so it runs in a `FROM scratch`
//! image. See README.md next to this crate for the endpoints and environment variables.

use std::collections::BTreeMap;
use std::env;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request head (request line + headers) we accept.
const MAX_HEAD: usize = 64 * 1024;
/// Read buffer size; also the chunk size for streaming bodies.
const BUF_SIZE: usize = 64 * 1024;
/// Longest chunk-size / trailer line in a chunked body.
const MAX_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 128;

static START: OnceLock<Instant> = OnceLock::new();
static HOSTNAME: OnceLock<String> = OnceLock::new();
static VERSION: OnceLock<String> = OnceLock::new();
/// Connections open to this app now, counted here rather than read from `/proc/net/tcp`:
/// that file is not a snapshot, and while sockets come and go a read lists some twice.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// One in [`OPEN_CONNECTIONS`] for as long as its connection's thread runs.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::SeqCst);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn version() -> &'static str {
    VERSION.get_or_init(|| env::var("VERSION").unwrap_or_else(|_| "v1".to_string()))
}

fn hostname() -> &'static str {
    HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown".to_string())
    })
}

/// Write one line to stdout; never panics (stdout may be a closed pipe).
fn log(line: std::fmt::Arguments<'_>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}.{:03} testapp: {}", now.as_secs(), now.subsec_millis(), line);
    let _ = out.flush();
}

macro_rules! log {
    ($($arg:tt)*) => { log(format_args!($($arg)*)) };
}

fn main() {
    if let Some(v) = env::var_os("EXIT_AT_START") {
        let v = v.to_string_lossy();
        let code: i32 = v.trim().parse().unwrap_or(1);
        log!("EXIT_AT_START={v}: exiting with code {code}");
        std::process::exit(code);
    }
    START.get_or_init(Instant::now);

    // As PID 1 in a container the kernel ignores signals that have no handler, so install
    // one explicitly: SIGTERM/SIGINT exit 0 at once (in-flight requests are cut).
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let name = if sig == signal_hook::consts::SIGTERM { "SIGTERM" } else { "SIGINT" };
                    log!("got {name}, exiting 0");
                    std::process::exit(0);
                }
            });
        }
        Err(e) => log!("cannot install signal handler: {e}"),
    }

    let addr = match env::var("LISTEN") {
        Ok(a) if !a.is_empty() => a,
        _ => format!("0.0.0.0:{}", env::var("PORT").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "8080".into())),
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            log!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    log!("version {} hostname {} listening on {} pid {}", version(), hostname(), local, std::process::id());

    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let spawned = thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || handle_connection(stream, peer));
                if let Err(e) = spawned {
                    log!("cannot spawn connection thread: {e}");
                }
            }
            Err(e) => {
                log!("accept failed: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A request head, owned.
struct Head {
    method: String,
    target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1
    minor: u8,
    /// lower-cased name, raw value
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
    fn header_str(&self, name: &str) -> Option<String> {
        self.header(name).map(|v| String::from_utf8_lossy(v).into_owned())
    }
    /// True when any `name` header contains `token` in its comma-separated list.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers.iter().filter(|(n, _)| n == name).any(|(_, v)| {
            String::from_utf8_lossy(v).split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn query(&self, key: &str) -> Option<&str> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then_some(v)
        })
    }
}

enum HeadError {
    /// Connection closed cleanly between requests.
    Closed,
    Io(io::Error),
    /// Answer with this status and close.
    Bad(u16, &'static str),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl Conn {
    fn buffered(&self) -> usize {
        self.len - self.pos
    }

    /// Read more bytes into the buffer (compacting first). Returns bytes read, 0 on EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "buffer full"));
        }
        loop {
            match self.stream.read(&mut self.buf[self.len..]) {
                Ok(n) => {
                    self.len += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn read_head(&mut self) -> Result<Head, HeadError> {
        loop {
            if self.buffered() > 0 {
                let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut hdrs);
                match req.parse(&self.buf[self.pos..self.len]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = Head {
                            method: req.method.unwrap_or("").to_string(),
                            target: req.path.unwrap_or("").to_string(),
                            minor: req.version.unwrap_or(1),
                            headers: req
                                .headers
                                .iter()
                                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                                .collect(),
                        };
                        self.pos += n;
                        return Ok(head);
                    }
                    Ok(httparse::Status::Partial) => {
                        if self.buffered() >= MAX_HEAD {
                            return Err(HeadError::Bad(431, "request head too large"));
                        }
                    }
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(HeadError::Bad(431, "too many headers"))
                    }
                    Err(_) => return Err(HeadError::Bad(400, "malformed request")),
                }
            }
            let had = self.buffered();
            if self.fill()? == 0 {
                return Err(if had == 0 {
                    HeadError::Closed
                } else {
                    HeadError::Io(io::ErrorKind::UnexpectedEof.into())
                });
            }
        }
    }

    /// One line without its CR LF.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..self.len].iter().position(|&b| b == b'\n') {
                let mut line = self.buf[self.pos..self.pos + i].to_vec();
                self.pos += i + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buffered() > MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Consume exactly `n` body bytes.
    fn discard(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.buffered() == 0 {
                self.pos = 0;
                self.len = 0;
                if self.fill()? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            let take = (self.buffered() as u64).min(n);
            self.pos += take as usize;
            n -= take;
        }
        Ok(())
    }

    /// Read and discard a chunked body, returning the number of payload bytes.
    fn discard_chunked(&mut self) -> io::Result<u64> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        let mut total = 0u64;
        loop {
            let line = self.read_line()?;
            let line = String::from_utf8_lossy(&line);
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // trailers until an empty line
                while !self.read_line()?.is_empty() {}
                return Ok(total);
            }
            self.discard(size)?;
            total += size;
            if !self.read_line()?.is_empty() {
                return Err(bad("missing CRLF after chunk"));
            }
        }
    }
}

enum Body {
    None,
    Length(u64),
    Chunked,
}

fn body_kind(head: &Head) -> Result<Body, &'static str> {
    if head.header("transfer-encoding").is_some() {
        let te: Vec<String> = head
            .headers
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .flat_map(|(_, v)| {
                String::from_utf8_lossy(v).split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>()
            })
            .collect();
        return if te.last().map(String::as_str) == Some("chunked") {
            Ok(Body::Chunked)
        } else {
            Err("unsupported transfer-encoding")
        };
    }
    let mut len: Option<u64> = None;
    for (n, v) in &head.headers {
        if n == "content-length" {
            for part in String::from_utf8_lossy(v).split(',') {
                let l: u64 = part.trim().parse().map_err(|_| "bad content-length")?;
                if len.is_some_and(|old| old != l) {
                    return Err("conflicting content-length");
                }
                len = Some(l);
            }
        }
    }
    Ok(match len {
        Some(0) | None => Body::None,
        Some(l) => Body::Length(l),
    })
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Stream this many generated bytes instead of `body`.
    stream_len: Option<u64>,
    close: bool,
    exit_code: Option<i32>,
    extra: Vec<(&'static str, String)>,
}

impl Response {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            stream_len: None,
            close: false,
            exit_code: None,
            extra: Vec::new(),
        }
    }
    fn json(v: &BTreeMap<String, String>) -> Self {
        let mut r = Response::text(200, serde_json::to_vec(v).unwrap_or_default());
        r.content_type = "application/json";
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn handle_connection(stream: TcpStream, peer: SocketAddr) {
    let _open = OpenConnection::new();
    let _ = stream.set_nodelay(true);
    let mut conn = Conn { stream, buf: vec![0u8; BUF_SIZE], pos: 0, len: 0 };
    loop {
        let head = match conn.read_head() {
            Ok(h) => h,
            Err(HeadError::Closed) => return,
            Err(HeadError::Io(e)) => {
                if e.kind() != io::ErrorKind::UnexpectedEof && e.kind() != io::ErrorKind::ConnectionReset {
                    log!("peer={peer} read error: {e}");
                }
                return;
            }
            Err(HeadError::Bad(status, msg)) => {
                log!("peer={peer} bad request: {msg} -> {status}");
                let mut r = Response::text(status, msg);
                r.close = true;
                let _ = write_response(&mut conn.stream, &r, false);
                let _ = conn.stream.shutdown(Shutdown::Write);
                return;
            }
        };
        let started = Instant::now();

        if head.path() == "/ws" {
            handle_ws(conn, head, peer);
            return;
        }

        // Read (and count) the request body for every route so keep-alive stays in sync.
        let body = match body_kind(&head) {
            Ok(b) => b,
            Err(msg) => {
                log!("peer={peer} {} {} bad body framing: {msg}", head.method, head.target);
                let mut r = Response::text(400, msg);
                r.close = true;
                let _ = write_response(&mut conn.stream, &r, false);
                return;
            }
        };
        if !matches!(body, Body::None)
            && head.has_token("expect", "100-continue")
            && conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let body_len = match body {
            Body::None => Ok(0),
            Body::Length(n) => conn.discard(n).map(|_| n),
            Body::Chunked => conn.discard_chunked(),
        };
        let body_len = match body_len {
            Ok(n) => n,
            Err(e) => {
                log!("peer={peer} {} {} error reading body: {e}", head.method, head.target);
                return;
            }
        };

        let mut resp = route(&head, body_len, peer);
        let keep_alive = if head.minor == 0 {
            head.has_token("connection", "keep-alive")
        } else {
            !head.has_token("connection", "close")
        };
        if !keep_alive {
            resp.close = true;
        }
        let head_only = head.method == "HEAD";
        let result = write_response(&mut conn.stream, &resp, head_only);
        let len = if head_only { 0 } else { resp.stream_len.unwrap_or(resp.body.len() as u64) };
        log!(
            "peer={peer} {} {} -> {} body_in={} body_out={} {:.1}ms{}",
            head.method,
            head.target,
            resp.status,
            body_len,
            len,
            started.elapsed().as_secs_f64() * 1000.0,
            match &result {
                Ok(()) => String::new(),
                Err(e) => format!(" write error: {e}"),
            }
        );
        if let Some(code) = resp.exit_code {
            let _ = conn.stream.flush();
            let _ = conn.stream.shutdown(Shutdown::Write);
            log!("exiting with code {code} (requested by /exit)");
            std::process::exit(code);
        }
        if result.is_err() || resp.close {
            let _ = conn.stream.shutdown(Shutdown::Write);
            return;
        }
    }
}

fn parse_num<T: std::str::FromStr>(head: &Head, key: &str, default: T) -> Result<T, Response> {
    match head.query(key) {
        None | Some("") => Ok(default),
        Some(v) => v.parse().map_err(|_| Response::text(400, format!("bad query parameter {key}={v}"))),
    }
}

fn route(head: &Head, body_len: u64, peer: SocketAddr) -> Response {
    let r = match head.path() {
        "/health" => Ok(health()),
        "/env" => {
            let env: BTreeMap<String, String> = env::vars_os()
                .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
                .collect();
            Ok(Response::json(&env))
        }
        "/headers" => {
            let mut map: BTreeMap<String, String> = BTreeMap::new();
            for (n, v) in &head.headers {
                let v = String::from_utf8_lossy(v);
                map.entry(n.clone())
                    .and_modify(|old| {
                        old.push_str(", ");
                        old.push_str(&v);
                    })
                    .or_insert_with(|| v.into_owned());
            }
            map.insert("_method".into(), head.method.clone());
            map.insert("_path".into(), head.target.clone());
            map.insert("_version".into(), format!("HTTP/1.{}", head.minor));
            map.insert("_peer".into(), peer.to_string());
            Ok(Response::json(&map))
        }
        "/sleep" => parse_num::<u64>(head, "ms", 0).map(|ms| {
            // Read when the request arrives, so a proxy's connection cap can be checked from
            // the responses: at most that many connections are open while any request waits.
            let open = OPEN_CONNECTIONS.load(Ordering::SeqCst);
            thread::sleep(Duration::from_millis(ms));
            let mut r = Response::text(200, format!("slept {ms}"));
            r.extra.push(("x-open-connections", open.to_string()));
            r
        }),
        "/exit" => parse_num::<i32>(head, "code", 0).map(|code| {
            let mut r = Response::text(200, format!("exiting {code}"));
            r.close = true;
            r.exit_code = Some(code);
            r
        }),
        "/upload" => Ok(Response::text(200, body_len.to_string())),
        "/big-header" => parse_num::<usize>(head, "bytes", 0).map(|n| {
            let mut r = Response::text(200, "big header\n");
            r.extra.push(("x-filler", "f".repeat(n)));
            r
        }),
        "/download" => parse_num::<u64>(head, "bytes", 0).map(|n| {
            let mut r = Response::text(200, Vec::new());
            r.content_type = "application/octet-stream";
            r.stream_len = Some(n);
            r
        }),
        _ => Ok(Response::text(200, format!("testapp {} {}\n", version(), hostname()))),
    };
    r.unwrap_or_else(|e| e)
}

fn health() -> Response {
    if env::var("HEALTH_FAIL").is_ok_and(|v| v.trim() == "1") {
        return Response::text(500, "unhealthy (HEALTH_FAIL=1)");
    }
    if let Some(delay) = env::var("HEALTH_DELAY_MS").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        let elapsed = START.get().map(|s| s.elapsed()).unwrap_or_default();
        if elapsed < Duration::from_millis(delay) {
            return Response::text(503, format!("starting ({}ms of {}ms)", elapsed.as_millis(), delay));
        }
    }
    Response::text(200, "ok")
}

fn write_response(stream: &mut TcpStream, r: &Response, head_only: bool) -> io::Result<()> {
    let len = r.stream_len.unwrap_or(r.body.len() as u64);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nx-testapp-version: {}\r\nconnection: {}\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        len,
        version(),
        if r.close { "close" } else { "keep-alive" },
    )
    .into_bytes();
    for (n, v) in &r.extra {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if head_only {
        return stream.write_all(&out);
    }
    match r.stream_len {
        None => {
            out.extend_from_slice(&r.body);
            stream.write_all(&out)
        }
        Some(mut n) => {
            stream.write_all(&out)?;
            // Byte at offset k is (k % 256) as u8; 64 KiB is a multiple of 256 so every
            // chunk is the same.
            let chunk: Vec<u8> = (0..BUF_SIZE).map(|i| i as u8).collect();
            while n > 0 {
                let take = (chunk.len() as u64).min(n) as usize;
                stream.write_all(&chunk[..take])?;
                n -= take as u64;
            }
            Ok(())
        }
    }
}

fn handle_ws(mut conn: Conn, head: Head, peer: SocketAddr) {
    let key = head.header_str("sec-websocket-key");
    let is_upgrade = head.method == "GET"
        && head.has_token("upgrade", "websocket")
        && head.has_token("connection", "upgrade")
        && key.is_some();
    if !is_upgrade {
        log!("peer={peer} {} {} -> 426 (not a websocket upgrade)", head.method, head.target);
        let mut r = Response::text(426, "expected a websocket upgrade");
        r.extra.push(("upgrade", "websocket".into()));
        r.close = true;
        let _ = write_response(&mut conn.stream, &r, false);
        let _ = conn.stream.shutdown(Shutdown::Write);
        return;
    }
    let accept = tungstenite::handshake::derive_accept_key(key.unwrap_or_default().trim().as_bytes());
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\nx-testapp-version: {}\r\n",
        version()
    );
    // Select the first offered subprotocol, if any, so proxies can be checked for passing it.
    if let Some(proto) = head.header_str("sec-websocket-protocol") {
        if let Some(first) = proto.split(',').map(str::trim).find(|p| !p.is_empty()) {
            resp.push_str(&format!("sec-websocket-protocol: {first}\r\n"));
        }
    }
    resp.push_str("\r\n");
    if conn.stream.write_all(resp.as_bytes()).is_err() {
        return;
    }
    log!("peer={peer} {} {} -> 101 websocket open", head.method, head.target);

    let leftover = conn.buf[conn.pos..conn.len].to_vec();
    let mut ws = tungstenite::WebSocket::from_partially_read(
        conn.stream,
        leftover,
        tungstenite::protocol::Role::Server,
        None,
    );
    let (mut msgs, mut bytes) = (0u64, 0u64);
    use tungstenite::{Error, Message};
    let end = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                msgs += 1;
                bytes += t.len() as u64;
                if let Err(e) = ws.send(Message::Text(t)) {
                    break format!("send error: {e}");
                }
            }
            Ok(Message::Binary(b)) => {
                msgs += 1;
                bytes += b.len() as u64;
                if let Err(e) = ws.send(Message::Binary(b)) {
                    break format!("send error: {e}");
                }
            }
            // Pongs to pings and the close reply are queued by tungstenite and flushed on
            // the next read.
            Ok(_) => {}
            Err(Error::ConnectionClosed) | Err(Error::AlreadyClosed) => break "closed".to_string(),
            Err(e) => break format!("error: {e}"),
        }
    };
    log!("peer={peer} websocket {end} after {msgs} messages, {bytes} bytes echoed");
}
