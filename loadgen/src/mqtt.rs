//! rumqttc clients of the scenarios: QoS 1 publishers with a bounded in-flight window that
//! count the broker's PUBACKs, and a QoS 1 subscriber (persistent session, automatic acks)
//! that counts what the broker delivers. Plain TCP with `TCP_NODELAY`, MQTT 3.1.1.
//!
//! Every wait is bounded: a run that makes no progress for [`STALL_TIMEOUT`] is an error
//! naming what it waited for, never a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::payload::Message;

/// A run that makes no progress for this long has failed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a CONNACK, SUBACK or UNSUBACK.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a publisher queues ahead of its event loop.
const REQUEST_CHANNEL_LEN: usize = 1024;

/// A connected QoS 1 publisher.
pub struct Publisher {
    client: AsyncClient,
    eventloop: EventLoop,
    id: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // rumqttc's EventLoop has no Debug.
        f.debug_struct("Publisher").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Publisher {
    /// Connects as `id` (clean session) with at most `inflight` unacknowledged PUBLISHes.
    pub async fn connect(port: u16, id: &str, inflight: u16, packet_bytes_max: usize) -> anyhow::Result<Publisher> {
        let mut o = options(port, id, packet_bytes_max);
        o.set_clean_session(true).set_inflight(inflight);
        let (client, mut eventloop) = AsyncClient::new(o, REQUEST_CHANNEL_LEN);
        set_nodelay(&mut eventloop);
        await_connack(&mut eventloop, id).await?;
        Ok(Publisher { client, eventloop, id: id.to_owned() })
    }

    /// Publishes `messages[first]`, `messages[first + stride]`, … at QoS 1, then disconnects.
    /// Returns when the broker has acknowledged the last one.
    pub async fn publish_share(
        mut self,
        messages: Arc<[Message]>,
        first: usize,
        stride: usize,
        live_acked: Arc<AtomicU64>,
    ) -> anyhow::Result<Instant> {
        let expected = messages.len().saturating_sub(first).div_ceil(stride.max(1));
        let client = self.client.clone();
        let feeder: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
            for m in messages.iter().skip(first).step_by(stride.max(1)) {
                client
                    .publish_bytes(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone())
                    .await
                    .context("queueing a PUBLISH")?;
            }
            Ok(())
        });
        let mut acked = 0;
        let mut last = Instant::now();
        while acked < expected {
            if let Event::Incoming(Packet::PubAck(_)) = self.poll("PUBACKs").await? {
                acked += 1;
                live_acked.fetch_add(1, Relaxed);
                last = Instant::now();
            }
        }
        feeder.await.context("the feeder task")??;
        self.disconnect().await;
        Ok(last)
    }

    /// Publishes one message at QoS 1 and waits for its PUBACK.
    pub async fn publish_one(&mut self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        self.client.publish_bytes(topic, QoS::AtLeastOnce, false, payload).await.context("queueing a PUBLISH")?;
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = self.poll("a PUBACK").await? {
                return Ok(());
            }
        }
    }

    /// Sends DISCONNECT and waits (bounded) until it is out.
    pub async fn disconnect(mut self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }

    async fn poll(&mut self, what: &str) -> anyhow::Result<Event> {
        match tokio::time::timeout(STALL_TIMEOUT, self.eventloop.poll()).await {
            Ok(r) => r.with_context(|| format!("publisher {} waiting for {what}", self.id)),
            Err(_) => bail!("publisher {}: no {what} for {STALL_TIMEOUT:?}", self.id),
        }
    }
}

/// A QoS 1 subscriber with a persistent session (clean session off) and automatic acks.
#[derive(Debug)]
pub struct Subscriber {
    client: AsyncClient,
    task: JoinHandle<anyhow::Result<()>>,
    received: Arc<AtomicU64>,
    done: watch::Receiver<Option<Instant>>,
}

