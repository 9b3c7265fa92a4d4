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
//! It serves billing data without TLS or tokens, so config validation accepts only a loopback
//! listen address.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Sources of records.
    pub sources: ReadSources,
    /// The node's catalog (status).
    pub catalog: Arc<Mutex<Catalog>>,
    /// The node's name.
    pub node: String,
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
                    if let Err(error) = drive_connection(stream, state).await {
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

async fn drive_connection(mut stream: TcpStream, state: ApiState) -> std::io::Result<()> {
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
    match segments.as_slice() {
        ["v1", "streams"] => {
            let src = state.sources.clone();
            let listed = tokio::task::spawn_blocking(move || crate::read::list_streams(&src)).await;
            match listed {
                Ok(Ok(names)) => json(&mut stream, &serde_json::json!({ "streams": names })).await,
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
            records(&mut stream, state.sources.clone(), q).await
        }
        _ => respond(&mut stream, 404, "not found: try /v1/streams, /v1/streams/STREAM/records, /v1/status\n").await,
    }
}

enum Msg {
    Chunk(Vec<u8>),
    Done(Result<ReadOutcome, String>),
}

async fn records(stream: &mut TcpStream, src: ReadSources, q: crate::read::ReadQuery) -> std::io::Result<()> {
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

async fn json(stream: &mut TcpStream, doc: &serde_json::Value) -> std::io::Result<()> {
    let body = format!("{doc}\n");
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Internal Server Error",
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The head up to its blank line; `None` if it exceeds [`REQUEST_HEAD_BYTES_MAX`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
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
    }
}
