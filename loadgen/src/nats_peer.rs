//! The NATS peer of `loadgen outage`: a NATS leaf node at the edge with JetStream and its MQTT
//! listener (devices publish to it as to any broker), and a hub at the core whose JetStream
//! stream *sources* the leaf's stream across the leaf-node link: NATS's own store-and-forward.
//!
//! - leaf (domain `leaf`): stream `CDR` capturing `cdr.>` (MQTT `cdr/…` topics), file storage;
//! - hub (domain `hub`): stream `CDR_HUB` sourcing `CDR` from domain `leaf`, file storage;
//! - the leaf's link to the hub goes through `loadgen wan --tcp`.
//!
//! What the hub's stream holds is read back with a pull consumer and verified like the others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt as _;

use crate::mosquitto::free_port;
use crate::process::Proc;
use crate::verify::Verifier;

/// How long a server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The `nats-server` executable: on `PATH`, else in /usr/sbin (Debian).
pub fn find_exe() -> anyhow::Result<PathBuf> {
    crate::mosquitto::find_server("nats-server", "apt-get install nats-server")
}

/// A running NATS server.
#[derive(Debug)]
pub struct NatsServer {
    proc: Proc,
    /// Client port on 127.0.0.1.
    pub port: u16,
}

impl NatsServer {
    fn start(exe: &Path, dir: &Path, name: &'static str, conf: &str, port: u16) -> anyhow::Result<NatsServer> {
        let conf_path = dir.join(format!("{name}.conf"));
        std::fs::write(&conf_path, conf)?;
        let mut command = std::process::Command::new(exe);
        command.arg("-c").arg(&conf_path);
        let mut proc = Proc::spawn(name, command, &dir.join(format!("{name}.log")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some(status) = proc.exited() {
                bail!("nats-server {name} exited with {status}\n{}", proc.log_tail(30));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(NatsServer { proc, port });
            }
            if Instant::now() > deadline {
                bail!("nats-server {name} not listening after {START_TIMEOUT:?}\n{}", proc.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it with SIGTERM.
    pub fn stop(self) -> anyhow::Result<()> {
        self.proc.terminate(Duration::from_secs(10)).map(drop)
    }
}

/// The hub (JetStream domain `hub`, leaf-node listener).
#[derive(Debug)]
pub struct Hub {
    /// The server.
    pub server: NatsServer,
    /// Where leaf nodes connect.
    pub leaf_port: u16,
    js: jetstream::Context,
}

/// The leaf (JetStream domain `leaf`, MQTT listener, remote to the hub via `hub_addr`).
#[derive(Debug)]
pub struct Leaf {
    /// The server.
    pub server: NatsServer,
    /// Devices publish MQTT here.
    pub mqtt_port: u16,
}

impl Hub {
    /// Starts the hub in `dir`, its leafnode listener on `leaf_port`, telling leaf nodes to
    /// reach it at `advertise` (the WAN proxy).
    pub async fn start(exe: &Path, dir: &Path, leaf_port: u16, advertise: SocketAddr) -> anyhow::Result<Hub> {
        let port = free_port()?;
        let conf = format!(
            "# loadgen outage: the NATS hub at the core\nserver_name: hub\nlisten: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{}\", domain: hub }}\n\
             # The leaf must reach the hub only through the WAN proxy: the hub gossips its leafnode\n\
             # URL in INFO, and a reconnecting leaf uses it, so it advertises the proxy's.\n\
             leafnodes {{ listen: 127.0.0.1:{leaf_port}, advertise: \"{advertise}\" }}\n",
            dir.join("hub-js").display()
        );
        let server = NatsServer::start(exe, dir, "nats-hub", &conf, port)?;
        let client = async_nats::connect(format!("127.0.0.1:{port}")).await.context("connecting to the NATS hub")?;
        let js = jetstream::with_domain(client, "hub");
        Ok(Hub { server, leaf_port, js })
    }

    /// Creates the hub's stream sourcing the leaf's `CDR` stream.
    pub async fn create_sourcing_stream(&self) -> anyhow::Result<()> {
        let source = stream::Source { name: "CDR".into(), domain: Some("leaf".into()), ..Default::default() };
        self.js
            .create_stream(stream::Config {
                name: "CDR_HUB".into(),
                sources: Some(vec![source]),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the hub stream: {e}"))?;
        Ok(())
    }

    /// Messages in the hub's stream.
    pub async fn messages(&self) -> anyhow::Result<u64> {
        let mut s = self.js.get_stream("CDR_HUB").await.map_err(|e| anyhow::anyhow!("hub stream: {e}"))?;
        Ok(s.info().await.map_err(|e| anyhow::anyhow!("hub stream info: {e}"))?.state.messages)
    }

    /// Feeds every message of the hub's stream to `verifier` (skipping the first `skip`, the
    /// probes); returns how many were read.
    pub async fn read_all(&self, verifier: &mut Verifier, skip: u64) -> anyhow::Result<u64> {
        let s = self.js.get_stream("CDR_HUB").await.map_err(|e| anyhow::anyhow!("hub stream: {e}"))?;
        let c = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some("loadgen-verify".into()),
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the verify consumer: {e}"))?;
        let mut n = 0u64;
        loop {
            let mut batch = c
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("fetching from the hub stream: {e}"))?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| anyhow::anyhow!("a hub message: {e}"))?;
                got += 1;
                n += 1;
                if n > skip {
                    verifier.record(&m.payload, None);
                }
            }
            if got == 0 {
                return Ok(n);
            }
        }
    }
}

impl Leaf {
    /// Starts the leaf in `dir`, its leaf-node remote pointing at `hub` (the WAN proxy), and
    /// creates its `CDR` stream.
    pub async fn start(exe: &Path, dir: &Path, hub: SocketAddr) -> anyhow::Result<Leaf> {
        let (port, mqtt_port) = (free_port()?, free_port()?);
        let conf = format!(
            "# loadgen outage: the NATS leaf node at the edge\nserver_name: leaf\nlisten: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{}\", domain: leaf }}\nmqtt {{ listen: 127.0.0.1:{mqtt_port} }}\n\
             leafnodes {{ remotes: [ {{ url: \"nats-leaf://{hub}\" }} ] }}\n",
            dir.join("leaf-js").display()
        );
        let server = NatsServer::start(exe, dir, "nats-leaf", &conf, port)?;
        let client = async_nats::connect(format!("127.0.0.1:{port}")).await.context("connecting to the NATS leaf")?;
        let js = jetstream::with_domain(client, "leaf");
        js.create_stream(stream::Config {
            name: "CDR".into(),
            subjects: vec!["cdr.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the leaf stream: {e}"))?;
        // MQTT needs its listener up too.
        let addr = SocketAddr::from(([127, 0, 0, 1], mqtt_port));
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the leaf's MQTT listener is not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Leaf { server, mqtt_port })
    }
}
