//! An `edge-agent` process that forwards to a core: the config of [`crate::agent`] (one broker
//! connection, stream `cdr`) plus a `[forward]` section naming the scenario's core and the
//! certificates made for it; its start (up to `/readyz`, a connection to the core and active
//! subscriptions), its metrics with the forwarder's counters, its stop and `log verify`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;

use crate::agent::{self, AgentMetrics, AgentSettings, PROBE_TOPIC, http_get};
use crate::core_node::{EdgeCert, SERVER_NAME};
use crate::mosquitto::free_port;
use crate::mqtt::Publisher;
use crate::process::Proc;
use crate::prom::Exposition;

/// How long the agent gets to start, connect, subscribe or stop.
const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The edge id [`agent::config_toml`] writes: the certificate must carry it.
pub fn edge_id() -> String {
    let text = agent::config_toml(&settings_for_id(), Path::new("/"), SocketAddr::from(([127, 0, 0, 1], 1)), 1);
    text.lines()
        .find_map(|l| l.strip_prefix("edge_id = \"")?.strip_suffix('"'))
        .expect("the agent's config names its edge_id")
        .to_owned()
}

fn settings_for_id() -> AgentSettings {
    AgentSettings { inflight: 1, linger_ms: 1, fsync_interval_ms: 1, batch_bytes_max: "1KiB", zstd_level: 1 }
}

/// The forwarder's congestion control (`[forward] congestion`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Congestion {
    /// Cubic, the default.
    #[default]
    Cubic,
    /// quinn's experimental BBR.
    Bbr,
}

/// The agent's config with a `[forward]` section to `core`, presenting `cert`.
#[allow(clippy::too_many_arguments)]
pub fn config_toml(
    s: &AgentSettings,
    data_dir: &Path,
    admin: SocketAddr,
    broker_port: u16,
    core: SocketAddr,
    ca_file: &Path,
    cert: &EdgeCert,
    congestion: Congestion,
) -> String {
    let base =
        agent::config_toml(s, data_dir, admin, broker_port).replacen("loadgen mqtt-ingest", "loadgen e2e-latency", 1);
    format!(
        r#"{base}
[forward]
cores = ["{core}"]
server_name = "{SERVER_NAME}"
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
congestion = "{cc}"
"#,
        cc = if congestion == Congestion::Bbr { "bbr" } else { "cubic" },
        ca = ca_file.display(),
        cert = cert.cert_file.display(),
        key = cert.key_file.display(),
    )
}

/// The forwarder's counters (`backhaul_edge_forward_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardCounters {
    /// `connected`: 1 while connected to a core.
    pub connected: u64,
    /// `connects_total`.
    pub connects: u64,
    /// `batches_sent_total`.
    pub batches_sent: u64,
    /// `sent_bytes_total`.
    pub sent_bytes: u64,
    /// `batches_acked_total`.
    pub batches_acked: u64,
}

impl ForwardCounters {
    /// Reads them from an exposition; each must be there.
    pub fn parse(text: &str) -> anyhow::Result<ForwardCounters> {
        let e = Exposition::parse(text)?;
        let get = |name: &str| {
            e.value(name, "").map(|v| v as u64).with_context(|| format!("no series {name} in the agent's /metrics"))
        };
        Ok(ForwardCounters {
            connected: get("backhaul_edge_forward_connected")?,
            connects: get("backhaul_edge_forward_connects_total")?,
            batches_sent: get("backhaul_edge_forward_batches_sent_total")?,
            sent_bytes: get("backhaul_edge_forward_sent_bytes_total")?,
            batches_acked: get("backhaul_edge_forward_batches_acked_total")?,
        })
    }
}

/// One read of the agent's `/metrics`.
#[derive(Clone, Debug)]
pub struct Scrape {
    /// The agent's own series.
    pub agent: AgentMetrics,
    /// The forwarder's.
    pub forward: ForwardCounters,
}

/// A running agent that forwards.
#[derive(Debug)]
pub struct ForwardingAgent {
    proc: Proc,
    exe: PathBuf,
    /// `[admin] listen`.
    pub admin: SocketAddr,
    /// `data_dir`.
    pub data_dir: PathBuf,
    /// The config it runs with, as written.
    pub config: String,
}

