//! `loadgen mqtt`: many device connections publishing traceable CDRs or SenML readings to an
//! MQTT endpoint (a broker, or the edge agent's own listener), at a target rate with an optional
//! burst profile, counting acknowledgements and their latency, and writing the manifest that
//! `loadgen verify` checks the core against.
//!
//! Schedule: global message `m` (0, 1, … rate × seconds − 1) belongs to device `m % devices` and
//! is due `m / rate` seconds into the run's *active* time; with a burst profile `ON/OFF`, active
//! time runs only during the ON part of each cycle (at rate × (ON + OFF) / ON then, so the mean
//! rate is kept). A device that falls behind sends at once; nothing is skipped.
//!
//! Each device is one rumqttc connection (MQTT 3.1.1, clean session) driven by one task: it
//! publishes what is due, polls its event loop and maps packet ids back to message numbers.
//! Acknowledged (QoS 1 PUBACK, QoS 2 PUBCOMP) messages must reach the core exactly once; QoS 0
//! messages and those in flight when a connection dropped are "unconfirmed".

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use rumqttc::{AsyncClient, ClientError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use shared::ranges::RangeSet;

use crate::progress::{Goal, Progress};
use crate::trace::{DeviceGen, Kind};
use crate::verify::{DeviceManifest, Manifest};

/// Requests a device queues ahead of its event loop.
const REQUEST_CHANNEL_LEN: usize = 64;
/// After the last message is due, how long devices wait for outstanding acknowledgements.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before polling again after a connection error (rumqttc reconnects on the next poll).
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// `loadgen mqtt` options.
#[derive(Clone, Debug, Args)]
pub struct MqttArgs {
    /// MQTT endpoint host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// MQTT endpoint port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Device connections.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub devices: u32,
    /// Messages per second, all devices together (the mean, with a burst profile).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// What the devices publish.
    #[arg(long, value_enum, default_value_t = Kind::Cdr)]
    pub kind: Kind,
    /// Pad CDR payloads with JSON whitespace up to this many bytes.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Topic of each message; `{device}` and `{site}` (device % 8) are replaced.
    #[arg(long, default_value = "cdr/site-{site}/dev-{device}")]
    pub topic: String,
    /// QoS of the PUBLISHes: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Burst profile `ON/OFF` (e.g. `2s/8s`): publish only during ON, faster, keeping the mean rate.
    #[arg(long, value_parser = parse_burst)]
    pub burst: Option<(Duration, Duration)>,
    /// Unacknowledged PUBLISHes per device.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// New connections per second while the devices connect.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_rate: u32,
    /// Username for CONNECT.
    #[arg(long)]
    pub username: Option<String>,
    /// Password for CONNECT; when absent, the environment variable LOADGEN_MQTT_PASSWORD.
    #[arg(long)]
    pub password: Option<String>,
    /// Seed of the payloads.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Device `d` connects as client id `<prefix>-d<d>`.
    #[arg(long, default_value = "loadgen")]
    pub client_prefix: String,
    /// Write the manifest for `loadgen verify` here.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}

fn parse_burst(s: &str) -> Result<(Duration, Duration), String> {
    let (on, off) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected ON/OFF, e.g. 2s/8s"))?;
    let d = |v: &str| crate::wan::parse_duration(v);
    let (on, off) = (d(on)?, d(off)?);
    if on.is_zero() {
        return Err(format!("{s:?}: the ON part must be above 0"));
    }
    Ok((on, off))
}

/// When global message `m` is due, from the start.
pub fn due(m: u64, rate: u64, burst: Option<(Duration, Duration)>) -> Duration {
    let active = m as f64 / rate as f64;
    match burst {
        None => Duration::from_secs_f64(active),
        Some((on, off)) => {
            // The mean rate is kept: during ON, (ON + OFF) / ON times faster.
            let cycle = (on + off).as_secs_f64();
            let t = active * on.as_secs_f64() / cycle;
            let k = (t / on.as_secs_f64()).floor();
            Duration::from_secs_f64(k * cycle + (t - k * on.as_secs_f64()))
        }
    }
}

/// Live counters of all devices.
#[derive(Debug, Default)]
pub struct Live {
    published: AtomicU64,
    acked: AtomicU64,
    connected: AtomicU64,
    errors: AtomicU64,
}

/// What one device did.
#[derive(Debug)]
struct DeviceOutcome {
    device: u32,
    acked: RangeSet,
    unconfirmed: RangeSet,
    latency_us: hdrhistogram::Histogram<u64>,
    errors: u64,
    connected: bool,
}

/// Ack latency in µs, 1 µs to 1 h at 3 significant digits (longer ones count as 1 h).
fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs one device: connect, publish its messages on schedule, collect acknowledgements.
async fn device(args: Arc<MqttArgs>, d: u32, start: Instant, live: Arc<Live>) -> DeviceOutcome {
    let mut out = DeviceOutcome {
        device: d,
        acked: RangeSet::new(),
        unconfirmed: RangeSet::new(),
        latency_us: latency_histogram(),
        errors: 0,
        connected: false,
    };
    let id = format!("{}-d{d}", args.client_prefix);
    let mut o = MqttOptions::new(&id, &args.host, args.port);
    o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(args.inflight);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(u) = &args.username {
        let password = args.password.clone().or_else(|| std::env::var("LOADGEN_MQTT_PASSWORD").ok());
        o.set_credentials(u, password.unwrap_or_default());
    }
    let (client, mut el) = AsyncClient::new(o, REQUEST_CHANNEL_LEN);
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let topic = args.topic.replace("{device}", &d.to_string()).replace("{site}", &(d % 8).to_string());
    let mut g = DeviceGen::new(args.kind, args.seed, d, args.payload_bytes);
    let total = args.rate * args.seconds;
    let devices = u64::from(args.devices);
    let count = total.saturating_sub(u64::from(d)).div_ceil(devices);
    match tokio::time::timeout(CONNECT_TIMEOUT, wait_connack(&mut el)).await {
        Ok(Ok(())) => {
            out.connected = true;
            live.connected.fetch_add(1, Relaxed);
        }
        Ok(Err(e)) => {
            tracing::warn!(device = d, error = %e, "connect failed");
            out.errors += 1;
            live.errors.fetch_add(1, Relaxed);
            return out;
        }
        Err(_) => {
            tracing::warn!(device = d, "no CONNACK within {CONNECT_TIMEOUT:?}");
            out.errors += 1;
            return out;
        }
    }
    // Messages queued to rumqttc but not yet given a packet id, then packet id → message.
    let mut queued: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut inflight: HashMap<u16, (u64, Instant)> = HashMap::new();
    let mut next = 0u64;
    let mut ready: Option<(u64, Bytes)> = None;
    let deadline = start + due(total, args.rate, args.burst) + DRAIN_TIMEOUT;
    loop {
        let settled = next == count && ready.is_none() && queued.is_empty() && inflight.is_empty();
        if settled || Instant::now() > deadline {
            break;
        }
        if ready.is_none() && next < count {
            let at = start + due(u64::from(d) + next * devices, args.rate, args.burst);
            if Instant::now() >= at {
                ready = Some((next, Bytes::from(g.payload(next, now_ms()))));
                next += 1;
            }
        }
        if let Some((n, payload)) = ready.take() {
            match client.try_publish(topic.clone(), qos, false, payload.clone()) {
                Ok(()) => {
                    queued.push_back((n, Instant::now()));
                    live.published.fetch_add(1, Relaxed);
                    continue;
                }
                Err(ClientError::TryRequest(_)) => ready = Some((n, payload)),
                Err(e) => {
                    tracing::warn!(device = d, error = %e, "publish failed");
                    break;
                }
            }
        }
        let wake = if ready.is_none() && next < count {
            start + due(u64::from(d) + next * devices, args.rate, args.burst)
        } else {
            deadline
        };
        tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some((n, t)) = queued.pop_front() {
                        if qos == QoS::AtMostOnce {
                            out.unconfirmed.insert(n..n + 1);
                        } else {
                            inflight.insert(pkid, (n, t));
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) if qos == QoS::AtLeastOnce => {
                    ack(&mut inflight, a.pkid, &mut out, &live);
                }
                Ok(Event::Incoming(Packet::PubComp(c))) if qos == QoS::ExactlyOnce => {
                    ack(&mut inflight, c.pkid, &mut out, &live);
                }
                Ok(_) => {}
                Err(e) => {
                    // The connection dropped: what was in flight may or may not be stored.
                    tracing::debug!(device = d, error = %e, "connection error");
                    out.errors += 1;
                    live.errors.fetch_add(1, Relaxed);
                    for (n, _) in inflight.drain().map(|(_, v)| v).chain(queued.drain(..)) {
                        out.unconfirmed.insert(n..n + 1);
                    }
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            },
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    for (n, _) in inflight.drain().map(|(_, v)| v).chain(queued.drain(..)) {
        out.unconfirmed.insert(n..n + 1);
    }
    if let Some((n, _)) = ready {
        out.unconfirmed.insert(n..n + 1);
    }
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    out
}

fn ack(inflight: &mut HashMap<u16, (u64, Instant)>, pkid: u16, out: &mut DeviceOutcome, live: &Live) {
    if let Some((n, t)) = inflight.remove(&pkid) {
        out.acked.insert(n..n + 1);
        out.latency_us.saturating_record(t.elapsed().as_micros() as u64);
        live.acked.fetch_add(1, Relaxed);
    }
}

async fn wait_connack(el: &mut EventLoop) -> Result<(), rumqttc::ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
            return Ok(());
        }
    }
}

/// `loadgen mqtt`.
pub async fn run(args: MqttArgs) -> anyhow::Result<Vec<String>> {
    Ok(start(args).finish().await?.failures)
}

impl Live {
    /// Messages acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Relaxed)
    }
}

