//! The QUIC acceptor: mutual TLS, the edge id from the client certificate, the control stream
//! (HELLO → WELCOME) and one task per data stream (OPEN, then BATCH frames, answered by ACK
//! frames after the store's fsync, in order). A bad frame closes that stream with an error code;
//! other streams and other edges keep flowing. Pure decisions live in `shared::wire::session`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::BytesMut;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use shared::batch::{BatchLimits, BatchParts};
use shared::quic::{read_frame, read_parted, write_frame};
use shared::wire::frame::{StreamHeld, marks};
use shared::wire::session::{IngestSession, ProducerKey, Refusal};
use shared::wire::{ErrorCode, Frame, FrameParts, Parted};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::{Metrics, Refused};
use crate::store::{StoreHandle, Stored};

/// Acks a data stream may have pending before it stops reading.
const PIPELINE_MAX: usize = 1024;
/// Most bytes of ACK frames gathered into one write on a data stream (about 700 ACKs).
const ACK_WRITE_BYTES_MAX: usize = 16 << 10;

/// What every connection task shares.
#[derive(Debug)]
pub struct ServerContext {
    /// The store.
    pub store: StoreHandle,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Edge ids allowed; `None`: any. Swapped by [`ServerContext::set_allow`].
    allow: RwLock<Option<HashSet<String>>>,
    /// Most connections.
    pub connections_max: u64,
    /// This node.
    pub node: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// Limits on batches.
    pub limits: BatchLimits,
    /// Seq ranges in the bucket per producer, published by the tierer: connected edges get
    /// TIERED frames on their control stream, and acks of batches already tiered the mark.
    pub tiered: watch::Receiver<Arc<crate::tier::TieredRanges>>,
    sessions: Mutex<HashMap<String, (u64, Connection)>>,
    next_session: AtomicU64,
}

impl ServerContext {
    /// The context.
    pub fn new(
        store: StoreHandle,
        metrics: Arc<Metrics>,
        allow: Option<HashSet<String>>,
        connections_max: u64,
        node: String,
        incarnation: u64,
    ) -> Self {
        ServerContext {
            store,
            metrics,
            allow: RwLock::new(allow),
            connections_max,
            node,
            incarnation,
            limits: BatchLimits::default(),
            // Nothing tiered until the tierer publishes (a sender-less channel keeps its value).
            tiered: watch::channel(Arc::default()).1,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        }
    }
}

impl ServerContext {
    /// Whether `edge` may connect now.
    pub fn is_allowed(&self, edge: &str) -> bool {
        self.allow.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|a| a.contains(edge))
    }

    /// Replaces the allow-list (revocation without a restart) and closes the sessions of the
    /// edges it no longer allows; returns their ids.
    pub fn set_allow(&self, allow: Option<HashSet<String>>) -> Vec<String> {
        *self.allow.write().unwrap_or_else(|p| p.into_inner()) = allow;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let revoked: Vec<String> = sessions.keys().filter(|e| !self.is_allowed(e)).cloned().collect();
        for edge in &revoked {
            if let Some((_, conn)) = sessions.remove(edge) {
                close(&conn, ErrorCode::NotAllowed, "edge no longer allowed");
            }
        }
        revoked
    }
}

/// Accepts connections until `shutdown`.
pub async fn serve(endpoint: Endpoint, ctx: Arc<ServerContext>, shutdown: impl Future) {
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        if ctx.metrics.connections.get() >= ctx.connections_max {
            ctx.metrics.refused(Refused::Overloaded);
            tracing::warn!(remote = %incoming.remote_address(), max = ctx.connections_max, "connection refused: connections_max reached");
            incoming.refuse();
            continue;
        }
        tokio::spawn(handle_incoming(incoming, ctx.clone()));
    }
    endpoint.close(VarInt::from(ErrorCode::NoError as u16), b"shutting down");
}

