//! `core-ingest run`: the store's writer thread, the QUIC acceptor and the admin endpoint.
//! Shutdown: stop accepting, let the store sync and answer what it holds, stop.

use std::future::Future;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use shared::admin::{self, AdminState, Health};
use shared::{reload, systemd, tls};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::catalog::{Catalog, SegmentState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::server::{self, ServerContext};
use crate::store::{Store, StoreConfig};
use crate::tier::Tierer;
use shared::wire::session::ProducerKey;

/// Batches waiting for the store: bounds memory when the disk is slower than the edges (at
/// the default 256 KiB edge batches, 256 MiB; each edge's window bounds its own share too).
const STORE_QUEUE_LEN: usize = 1024;
/// Most QUIC streams an edge may open: a control stream and two lanes per log stream.
const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// How long the watchdog waits for the store thread to answer before it skips a ping.
const WATCHDOG_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long start waits for the bucket listing of earlier incarnations' manifests (dedup seed).
/// Past it the node starts with local dedup state only, rather than not at all.
const BUCKET_SEED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The identity kind of a core data directory.
pub const IDENTITY_KIND: &str = "backhaul-core";

/// Runs the node until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let incarnation = shared::identity::open_or_create(&config.data_dir, IDENTITY_KIND)
        .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new());
    health.set_not_ready("starting");

    let catalog_path = config.data_dir.join(crate::catalog::CATALOG_FILE);
    let catalog = Catalog::open(&catalog_path)?;
    let mut tiered_ranges = dedup_seed(&catalog)?;
    let catalog = Arc::new(Mutex::new(catalog));
    let (objects, prefix) =
        crate::tier::store::open(config.tier.object_store.as_deref(), &config.data_dir).map_err(anyhow::Error::msg)?;
    // Best effort: an unreachable bucket must not keep the node from taking data.
    let earlier = crate::tier::earlier_incarnations_ranges(objects.as_ref(), &prefix, &config.node, incarnation);
    match tokio::time::timeout(BUCKET_SEED_TIMEOUT, earlier).await {
        Ok(Ok(ranges)) => {
            if !ranges.is_empty() {
                tracing::info!(ranges = ranges.len(), "dedup seeded from earlier incarnations' manifests");
            }
            tiered_ranges.extend(ranges);
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "listing earlier incarnations' manifests failed; dedup from local data only")
        }
        Err(_) => {
            tracing::warn!(timeout = ?BUCKET_SEED_TIMEOUT, "listing earlier incarnations' manifests timed out; dedup from local data only")
        }
    }
    let store_config = StoreConfig {
        data_dir: config.data_dir.clone(),
        partitions: config.partitions,
        segment_bytes_max: config.segment_bytes_max.0,
        direct_io: config.direct_io,
        disk_budget_bytes: config.tier.disk_budget_bytes.0,
        tiered_ranges,
    };
    let store = Store::open(store_config, metrics.clone()).context("opening the stream logs")?;
    let (store, store_thread) = store.spawn(STORE_QUEUE_LEN).context("starting the store")?;

    // Installed before anything else can take a while: SIGHUP's default action is to exit.
    let hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let cert_files = tls::CertFiles {
        ca_file: config.tls.ca_file.clone(),
        cert_file: config.tls.cert_file.clone(),
        key_file: config.tls.key_file.clone(),
    };
    let server_config = quic_server_config(&config, &cert_files, &metrics)?;
    let socket = udp_socket(config.listen, config.udp_buffer_bytes.0 as usize)
        .with_context(|| format!("listen {}", config.listen))?;
    let endpoint = shared::quic::endpoint(socket, config.mtu(), Some(server_config))
        .with_context(|| format!("listen {}", config.listen))?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("admin_listen {}", config.admin_listen))?;
    let mut admin_stop = stop_rx.clone();
    let admin_state = AdminState { metrics: metrics.clone(), health: health.clone() };
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, async move {
        let _ = admin_stop.changed().await;
    }));

    let (tiered_tx, tiered_rx) = watch::channel(Arc::default());
    let allow = config.allow_edges.clone().map(|v| v.into_iter().collect());
    let mut ctx = ServerContext::new(
        store.clone(),
        metrics.clone(),
        allow,
        config.connections_max as u64,
        config.node.clone(),
        incarnation,
    );
    ctx.tiered = tiered_rx;
    let ctx = Arc::new(ctx);
    let mut tierer = Tierer::new(
        config.tier.clone(),
        store.clone(),
        objects,
        prefix,
        config.node.clone(),
        incarnation,
        catalog.clone(),
        metrics.clone(),
    );
    tierer.publish_tiered(tiered_tx)?;
    let mut tier_stop = stop_rx.clone();
    let tier_task = tokio::spawn(tierer.drive(async move {
        let _ = tier_stop.changed().await;
    }));

    let read = |p: &std::path::Path| tls::load_pem_file(p).map_err(anyhow::Error::from);
    let read_listener = match config.read_api.listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("read_api.listen {addr}"))?)
        }
        None => None,
    };
    let (read_objects, read_prefix) =
        crate::tier::store::open(config.tier.object_store.as_deref(), &config.data_dir).map_err(anyhow::Error::msg)?;
    let api_state = crate::readapi::ApiState {
        sources: crate::read::ReadSources {
            data_dir: config.data_dir.clone(),
            node: config.node.clone(),
            incarnation: Some(incarnation),
            objects: read_objects,
            prefix: read_prefix,
            handle: tokio::runtime::Handle::current(),
        },
        catalog: catalog.clone(),
        node: config.node.clone(),
        tokens: config.read_api.resolved_tokens().map_err(|(k, why)| anyhow::anyhow!("{k}: {why}"))?,
        tls: match (&config.read_api.cert_file, &config.read_api.key_file) {
            (Some(c), Some(k)) => {
                let tls = tls::https_server_config(&read(c)?, &read(k)?).context("read_api TLS")?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
            }
            _ => None,
        },
    };
    let mut api_stop = stop_rx.clone();
    let api_task = tokio::spawn(async move {
        if let Some(listener) = read_listener {
            crate::readapi::serve(listener, api_state, async move {
                let _ = api_stop.changed().await;
            })
            .await;
        }
    });

    let mut server_stop = stop_rx.clone();
    let server_task = tokio::spawn(server::serve(endpoint.clone(), ctx.clone(), async move {
        let _ = server_stop.changed().await;
    }));
    // Certificate rotation: new connections get the new certificates, open ones keep theirs.
    // SIGHUP also reads allow_edges again: revocation without a restart.
    let reloads = {
        let (endpoint, metrics, ctx) = (endpoint.clone(), metrics.clone(), ctx.clone());
        let files = vec![cert_files.ca_file.clone(), cert_files.cert_file.clone(), cert_files.key_file.clone()];
        let config = config.clone();
        tokio::spawn(reload::drive_reloads(hangup, files, reload::CERT_CHECK_INTERVAL, move |trigger| {
            match quic_server_config(&config, &cert_files, &metrics) {
                Ok(server_config) => {
                    endpoint.set_server_config(Some(server_config));
                    metrics.tls_reloads.inc();
                    tracing::info!(trigger = trigger.as_str(), "certificates reloaded: new connections use them");
                }
                Err(error) => {
                    metrics.tls_reload_failures.inc();
                    tracing::error!(trigger = trigger.as_str(), error = %format!("{error:#}"), "certificate reload failed: still using the previous certificates");
                }
            }
            if trigger == reload::Trigger::Signal {
                reload_allow_list(&config.source, &ctx);
            }
        }))
    };
    // The watchdog is pinged only while the store's writer thread answers.
    let watchdog = {
        let store = store.clone();
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(systemd::drive_watchdog(move || {
            let (store, answered) = (store.clone(), answered.clone());
            async move {
                let probe = tokio::time::timeout(WATCHDOG_PROBE_TIMEOUT, store.held(Vec::new())).await;
                matches!(probe, Ok(Ok(_))).then(|| answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
            }
        }))
    };
    tracing::info!(node = %config.node, incarnation = %format!("{incarnation:016x}"), listen = %endpoint.local_addr()?, data_dir = %config.data_dir.display(), "core-ingest ready");
    health.set_live(true);
    health.set_ready();
    systemd::notify_env("READY=1\nSTATUS=accepting edges");

    shutdown.await;
    tracing::info!("shutting down");
    systemd::notify_env("STOPPING=1\nSTATUS=syncing and stopping");
    reloads.abort();
    watchdog.abort();
    health.set_not_ready("shutting down");
    let _ = stop_tx.send(true);
    let _ = server_task.await;
    let _ = tier_task.await;
    let _ = api_task.await;
    store.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    let _ = admin_task.await;
    endpoint.wait_idle().await;
    tracing::info!("stopped");
    Ok(())
}