impl Subscriber {
    /// Connects as `id`, subscribes to `filter` at QoS 1 and waits for the SUBACK, so nothing
    /// published afterwards can miss it. Notes the instant the `expected`-th message arrives.
    pub async fn subscribe(
        port: u16,
        id: &str,
        filter: &str,
        expected: u64,
        packet_bytes_max: usize,
    ) -> anyhow::Result<Subscriber> {
        let mut o = options(port, id, packet_bytes_max);
        o.set_clean_session(false);
        let (client, mut eventloop) = AsyncClient::new(o, REQUEST_CHANNEL_LEN);
        set_nodelay(&mut eventloop);
        await_connack(&mut eventloop, id).await?;
        client.subscribe(filter, QoS::AtLeastOnce).await.context("queueing SUBSCRIBE")?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                match eventloop.poll().await.context("waiting for SUBACK")? {
                    Event::Incoming(Packet::SubAck(a)) => {
                        if a.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            bail!("the broker refused the subscription to {filter}");
                        }
                        return Ok(());
                    }
                    Event::Incoming(Packet::Publish(p)) => bail!("a message on {} before the SUBACK", p.topic),
                    _ => {}
                }
            }
        })
        .await
        .with_context(|| format!("subscriber {id}: no SUBACK within {HANDSHAKE_TIMEOUT:?}"))??;
        let received = Arc::new(AtomicU64::new(0));
        let (done_tx, done) = watch::channel(None);
        let task = tokio::spawn(drive_subscriber(eventloop, received.clone(), expected, done_tx));
        Ok(Subscriber { client, task, received, done })
    }

    /// Messages received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Relaxed)
    }

    /// Waits until the `expected`-th message has arrived and returns when it did. An error if
    /// no message arrives for [`STALL_TIMEOUT`] or the connection fails.
    pub async fn wait_all(&mut self) -> anyhow::Result<Instant> {
        let mut seen = (self.received(), Instant::now());
        loop {
            let waited = tokio::time::timeout(Duration::from_millis(500), self.done.wait_for(Option::is_some))
                .await
                .map(|r| r.map(|at| *at));
            match waited {
                Ok(Ok(at)) => return Ok(at.expect("waited for Some")),
                // The sender goes with the task.
                Ok(Err(_)) => {
                    bail!("the subscriber stopped after {} messages: {:?}", self.received(), (&mut self.task).await)
                }
                Err(_) => {}
            }
            let now = self.received();
            if now != seen.0 {
                seen = (now, Instant::now());
            } else if seen.1.elapsed() > STALL_TIMEOUT {
                bail!("the subscriber received nothing for {STALL_TIMEOUT:?} after {now} messages");
            }
        }
    }

    /// Unsubscribes from `filter` (so the broker queues nothing more for this session) and
    /// disconnects.
    pub async fn unsubscribe_and_disconnect(self, filter: &str) -> anyhow::Result<()> {
        self.client.unsubscribe(filter).await.context("queueing UNSUBSCRIBE")?;
        // The broker handles the two packets in order: the subscription is gone first.
        self.client.disconnect().await.context("queueing DISCONNECT")?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.task)
            .await
            .context("the subscriber did not disconnect")?
            .context("the subscriber task")?
    }
}

async fn drive_subscriber(
    mut eventloop: EventLoop,
    received: Arc<AtomicU64>,
    expected: u64,
    done: watch::Sender<Option<Instant>>,
) -> anyhow::Result<()> {
    loop {
        match eventloop.poll().await.context("subscriber connection")? {
            Event::Incoming(Packet::Publish(_)) => {
                let count = received.fetch_add(1, Relaxed) + 1;
                if count == expected {
                    done.send_replace(Some(Instant::now()));
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => return Ok(()),
            _ => {}
        }
    }
}

fn options(port: u16, id: &str, packet_bytes_max: usize) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(packet_bytes_max, packet_bytes_max);
    o
}

fn set_nodelay(eventloop: &mut EventLoop) {
    let mut n = eventloop.network_options();
    n.set_tcp_nodelay(true);
    eventloop.set_network_options(n);
}

async fn await_connack(eventloop: &mut EventLoop, id: &str) -> anyhow::Result<()> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    })
    .await
    .with_context(|| format!("{id}: no CONNACK within {HANDSHAKE_TIMEOUT:?}"))?
    .with_context(|| format!("{id}: connecting"))
}