async fn handle_incoming(incoming: quinn::Incoming, ctx: Arc<ServerContext>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(error) => {
            ctx.metrics.refused(Refused::Tls);
            tracing::warn!(%remote, %error, "connection refused in the TLS handshake (unknown CA, expired or invalid certificate?)");
            return;
        }
    };
    let edge = match edge_of(&conn) {
        Ok(id) => id,
        Err(error) => {
            ctx.metrics.refused(Refused::Identity);
            tracing::warn!(%remote, %error, "connection refused: the certificate names no edge");
            close(&conn, ErrorCode::NotAllowed, "certificate names no edge");
            return;
        }
    };
    if !ctx.is_allowed(&edge) {
        ctx.metrics.refused(Refused::NotAllowed);
        tracing::warn!(%remote, %edge, "connection refused: edge not in allow_edges");
        close(&conn, ErrorCode::NotAllowed, "edge not allowed");
        return;
    }
    ctx.metrics.connections.inc();
    let id = ctx.next_session.fetch_add(1, Ordering::Relaxed);
    let result = run_session(&conn, &edge, id, &ctx).await;
    ctx.metrics.connections.dec();
    {
        let mut sessions = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.get(&edge).is_some_and(|(sid, _)| *sid == id) {
            sessions.remove(&edge);
        }
    }
    match result {
        Ok(()) => tracing::info!(%edge, %remote, "edge disconnected"),
        Err(r) => {
            tracing::warn!(%edge, %remote, code = ?r.code, message = %r.message, "session closed");
            close(&conn, r.code, &r.message);
        }
    }
}

/// The edge id of the peer's certificate.
fn edge_of(conn: &Connection) -> Result<String, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let first = certs.first().ok_or("empty certificate chain")?;
    shared::tls::peer_edge_id(first.as_ref()).map_err(|e| e.to_string())
}

/// The serial of the peer's certificate (which one an edge presents, e.g. after a rotation).
fn peer_serial(conn: &Connection) -> String {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|certs| shared::tls::cert_serial(certs.first()?.as_ref()).ok())
        .unwrap_or_else(|| "unknown".into())
}

fn close(conn: &Connection, code: ErrorCode, message: &str) {
    conn.close(VarInt::from(code as u16), message.as_bytes());
}

async fn run_session(conn: &Connection, edge: &str, id: u64, ctx: &Arc<ServerContext>) -> Result<(), Refusal> {
    let (mut ctl_send, mut ctl_recv) = conn.accept_bi().await.map_err(|e| refusal(ErrorCode::NoError, e))?;
    let mut buf = FrameParts::default();
    let hello = read_frame(&mut ctl_recv, &mut buf).await?.ok_or_else(|| refusal(ErrorCode::Protocol, "no hello"))?;
    let Frame::Hello { version, epoch, edge_id, streams } = hello else {
        return Err(refusal(ErrorCode::Protocol, "the first frame must be a hello"));
    };
    let mut session = IngestSession::new(edge);
    let keys = session.handle_hello(version, epoch, &edge_id, &streams)?;
    let held = ctx.store.held(keys.clone()).await?;
    let welcome = Frame::Welcome {
        node: ctx.node.clone(),
        incarnation: ctx.incarnation,
        streams: keys.iter().zip(held).map(|(k, h)| StreamHeld { name: k.stream.clone(), held: h }).collect(),
    };
    write_frame(&mut ctl_send, &welcome).await?;
    tracing::info!(%edge, epoch = %format!("{epoch:016x}"), streams = streams.len(), remote = %conn.remote_address(), cert_serial = %peer_serial(conn), "edge session started");
    // A newer session of the same edge supersedes the older one.
    let older = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(edge.to_owned(), (id, conn.clone()));
    if let Some((_, old)) = older {
        close(&old, ErrorCode::Superseded, "a newer session of this edge took over");
    }
    // The allow-list may have changed since the handshake was checked.
    if !ctx.is_allowed(edge) {
        return Err(refusal(ErrorCode::NotAllowed, "edge no longer allowed"));
    }
    let session = Arc::new(session);
    let notifier = tokio::spawn(send_tiered(ctl_send, keys, ctx.tiered.clone()));
    // The control stream stays open; later frames (DICT) are read and, for now, only checked.
    let ctl = tokio::spawn(async move {
        loop {
            match read_frame(&mut ctl_recv, &mut buf).await {
                Ok(Some(Frame::Dict { .. })) => {}
                Ok(Some(_)) | Err(_) => {
                    let _ = ctl_recv.stop(VarInt::from(ErrorCode::Protocol as u16));
                    break;
                }
                Ok(None) => break,
            }
        }
    });
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(data_stream(send, recv, session.clone(), ctx.clone()));
            }
            Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => break,
            Err(e) => {
                tracing::debug!(%edge, error = %e, "connection ended");
                break;
            }
        }
    }
    ctl.abort();
    notifier.abort();
    Ok(())
}

