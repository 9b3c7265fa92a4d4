//! One broker connection (subscribe mode) with rumqttc: persistent session, QoS 1
//! subscriptions, manual acks. PUBLISHes go to the writer; the PUBACKs the writer releases come
//! back on a channel and are sent in that order. Reconnects back off exponentially with jitter
//! and resubscribe. The broker's `$SYS` drop counter is watched and reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::config::{BrokerConfig, Config, MqttVersion, parse_broker_url};
use crate::metrics::{ConnectionId, Metrics};
use crate::writer::{Incoming, Input};

/// Mosquitto's count of messages it dropped (queue or inflight limits).
pub const SYS_DROPPED_TOPIC: &str = "$SYS/broker/publish/messages/dropped";

/// Largest packet accepted from the broker. Keep the broker's `message_size_limit` below it:
/// a larger message would make the client drop the connection, and the broker redeliver it.
pub const MAX_PACKET_BYTES: usize = 64 << 20;

/// Everything a connection task needs.
#[derive(Debug)]
pub struct ConnParams {
    /// Index of the connection.
    pub conn: usize,
    /// Its config.
    pub broker: BrokerConfig,
    /// Client id to use.
    pub client_id: String,
    /// Password, already read from the environment.
    pub password: Option<String>,
    /// Where PUBLISHes go.
    pub writer: mpsc::Sender<Input>,
    /// PUBACKs to send, in order, with the connection generation they belong to.
    pub acks: mpsc::UnboundedReceiver<crate::writer::Ack>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// This connection's metric id.
    pub metric_id: ConnectionId,
    /// The writer's monotonic time base.
    pub epoch: Instant,
    /// Becomes true at shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// Drives the connection until shutdown. Returns after sending DISCONNECT.
pub async fn drive_connection(p: ConnParams) {
    match p.broker.protocol {
        MqttVersion::V311 => v311::drive(p).await,
        MqttVersion::V5 => v5::drive(p).await,
    }
}

/// The password to connect with, for `config`'s broker `i`.
pub fn password(config: &Config, i: usize) -> Result<Option<String>, String> {
    Config::broker_password(&config.brokers[i])
}

/// Reconnect delay: exponential from `min` to `max`, with ±50 % jitter.
fn backoff(attempt: u32, b: &BrokerConfig) -> Duration {
    let base = b.reconnect_min.0.saturating_mul(1u64 << attempt.min(20)).min(b.reconnect_max.0);
    let jitter = rand::thread_rng().gen_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Room in rumqttc's request channel: every ack of a full window, and subscriptions besides.
fn request_capacity(b: &BrokerConfig) -> usize {
    usize::from(b.inflight_max) * 2 + 16
}

/// The TLS transport for an `mqtts://` broker (its `ca_file` as the only root), or `None`.
fn tls_transport(b: &BrokerConfig) -> Result<Option<rumqttc::Transport>, String> {
    Ok(ca_bytes(b)?.map(|ca| {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple { ca, alpn: None, client_auth: None })
    }))
}

fn ca_bytes(b: &BrokerConfig) -> Result<Option<Vec<u8>>, String> {
    let (tls, _, _) = parse_broker_url(&b.url)?;
    match (&b.ca_file, tls) {
        (_, false) => Ok(None),
        (Some(path), true) => std::fs::read(path).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        (None, true) => Err(format!("broker {}: mqtts:// needs ca_file", b.name)),
    }
}

/// What the two protocol versions have in common, as the loop below needs it.
enum Event {
    Publish { pkid: u16, qos: u8, dup: bool, topic: String, payload: Bytes },
    ConnAck { session_present: bool },
    SubAck,
    SentDisconnect,
    Other,
}

/// The shared connection loop; `$poll`, `$ack`, `$subscribe` and `$disconnect` differ by
/// version. Written as a macro because rumqttc's v4 and v5 clients share no trait.
macro_rules! connection_loop {
    ($p:ident, $client:ident, $eventloop:ident, $to_event:path, $publish_for_ack:path, $qos1:expr, $qos0:expr) => {{
        let mut p = $p;
        let name = p.broker.name.clone();
        // PUBACKs leave from their own task so the event loop never waits on the request
        // channel it is supposed to drain.
        // An ack of an older generation is for a message the broker redelivers on the new
        // connection (and the writer acks again): sending it could acknowledge a different
        // message that reuses the packet id.
        let ack_client = $client.clone();
        let generation = Arc::new(AtomicU64::new(0));
        let ack_generation = generation.clone();
        let mut acks = std::mem::replace(&mut p.acks, mpsc::unbounded_channel().1);
        let mut ack_task = tokio::spawn(async move {
            while let Some(ack) = acks.recv().await {
                if ack.generation != ack_generation.load(Ordering::Acquire) {
                    continue;
                }
                if ack_client.ack(&$publish_for_ack(ack.pkid)).await.is_err() {
                    break;
                }
            }
        });
        let mut attempt = 0u32;
        let mut last_dropped: Option<u64> = None;
        loop {
            let polled = tokio::select! {
                r = $eventloop.poll() => r,
                _ = p.shutdown.changed() => break,
            };
            match polled.map($to_event) {
                Ok(Event::SubAck) => {
                    // Connected counts once the subscriptions hold: before that, a message
                    // published to the broker would not be kept for this session.
                    p.metrics.set_broker_connected(p.metric_id, true);
                }
                Ok(Event::ConnAck { session_present }) => {
                    attempt = 0;
                    tracing::info!(connection = %name, session_present, "connected to broker");
                    let client = $client.clone();
                    let filters = p.broker.subscriptions.clone();
                    tokio::spawn(async move {
                        for f in filters {
                            let _ = client.subscribe(f, $qos1).await;
                        }
                        let _ = client.subscribe(SYS_DROPPED_TOPIC, $qos0).await;
                    });
                }
                Ok(Event::Publish { topic, payload, .. }) if topic == SYS_DROPPED_TOPIC => {
                    let n = std::str::from_utf8(&payload).ok().and_then(|s| s.trim().parse::<u64>().ok());
                    if let Some(n) = n {
                        p.metrics.set_broker_dropped_messages(n);
                        if last_dropped.is_some_and(|l| n > l) {
                            tracing::error!(connection = %name, dropped = n, "the broker is dropping messages: raise its max_queued_messages / max_inflight_messages (README)");
                        }
                        last_dropped = Some(n);
                    }
                }
                Ok(Event::Publish { pkid, qos, dup, topic, payload }) => {
                    let msg = Incoming {
                        conn: p.conn,
                        pkid,
                        qos,
                        dup,
                        will: false,
                        topic,
                        payload,
                        ts_ms: now_ms(),
                        received_us: p.epoch.elapsed().as_micros() as u64,
                    };
                    if p.writer.send(Input::Publish(msg)).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Other | Event::SentDisconnect) => {}
                Err(error) => {
                    p.metrics.set_broker_connected(p.metric_id, false);
                    p.metrics.add_broker_reconnect(p.metric_id);
                    let g = generation.fetch_add(1, Ordering::AcqRel) + 1;
                    let _ = p.writer.send(Input::Reset { conn: p.conn, generation: g }).await;
                    let delay = backoff(attempt, &p.broker);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(connection = %name, %error, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = p.shutdown.changed() => break,
                    }
                }
            }
        }
        // Shutdown: the writer sent its last acks and closed the channel. Queue them all,
        // then DISCONNECT behind them, and poll until it is out: the acks went first.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut ack_task).await;
        if $client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match $eventloop.poll().await.map($to_event) {
                        Ok(Event::SentDisconnect) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        ack_task.abort();
        p.metrics.set_broker_connected(p.metric_id, false);
    }};
}

mod v311 {
    use super::*;
    use rumqttc::{AsyncClient, MqttOptions, Packet, Publish, QoS};

    pub(super) async fn drive(p: ConnParams) {
        let (_, host, port) = parse_broker_url(&p.broker.url).expect("validated url");
        let mut o = MqttOptions::new(p.client_id.clone(), host, port);
        o.set_keep_alive(p.broker.keep_alive.duration())
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_PACKET_BYTES, 1 << 20)
            .set_request_channel_capacity(request_capacity(&p.broker));
        if let Some(user) = &p.broker.username {
            o.set_credentials(user.clone(), p.password.clone().unwrap_or_default());
        }
        match tls_transport(&p.broker) {
            Ok(Some(t)) => {
                o.set_transport(t);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(connection = %p.broker.name, error = %e, "TLS setup failed");
                return;
            }
        }
        let (client, mut eventloop) = AsyncClient::new(o, request_capacity(&p.broker));
        connection_loop!(p, client, eventloop, to_event, publish_for_ack, QoS::AtLeastOnce, QoS::AtMostOnce)
    }

    fn to_event(e: rumqttc::Event) -> Event {
        match e {
            rumqttc::Event::Incoming(Packet::Publish(p)) => {
                Event::Publish { pkid: p.pkid, qos: p.qos as u8, dup: p.dup, topic: p.topic, payload: p.payload }
            }
            rumqttc::Event::Incoming(Packet::ConnAck(a)) => Event::ConnAck { session_present: a.session_present },
            rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Event::SentDisconnect,
            rumqttc::Event::Incoming(Packet::SubAck(_)) => Event::SubAck,
            _ => Event::Other,
        }
    }

    fn publish_for_ack(pkid: u16) -> Publish {
        let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
        p.pkid = pkid;
        p
    }
}

mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
    use rumqttc::v5::{AsyncClient, MqttOptions};

