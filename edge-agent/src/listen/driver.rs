//! The listeners (TCP and TLS) and one task per device connection around
//! [`super::session::ConnSession`]. The codec is rumqttc's `mqttbytes` (v4 for 3.1.1, v5);
//! this file only moves bytes, keeps time and turns packets into session calls and back.
//!
//! Bounds per connection: the read buffer holds at most one packet of `packet_bytes_max`
//! (the codec refuses a larger one from its fixed header, before its body arrives); the
//! CONNECT must come within `connect_timeout`; silence beyond 1.5 × keep-alive closes it; at
//! most `inflight_max` PUBLISHes wait for acks. A bad device only ever closes its own
//! connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::auth::Users;
use super::config::ListenConfig;
use super::session::{
    Accepted, ConnSession, ConnectRequest, Credential, Ending, Limits, Out, PublishAction, Reason, SessionStore,
    Version, Will, handle_connect, will_due,
};
use crate::metrics::ListenMetrics;
use crate::writer::{Ack, ConnInfo, Incoming, Input};

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Bytes asked per read before the CONNECT is accepted: a connection that never sends one
/// costs little.
const CONNECT_CHUNK_BYTES: usize = 1 << 10;
/// Connections accepted beyond `connections_max` while they have not sent their CONNECT (so
/// that one more can be told "quota exceeded"); above it, a new socket is closed at once.
const CONNECTING_MAX: usize = 1024;
/// How long, and how many bytes, a closing connection reads and drops (see `linger`).
const LINGER: Duration = Duration::from_millis(200);
const LINGER_BYTES_MAX: usize = 1 << 20;
/// How long a new connection waits for the one it takes over to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// The bound listeners, before they serve.
pub struct Listeners {
    tcp: Vec<TcpListener>,
    tls: Vec<TcpListener>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").field("addrs", &self.local_addrs()).finish_non_exhaustive()
    }
}

impl Listeners {
    /// Binds every address of `config` and loads the TLS files; errors name the key.
    pub async fn bind(config: &ListenConfig) -> anyhow::Result<Listeners> {
        let mut tcp = Vec::new();
        for (i, a) in config.tcp.iter().enumerate() {
            tcp.push(TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("listen.tcp[{i}] {a}: {e}"))?);
        }
        let mut tls = Vec::new();
        for (i, a) in config.tls.iter().enumerate() {
            tls.push(TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("listen.tls[{i}] {a}: {e}"))?);
        }
        let acceptor = if config.tls.is_empty() {
            None
        } else {
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(config)?)))
        };
        Ok(Listeners { tcp, tls, acceptor })
    }

    /// The addresses bound (TCP, then TLS).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp.iter().chain(&self.tls).filter_map(|l| l.local_addr().ok()).collect()
    }
}

