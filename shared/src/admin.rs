//! The admin endpoint: `GET /metrics`, `/healthz`, `/readyz`.
//!
//! A small HTTP/1.1 responder over a tokio `TcpListener`; three GET endpoints do not need a
//! framework. One request per connection, answered with `Content-Length` and
//! `Connection: close`. Limits ([`AdminLimits`]): the request head is read up to
//! `request_head_bytes_max` (beyond: 431), the whole exchange gets `client_timeout`, and at
//! most `connections_max` connections are served at once (more wait in the listen backlog).
//! Whatever a client sends ends in a 4xx or a closed connection, never in a panic or a stopped
//! server.
//!
//! - `/metrics`: [`RenderMetrics::render`], `text/plain; version=0.0.4`.
//! - `/healthz`: 200 `ok` while [`Health::set_live`] says the main loop runs, else 503.
//! - `/readyz`: 200 `ready`, or 503 `not ready: <reason>` ([`Health::set_not_ready`]).

use std::future::Future;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

/// What `/metrics` serves: a binary's metrics in Prometheus text exposition.
pub trait RenderMetrics: Send + Sync + std::fmt::Debug {
    /// The exposition text.
    fn render(&self) -> String;
}

/// What the admin endpoint serves.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Rendered on `/metrics`.
    pub metrics: Arc<dyn RenderMetrics>,
    /// Answers `/healthz` and `/readyz`.
    pub health: Arc<Health>,
}

/// Liveness and readiness, set by the agent's main loop, read by the admin endpoint.
#[derive(Debug)]
pub struct Health {
    live: AtomicBool,
    ready: AtomicBool,
    /// Why not ready; written under the lock together with `ready`. Not on a hot path.
    not_ready_reason: Mutex<String>,
}

/// What `/readyz` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Logs open and at least one broker connected (the owner decides).
    Ready,
    /// Not ready, and why.
    NotReady(String),
}

impl Health {
    /// Not live, not ready: "starting".
    pub fn new() -> Health {
        Health {
            live: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            not_ready_reason: Mutex::new("starting".into()),
        }
    }

    /// Whether the main loop runs: set when it starts, cleared when it ends.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Release);
    }

    /// Whether the main loop runs.
    pub fn is_live(&self) -> bool {
        self.live.load(Acquire)
    }

    /// Ready: the agent has opened its logs and connected to at least one broker.
    pub fn set_ready(&self) {
        let mut reason = self.reason();
        reason.clear();
        self.ready.store(true, Release);
    }

    /// Not ready, because of `reason` (e.g. "no broker connected", "shutting down").
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let mut r = self.reason();
        *r = reason.into();
        self.ready.store(false, Release);
    }

    /// Whether ready; a lock-free read.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Acquire)
    }

    /// Ready, or not and why.
    pub fn readiness(&self) -> Readiness {
        let reason = self.reason();
        if self.ready.load(Acquire) { Readiness::Ready } else { Readiness::NotReady(reason.clone()) }
    }

    fn reason(&self) -> MutexGuard<'_, String> {
        // A panic while holding the lock leaves a whole String behind; keep serving it.
        self.not_ready_reason.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

/// Bounds of the admin endpoint; tests make them tiny.
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// Longest request head (request line and headers) read; longer gets 431.
    pub request_head_bytes_max: usize,
    /// Time for a whole exchange, from accept to close; a slower client is cut off.
    pub client_timeout: Duration,
    /// Connections served at once.
    pub connections_max: usize,
}

impl AdminLimits {
    /// A scrape's request head is a few hundred bytes; 8 KiB is what common servers allow.
    pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
    /// A local scrape takes milliseconds; 5 s lets a slow link through and a stuck client go.
    pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Scrapers, probes and `status` are a handful; the bound keeps a flood from costing memory.
    pub const CONNECTIONS_MAX: usize = 64;
}

impl Default for AdminLimits {
    fn default() -> AdminLimits {
        AdminLimits {
            request_head_bytes_max: AdminLimits::REQUEST_HEAD_BYTES_MAX,
            client_timeout: AdminLimits::CLIENT_TIMEOUT,
            connections_max: AdminLimits::CONNECTIONS_MAX,
        }
    }
}

/// Serves the admin endpoints on `listener` with the default [`AdminLimits`] until `shutdown`
/// completes; then it stops accepting and drops the connections still open.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: impl Future) {
    serve_with_limits(listener, state, AdminLimits::default(), shutdown).await;
}