    pub(super) async fn drive(p: ConnParams) {
        let (_, host, port) = parse_broker_url(&p.broker.url).expect("validated url");
        let mut o = MqttOptions::new(p.client_id.clone(), host, port);
        let expiry = u32::try_from(p.broker.session_expiry.0 / 1000).unwrap_or(u32::MAX);
        o.set_keep_alive(p.broker.keep_alive.duration())
            .set_clean_start(false)
            .set_session_expiry_interval(Some(expiry))
            .set_receive_maximum(Some(p.broker.inflight_max))
            .set_max_packet_size(Some(MAX_PACKET_BYTES as u32))
            .set_manual_acks(true)
            .set_request_channel_capacity(request_capacity(&p.broker));
        if let Some(user) = &p.broker.username {
            o.set_credentials(user.clone(), p.password.clone().unwrap_or_default());
        }
        match tls_transport(&p.broker) {
            Ok(Some(t)) => {
                o.set_transport(t);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(connection = %p.broker.name, error = %e, "TLS setup failed");
                return;
            }
        }
        let (client, mut eventloop) = AsyncClient::new(o, request_capacity(&p.broker));
        connection_loop!(p, client, eventloop, to_event, publish_for_ack, QoS::AtLeastOnce, QoS::AtMostOnce)
    }

    fn to_event(e: rumqttc::v5::Event) -> Event {
        match e {
            rumqttc::v5::Event::Incoming(Packet::Publish(p)) => Event::Publish {
                pkid: p.pkid,
                qos: p.qos as u8,
                dup: p.dup,
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
            },
            rumqttc::v5::Event::Incoming(Packet::ConnAck(a)) => Event::ConnAck { session_present: a.session_present },
            rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Event::SentDisconnect,
            rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => Event::SubAck,
            _ => Event::Other,
        }
    }

    fn publish_for_ack(pkid: u16) -> Publish {
        let mut p = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
        p.pkid = pkid;
        p
    }
}
