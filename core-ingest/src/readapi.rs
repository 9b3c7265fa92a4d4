//! The HTTP read API (DESIGN §5): `GET /v1/streams`, `GET /v1/streams/{stream}/records`,
//! `GET /v1/status`. A small HTTP/1.1 responder like the admin endpoint's: one request per
//! connection, `Connection: close`.
//!
//! `records` takes `since`, `until` (RFC 3339 or ms), `edge`, `limit` and `cursor`, and streams
//! NDJSON record lines (the body ends with the connection). After the records come control
//! lines, told apart by their single key: `{"damaged": "..."}` for each damaged object or file
//! (key or path, byte offset; the records around it were still sent) and, when `limit` cut the
//! read short, `{"next_cursor": "..."}` to continue with. An error before the first record is a
//! 4xx/5xx with a text body.
//!
//! It serves billing data: with `[read_api] tokens` set, a stream's records need
//! `Authorization: Bearer <that stream's token>` (401 without, 403 with another), and
//! `/v1/streams` (the streams the token grants) and `/v1/status` need one of the tokens; with
//! `cert_file`/`key_file` it speaks HTTPS (TLS 1.3). Config validation accepts a non-loopback
//! listen address only with both.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::catalog::Catalog;
use crate::read::{ReadOutcome, ReadSources};

/// Longest request head read.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// Time for a client to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once (each read holds a blocking thread).
pub const CONNECTIONS_MAX: usize = 16;
/// Bytes of NDJSON gathered before a write to the socket.
const CHUNK_BYTES: usize = 64 << 10;
/// Chunks queued between the reader and the socket.
const CHUNKS_QUEUED_MAX: usize = 8;

/// What the API reads from.
#[derive(Clone)]
pub struct ApiState {
    /// Sources of records.
    pub sources: ReadSources,
    /// The node's catalog (status).
    pub catalog: Arc<Mutex<Catalog>>,
    /// The node's name.
    pub node: String,
    /// Bearer tokens per stream (resolved); empty: no authentication (loopback only).
    pub tokens: std::collections::BTreeMap<String, String>,
    /// HTTPS, when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens stay out of logs.
        f.debug_struct("ApiState")
            .field("node", &self.node)
            .field("streams_with_tokens", &self.tokens.keys().collect::<Vec<_>>())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, state: ApiState, shutdown: impl Future) {
    let mut shutdown = std::pin::pin!(shutdown);
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    let result = match state.tls.clone() {
                        Some(acceptor) => match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => drive_connection(tls, state).await,
                            Ok(Err(e)) => Err(e),
                            Err(_) => Ok(()),
                        },
                        None => drive_connection(stream, state).await,
                    };
                    if let Err(error) = result {
                        tracing::debug!(%error, "read API: connection failed");
                    }
                    drop(permit);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "read API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A client connection, plain or TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

