//! `edge-agent run`: wires the pieces and runs until `shutdown`.
//!
//! Threads and tasks: the writer on its own thread (it does the blocking file I/O and fsyncs);
//! one task per broker connection and one for its PUBACKs; with `[listen]`, the listeners and
//! one task per device connection; a ticker; the admin endpoint.
//! Shutdown: the writer flushes, syncs and releases its last acks; the connections send them
//! and DISCONNECT (devices get MQTT 5 reason 0x8B); nothing acknowledged is lost and nothing
//! durable goes unacknowledged longer than the broker's (or device's) redelivery.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use shared::log::storage::FsStorage;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::forward::cursors::Cursors;
use crate::forward::driver::{ForwardMetrics, ForwardParams, ForwardStream, drive_forwarder};
use crate::ingest::driver::{ConnParams, drive_connection};
use crate::listen::driver::{ListenParams, Listeners, drive_listeners};
use crate::metrics::{ListenMetrics, Metrics};
use crate::writer::{AckSender, ConnInfo, Input, Writer};
use shared::admin::{self, AdminState, Health};
use shared::{reload, systemd};
use tokio::signal::unix::{SignalKind, signal};

/// Messages waiting for the writer; bounds memory when the disk is slower than the broker.
const WRITER_QUEUE_LEN: usize = 4096;
/// Most inputs the writer takes before it drives (flush, sync, ack) once.
const WRITER_DRAIN_MAX: usize = 1024;
/// A burst smaller than this is followed by a [`WRITER_NAP`].
const WRITER_SMALL_BURST: usize = 64;
/// How long the writer naps after a small burst.
const WRITER_NAP: Duration = Duration::from_micros(200);

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // One crypto provider everywhere (DESIGN §9); an error only means one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Installed first: SIGHUP's default action is to exit.
    let hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let epoch = shared::identity::open_or_create(&config.data_dir, "backhaul-edge")
        .map(shared::ids::Epoch)
        .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    let names = config.stream_names();
    let conn_names: Vec<String> = config.brokers.iter().map(|b| b.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(&names, &conn_names));
    let health = Arc::new(Health::new());
    health.set_not_ready("starting");

    let conns: Vec<ConnInfo> = config
        .brokers
        .iter()
        .map(|b| ConnInfo {
            client_id: b.client_id(&config.edge_id),
            inflight_max: usize::from(b.inflight_max),
            refuse_when_full: false,
        })
        .collect();
    let writer = Writer::open(&config, epoch, Arc::new(FsStorage), conns.clone(), metrics.clone(), wall_ms())
        .context("opening the stream logs")?;
    tracing::info!(edge_id = %config.edge_id, epoch = %epoch, data_dir = %config.data_dir.display(), streams = ?names, "logs open");

    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen {}", config.admin.listen))?;
    // Listen mode binds before anything starts, so a taken port fails the start.
    let listeners = match &config.listen {
        Some(l) => Some(Listeners::bind(l).await?),
        None => None,
    };
    let listen_metrics = listeners.as_ref().map(|_| Arc::new(ListenMetrics::new(writer.qos0_dropped_full())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let forward_metrics = Arc::new(ForwardMetrics::default());
    let admin_state = AdminState {
        metrics: Arc::new(AgentMetrics {
            agent: metrics.clone(),
            forward: forward_metrics.clone(),
            budgets: budget_metrics(&config),
            listen: listen_metrics.clone(),
        }),
        health: health.clone(),
    };
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, async move {
        let _ = admin_stop.changed().await;
    }));

    let (in_tx, in_rx) = mpsc::channel::<Input>(WRITER_QUEUE_LEN);
    let clock = Instant::now();
    let mut ack_txs = Vec::new();
    let mut conn_tasks = Vec::new();
    for (i, b) in config.brokers.iter().enumerate() {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        ack_txs.push(Some(ack_tx));
        let params = ConnParams {
            conn: i,
            broker: b.clone(),
            client_id: conns[i].client_id.clone(),
            password: Config::broker_password(b).map_err(anyhow::Error::msg)?,
            writer: in_tx.clone(),
            acks: ack_rx,
            metric_id: metrics.connection_id(&b.name).expect("metrics know every connection"),
            metrics: metrics.clone(),
            epoch: clock,
            shutdown: stop_rx.clone(),
        };
        conn_tasks.push(tokio::spawn(drive_connection(params)));
    }

    // Certificate rotation (SIGHUP, or the files changed): the forwarder reloads them.
    let (reload_tx, reload_rx) = watch::channel(0u64);
    let cert_files = config
        .forward
        .as_ref()
        .map_or_else(Vec::new, |f| vec![f.ca_file.clone(), f.cert_file.clone(), f.key_file.clone()]);
    let reloads =
        tokio::spawn(reload::drive_reloads(hangup, cert_files, reload::CERT_CHECK_INTERVAL, move |trigger| {
            tracing::info!(trigger = trigger.as_str(), "reloading certificates");
            reload_tx.send_modify(|n| *n += 1);
        }));
    let forwarder = match &config.forward {
        None => None,
        Some(fc) => {
            let mut streams: Vec<ForwardStream> = config
                .streams
                .iter()
                .filter(|(_, s)| s.forwarded)
                .map(|(name, s)| ForwardStream {
                    name: name.clone(),
                    log: writer.shared_log(name).expect("the writer has every stream"),
                    delivery: s.delivery,
                    priority: s.priority,
                    release_on: s.release_on,
                })
                .collect();
            streams.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
            let cursors =
                Cursors::open(&config.data_dir.join("forward.sqlite")).context("opening the forwarding cursors")?;
            let params = ForwardParams {
                config: fc.clone(),
                edge_id: config.edge_id.clone(),
                epoch,
                streams,
                committed: writer.committed_notify(),
                metrics: forward_metrics.clone(),
                cursors,
                shutdown: stop_rx.clone(),
                reload: reload_rx.clone(),
            };
            Some(tokio::spawn(async move {
                if let Err(e) = drive_forwarder(params).await {
                    tracing::error!(error = %e, "forwarder stopped");
                }
            }))
        }
    };

    let listen_task = match (listeners, &config.listen, &listen_metrics) {
        (Some(listeners), Some(lc), Some(lm)) => {
            tracing::info!(addresses = ?listeners.local_addrs(), "listening for devices");
            let params = ListenParams {
                config: lc.clone(),
                conn_base: config.brokers.len(),
                writer: in_tx.clone(),
                epoch: clock,
                known_clients: writer.parked_clients(),
                metrics: lm.clone(),
                shutdown: stop_rx.clone(),
            };
            Some(tokio::spawn(drive_listeners(listeners, params)))
        }
        _ => None,
    };

    let tick = tick_interval(&config);
    let ticker_tx = in_tx.clone();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            // A full queue means the writer is busy and will drive anyway.
            if ticker_tx.try_send(Input::Tick).is_err() && ticker_tx.is_closed() {
                break;
            }
        }
    });
    // The writer counts its rounds; the watchdog is pinged only while the count moves (the
    // ticker wakes the writer at least every 50 ms).
    let writer_rounds = Arc::new(AtomicU64::new(0));
    let rounds = writer_rounds.clone();
    let writer_thread = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || writer_loop(writer, in_rx, ack_txs, clock, &rounds))
        .context("starting the writer thread")?;
    let watchdog = tokio::spawn(systemd::drive_watchdog(move || {
        let rounds = writer_rounds.load(Relaxed);
        async move { Some(rounds) }
    }));

    health.set_live(true);
    let ready_health = health.clone();
    let ready_metrics = metrics.clone();
    // Listen mode is ready once its listeners are bound (they are, by now).
    let listening = listen_task.is_some();
    let readiness = tokio::spawn(async move {
        loop {
            let snap = ready_metrics.snapshot();
            if listening || snap.connections.iter().any(|c| c.connected) {
                ready_health.set_ready();
            } else {
                ready_health.set_not_ready("no broker connection");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    systemd::notify_env("READY=1\nSTATUS=logs open, ingesting");

    shutdown.await;
    tracing::info!("shutting down: flushing, syncing, acknowledging");
    systemd::notify_env("STOPPING=1\nSTATUS=flushing, syncing, acknowledging");
    health.set_not_ready("shutting down");
    reloads.abort();
    watchdog.abort();
    readiness.abort();
    ticker.abort();
    // The writer stops after its last acks; the connections then send them and DISCONNECT.
    let _ = in_tx.send(Input::Shutdown).await;
    drop(in_tx);
    let writer_result = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    let _ = stop_tx.send(true);
    for t in conn_tasks {
        let _ = t.await;
    }
    if let Some(t) = listen_task {
        let _ = t.await;
    }
    if let Some(f) = forwarder {
        let _ = f.await;
    }
    let _ = admin_task.await;
    health.set_live(false);
    match writer_result {
        Ok(Ok(())) => {
            tracing::info!("stopped");
            Ok(())
        }
        _ => anyhow::bail!("the writer thread panicked"),
    }
}

/// The writer thread: take inputs (a burst at a time), drive, hand out acks.
fn writer_loop(
    mut writer: Writer,
    mut rx: mpsc::Receiver<Input>,
    mut acks: Vec<Option<AckSender>>,
    clock: Instant,
    rounds: &AtomicU64,
) {
    // A listen-mode connection brings its ack sender; the writer itself never sees it.
    let take = |writer: &mut Writer, acks: &mut Vec<Option<AckSender>>, mut input: Input| {
        if let Input::Attach { conn, acks: sender, .. } = &mut input {
            if acks.len() <= *conn {
                acks.resize(*conn + 1, None);
            }
            acks[*conn] = sender.take();
        }
        writer.handle_input(input)
    };
    while let Some(first) = rx.blocking_recv() {
        rounds.fetch_add(1, Relaxed);
        let mut stop = take(&mut writer, &mut acks, first);
        let mut taken = 1;
        while !stop && taken < WRITER_DRAIN_MAX {
            match rx.try_recv() {
                Ok(input) => stop = take(&mut writer, &mut acks, input),
                Err(_) => break,
            }
            taken += 1;
        }
        let now_us = clock.elapsed().as_micros() as u64;
        for ack in writer.drive(now_us, wall_ms(), stop) {
            if let Some(Some(tx)) = acks.get(ack.conn) {
                let _ = tx.send(ack);
            }
        }
        if stop {
            break;
        }
        // Waking this thread costs more than handling a message (a futex and two context
        // switches): after a small burst, give the next messages a moment to queue up. The
        // nap is far below the linger and fsync intervals the acks wait for anyway.
        if taken < WRITER_SMALL_BURST {
            std::thread::sleep(WRITER_NAP);
        }
    }
    // Dropping the ack senders tells each connection its last ack is queued.
}

/// The writer needs to look at the clock at the finest linger or fsync interval.
fn tick_interval(config: &Config) -> Duration {
    let finest = config.streams.values().flat_map(|s| [s.linger.0, s.fsync_interval.0]).min().unwrap_or(5);
    Duration::from_millis((finest / 2).clamp(1, 50))
}

fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What `/metrics` serves: the agent's metrics, the forwarder's, and the disk budgets.
#[derive(Debug)]
struct AgentMetrics {
    agent: Arc<Metrics>,
    forward: Arc<ForwardMetrics>,
    budgets: String,
    listen: Option<Arc<ListenMetrics>>,
}

impl shared::admin::RenderMetrics for AgentMetrics {
    fn render(&self) -> String {
        let mut text = self.agent.render();
        text.push_str(&self.forward.render());
        text.push_str(&self.budgets);
        if let Some(l) = &self.listen {
            text.push_str(&l.render());
        }
        text
    }
}

/// The disk budgets from the config, as gauges, so `backhaul_edge_log_bytes` can be compared
/// with them (the 80 % alert): per stream that has one, and the total (`disk.budget_bytes`).
fn budget_metrics(config: &Config) -> String {
    let mut out = String::new();
    let name = "backhaul_edge_disk_budget_bytes";
    out.push_str(&format!("# HELP {name} The stream's disk budget (disk_budget_bytes).\n# TYPE {name} gauge\n"));
    for (stream, s) in &config.streams {
        if let Some(b) = s.disk_budget_bytes {
            out.push_str(&format!("{name}{{stream=\"{stream}\"}} {}\n", b.0));
        }
    }
    let name = "backhaul_edge_disk_total_budget_bytes";
    if let Some(b) = config.disk.budget_bytes {
        out.push_str(&format!(
            "# HELP {name} The agent's total disk budget (disk.budget_bytes).\n# TYPE {name} gauge\n"
        ));
        out.push_str(&format!("{name} {}\n", b.0));
    }
    out
}