/// What the listeners need from the rest of the agent.
#[derive(Debug)]
pub struct ListenParams {
    /// `[listen]`.
    pub config: ListenConfig,
    /// First writer connection index of listen mode (the broker connections come first).
    pub conn_base: usize,
    /// Where PUBLISHes go.
    pub writer: mpsc::Sender<Input>,
    /// The writer's monotonic time base.
    pub epoch: Instant,
    /// Client ids the logs' tails hold (their redelivery memory survived a restart).
    pub known_clients: Vec<String>,
    /// Counters.
    pub metrics: Arc<ListenMetrics>,
    /// Becomes true at shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// Serves every listener until shutdown; then closes the connections (MQTT 5: server
/// shutting down) after the acks the writer released.
pub async fn drive_listeners(listeners: Listeners, p: ListenParams) {
    let limits = Limits {
        inflight_max: p.config.inflight_max,
        keep_alive_max_s: u16::try_from(p.config.keep_alive_max.0 / 1000).unwrap_or(u16::MAX),
        session_expiry_max_s: u32::try_from(p.config.session_expiry_max.0 / 1000).unwrap_or(u32::MAX),
        allow_anonymous: p.config.allow_anonymous,
    };
    let mut store = SessionStore::new(p.config.sessions_max);
    store.remember_known(p.known_clients, wall_ms().saturating_add(p.config.session_expiry_max.0));
    let shared = Arc::new(Shared {
        users: Arc::new(Users::new(&p.config.users)),
        limits,
        config: p.config,
        conn_base: p.conn_base,
        writer: p.writer,
        epoch: p.epoch,
        metrics: p.metrics,
        slots: Mutex::new(Slots::default()),
        store: Mutex::new(store),
        live: Mutex::new(HashMap::new()),
        serial: AtomicU64::new(0),
        shutdown: p.shutdown.clone(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners.tcp {
        tasks.spawn(accept_loop(l, None, shared.clone()));
    }
    for l in listeners.tls {
        tasks.spawn(accept_loop(l, listeners.acceptor.clone(), shared.clone()));
    }
    let mut shutdown = p.shutdown;
    let _ = shutdown.wait_for(|s| *s).await;
    tasks.abort_all();
    // Connections see the same signal and close themselves; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while shared.metrics.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Shared {
    config: ListenConfig,
    limits: Limits,
    users: Arc<Users>,
    conn_base: usize,
    writer: mpsc::Sender<Input>,
    epoch: Instant,
    metrics: Arc<ListenMetrics>,
    slots: Mutex<Slots>,
    store: Mutex<SessionStore>,
    /// Connected client ids: the connection's serial and how to make it close.
    live: Mutex<HashMap<String, (u64, Kick)>>,
    serial: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// Tells a connection to close; it answers on the enclosed sender once its session is stored.
type Kick = oneshot::Sender<oneshot::Sender<()>>;

/// Writer connection slots: freed ones are reused, so the writer's tables stay as large as
/// the most connections ever open at once.
#[derive(Debug, Default)]
struct Slots {
    free: Vec<usize>,
    next: usize,
}

impl Slots {
    fn take(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, mostly: wait rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.metrics.connections() >= shared.config.connections_max + CONNECTING_MAX {
            shared.metrics.add_protocol_error();
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // Counted until the task ends, however it ends.
            let _counted = Counted::new(&shared.metrics);
            let result = serve_transport(tcp, tls, &shared).await;
            if let Err(why) = result {
                shared.metrics.add_protocol_error();
                tracing::debug!(%peer, reason = %why, "device connection closed");
            }
        });
    }
}

struct Counted<'a>(&'a ListenMetrics);

impl<'a> Counted<'a> {
    fn new(m: &'a ListenMetrics) -> Self {
        m.connection_opened();
        Counted(m)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

async fn serve_transport(
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: &Shared,
) -> Result<(), String> {
    let timeout = shared.config.connect_timeout.duration();
    match tls {
        None => serve(tcp, false, shared).await,
        Some(acceptor) => {
            let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let has_cert = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
            serve(stream, has_cert, shared).await
        }
    }
}

/// A packet of either version, as the session needs it.
enum In {
    Connect(ConnectRequest, Option<(String, Bytes)>),
    Publish {
        qos: u8,
        pkid: u16,
        dup: bool,
        topic: String,
        payload: Bytes,
        alias: bool,
    },
    PubRel(u16),
    Subscribe(u16, usize),
    Unsubscribe(u16, usize),
    PingReq,
    /// DISCONNECT: the MQTT 5 session expiry it sets, and whether its reason is 0x04
    /// "disconnect with Will Message".
    Disconnect {
        expiry: Option<u32>,
        with_will: bool,
    },
    /// A packet only a server sends, or one this agent never asked for.
    Unexpected(&'static str),
}

enum DecodeError {
    Incomplete,
    TooLarge(usize),
    Malformed(String),
    /// A CONNECT of another protocol version (MQTT 3.1, or an unknown level).
    Unsupported(String),
}

fn decode(version: Version, buf: &mut BytesMut, max: usize) -> Result<In, DecodeError> {
    match version {
        Version::V311 => {
            use rumqttc::mqttbytes::Error as E;
            use rumqttc::mqttbytes::v4::Packet as P;
            match P::read(buf, max) {
                Ok(P::Publish(p)) => Ok(In::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    dup: p.dup,
                    topic: p.topic,
                    payload: p.payload,
                    alias: false,
                }),
                Ok(P::PubRel(r)) => Ok(In::PubRel(r.pkid)),
                Ok(P::Subscribe(s)) => Ok(In::Subscribe(s.pkid, s.filters.len())),
                Ok(P::Unsubscribe(u)) => Ok(In::Unsubscribe(u.pkid, u.topics.len())),
                Ok(P::PingReq) => Ok(In::PingReq),
                Ok(P::Disconnect) => Ok(In::Disconnect { expiry: None, with_will: false }),
                Ok(P::Connect(_)) => Ok(In::Unexpected("a second CONNECT")),
                Ok(_) => Ok(In::Unexpected("a packet only a server sends")),
                Err(E::InsufficientBytes(_)) => Err(DecodeError::Incomplete),
                Err(E::PayloadSizeLimitExceeded(n)) => Err(DecodeError::TooLarge(n)),
                Err(e) => Err(DecodeError::Malformed(e.to_string())),
            }
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::Error as E;
            use rumqttc::v5::mqttbytes::v5::Packet as P;
            let first = buf.first().copied();
            // A DISCONNECT of a reason code alone (remaining length 1, MQTT 5 3.14.2.2.1):
            // rumqttc 0.25 wants a property length after it and would wait for more bytes.
            if let [0xE0, 0x01, reason, ..] = buf[..] {
                let _ = buf.split_to(3);
                return Ok(In::Disconnect { expiry: None, with_will: reason == 0x04 });
            }
            match P::read(buf, Some(u32::try_from(max).unwrap_or(u32::MAX))) {
                // rumqttc 0.25 refuses a DISCONNECT without reason code, which MQTT 5
                // (3.14.2.1) allows and mosquitto sends; the reader consumed it already.
                Err(E::PayloadRequired) if first == Some(0xE0) => Ok(In::Disconnect { expiry: None, with_will: false }),
                Ok(P::Publish(p)) => Ok(In::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    dup: p.dup,
                    alias: p.properties.as_ref().is_some_and(|pp| pp.topic_alias.is_some()),
                    topic: String::from_utf8(p.topic.to_vec())
                        .map_err(|_| DecodeError::Malformed("topic is not UTF-8".into()))?,
                    payload: p.payload,
                }),
                Ok(P::PubRel(r)) => Ok(In::PubRel(r.pkid)),
                Ok(P::Subscribe(s)) => Ok(In::Subscribe(s.pkid, s.filters.len())),
                Ok(P::Unsubscribe(u)) => Ok(In::Unsubscribe(u.pkid, u.filters.len())),
                Ok(P::PingReq(_)) => Ok(In::PingReq),
                Ok(P::Disconnect(d)) => Ok(In::Disconnect {
                    with_will: d.reason_code
                        == rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::DisconnectWithWillMessage,
                    expiry: d.properties.and_then(|p| p.session_expiry_interval),
                }),
                Ok(P::Connect(..)) => Ok(In::Unexpected("a second CONNECT")),
                Ok(P::Auth(_)) => Ok(In::Unexpected("AUTH (no enhanced authentication is offered)")),
                Ok(_) => Ok(In::Unexpected("a packet only a server sends")),
                Err(E::InsufficientBytes(_)) => Err(DecodeError::Incomplete),
                Err(E::PayloadSizeLimitExceeded { pkt_size, .. }) => Err(DecodeError::TooLarge(pkt_size)),
                Err(e) => Err(DecodeError::Malformed(e.to_string())),
            }
        }
    }
}

/// Decodes the first packet, which must be a CONNECT, of either version.
fn decode_connect(buf: &mut BytesMut, max: usize) -> Result<In, DecodeError> {
    use rumqttc::v5::mqttbytes::Error as E5;
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let mut probe = buf.clone();
    match P5::read(&mut probe, Some(u32::try_from(max).unwrap_or(u32::MAX))) {
        Ok(P5::Connect(c, will, login)) => {
            *buf = probe;
            let will = match will {
                Some(w) => Some(Will {
                    topic: String::from_utf8(w.topic.to_vec())
                        .map_err(|_| DecodeError::Malformed("Will topic is not UTF-8".into()))?,
                    payload: w.message,
                    delay_s: w.properties.and_then(|p| p.delay_interval).unwrap_or(0),
                }),
                None => None,
            };
            let req = ConnectRequest {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive_s: c.keep_alive,
                session_expiry_s: c.properties.and_then(|p| p.session_expiry_interval),
                will,
            };
            Ok(In::Connect(req, login.map(|l| (l.username, Bytes::from(l.password)))))
        }
        Ok(_) => Err(DecodeError::Malformed("the first packet is not CONNECT".into())),
        Err(E5::InsufficientBytes(_)) => Err(DecodeError::Incomplete),
        Err(E5::PayloadSizeLimitExceeded { pkt_size, .. }) => Err(DecodeError::TooLarge(pkt_size)),
        Err(E5::InvalidProtocolLevel(4)) => {
            use rumqttc::mqttbytes::v4::Packet as P4;
            match P4::read(buf, max) {
                Ok(P4::Connect(c)) => {
                    let req = ConnectRequest {
                        version: Version::V311,
                        client_id: c.client_id,
                        clean_start: c.clean_session,
                        keep_alive_s: c.keep_alive,
                        session_expiry_s: None,
                        will: c.last_will.map(|w| Will { topic: w.topic, payload: w.message, delay_s: 0 }),
                    };
                    Ok(In::Connect(req, c.login.map(|l| (l.username, Bytes::from(l.password)))))
                }
                Ok(_) => Err(DecodeError::Malformed("the first packet is not CONNECT".into())),
                Err(e) => Err(DecodeError::Malformed(e.to_string())),
            }
        }
        Err(E5::InvalidProtocolLevel(n)) => Err(DecodeError::Unsupported(format!("protocol level {n}"))),
        Err(E5::InvalidProtocol) => Err(DecodeError::Unsupported("protocol name other than MQTT (MQTT 3.1?)".into())),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

/// Encodes `out` for `version` into `buf`.
fn encode(version: Version, out: Out, buf: &mut BytesMut) {
    // Encoding a fixed-size ack into a BytesMut cannot fail.
    let _ = match version {
        Version::V311 => {
            use rumqttc::mqttbytes::v4::{PubAck, PubComp, PubRec, SubAck, SubscribeReasonCode, UnsubAck};
            match out {
                Out::PubAck(pkid, _) => PubAck::new(pkid).write(buf),
                Out::PubRec(pkid, _) => PubRec::new(pkid).write(buf),
                Out::PubComp(pkid, _) => PubComp::new(pkid).write(buf),
                Out::SubAck(pkid, _, n) => SubAck::new(pkid, vec![SubscribeReasonCode::Failure; n]).write(buf),
                Out::UnsubAck(pkid, _) => UnsubAck::new(pkid).write(buf),
                Out::PingResp => rumqttc::mqttbytes::v4::PingResp.write(buf),
            }
            .map_err(|_| ())
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::v5;
            let packet = match out {
                Out::PubAck(pkid, r) => {
                    v5::Packet::PubAck(v5::PubAck { pkid, reason: puback_reason(r), properties: None })
                }
                Out::PubRec(pkid, r) => {
                    v5::Packet::PubRec(v5::PubRec { pkid, reason: pubrec_reason(r), properties: None })
                }
                Out::PubComp(pkid, r) => v5::Packet::PubComp(v5::PubComp {
                    pkid,
                    reason: if r == Reason::Success {
                        v5::PubCompReason::Success
                    } else {
                        v5::PubCompReason::PacketIdentifierNotFound
                    },
                    properties: None,
                }),
                Out::SubAck(pkid, _, n) => v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; n],
                    properties: Some(v5::SubAckProperties {
                        reason_string: Some("this agent takes PUBLISH only; it is not a broker".into()),
                        user_properties: Vec::new(),
                    }),
                }),
                Out::UnsubAck(pkid, n) => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; n.max(1)],
                    properties: None,
                }),
                Out::PingResp => v5::Packet::PingResp(v5::PingResp),
            };
            packet.write(buf, None).map_err(|_| ())
        }
    };
}