/// Sends TIERED on the control stream whenever the bucket holds more of this session's
/// producer streams (first right after the WELCOME, so a reconnecting edge learns at once).
async fn send_tiered(
    mut ctl_send: SendStream,
    keys: Vec<shared::wire::session::ProducerKey>,
    mut tiered: watch::Receiver<Arc<crate::tier::TieredRanges>>,
) {
    let mut sent: HashMap<String, shared::ranges::RangeSet> = HashMap::new();
    loop {
        let current = tiered.borrow_and_update().clone();
        for k in &keys {
            if let Some(ranges) = current.get(k)
                && sent.get(&k.stream) != Some(ranges)
            {
                let frame = Frame::Tiered { stream: k.stream.clone(), ranges: ranges.clone() };
                if write_frame(&mut ctl_send, &frame).await.is_err() {
                    return;
                }
                sent.insert(k.stream.clone(), ranges.clone());
            }
        }
        if tiered.changed().await.is_err() {
            // No tierer: keep the control stream open until the session ends.
            std::future::pending::<()>().await;
        }
    }
}

enum Pending {
    Ack(Arc<ProducerKey>, std::ops::Range<u64>, oneshot::Receiver<Result<Stored, Refusal>>),
    Fail(Refusal),
}

async fn data_stream(mut send: SendStream, mut recv: RecvStream, session: Arc<IngestSession>, ctx: Arc<ServerContext>) {
    let mut buf = FrameParts::default();
    let stream = match read_frame(&mut recv, &mut buf).await {
        Ok(Some(Frame::Open { stream, lane })) => {
            tracing::debug!(edge = %session.edge(), %stream, ?lane, "data stream opened");
            stream
        }
        other => {
            let r = match other {
                Err(r) => r,
                _ => refusal(ErrorCode::Protocol, "a data stream starts with open"),
            };
            fail_stream(&mut send, &mut recv, &r, &ctx).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Pending>(PIPELINE_MAX);
    let tiered = ctx.tiered.clone();
    // Acks leave in the order the batches came, each after its fsync; a batch already in the
    // bucket (a resend after its segment tiered) carries the tiered mark too.
    let acks = tokio::spawn(async move {
        // ACK frames of batches whose answers are already in go out in one write.
        let mut out = BytesMut::new();
        let mut next: Option<Pending> = None;
        loop {
            let p = match next.take() {
                Some(p) => p,
                None => match rx.recv().await {
                    Some(p) => p,
                    None => break,
                },
            };
            let answer = match p {
                Pending::Ack(key, range, answer) => (key, range, answer.await.ok()),
                Pending::Fail(r) => return Some((send, r)),
            };
            if let Err(r) = ack_frame(answer, &tiered).map(|f| f.encode(&mut out)) {
                return Some((send, r));
            }
            while out.len() < ACK_WRITE_BYTES_MAX {
                let Ok(mut p) = rx.try_recv() else { break };
                // In: `Some(answer)`, `None` once the store is gone. Still waiting: not ready.
                let ready = match &mut p {
                    Pending::Ack(_, _, answer) => match answer.try_recv() {
                        Err(oneshot::error::TryRecvError::Empty) => None,
                        r => Some(r.ok()),
                    },
                    Pending::Fail(_) => None,
                };
                match (ready, p) {
                    (Some(a), Pending::Ack(key, range, _)) => match ack_frame((key, range, a), &tiered) {
                        Ok(f) => f.encode(&mut out),
                        Err(r) => {
                            let _ = send.write_all(&out).await;
                            return Some((send, r));
                        }
                    },
                    (_, p) => {
                        next = Some(p);
                        break;
                    }
                }
            }
            if send.write_all(&out).await.is_err() {
                return None;
            }
            out.clear();
        }
        let _ = send.finish();
        None
    });
    // Every batch of this stream has the same key: made once, at the first batch that passes.
    let mut stream_key: Option<Arc<ProducerKey>> = None;
    loop {
        // A refusal from the store ends the ack task (it closes `rx`): stop reading at once,
        // so the edge hears of it without having to send another frame first.
        let read = tokio::select! {
            r = read_parted(&mut recv, &mut buf) => r,
            _ = tx.closed() => break,
        };
        let pieces = match read {
            Ok(Some(Parted::Batch(pieces))) => pieces,
            Ok(Some(Parted::Frame(_))) => {
                let _ = tx.send(Pending::Fail(refusal(ErrorCode::Protocol, "only batches on a data stream"))).await;
                break;
            }
            Ok(None) => break,
            Err(r) => {
                let _ = tx.send(Pending::Fail(r)).await;
                break;
            }
        };
        ctx.metrics.batches_received.inc();
        // Checked in the pieces it came in; the log copies them once, into its write buffer.
        let batch = match BatchParts::from_pieces(pieces, &ctx.limits) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Pending::Fail(refusal(ErrorCode::BadBatch, e))).await;
                break;
            }
        };
        let checked = session.check_batch(&stream, batch.header()).and_then(|range| match &stream_key {
            Some(k) => Ok((Arc::clone(k), range)),
            None => Ok((stream_key.insert(Arc::new(session.producer_key(&stream)?)).clone(), range)),
        });
        let (key, range) = match checked {
            Ok(kr) => kr,
            Err(r) => {
                let _ = tx.send(Pending::Fail(r)).await;
                break;
            }
        };
        match ctx.store.append_pipelined(Arc::clone(&key), range.clone(), batch).await {
            Ok(answer) => {
                if tx.send(Pending::Ack(key, range, answer)).await.is_err() {
                    break;
                }
            }
            Err(r) => {
                let _ = tx.send(Pending::Fail(r)).await;
                break;
            }
        }
    }
    drop(tx);
    if let Ok(Some((mut send, r))) = acks.await {
        fail_stream(&mut send, &mut recv, &r, &ctx).await;
    }
}