/// Reads `allow_edges` from the config file again and applies it; other keys need a restart.
/// An unreadable or invalid file changes nothing.
fn reload_allow_list(path: &std::path::Path, ctx: &ServerContext) {
    match Config::load(path) {
        Ok(new) => {
            let allowed = new.allow_edges.as_ref().map(Vec::len);
            let revoked = ctx.set_allow(new.allow_edges.map(|v| v.into_iter().collect()));
            tracing::info!(file = %path.display(), allowed = ?allowed, ?revoked, "allow_edges reloaded (other keys take effect at the next start)");
        }
        Err(error) => {
            tracing::error!(%error, "config reload failed: allow_edges unchanged");
        }
    }
}

/// The QUIC server config from the certificate files (read now), with the transport settings;
/// records when the certificates expire.
fn quic_server_config(
    config: &Config,
    files: &tls::CertFiles,
    metrics: &Metrics,
) -> anyhow::Result<quinn::ServerConfig> {
    let (server_tls, expiry) = files.server_config(tls::ALPN_ACCEPTED)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).context("TLS config for QUIC")?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server_config.transport_config(shared::quic::transport(
        config.keep_alive.duration(),
        config.idle_timeout.duration(),
        shared::quic::Congestion::Cubic,
        STREAMS_PER_CONNECTION_MAX,
        config.mtu(),
    ));
    metrics.set_cert_expiry(expiry);
    Ok(server_config)
}