impl ForwardingAgent {
    /// Writes the config into `dir`, starts `exe run`, waits for `/readyz` and for its
    /// connection to the core.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        exe: &Path,
        dir: &Path,
        settings: &AgentSettings,
        broker_port: u16,
        core: SocketAddr,
        ca_file: &Path,
        cert: &EdgeCert,
        congestion: Congestion,
    ) -> anyhow::Result<ForwardingAgent> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let data_dir = dir.join("agent-data");
        let config = config_toml(settings, &data_dir, admin, broker_port, core, ca_file, cert, congestion);
        let config_path = dir.join("edge-agent.toml");
        std::fs::write(&config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new(exe);
        command.arg("run").arg("--config").arg(&config_path).env("RUST_LOG", "info").env("NO_COLOR", "1");
        let proc = Proc::spawn("edge-agent", command, &dir.join("edge-agent.log"))?;
        let mut agent = ForwardingAgent { proc, exe: exe.to_path_buf(), admin, data_dir, config };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(agent.admin, "/readyz").await
                && agent.scrape().await.is_ok_and(|s| s.forward.connected == 1)
            {
                return Ok(agent);
            }
            agent.check(deadline, "/readyz and its connection to the core")?;
            tokio::time::sleep(POLL).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its metrics now.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        let (code, body) = http_get(self.admin, "/metrics").await?;
        if code != 200 {
            bail!("GET /metrics of edge-agent: {code}: {body}");
        }
        Ok(Scrape { agent: AgentMetrics::parse(&body)?, forward: ForwardCounters::parse(&body)? })
    }

    /// As [`crate::agent::Agent::wait_subscribed`]: probes on [`PROBE_TOPIC`] until one comes
    /// back unrouted, then until every probe's ack is out.
    pub async fn wait_subscribed(&mut self, probe: &mut Publisher) -> anyhow::Result<Scrape> {
        let deadline = Instant::now() + TIMEOUT;
        let mut sent = 0u64;
        loop {
            probe.publish_one(PROBE_TOPIC, Bytes::from(format!("probe {sent}"))).await?;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.scrape().await?.agent.unrouted > 0 {
                break;
            }
            self.check(deadline, "its subscriptions (probes unanswered)")?;
        }
        let mut last = self.scrape().await?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.scrape().await?;
            let (a, b) = (&now.agent, &last.agent);
            if a.acks >= a.unrouted && a.unrouted == b.unrouted && a.acks == b.acks {
                return Ok(now);
            }
            last = now;
            self.check(deadline, "the probes' acks")?;
        }
    }

    /// An error with its log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.proc.exited() {
            Some(status) => bail!("edge-agent exited with {status}\n{}", self.log_tail()),
            None => Ok(()),
        }
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail(40)
    }

    /// SIGTERM and its exit status; then `edge-agent log verify` on its data dir, with its
    /// status and output.
    pub async fn stop_and_verify(self) -> anyhow::Result<(ExitStatus, ExitStatus, String)> {
        let ForwardingAgent { proc, exe, data_dir, .. } = self;
        proc.stop_and_verify(TIMEOUT, exe, data_dir).await
    }

    fn check(&mut self, deadline: Instant, what: &str) -> anyhow::Result<()> {
        self.check_alive().with_context(|| format!("while loadgen waited for {what}"))?;
        if Instant::now() >= deadline {
            bail!("timed out after {TIMEOUT:?} waiting for the agent's {what}\n{}", self.log_tail());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_section_names_the_core_and_the_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = crate::core_node::Pki::create(tmp.path()).unwrap();
        let cert = pki.issue_edge(&edge_id()).unwrap();
        assert_eq!(edge_id(), "loadgen-bench");
        let core = SocketAddr::from(([127, 0, 0, 1], 4433));
        let text = config_toml(
            &settings_for_id(),
            Path::new("/d"),
            SocketAddr::from(([127, 0, 0, 1], 9)),
            1884,
            core,
            &pki.ca_file(),
            &cert,
            Congestion::Bbr,
        );
        for want in [
            "[forward]",
            "cores = [\"127.0.0.1:4433\"]",
            "server_name = \"localhost\"",
            "loadgen-bench.pem",
            "congestion = \"bbr\"",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(text.starts_with("# Written by loadgen e2e-latency."), "{text}");
    }

    #[test]
    fn forward_counters_are_read() {
        let text = "backhaul_edge_forward_connected 1\nbackhaul_edge_forward_connects_total 2\n\
                    backhaul_edge_forward_batches_sent_total 10\nbackhaul_edge_forward_sent_bytes_total 999\n\
                    backhaul_edge_forward_batches_acked_total 9\n";
        let c = ForwardCounters::parse(text).unwrap();
        assert_eq!((c.connected, c.connects, c.batches_sent, c.sent_bytes, c.batches_acked), (1, 2, 10, 999, 9));
        assert!(ForwardCounters::parse("backhaul_edge_forward_connected 1\n").is_err());
    }
}