/// Maps a session's reason onto rumqttc's PUBACK or PUBREC reason enum (same variant names).
macro_rules! ack_reason {
    ($r:expr, $to:ty) => {{
        type R = $to;
        match $r {
            Reason::Success => R::Success,
            Reason::NoMatchingSubscribers => R::NoMatchingSubscribers,
            Reason::NotAuthorized => R::NotAuthorized,
            Reason::TopicNameInvalid => R::TopicNameInvalid,
            Reason::QuotaExceeded => R::QuotaExceeded,
            Reason::PayloadFormatInvalid => R::PayloadFormatInvalid,
            Reason::ImplementationSpecificError => R::ImplementationSpecificError,
            _ => R::UnspecifiedError,
        }
    }};
}

fn puback_reason(r: Reason) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    ack_reason!(r, rumqttc::v5::mqttbytes::v5::PubAckReason)
}

fn pubrec_reason(r: Reason) -> rumqttc::v5::mqttbytes::v5::PubRecReason {
    ack_reason!(r, rumqttc::v5::mqttbytes::v5::PubRecReason)
}

fn connack(version: Version, result: &Result<Accepted, Reason>, limits: &Limits, max: usize, buf: &mut BytesMut) {
    match version {
        Version::V311 => {
            use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode as C};
            let (code, present) = match result {
                Ok(a) => (C::Success, a.session_present),
                Err(Reason::BadUserNameOrPassword) => (C::BadUserNamePassword, false),
                Err(Reason::NotAuthorized) => (C::NotAuthorized, false),
                Err(Reason::ClientIdentifierNotValid) => (C::BadClientId, false),
                Err(Reason::UnsupportedProtocolVersion) => (C::RefusedProtocolVersion, false),
                // 3.1.1 has no code for a bad Will topic: a protocol violation, closed unanswered.
                Err(Reason::TopicNameInvalid) => return,
                Err(_) => (C::ServiceUnavailable, false),
            };
            let _ = ConnAck::new(code, present).write(buf);
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, ConnectReturnCode as C};
            let code = match result {
                Ok(_) => C::Success,
                Err(Reason::BadUserNameOrPassword) => C::BadUserNamePassword,
                Err(Reason::NotAuthorized) => C::NotAuthorized,
                Err(Reason::ClientIdentifierNotValid) => C::ClientIdentifierNotValid,
                Err(Reason::QuotaExceeded) => C::QuotaExceeded,
                Err(Reason::UnsupportedProtocolVersion) => C::UnsupportedProtocolVersion,
                Err(Reason::ServerShuttingDown) => C::ServerUnavailable,
                Err(Reason::TopicNameInvalid) => C::TopicNameInvalid,
                Err(_) => C::UnspecifiedError,
            };
            let properties = result.as_ref().ok().map(|a| ConnAckProperties {
                session_expiry_interval: Some(a.session_expiry_s),
                receive_max: Some(limits.inflight_max),
                max_qos: None,
                // Retained PUBLISHes are taken as any other (nothing here serves subscribers).
                retain_available: None,
                max_packet_size: Some(u32::try_from(max).unwrap_or(u32::MAX)),
                assigned_client_identifier: a.assigned.then(|| a.client_id.clone()),
                topic_alias_max: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: Some(a.keep_alive_s),
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            let present = result.as_ref().is_ok_and(|a| a.session_present);
            let _ = rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ConnAck { session_present: present, code, properties })
                .write(buf, None);
        }
    }
}

