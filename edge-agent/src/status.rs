//! `edge-agent status`: a running agent's readiness and metrics, summarised for a person.
//!
//! Reads `/readyz` and `/metrics` from the agent's admin endpoint ((`shared::admin`)) with a
//! tiny blocking HTTP/1.1 GET (one request per connection, as that endpoint answers), parses
//! the exposition back into a [`Snapshot`] and prints readiness, broker connections, per
//! stream counts and the receive-to-ack p50/p99 estimated from the histogram's buckets.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::metrics::{DropReason, HistogramSnapshot, ParseError, Snapshot};
use shared::admin::Readiness;

/// Why `status` could not report.
#[derive(Debug, Error)]
pub enum StatusError {
    /// Nothing accepted a connection at the address.
    #[error("no agent answers at {addr}: {source}; is the agent running? admin.listen is {addr}")]
    Unreachable {
        /// The admin address tried.
        addr: SocketAddr,
        /// Why the connection failed.
        source: io::Error,
    },
    /// The connection broke or timed out.
    #[error("GET http://{addr}{path}: {source}")]
    Request {
        /// The admin address.
        addr: SocketAddr,
        /// The path asked for.
        path: &'static str,
        /// What failed.
        source: io::Error,
    },
    /// Something answered, but not as the agent's admin endpoint would.
    #[error("GET http://{addr}{path}: {detail} (is admin.listen {addr} this agent's admin endpoint?)")]
    Response {
        /// The admin address.
        addr: SocketAddr,
        /// The path asked for.
        path: &'static str,
        /// What was wrong with the answer.
        detail: String,
    },
    /// `/metrics` answered with an exposition that cannot be read.
    #[error("GET http://{addr}/metrics: {source}")]
    Metrics {
        /// The admin address.
        addr: SocketAddr,
        /// Where and why.
        source: ParseError,
    },
    /// Writing the summary failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

impl StatusError {
    /// Whether the output's reader went away (`| head`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, StatusError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Asks the agent whose admin endpoint listens on `admin_addr` how it is, and writes a short
/// summary to `out`. A not-ready agent is reported, not an error.
pub fn status(admin_addr: SocketAddr, out: &mut dyn Write) -> Result<(), StatusError> {
    let ready = get(admin_addr, "/readyz")?;
    let readiness = match ready.status {
        200 => Readiness::Ready,
        503 => {
            let body = String::from_utf8_lossy(&ready.body);
            let body = body.trim();
            Readiness::NotReady(body.strip_prefix("not ready: ").unwrap_or(body).to_owned())
        }
        s => return Err(unexpected(admin_addr, "/readyz", s)),
    };
    let metrics = get(admin_addr, "/metrics")?;
    if metrics.status != 200 {
        return Err(unexpected(admin_addr, "/metrics", metrics.status));
    }
    let text = String::from_utf8(metrics.body).map_err(|_| StatusError::Response {
        addr: admin_addr,
        path: "/metrics",
        detail: "the body is not UTF-8".into(),
    })?;
    let snapshot = Snapshot::parse(&text).map_err(|source| StatusError::Metrics { addr: admin_addr, source })?;
    write_summary(out, admin_addr, &readiness, &snapshot)?;
    out.flush()?;
    Ok(())
}

/// Time to connect; the agent is local, so this only has to outlast a busy moment.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a whole request and response (the admin endpoint cuts clients off at 5 s).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest response read: an exposition is some kilobytes per stream.
const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// A response: status and body (as long as `Content-Length` said).
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

fn get(addr: SocketAddr, path: &'static str) -> Result<Response, StatusError> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|source| StatusError::Unreachable { addr, source })?;
    let request_error = |source| StatusError::Request { addr, path, source };
    let deadline = Instant::now() + RESPONSE_TIMEOUT;
    stream.set_write_timeout(Some(RESPONSE_TIMEOUT)).map_err(request_error)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: edge-agent-status\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(request_error)?;
    let raw = read_all(&mut stream, deadline).map_err(request_error)?;
    parse_response(&raw).map_err(|detail| StatusError::Response { addr, path, detail })
}

/// Reads until the server closes, by `deadline`, at most [`RESPONSE_BYTES_MAX`] bytes.
fn read_all(stream: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut chunk = [0_u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no complete answer in time"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(raw),
            Ok(n) if raw.len() + n > RESPONSE_BYTES_MAX => {
                return Err(io::Error::other(format!("answer longer than {RESPONSE_BYTES_MAX} bytes")));
            }
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Parses an HTTP/1.x response as the admin endpoint writes it (`Content-Length`, no chunks).
fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no complete HTTP response head")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "the response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1.x status line: {:?}", cut(status_line)))?;
    let mut body = raw[head_end + 4..].to_vec();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("unexpected Transfer-Encoding {value:?}"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let len: usize = value.parse().map_err(|_| format!("bad Content-Length {value:?}"))?;
            if body.len() < len {
                return Err(format!("answer cut short: {} of {len} bytes", body.len()));
            }
            body.truncate(len);
        }
    }
    Ok(Response { status, body })
}

fn unexpected(addr: SocketAddr, path: &'static str, status: u16) -> StatusError {
    StatusError::Response { addr, path, detail: format!("unexpected HTTP status {status}") }
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

fn write_summary(out: &mut dyn Write, addr: SocketAddr, readiness: &Readiness, s: &Snapshot) -> io::Result<()> {
    match readiness {
        Readiness::Ready => writeln!(out, "edge-agent at {addr}: ready")?,
        Readiness::NotReady(why) => writeln!(out, "edge-agent at {addr}: NOT READY: {why}")?,
    }

    writeln!(out, "\nbroker connections")?;
    if s.connections.is_empty() {
        writeln!(out, "  none")?;
    } else {
        let mut rows = vec![vec!["name".into(), "state".into(), "reconnects".into()]];
        for c in &s.connections {
            let state = if c.connected { "connected" } else { "DISCONNECTED" };
            rows.push(vec![c.name.clone(), state.into(), c.reconnects.to_string()]);
        }
        table(out, &rows)?;
    }
    if s.broker_dropped_messages > 0 {
        writeln!(out, "  broker dropped messages: {} (lost before the agent)", s.broker_dropped_messages)?;
    }

    writeln!(out, "\nstreams")?;
    let mut rows =
        vec![["name", "received", "appended", "dropped", "log", "oldest unforwarded", ""].map(String::from).to_vec()];
    for st in &s.streams {
        let mut notes = Vec::new();
        if st.disk_full {
            notes.push("DISK FULL".to_owned());
        }
        if st.append_errors > 0 {
            notes.push(format!("append errors: {}", st.append_errors));
        }
        rows.push(vec![
            st.name.clone(),
            st.received.to_string(),
            st.appended.to_string(),
            st.dropped_total().to_string(),
            bytes(st.log_bytes),
            age(st.oldest_unforwarded_age_seconds),
            notes.join(", "),
        ]);
    }
    table(out, &rows)?;
    for st in s.streams.iter().filter(|st| st.dropped_total() > 0) {
        let reasons: Vec<String> = DropReason::ALL
            .into_iter()
            .filter(|&r| st.dropped(r) > 0)
            .map(|r| format!("{} {}", r.label(), st.dropped(r)))
            .collect();
        writeln!(out, "  dropped from {}: {}", st.name, reasons.join(", "))?;
    }
    writeln!(out, "  unrouted records: {}", s.records_unrouted)?;

    writeln!(out, "\n{}", receive_to_ack(&s.receive_to_ack))
}

fn receive_to_ack(h: &HistogramSnapshot) -> String {
    let top = h.buckets.iter().map(|b| b.le).filter(|le| le.is_finite()).fold(0.0, f64::max);
    match (h.quantile(0.5), h.quantile(0.99)) {
        (Some(p50), Some(p99)) => {
            format!("receive to ack: p50 {}, p99 {} over {} acks", latency(p50, top), latency(p99, top), h.count)
        }
        _ => "receive to ack: no acks yet".into(),
    }
}

/// Left-aligned columns, two spaces apart, indented by two; the last column unpadded.
fn table(out: &mut dyn Write, rows: &[Vec<String>]) -> io::Result<()> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|v| v.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::from(" ");
        for (c, v) in row.iter().enumerate() {
            line.push(' ');
            line.push_str(v);
            if c + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', widths[c] - v.chars().count() + 1));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A latency estimate; beyond the highest finite bucket bound `top` only a bound is known.
fn latency(seconds: f64, top: f64) -> String {
    if seconds.is_infinite() {
        return format!("> {}", latency(top, top));
    }
    if seconds < 1e-3 {
        format!("{:.0} µs", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:.2} s")
    }
}

fn age(seconds: f64) -> String {
    let whole = seconds as u64;
    match whole {
        _ if seconds < 60.0 => format!("{seconds:.1} s"),
        0..3_600 => format!("{}m {:02}s", whole / 60, whole % 60),
        3_600..86_400 => format!("{}h {:02}m", whole / 3_600, whole % 3_600 / 60),
        _ => format!("{}d {:02}h", whole / 86_400, whole % 86_400 / 3_600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use shared::admin::{self, AdminState, Health};
    use shared::ids::Offset;
    use std::sync::Arc;

    async fn start_agent() -> (SocketAddr, AdminState, Arc<Metrics>, tokio::sync::oneshot::Sender<()>) {
        let metrics = Arc::new(Metrics::new(&["cdr", "sensors"], &["gw-fast", "gw-slow"]));
        let state = AdminState { metrics: metrics.clone(), health: Arc::new(Health::new()) };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(admin::serve(listener, state.clone(), stopped));
        (addr, state, metrics, stop)
    }

    async fn run_status(addr: SocketAddr) -> Result<String, StatusError> {
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            status(addr, &mut out).map(|()| String::from_utf8(out).unwrap())
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_summarises_a_running_agent() {
        let (addr, state, metrics, stop) = start_agent().await;
        let m = &metrics;
        let (cdr, sensors) = (m.stream_id("cdr").unwrap(), m.stream_id("sensors").unwrap());
        m.add_received(cdr, 1200);
        m.add_appended(cdr, 1190);
        m.add_dropped(cdr, DropReason::TooLarge, 2);
        m.add_dropped(cdr, DropReason::Duplicate, 8);
        m.set_log_bytes(cdr, 3 << 20);
        m.set_committed_offset(cdr, Offset(1190));
        m.set_oldest_unforwarded_age(cdr, Duration::from_millis(4_200));
        m.set_disk_full(sensors, true);
        m.add_unrouted(5);
        let gw = m.connection_id("gw-fast").unwrap();
        m.set_broker_connected(gw, true);
        m.add_broker_reconnect(gw);
        for _ in 0..100 {
            m.observe_receive_to_ack(Duration::from_millis(2));
        }

        let text = run_status(addr).await.unwrap();
        assert!(text.starts_with(&format!("edge-agent at {addr}: NOT READY: starting\n")), "{text}");
        // Compared with runs of spaces squeezed: column widths are not the point.
        let lines: Vec<String> = text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        for expected in [
            "gw-fast connected 1",
            "gw-slow DISCONNECTED 0",
            "cdr 1200 1190 10 3.0 MiB 4.2 s",
            "sensors 0 0 0 0 B 0.0 s DISK FULL",
            "dropped from cdr: too_large 2, duplicate 8",
            "unrouted records: 5",
            "receive to ack: p50 1.8 ms, p99 2.5 ms over 100 acks",
        ] {
            assert!(lines.iter().any(|l| l == expected), "{expected:?} missing from\n{text}");
        }

        state.health.set_ready();
        let text = run_status(addr).await.unwrap();
        assert!(text.starts_with(&format!("edge-agent at {addr}: ready\n")), "{text}");
        stop.send(()).unwrap();
    }

    #[test]
    fn nothing_listening_is_an_error_naming_the_address() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = status(addr, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, StatusError::Unreachable { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&addr.to_string()) && msg.contains("is the agent running?"), "{msg}");
    }

    #[test]
    fn another_server_is_an_error_not_a_summary() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").unwrap();
        });
        let e = status(addr, &mut Vec::new()).unwrap_err();
        server.join().unwrap();
        assert!(e.to_string().contains("unexpected HTTP status 404"), "{e}");
    }

    #[test]
    fn parse_response_checks_the_framing() {
        let ok = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!(ok, Response { status: 200, body: b"hi".to_vec() });
        let no_length = parse_response(b"HTTP/1.0 503 Service Unavailable\r\n\r\nnot ready: x\n").unwrap();
        assert_eq!(no_length.body, b"not ready: x\n");
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"",
        ] {
            assert!(parse_response(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn units_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(age(0.0), "0.0 s");
        assert_eq!(age(125.0), "2m 05s");
        assert_eq!(age(7_260.0), "2h 01m");
        assert_eq!(age(90_000.0), "1d 01h");
        assert_eq!(latency(0.0004, 10.0), "400 µs");
        assert_eq!(latency(f64::INFINITY, 10.0), "> 10.00 s");
    }
}