/// Devices connecting and publishing.
#[derive(Debug)]
pub struct Running {
    args: Arc<MqttArgs>,
    live: Arc<Live>,
    start: Instant,
    tasks: Vec<tokio::task::JoinHandle<DeviceOutcome>>,
    progress: Progress,
}

/// What a finished run acknowledged.
#[derive(Debug)]
pub struct Finished {
    /// Failed checks.
    pub failures: Vec<String>,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages published without an acknowledgement.
    pub unconfirmed: u64,
    /// The manifest of the run.
    pub manifest: Manifest,
    /// Publish → acknowledgement, ms: p50, p90, p99, max (empty when nothing was acknowledged).
    pub ack_latency_ms: Vec<(String, f64)>,
}

impl Running {
    /// The live counters.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// When the schedule starts (message 0 is due).
    pub fn schedule_start(&self) -> Instant {
        self.start
    }

    /// Waits for every device, prints the summary, writes the manifest if asked.
    pub async fn finish(self) -> anyhow::Result<Finished> {
        let Running { args, live, start, tasks, progress } = self;
        finish(args, live, start, tasks, progress).await
    }
}

/// Starts the devices (see the module doc); [`Running::finish`] waits for them.
pub fn start(args: MqttArgs) -> Running {
    let args = Arc::new(args);
    let total = args.rate * args.seconds;
    let live = Arc::new(Live::default());
    println!(
        "loadgen mqtt: {} devices → {}:{}, {} msg/s for {} s ({} messages), {:?} at QoS {}{}",
        args.devices,
        args.host,
        args.port,
        args.rate,
        args.seconds,
        total,
        args.kind,
        args.qos,
        args.burst.map_or(String::new(), |(on, off)| format!(", bursts {on:?} on / {off:?} off")),
    );
    // Connect at `connect_rate`; the schedule starts once every device had its turn.
    let connect_time = Duration::from_secs_f64(f64::from(args.devices) / f64::from(args.connect_rate));
    let start = Instant::now() + connect_time + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for d in 0..args.devices {
        let at = Instant::now() + Duration::from_secs_f64(f64::from(d) / f64::from(args.connect_rate));
        let (args, live) = (args.clone(), live.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            device(args, d, start, live).await
        }));
    }
    let progress = {
        let live = live.clone();
        let run_time = start.saturating_duration_since(Instant::now()) + due(total, args.rate, args.burst);
        Progress::start("mqtt", Goal::Time(run_time), "acked", move || live.acked.load(Relaxed))
    };
    Running { args, live, start, tasks, progress }
}