fn disconnect_v5(reason: Reason, buf: &mut BytesMut) {
    use rumqttc::v5::mqttbytes::v5::{Disconnect, DisconnectProperties, DisconnectReasonCode as D, Packet};
    let code = match reason {
        Reason::MalformedPacket => D::MalformedPacket,
        Reason::ProtocolError => D::ProtocolError,
        Reason::NotAuthorized => D::NotAuthorized,
        Reason::ServerShuttingDown => D::ServerShuttingDown,
        Reason::KeepAliveTimeout => D::KeepAliveTimeout,
        Reason::SessionTakenOver => D::SessionTakenOver,
        Reason::TopicNameInvalid => D::TopicNameInvalid,
        Reason::ReceiveMaximumExceeded => D::ReceiveMaximumExceeded,
        Reason::TopicAliasInvalid => D::TopicAliasInvalid,
        Reason::PacketTooLarge => D::PacketTooLarge,
        Reason::QuotaExceeded => D::QuotaExceeded,
        Reason::PayloadFormatInvalid => D::PayloadFormatInvalid,
        _ => D::ImplementationSpecificError,
    };
    // Always with properties: rumqttc 0.25 writes one byte more than the remaining length it
    // declares for a DISCONNECT without them. The reason string helps the device's operator.
    let properties = DisconnectProperties {
        session_expiry_interval: None,
        reason_string: Some(format!("{reason:?}")),
        user_properties: Vec::new(),
        server_reference: None,
    };
    let _ = Packet::Disconnect(Disconnect { reason_code: code, properties: Some(properties) }).write(buf, None);
}

