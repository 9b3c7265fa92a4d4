//! QoS 1 publishers paced by a token schedule: message `m` of the set is due at
//! `start + m / rate`, so P publishers sending every P-th message together hold `rate`
//! messages per second, spread evenly rather than in bursts (to the timer's millisecond: each
//! publisher sends the few messages due in the same millisecond back to back). A publisher that
//! falls behind sends at once and the lateness is counted, never hidden by skipping.
//!
//! rumqttc as in [`crate::mqtt`]: MQTT 3.1.1, clean session, `TCP_NODELAY`, a bounded window of
//! unacknowledged PUBLISHes; the broker's PUBACKs are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;

use crate::mqtt::STALL_TIMEOUT;
use crate::payload::Message;

/// Time for the CONNACK and for the DISCONNECT to go out.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a publisher queues ahead of its event loop.
const REQUEST_CHANNEL_LEN: usize = 1024;
/// A message queued later than this after its due time counts as late.
pub const LATE: Duration = Duration::from_millis(5);
/// Lateness logged, with when in the run it happened (each time a publisher's record grows).
const STALL: Duration = Duration::from_millis(50);

/// A connected publisher.
pub struct PacedPublisher {
    client: AsyncClient,
    eventloop: EventLoop,
    id: String,
}

impl std::fmt::Debug for PacedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // rumqttc's EventLoop has no Debug.
        f.debug_struct("PacedPublisher").field("id", &self.id).finish_non_exhaustive()
    }
}

/// How a publisher kept its schedule.
#[derive(Clone, Copy, Debug)]
pub struct PacedOutcome {
    /// Messages published and acknowledged by the broker.
    pub acked: u64,
    /// When the last PUBACK came.
    pub last_ack: Instant,
    /// The latest a message was queued after its due time.
    pub max_late: Duration,
    /// Messages queued more than [`LATE`] after their due time.
    pub late: u64,
}

impl PacedPublisher {
    /// Connects as `id` (clean session) with at most `inflight` unacknowledged PUBLISHes.
    pub async fn connect(port: u16, id: &str, inflight: u16, packet_bytes_max: usize) -> anyhow::Result<Self> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(packet_bytes_max, packet_bytes_max)
            .set_clean_session(true)
            .set_inflight(inflight);
        let (client, mut eventloop) = AsyncClient::new(o, REQUEST_CHANNEL_LEN);
        let mut n = eventloop.network_options();
        n.set_tcp_nodelay(true);
        eventloop.set_network_options(n);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                    return Ok::<_, rumqttc::ConnectionError>(());
                }
            }
        })
        .await
        .with_context(|| format!("{id}: no CONNACK within {HANDSHAKE_TIMEOUT:?}"))?
        .with_context(|| format!("{id}: connecting"))?;
        Ok(PacedPublisher { client, eventloop, id: id.to_owned() })
    }

    /// Publishes `messages[first]`, `messages[first + stride]`, … at QoS 1, message `m` due at
    /// `start + m / rate`; returns once the broker has acknowledged the last one, then
    /// disconnects. Each PUBACK also counts in `live_acked` (for the progress display).
    pub async fn run(
        mut self,
        messages: Arc<[Message]>,
        first: usize,
        stride: usize,
        start: Instant,
        rate: f64,
        live_acked: Arc<AtomicU64>,
    ) -> anyhow::Result<PacedOutcome> {
        let stride = stride.max(1);
        let expected = messages.len().saturating_sub(first).div_ceil(stride) as u64;
        let client = self.client.clone();
        let feeder: JoinHandle<anyhow::Result<(Duration, u64)>> = tokio::spawn(async move {
            let (mut max_late, mut late) = (Duration::ZERO, 0);
            for m in (first..messages.len()).step_by(stride) {
                let due = start + Duration::from_secs_f64(m as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let msg = &messages[m];
                client
                    .publish_bytes(msg.topic.clone(), QoS::AtLeastOnce, false, msg.payload.clone())
                    .await
                    .context("queueing a PUBLISH")?;
                let behind = due.elapsed();
                if behind > STALL && behind > max_late {
                    tracing::warn!(
                        at_s = format!("{:.3}", (due - start).as_secs_f64()),
                        behind_ms = behind.as_millis() as u64,
                        "a publisher fell behind its schedule"
                    );
                }
                max_late = max_late.max(behind);
                late += u64::from(behind > LATE);
            }
            Ok((max_late, late))
        });
        let mut acked = 0;
        let mut last_ack = Instant::now();
        while acked < expected {
            let polled = match tokio::time::timeout(STALL_TIMEOUT, self.eventloop.poll()).await {
                Ok(r) => r.with_context(|| format!("publisher {} waiting for PUBACKs", self.id))?,
                Err(_) => bail!("publisher {}: no PUBACK for {STALL_TIMEOUT:?} after {acked}", self.id),
            };
            if let Event::Incoming(Packet::PubAck(_)) = polled {
                acked += 1;
                live_acked.fetch_add(1, Relaxed);
                last_ack = Instant::now();
            }
        }
        let (max_late, late) = feeder.await.context("the feeder task")??;
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
        Ok(PacedOutcome { acked, last_ack, max_late, late })
    }
}