/// The ACK for a stored batch (a batch already in the bucket — a resend after its segment
/// tiered — carries the tiered mark too), or why the stream must close (`answer` is `None`
/// when the store stopped without one).
fn ack_frame(
    (key, range, answer): (Arc<ProducerKey>, std::ops::Range<u64>, Option<Result<Stored, Refusal>>),
    tiered: &watch::Receiver<Arc<crate::tier::TieredRanges>>,
) -> Result<Frame, Refusal> {
    match answer {
        Some(Ok(stored)) => {
            let in_bucket =
                stored == Stored::Duplicate && tiered.borrow().get(&key).is_some_and(|r| r.contains_range(&range));
            let m = if in_bucket { marks::DURABLE | marks::TIERED } else { marks::DURABLE };
            Ok(Frame::Ack { start: range.start, end: range.end, marks: m })
        }
        Some(Err(r)) => Err(r),
        None => Err(refusal(ErrorCode::Internal, "store stopped")),
    }
}

async fn fail_stream(send: &mut SendStream, recv: &mut RecvStream, r: &Refusal, ctx: &ServerContext) {
    if matches!(
        r.code,
        ErrorCode::BadBatch
            | ErrorCode::Protocol
            | ErrorCode::FrameTooLarge
            | ErrorCode::WrongProducer
            | ErrorCode::SeqConflict
    ) {
        ctx.metrics.refused(Refused::BadInput);
    }
    tracing::warn!(code = ?r.code, message = %r.message, "data stream closed");
    let _ = write_frame(send, &Frame::Error { code: r.code, message: r.message.clone() }).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from(r.code as u16));
}

fn refusal(code: ErrorCode, e: impl std::fmt::Display) -> Refusal {
    Refusal { code, message: e.to_string() }
}