/// Reads into `buf` until `decode` gives a packet or fails; `None` at EOF.
async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    mut decode: impl FnMut(&mut BytesMut) -> Result<In, DecodeError>,
) -> Result<Option<In>, DecodeError> {
    loop {
        match decode(buf) {
            Err(DecodeError::Incomplete) => {}
            other => return other.map(Some),
        }
        buf.reserve(CONNECT_CHUNK_BYTES);
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S, has_cert: bool, shared: &Shared) -> Result<(), String> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let max = usize::try_from(shared.config.packet_bytes_max.0).unwrap_or(usize::MAX);
    let mut buf = BytesMut::with_capacity(CONNECT_CHUNK_BYTES);
    let first = tokio::time::timeout(
        shared.config.connect_timeout.duration(),
        read_packet(&mut rd, &mut buf, |b| decode_connect(b, max)),
    )
    .await;
    let (req, login) = match first {
        Err(_) => return Err("no CONNECT within connect_timeout".into()),
        Ok(Ok(None)) => return Err("closed before CONNECT".into()),
        Ok(Ok(Some(In::Connect(req, login)))) => (req, login),
        Ok(Ok(Some(_))) => unreachable!("decode_connect gives only CONNECT"),
        Ok(Err(DecodeError::TooLarge(n))) => return Err(format!("CONNECT of {n} bytes above packet_bytes_max")),
        Ok(Err(DecodeError::Malformed(e))) => return Err(format!("bad CONNECT: {e}")),
        Ok(Err(DecodeError::Unsupported(what))) => {
            // MQTT 3.1.1 (3.1.2.2): CONNACK 0x01 "unacceptable protocol level", then close.
            shared.metrics.refuse(Reason::UnsupportedProtocolVersion.code());
            let mut out = BytesMut::new();
            connack(Version::V311, &Err(Reason::UnsupportedProtocolVersion), &shared.limits, max, &mut out);
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
            linger(&mut rd).await;
            return Err(format!("unsupported CONNECT: {what}"));
        }
        Ok(Err(DecodeError::Incomplete)) => return Err("closed inside CONNECT".into()),
    };
    let version = req.version;
    let cred = match login {
        Some((user, password)) => {
            let ok = {
                let (user, users) = (user.clone(), shared.users.clone());
                // PBKDF2 takes tens of ms: off the runtime's workers.
                tokio::task::spawn_blocking(move || users.check(&user, &password)).await.unwrap_or(false)
            };
            Credential::Password { user, ok }
        }
        None if has_cert => Credential::Certificate,
        None => Credential::None,
    };
    let full = shared.metrics.connections() > shared.config.connections_max;
    let now = wall_ms();
    let nonce: u64 = rand::random();
    let filters = match &cred {
        Credential::Password { user, .. } => shared.users.publish_filters(user).map(<[String]>::to_vec),
        _ => None,
    };
    // Whether a session is stored is only known once the client id is; take it after the
    // decision, when the id (maybe assigned) is final.
    let probe = handle_connect(&req, &cred, &shared.limits, full, false, nonce, filters.as_deref());
    let mut out = BytesMut::new();
    let accepted = match probe {
        Err(reason) => {
            shared.metrics.refuse(reason.code());
            connack(version, &Err(reason), &shared.limits, max, &mut out);
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
            linger(&mut rd).await;
            return Err(format!("CONNECT refused: {reason:?}"));
        }
        Ok(a) => a,
    };
    let client_id = accepted.client_id.clone();
    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    // A second connection with the same client id takes the session over (MQTT): the older
    // one closes, and hands its session back, first.
    let (kick_tx, mut kick_rx) = oneshot::channel::<oneshot::Sender<()>>();
    let older = lock(&shared.live).insert(client_id.clone(), (serial, kick_tx));
    if let Some((_, kick)) = older {
        let (done_tx, done_rx) = oneshot::channel();
        if kick.send(done_tx).is_ok() {
            let _ = tokio::time::timeout(TAKEOVER_WAIT, done_rx).await;
        }
    }
    let (present, stored) = lock(&shared.store).take(&client_id, now);
    let stored = if req.clean_start { Default::default() } else { stored };
    let accepted = Accepted { session_present: present && !req.clean_start, ..accepted };
    let mut session = ConnSession::new(version, shared.limits.inflight_max, stored, filters.as_deref());
    let mut session_expiry_s = accepted.session_expiry_s;

    let conn = shared.conn_base + lock(&shared.slots).take();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
    let info = ConnInfo {
        client_id: client_id.clone(),
        inflight_max: usize::from(shared.limits.inflight_max),
        refuse_when_full: version == Version::V5,
    };
    let attached =
        shared.writer.send(Input::Attach { conn, info, clean: req.clean_start, acks: Some(ack_tx) }).await.is_ok();
    shared.metrics.add_accepted();
    connack(version, &Ok(accepted.clone()), &shared.limits, max, &mut out);

    let keep_alive = Duration::from_millis(u64::from(accepted.keep_alive_s) * 1500);
    let mut shutdown = shared.shutdown.clone();
    let mut done_signal: Option<oneshot::Sender<()>> = None;
    // How the connection ended decides whether its Will is due; failures unless said otherwise.
    let mut ending = Ending::Failed;
    let result: Result<(), String> = 'conn: {
        if !attached {
            break 'conn Err("the writer is gone".into());
        }
        let mut deadline = tokio::time::Instant::now() + keep_alive;
        loop {
            if !out.is_empty() {
                if let Err(e) = wr.write_all(&out).await {
                    break 'conn Err(format!("write: {e}"));
                }
                out.clear();
            }
            // Packets already buffered are handled before reading more.
            let decoded =
                if session.reading_paused() { Err(DecodeError::Incomplete) } else { decode(version, &mut buf, max) };
            let packet = match decoded {
                Ok(p) => Some(p),
                Err(DecodeError::Incomplete) => None,
                Err(DecodeError::TooLarge(n)) => {
                    shared.metrics.refuse(Reason::PacketTooLarge.code());
                    close_with(version, Reason::PacketTooLarge, &mut out);
                    break 'conn Err(format!("packet of {n} bytes above packet_bytes_max"));
                }
                Err(DecodeError::Malformed(e) | DecodeError::Unsupported(e)) => {
                    close_with(version, Reason::MalformedPacket, &mut out);
                    break 'conn Err(format!("malformed packet: {e}"));
                }
            };
            if let Some(packet) = packet {
                deadline = tokio::time::Instant::now() + keep_alive;
                match handle_packet(packet, &mut session, &mut session_expiry_s, conn, version, shared, &mut out).await
                {
                    Step::Go => continue,
                    Step::Disconnect { with_will } => {
                        ending = Ending::Disconnect { with_will };
                        break 'conn Ok(());
                    }
                    Step::Stop(r) => break 'conn r,
                }
            }
            let paused = session.reading_paused();
            if paused {
                // The device waits for our acks: its keep-alive starts again when we read.
                deadline = tokio::time::Instant::now() + keep_alive;
            }
            // read_buf reads nothing into a full buffer (and that would look like EOF).
            if buf.capacity() - buf.len() < CONNECT_CHUNK_BYTES {
                buf.reserve(READ_CHUNK_BYTES);
            }
            tokio::select! {
                n = rd.read_buf(&mut buf), if !paused => {
                    match n {
                        Ok(0) => break 'conn Err("closed by the device without DISCONNECT".into()),
                        Err(e) => break 'conn Err(format!("read: {e}")),
                        Ok(_) => {}
                    }
                }
                ack = ack_rx.recv() => {
                    let Some(ack) = ack else {
                        // The writer stopped (shutdown) after releasing its last acks.
                        close_with(version, Reason::ServerShuttingDown, &mut out);
                        ending = Ending::Shutdown;
                        break 'conn Ok(());
                    };
                    push_ack(&mut session, ack, version, &shared.metrics, &mut out);
                    while let Ok(ack) = ack_rx.try_recv() {
                        push_ack(&mut session, ack, version, &shared.metrics, &mut out);
                    }
                }
                // While reading is paused the silence is ours, not the device's.
                _ = tokio::time::sleep_until(deadline), if !paused => {
                    close_with(version, Reason::KeepAliveTimeout, &mut out);
                    break 'conn Err("keep-alive timeout".into());
                }
                kicked = &mut kick_rx => {
                    done_signal = kicked.ok();
                    close_with(version, Reason::SessionTakenOver, &mut out);
                    ending = Ending::TakenOver;
                    break 'conn Ok(());
                }
                _ = shutdown.wait_for(|s| *s) => {
                    // The writer released its last acks before the shutdown signal.
                    while let Ok(ack) = ack_rx.try_recv() {
                        push_ack(&mut session, ack, version, &shared.metrics, &mut out);
                    }
                    close_with(version, Reason::ServerShuttingDown, &mut out);
                    ending = Ending::Shutdown;
                    break 'conn Ok(());
                }
            }
        }
    };
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    linger(&mut rd).await;
    if attached && let Some(will) = will_due(req.will, ending, session_expiry_s) {
        // A delayed Will waits with the connection's slot still attached (its client id
        // names the record); a new connection of the device takes the session over and
        // cancels it, as does a shutdown.
        let delay = Duration::from_secs(u64::from(will.delay_s));
        let store = delay.is_zero()
            || tokio::select! {
                _ = tokio::time::sleep(delay) => true,
                kicked = &mut kick_rx => {
                    done_signal = kicked.ok();
                    false
                }
                _ = shutdown.wait_for(|s| *s) => false,
            };
        if store {
            store_will(conn, will, shared).await;
        }
    }
    let _ = shared.writer.send(Input::Detach { conn }).await;
    lock(&shared.slots).free.push(conn - shared.conn_base);
    {
        let mut live = lock(&shared.live);
        if live.get(&client_id).is_some_and(|(s, _)| *s == serial) {
            live.remove(&client_id);
        }
    }
    lock(&shared.store).park(client_id, session.into_stored(), session_expiry_s, wall_ms());
    if let Some(done) = done_signal {
        let _ = done.send(());
    }
    result
}