async fn finish(
    args: Arc<MqttArgs>,
    live: Arc<Live>,
    start: Instant,
    tasks: Vec<tokio::task::JoinHandle<DeviceOutcome>>,
    progress: Progress,
) -> anyhow::Result<Finished> {
    let total = args.rate * args.seconds;
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.context("a device task")?);
    }
    progress.finish();
    let wall = start.elapsed().as_secs_f64();
    let mut latency = latency_histogram();
    let (mut acked, mut unconfirmed, mut errors, mut connected) = (0, 0, 0, 0);
    for o in &outcomes {
        latency.add(&o.latency_us).expect("same precision");
        acked += o.acked.len();
        unconfirmed += o.unconfirmed.len();
        errors += o.errors;
        connected += u64::from(o.connected);
    }
    let published = live.published.load(Relaxed);
    let q = |x: f64| {
        if latency.is_empty() { "-".to_owned() } else { format!("{:.1}", latency.value_at_quantile(x) as f64 / 1e3) }
    };
    println!("\n| | |\n|---|---:|");
    for (k, v) in [
        ("devices connected", format!("{connected} of {}", args.devices)),
        ("messages due / published", format!("{total} / {published}")),
        ("acknowledged", acked.to_string()),
        ("unconfirmed (QoS 0, or in flight at a drop or the end)", unconfirmed.to_string()),
        ("connection errors", errors.to_string()),
        ("acknowledged per second (from the schedule start)", format!("{:.0}", acked as f64 / wall)),
        ("ack latency p50 / p90 / p99 / max, ms", format!("{} / {} / {} / {}", q(0.5), q(0.9), q(0.99), q(1.0))),
    ] {
        println!("| {k} | {v} |");
    }
    println!(
        "RESULT devices={} connected={connected} due={total} published={published} acked={acked} unconfirmed={unconfirmed} \
         errors={errors} p50_ms={} p99_ms={}",
        args.devices,
        q(0.5),
        q(0.99)
    );
    let manifest = Manifest {
        seed: args.seed,
        devices: outcomes.iter().map(|o| DeviceManifest::new(o.device, &o.acked, &o.unconfirmed)).collect(),
    };
    if let Some(path) = &args.manifest {
        std::fs::write(path, serde_json::to_vec(&manifest)?).with_context(|| format!("writing {}", path.display()))?;
        println!("manifest: {}", path.display());
    }
    let mut failures = Vec::new();
    if connected < u64::from(args.devices) {
        failures.push(format!("{} devices could not connect", u64::from(args.devices) - connected));
    }
    if args.qos > 0 && acked < total {
        failures.push(format!("{} of {total} messages not acknowledged", total - acked));
    }
    let ack_latency_ms = if latency.is_empty() {
        Vec::new()
    } else {
        [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)]
            .iter()
            .map(|(k, q)| (format!("publish → ack {k}"), latency.value_at_quantile(*q) as f64 / 1e3))
            .collect()
    };
    Ok(Finished { failures, acked, unconfirmed, manifest, ack_latency_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_schedule_spreads_messages_evenly() {
        assert_eq!(due(0, 100, None), Duration::ZERO);
        assert_eq!(due(50, 100, None), Duration::from_millis(500));
    }

    #[test]
    fn bursts_keep_the_mean_rate_and_leave_the_off_time_empty() {
        let b = Some((Duration::from_secs(2), Duration::from_secs(8)));
        // 100/s mean over 10 s cycles: 1000 messages per cycle, sent at 500/s in its 2 s ON.
        let times: Vec<f64> = (0..3000).map(|m| due(m, 100, b).as_secs_f64()).collect();
        assert!(times.windows(2).all(|w| w[1] >= w[0]));
        assert!(times.iter().all(|t| (t % 10.0) < 2.0 + 1e-9), "nothing due in an OFF part");
        assert!((times[999] - 1.998).abs() < 1e-6, "{}", times[999]);
        assert!((times[1000] - 10.0).abs() < 1e-9, "{}", times[1000]);
        assert!((times[1500] - 11.0).abs() < 1e-9, "{}", times[1500]);
        assert!((due(3000, 100, b).as_secs_f64() - 30.0).abs() < 1e-9, "the mean rate is kept");
    }

    #[test]
    fn burst_profiles_are_parsed_strictly() {
        assert_eq!(parse_burst("2s/8s"), Ok((Duration::from_secs(2), Duration::from_secs(8))));
        assert!(parse_burst("2s").is_err());
        assert!(parse_burst("0s/8s").is_err());
    }
}