/// [`serve`] with explicit limits.
pub async fn serve_with_limits(listener: TcpListener, state: AdminState, limits: AdminLimits, shutdown: impl Future) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        while let Some(done) = connections.try_join_next() {
            report_panic(done);
        }
        let full = connections.len() >= limits.connections_max;
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = connections.join_next(), if full => report_panic(done),
            accepted = listener.accept(), if !full => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(drive_connection(stream, state.clone(), limits));
                }
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(%error, "admin endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// How long to wait after a failed `accept` before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Bytes read and discarded after answering, so that unread request bytes do not turn the
/// close into a reset that destroys the response before the client reads it.
const DRAIN_BYTES_MAX: u64 = 64 * 1024;

fn report_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!(error = %e, "admin endpoint: connection handler panicked");
    }
}

async fn drive_connection(mut stream: TcpStream, state: AdminState, limits: AdminLimits) {
    match tokio::time::timeout(limits.client_timeout, exchange(&mut stream, &state, limits)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "admin endpoint: connection failed"),
        Err(_) => debug!(timeout = ?limits.client_timeout, "admin endpoint: client too slow, closing"),
    }
}

async fn exchange(stream: &mut TcpStream, state: &AdminState, limits: AdminLimits) -> io::Result<()> {
    let response = match read_head(stream, limits.request_head_bytes_max).await? {
        Head::Complete(head) => respond(&head, state),
        Head::TooLarge => Response::text(431, "Request Header Fields Too Large", "request head too large\n"),
        Head::Closed => return Ok(()),
    };
    stream.write_all(&response.encode()).await?;
    stream.shutdown().await?;
    let mut sink = tokio::io::sink();
    tokio::io::copy(&mut (&mut *stream).take(DRAIN_BYTES_MAX), &mut sink).await?;
    Ok(())
}

enum Head {
    /// The head up to and including its blank line.
    Complete(Vec<u8>),
    /// `max` bytes without a blank line.
    TooLarge,
    /// The client closed before finishing a head.
    Closed,
}

async fn read_head(stream: &mut TcpStream, max: usize) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(max.min(1024));
    let mut chunk = [0_u8; 1024];
    loop {
        let want = chunk.len().min(max - buf.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        let searched = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf, searched) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() >= max {
            return Ok(Head::TooLarge);
        }
    }
}

/// The end of the head (after its blank line) if `buf` holds one, searching from `from`.
/// Bare `\n` line ends are accepted too (RFC 9112 §2.2).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match &buf[i + 1..] {
            [b'\n', ..] => Some(i + 2),
            [b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        }
    })
}

/// The answer to a complete request head. Pure: no IO.
fn respond(head: &[u8], state: &AdminState) -> Response {
    let Some((method, target)) = request_line(head) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    let path = target.split('?').next().unwrap_or(target);
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text(404, "Not Found", "not found: try /metrics, /healthz or /readyz\n");
    }
    if method != "GET" {
        let mut r = Response::text(405, "Method Not Allowed", "only GET\n");
        r.allow_get = true;
        return r;
    }
    match path {
        "/metrics" => Response {
            status: 200,
            reason: "OK",
            content_type: METRICS_CONTENT_TYPE,
            body: state.metrics.render().into_bytes(),
            allow_get: false,
        },
        "/healthz" if state.health.is_live() => Response::text(200, "OK", "ok\n"),
        "/healthz" => Response::text(503, "Service Unavailable", "not live\n"),
        _ => match state.health.readiness() {
            Readiness::Ready => Response::text(200, "OK", "ready\n"),
            Readiness::NotReady(why) => Response::text(503, "Service Unavailable", &format!("not ready: {why}\n")),
        },
    }
}