/// Hands a device's Will to the writer as a QoS 0 PUBLISH of its connection `conn`.
async fn store_will(conn: usize, will: Will, shared: &Shared) {
    let msg = Incoming {
        conn,
        pkid: 0,
        qos: 0,
        dup: false,
        will: true,
        topic: will.topic,
        payload: will.payload,
        ts_ms: wall_ms() as i64,
        received_us: shared.epoch.elapsed().as_micros() as u64,
    };
    if shared.writer.send(Input::Publish(msg)).await.is_ok() {
        shared.metrics.add_will();
    }
}

/// After our FIN, reads and drops what the device still sends, briefly: closing a socket
/// with unread bytes sends a reset, which can destroy the DISCONNECT that says why.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES_MAX;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

enum Step {
    Go,
    /// The device sent DISCONNECT (`with_will`: MQTT 5 reason 0x04).
    Disconnect {
        with_will: bool,
    },
    Stop(Result<(), String>),
}

async fn handle_packet(
    packet: In,
    session: &mut ConnSession,
    session_expiry_s: &mut u32,
    conn: usize,
    version: Version,
    shared: &Shared,
    out: &mut BytesMut,
) -> Step {
    match packet {
        In::Publish { alias: true, .. } => {
            close_with(version, Reason::TopicAliasInvalid, out);
            Step::Stop(Err("topic alias (none offered)".into()))
        }
        In::Publish { qos, pkid, dup, topic, payload, .. } => match session.handle_publish(qos, pkid, dup, &topic) {
            PublishAction::Take { dup } => {
                let msg = Incoming {
                    conn,
                    pkid,
                    qos,
                    dup,
                    will: false,
                    topic,
                    payload,
                    ts_ms: wall_ms() as i64,
                    received_us: shared.epoch.elapsed().as_micros() as u64,
                };
                if shared.writer.send(Input::Publish(msg)).await.is_err() {
                    return Step::Stop(Err("the writer is gone".into()));
                }
                Step::Go
            }
            PublishAction::Ignore => Step::Go,
            PublishAction::Answer(o) => {
                if let Out::PubAck(_, r) | Out::PubRec(_, r) = o
                    && r.code() >= 0x80
                {
                    shared.metrics.refuse(r.code());
                }
                encode(version, o, out);
                Step::Go
            }
            PublishAction::Close(r) => {
                shared.metrics.refuse(r.code());
                close_with(version, r, out);
                Step::Stop(Err(format!("PUBLISH refused: {r:?}")))
            }
        },
        In::PubRel(pkid) => {
            encode(version, session.handle_pubrel(pkid), out);
            Step::Go
        }
        In::Subscribe(pkid, n) => {
            let suback = session.handle_subscribe(pkid, n);
            if let Out::SubAck(_, r, _) = suback {
                shared.metrics.refuse(r.code());
            }
            encode(version, suback, out);
            Step::Go
        }
        In::Unsubscribe(pkid, n) => {
            encode(version, Out::UnsubAck(pkid, n), out);
            Step::Go
        }
        In::PingReq => {
            encode(version, Out::PingResp, out);
            Step::Go
        }
        In::Disconnect { expiry, with_will } => {
            if let Some(e) = expiry {
                *session_expiry_s = e.min(shared.limits.session_expiry_max_s);
            }
            Step::Disconnect { with_will }
        }
        In::Connect(..) | In::Unexpected(_) => {
            let what = if let In::Unexpected(w) = packet { w } else { "CONNECT" };
            close_with(version, Reason::ProtocolError, out);
            Step::Stop(Err(format!("protocol error: {what}")))
        }
    }
}