async fn drive_connection(mut stream: impl Conn, state: ApiState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return respond(&mut stream, 431, "request head too large\n").await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let Some((method, target)) = request_line(&head) else {
        return respond(&mut stream, 400, "bad request\n").await;
    };
    if method != "GET" {
        return respond(&mut stream, 405, "only GET\n").await;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params = parse_query(query);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let bearer = bearer_token(&head);
    // Which streams the request may see: all without tokens configured, else its token's.
    let granted: Option<Vec<String>> = (!state.tokens.is_empty()).then(|| {
        state
            .tokens
            .iter()
            .filter(|(_, t)| bearer.as_deref().is_some_and(|b| constant_time_eq(b.as_bytes(), t.as_bytes())))
            .map(|(s, _)| s.clone())
            .collect()
    });
    if granted.as_ref().is_some_and(|g| g.is_empty()) {
        return match bearer {
            None => respond(&mut stream, 401, "a bearer token is needed (Authorization: Bearer TOKEN)\n").await,
            Some(_) => respond(&mut stream, 403, "this token grants no stream\n").await,
        };
    }
    match segments.as_slice() {
        ["v1", "streams"] => {
            let src = state.sources.clone();
            let listed = tokio::task::spawn_blocking(move || crate::read::list_streams(&src)).await;
            match listed {
                Ok(Ok(mut names)) => {
                    if let Some(g) = &granted {
                        names.retain(|n| g.contains(n));
                    }
                    json(&mut stream, &serde_json::json!({ "streams": names })).await
                }
                Ok(Err(e)) => respond(&mut stream, 502, &format!("{e}\n")).await,
                Err(e) => respond(&mut stream, 500, &format!("{e}\n")).await,
            }
        }
        ["v1", "status"] => {
            let doc = {
                let catalog = state.catalog.lock().unwrap_or_else(|p| p.into_inner());
                crate::readcmd::status_json(&state.node, Some(&catalog), now_ms())
            };
            match doc {
                Ok(doc) => json(&mut stream, &doc).await,
                Err(e) => respond(&mut stream, 500, &format!("{e}\n")).await,
            }
        }
        ["v1", "streams", name, "records"] => {
            let p = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
            let limit = match p("limit").map(str::parse::<u64>).transpose() {
                Ok(l) => l,
                Err(_) => return respond(&mut stream, 400, "limit: not a number\n").await,
            };
            let q = match crate::readcmd::query(
                &percent_decode(name),
                p("since"),
                p("until"),
                p("edge"),
                limit,
                p("cursor"),
            ) {
                Ok(q) => q,
                Err(e) => return respond(&mut stream, 400, &format!("{e}\n")).await,
            };
            if !shared::batch::is_valid_stream_name(&q.stream) {
                return respond(&mut stream, 400, &format!("stream {:?} is not a valid stream name\n", q.stream)).await;
            }
            if granted.as_ref().is_some_and(|g| !g.contains(&q.stream)) {
                return respond(&mut stream, 403, &format!("this token does not grant stream {}\n", q.stream)).await;
            }
            records(&mut stream, state.sources.clone(), q).await
        }
        _ => respond(&mut stream, 404, "not found: try /v1/streams, /v1/streams/STREAM/records, /v1/status\n").await,
    }
}

enum Msg {
    Chunk(Vec<u8>),
    Done(Result<ReadOutcome, String>),
}

async fn records(stream: &mut impl Conn, src: ReadSources, q: crate::read::ReadQuery) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Msg>(CHUNKS_QUEUED_MAX);
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(CHUNK_BYTES);
        let result = crate::read::read_records(&src, &q, &mut |line| {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            if buf.len() >= CHUNK_BYTES {
                let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES));
                tx.blocking_send(Msg::Chunk(chunk)).map_err(|_| std::io::ErrorKind::BrokenPipe)?;
            }
            Ok(())
        });
        if !buf.is_empty() {
            let _ = tx.blocking_send(Msg::Chunk(buf));
        }
        let _ = tx.blocking_send(Msg::Done(result.map_err(|e| e.to_string())));
    });
    let mut started = false;
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Done(Err(e)) if !started => return respond(stream, 502, &format!("{e}\n")).await,
            Msg::Done(Err(e)) => {
                let line = serde_json::json!({ "error": e }).to_string();
                stream.write_all(format!("{line}\n").as_bytes()).await?;
            }
            Msg::Done(Ok(outcome)) => {
                if !started {
                    stream.write_all(ndjson_head().as_bytes()).await?;
                    started = true;
                }
                for p in &outcome.problems {
                    stream.write_all(format!("{}\n", serde_json::json!({ "damaged": p })).as_bytes()).await?;
                }
                if let Some(c) = &outcome.next_cursor {
                    stream.write_all(format!("{}\n", serde_json::json!({ "next_cursor": c })).as_bytes()).await?;
                }
            }
            Msg::Chunk(chunk) => {
                if !started {
                    stream.write_all(ndjson_head().as_bytes()).await?;
                    started = true;
                }
                stream.write_all(&chunk).await?;
            }
        }
    }
    stream.shutdown().await
}

fn ndjson_head() -> String {
    "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        .into()
}

async fn json(stream: &mut impl Conn, doc: &serde_json::Value) -> std::io::Result<()> {
    let body = format!("{doc}\n");
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn respond(stream: &mut impl Conn, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Internal Server Error",
    };
    let allow = match status {
        405 => "Allow: GET\r\n",
        401 => "WWW-Authenticate: Bearer\r\n",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The head up to its blank line; `None` if it exceeds [`REQUEST_HEAD_BYTES_MAX`].
async fn read_head(stream: &mut impl Conn) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            return Ok(None);
        }
    }
}

/// `(method, target)` of a well-formed request line. Pure.
pub fn request_line(head: &str) -> Option<(String, String)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none() && target.starts_with('/') && version.starts_with("HTTP/1.");
    ok.then(|| (method.to_string(), target.to_string()))
}

/// The token of an `Authorization: Bearer TOKEN` header. Pure.
pub fn bearer_token(head: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
    })
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` is a space). Pure.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Percent-decoding; malformed escapes stay as they are. Pure.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let q = parse_query("since=2026-11-22T17%3A35%3A18%2B01%3A00&edge=e+1&limit=5&bad=%zz&end=%4");
        assert_eq!(q[0], ("since".into(), "2026-11-22T17:35:18+01:00".into()));
        assert_eq!(q[1], ("edge".into(), "e 1".into()));
        assert_eq!(q[2], ("limit".into(), "5".into()));
        assert_eq!(q[3], ("bad".into(), "%zz".into()));
        assert_eq!(q[4], ("end".into(), "%4".into()));
        assert_eq!(request_line("GET /v1/status HTTP/1.1\r\n\r\n"), Some(("GET".into(), "/v1/status".into())));
        assert_eq!(request_line("GET v1 HTTP/1.1\r\n"), None);
        let head = "GET / HTTP/1.1\r\nHost: x\r\nauthorization:  bearer abc.DEF-123 \r\n\r\n";
        assert_eq!(bearer_token(head).as_deref(), Some("abc.DEF-123"));
        assert_eq!(bearer_token("GET / HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n"), None);
        assert!(
            constant_time_eq(b"same", b"same") && !constant_time_eq(b"same", b"sane") && !constant_time_eq(b"a", b"ab")
        );
    }
}