/// The seq ranges dedup must hold beyond the local logs: those of tiered segments whose local
/// copies are gone, so a batch resent after its segment left the disk is acknowledged, not
/// stored twice.
pub fn dedup_seed(catalog: &Catalog) -> Result<Vec<(ProducerKey, std::ops::Range<u64>)>, crate::catalog::CatalogError> {
    Ok(catalog
        .ranges_in_states(&[SegmentState::LocalDeleted])?
        .into_iter()
        .map(|(stream, r)| (ProducerKey { edge: r.edge, epoch: r.epoch, stream }, r.seqs))
        .collect())
}

impl shared::admin::RenderMetrics for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

/// The UDP socket QUIC listens on, with buffers of `buffer_bytes` (warns when the kernel caps
/// them: raise `net.core.rmem_max` / `wmem_max`).
fn udp_socket(addr: std::net::SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(buffer_bytes)?;
    socket.set_send_buffer_size(buffer_bytes)?;
    // Linux reports twice what was granted (it counts its own bookkeeping).
    let (recv, send) = (socket.recv_buffer_size()? / 2, socket.send_buffer_size()? / 2);
    if recv < buffer_bytes || send < buffer_bytes {
        tracing::warn!(
            requested = buffer_bytes,
            recv,
            send,
            "UDP buffers capped by the kernel: raise net.core.rmem_max and wmem_max, or datagrams will be dropped under load"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