fn push_ack(session: &mut ConnSession, ack: Ack, version: Version, metrics: &ListenMetrics, out: &mut BytesMut) {
    if let Some(o) = session.handle_durable(ack.pkid, ack.outcome) {
        if let Out::PubAck(_, r) | Out::PubRec(_, r) = o
            && r.code() >= 0x80
        {
            metrics.refuse(r.code());
        }
        encode(version, o, out);
    }
}

/// MQTT 5 says why before closing; 3.1.1 just closes.
fn close_with(version: Version, reason: Reason, out: &mut BytesMut) {
    if version == Version::V5 {
        disconnect_v5(reason, out);
    }
}

/// TLS 1.2 and 1.3 (devices often lack 1.3) with the ring provider; a client certificate is
/// required, and checked against `client_ca_file`, when that is set.
fn tls_config(config: &ListenConfig) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |key: &str, f: &Option<std::path::PathBuf>| -> anyhow::Result<Vec<u8>> {
        let f = f.as_ref().ok_or_else(|| anyhow::anyhow!("listen.{key}: required with listen.tls"))?;
        std::fs::read(f).map_err(|e| anyhow::anyhow!("listen.{key} {}: {e}", f.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("cert_file", &config.cert_file)?)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("listen.cert_file: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&read("key_file", &config.key_file)?)
        .map_err(|e| anyhow::anyhow!("listen.key_file: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS versions: {e}"))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(_) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read("client_ca_file", &config.client_ca_file)?) {
                let c = c.map_err(|e| anyhow::anyhow!("listen.client_ca_file: {e}"))?;
                roots.add(c).map_err(|e| anyhow::anyhow!("listen.client_ca_file: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| anyhow::anyhow!("listen.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(certs, key).map_err(|e| anyhow::anyhow!("listen.cert_file / key_file: {e}"))
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8], max: usize) {
        let mut buf = BytesMut::from(bytes);
        let _ = decode_connect(&mut buf, max);
        for version in [Version::V311, Version::V5] {
            let mut buf = BytesMut::from(bytes);
            // Each call consumes a packet or fails; a bounded number of rounds either way.
            for _ in 0..64 {
                match decode(version, &mut buf, max) {
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// rumqttc's decoders, as this driver calls them, never panic on any bytes.
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            decode_all(&bytes, 256);
        }

        /// Nor on bytes that start like real packets (a valid fixed header of each type).
        #[test]
        fn decoding_packet_shaped_bytes_never_panics(
            kind in 1u8..16,
            flags in 0u8..16,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = vec![(kind << 4) | flags];
            let mut len = body.len();
            loop {
                let mut b = (len % 128) as u8;
                len /= 128;
                if len > 0 {
                    b |= 0x80;
                }
                bytes.push(b);
                if len == 0 {
                    break;
                }
            }
            bytes.extend_from_slice(&body);
            decode_all(&bytes, 1024);
        }
    }

    #[test]
    fn a_packet_above_the_bound_is_refused_from_its_header() {
        // A PUBLISH announcing 1 MiB, of which only the header arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]);
        assert!(matches!(decode(Version::V311, &mut buf, 4096), Err(DecodeError::TooLarge(_))));
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]);
        assert!(matches!(decode(Version::V5, &mut buf, 4096), Err(DecodeError::TooLarge(_))));
    }
}