/// `(method, target)` of a well-formed HTTP/1.x request line.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && version.starts_with("HTTP/1.");
    well_formed.then_some((method, target))
}

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// Add `Allow: GET` (405).
    allow_get: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response { status, reason, content_type: "text/plain; charset=utf-8", body: body.into(), allow_get: false }
    }

    fn encode(&self) -> Vec<u8> {
        let allow = if self.allow_get { "Allow: GET\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        let mut out = Vec::with_capacity(head.len() + self.body.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// A running admin endpoint on an ephemeral loopback port.
    #[derive(Debug, Default)]
    struct TestMetrics(std::sync::atomic::AtomicU64);

    impl RenderMetrics for TestMetrics {
        fn render(&self) -> String {
            format!("received_total{{stream=\"cdr\"}} {}\n", self.0.load(std::sync::atomic::Ordering::Relaxed))
        }
    }

    struct Server {
        addr: SocketAddr,
        state: AdminState,
        metrics: Arc<TestMetrics>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start(limits: AdminLimits) -> Server {
            let metrics = Arc::new(TestMetrics::default());
            let state = AdminState { metrics: metrics.clone(), health: Arc::new(Health::new()) };
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve_with_limits(listener, state.clone(), limits, stopped));
            Server { addr, state, metrics, stop: Some(stop), task }
        }

        async fn stop(mut self) {
            self.stop.take().unwrap().send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(10), &mut self.task).await.unwrap().unwrap();
        }
    }

    /// Sends `request`, returns everything the server sent until it closed.
    async fn send(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
        out
    }

    /// `(status, headers, body)` of a response; checks `Content-Length` and `Connection`.
    fn parse(response: &[u8]) -> (u16, String, String) {
        let text = String::from_utf8(response.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head end: {text:?}"));
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        (status, head.to_owned(), body.to_owned())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        parse(&send(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await)
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_the_exposition() {
        let server = Server::start(AdminLimits::default()).await;
        server.metrics.0.store(42, std::sync::atomic::Ordering::Relaxed);
        let (status, head, body) = get(server.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
        assert!(body.contains("received_total{stream=\"cdr\"} 42\n"), "{body}");
        assert_eq!(get(server.addr, "/metrics?x=1").await.0, 200, "a query string is ignored");
        server.stop().await;
    }

    #[tokio::test]
    async fn healthz_follows_liveness() {
        let server = Server::start(AdminLimits::default()).await;
        assert_eq!(get(server.addr, "/healthz").await.0, 503);
        server.state.health.set_live(true);
        let (status, _, body) = get(server.addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        server.stop().await;
    }

    #[tokio::test]
    async fn readyz_says_why_not() {
        let server = Server::start(AdminLimits::default()).await;
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: starting\n"));
        server.state.health.set_ready();
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        server.state.health.set_not_ready("no broker connected");
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: no broker connected\n"));
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_path_is_404_and_other_methods_405() {
        let server = Server::start(AdminLimits::default()).await;
        assert_eq!(get(server.addr, "/").await.0, 404);
        assert_eq!(get(server.addr, "/metricsx").await.0, 404);
        let (status, head, _) =
            parse(&send(server.addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").await);
        assert_eq!(status, 405);
        assert!(head.contains("\r\nAllow: GET\r\n"), "{head}");
        assert_eq!(parse(&send(server.addr, b"HEAD /healthz HTTP/1.0\n\n").await).0, 405);
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_400_or_a_close_and_the_server_goes_on() {
        let server = Server::start(AdminLimits::default()).await;
        for garbage in [
            &b"\x00\xff\xfe garbage\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            let (status, _, _) = parse(&send(server.addr, garbage).await);
            assert_eq!(status, 400, "{garbage:?}");
        }
        // A client that gives up halfway gets nothing.
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /metr").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        assert_eq!(get(server.addr, "/healthz").await.0, 503);
        server.stop().await;
    }

    #[tokio::test]
    async fn oversize_head_gets_431_and_the_server_goes_on() {
        let server = Server::start(AdminLimits::default()).await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(AdminLimits::REQUEST_HEAD_BYTES_MAX + 2000, b'a');
        let (status, _, _) = parse(&send(server.addr, &request).await);
        assert_eq!(status, 431);
        // Just within the bound is fine.
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(AdminLimits::REQUEST_HEAD_BYTES_MAX - 4, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&send(server.addr, &request).await).0, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn slow_client_is_cut_off_and_the_server_goes_on() {
        let limits = AdminLimits { client_timeout: Duration::from_millis(200), ..AdminLimits::default() };
        let server = Server::start(limits).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut out)).await.unwrap().unwrap();
        assert!(out.is_empty(), "cut off without an answer");
        assert_eq!(get(server.addr, "/healthz").await.0, 503);
        server.stop().await;
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_their_turn() {
        let limits =
            AdminLimits { connections_max: 1, client_timeout: Duration::from_millis(300), ..Default::default() };
        let server = Server::start(limits).await;
        // Holds the only slot until it times out.
        let _idle = TcpStream::connect(server.addr).await.unwrap();
        assert_eq!(get(server.addr, "/healthz").await.0, 503);
        server.stop().await;
    }

    #[test]
    fn head_end_accepts_crlf_and_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
        assert_eq!(head_end(b"\n", 0), None);
    }
}
