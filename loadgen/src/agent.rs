//! The `edge-agent` process of a scenario: its config, its start (up to `/readyz` and active
//! subscriptions), its metrics as the admin endpoint serves them, its stop and `log verify`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mosquitto::free_port;
use crate::mqtt::Publisher;
use crate::process::Proc;
use crate::prom::{Bucket, Exposition};

/// The stream the scenario's CDRs go to.
pub const STREAM: &str = "cdr";
/// Topic filter of the CDRs.
pub const CDR_FILTER: &str = "cdr/#";
/// Subscribed after [`CDR_FILTER`] and routed nowhere: a probe published there comes back as
/// an unrouted record once every subscription before it is active (the broker handles one
/// connection's SUBSCRIBEs in order). `/readyz` says only that the connection is up.
pub const PROBE_TOPIC: &str = "loadgen/probe";
/// How long the agent gets to start, subscribe or stop.
const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// What the scenario sets in the agent's config.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// `[[broker]] inflight_max` (and the broker's `max_inflight_messages`).
    pub inflight: u16,
    /// `[streams.cdr] linger`, ms.
    pub linger_ms: u64,
    /// `[streams.cdr] fsync_interval`, ms.
    pub fsync_interval_ms: u64,
    /// `[streams.cdr] batch_bytes_max`, as written (e.g. `"256KiB"`).
    pub batch_bytes_max: &'static str,
    /// `[streams.cdr] zstd_level`.
    pub zstd_level: i32,
}

/// The agent's config: data under `data_dir`, admin on `admin`, one broker connection.
pub fn config_toml(s: &AgentSettings, data_dir: &Path, admin: SocketAddr, broker_port: u16) -> String {
    format!(
        r#"# Written by loadgen mqtt-ingest.
edge_id = "loadgen-bench"
data_dir = "{data_dir}"

[admin]
listen = "{admin}"

[[broker]]
name = "bench"
url = "mqtt://127.0.0.1:{broker_port}"
protocol = "3.1.1"
inflight_max = {inflight}
subscriptions = ["{CDR_FILTER}", "{PROBE_TOPIC}"]

[[route]]
filter = "{CDR_FILTER}"
stream = "{STREAM}"

[streams.{STREAM}]
format = "json"
linger = "{linger}ms"
batch_bytes_max = "{batch}"
zstd_level = {zstd}
fsync = "interval"
fsync_interval = "{fsync}ms"
full_policy = "backpressure"
"#,
        data_dir = data_dir.display(),
        inflight = s.inflight,
        linger = s.linger_ms,
        batch = s.batch_bytes_max,
        zstd = s.zstd_level,
        fsync = s.fsync_interval_ms,
    )
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    exe: PathBuf,
    /// `[admin] listen`.
    pub admin: SocketAddr,
    /// `data_dir`.
    pub data_dir: PathBuf,
    /// The config it runs with, as written.
    pub config: String,
}

impl Agent {
    /// Writes the config into `dir`, starts `exe run` and waits for `/readyz`.
    pub async fn start(exe: &Path, dir: &Path, settings: &AgentSettings, broker_port: u16) -> anyhow::Result<Agent> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let data_dir = dir.join("agent-data");
        let config = config_toml(settings, &data_dir, admin, broker_port);
        let config_path = dir.join("edge-agent.toml");
        std::fs::write(&config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new(exe);
        command.arg("run").arg("--config").arg(&config_path).env("RUST_LOG", "info");
        let proc = Proc::spawn("edge-agent", command, &dir.join("edge-agent.log"))?;
        let mut agent = Agent { proc, exe: exe.to_path_buf(), admin, data_dir, config };
        agent.wait_ready().await?;
        Ok(agent)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Publishes probes on [`PROBE_TOPIC`] until one comes back as an unrouted record, then
    /// waits until every probe that arrived is acknowledged: from then on, every CDR published
    /// reaches the agent, and the agent's counters move only with the scenario's messages.
    pub async fn wait_subscribed(&mut self, probe: &mut Publisher) -> anyhow::Result<AgentMetrics> {
        let deadline = Instant::now() + TIMEOUT;
        let mut sent = 0u64;
        loop {
            probe.publish_one(PROBE_TOPIC, Bytes::from(format!("probe {sent}"))).await?;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.metrics().await?.unrouted > 0 {
                break;
            }
            self.check_deadline(deadline, "its subscriptions (probes unanswered)")?;
        }
        let mut last = self.metrics().await?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.metrics().await?;
            if now.acks >= now.unrouted && now.unrouted == last.unrouted && now.acks == last.acks {
                return Ok(now);
            }
            last = now;
            self.check_deadline(deadline, "the probes' acks")?;
        }
    }

    /// Its metrics now.
    pub async fn metrics(&self) -> anyhow::Result<AgentMetrics> {
        let (code, body) = http_get(self.admin, "/metrics").await?;
        if code != 200 {
            bail!("GET /metrics: {code}: {body}");
        }
        AgentMetrics::parse(&body)
    }

    /// Whether it has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail(40)
    }

    /// SIGTERM and its exit status; then `edge-agent log verify` on its data dir, with its
    /// status and output.
    pub async fn stop_and_verify(self) -> anyhow::Result<(ExitStatus, ExitStatus, String)> {
        let Agent { proc, exe, data_dir, .. } = self;
        proc.stop_and_verify(TIMEOUT, exe, data_dir).await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return Ok(());
            }
            self.check_deadline(deadline, "/readyz")?;
            tokio::time::sleep(POLL).await;
        }
    }

    fn check_deadline(&mut self, deadline: Instant, what: &str) -> anyhow::Result<()> {
        if let Some(status) = self.proc.exited() {
            bail!("edge-agent exited with {status} while loadgen waited for {what}\n{}", self.log_tail());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {TIMEOUT:?} waiting for the agent's {what}\n{}", self.log_tail());
        }
        Ok(())
    }
}

/// The agent's series the scenario reads: stream [`STREAM`], plus the unlabelled ones.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentMetrics {
    /// `backhaul_edge_records_received_total{stream="cdr"}`.
    pub received: u64,
    /// `backhaul_edge_records_appended_total{stream="cdr"}`.
    pub appended: u64,
    /// `backhaul_edge_records_dropped_total{stream="cdr"}`, every reason.
    pub dropped: u64,
    /// `backhaul_edge_records_unrouted_total` (the probes).
    pub unrouted: u64,
    /// `backhaul_edge_receive_to_ack_seconds_count`: acks released, CDRs and probes.
    pub acks: u64,
    /// `backhaul_edge_receive_to_ack_seconds_sum`.
    pub ack_seconds_sum: f64,
    /// `backhaul_edge_receive_to_ack_seconds_bucket`.
    pub ack_buckets: Vec<Bucket>,
    /// `backhaul_edge_batches_total{stream="cdr"}`.
    pub batches: u64,
    /// `backhaul_edge_batch_raw_bytes_total{stream="cdr"}`.
    pub batch_raw_bytes: u64,
    /// `backhaul_edge_batch_compressed_bytes_total{stream="cdr"}`.
    pub batch_compressed_bytes: u64,
    /// `backhaul_edge_log_bytes{stream="cdr"}`.
    pub log_bytes: u64,
    /// `backhaul_edge_append_errors_total{stream="cdr"}`.
    pub append_errors: u64,
    /// `backhaul_edge_broker_dropped_messages`.
    pub broker_dropped: u64,
}

impl AgentMetrics {
    /// Reads an exposition; every series named above must be in it.
    pub fn parse(text: &str) -> anyhow::Result<AgentMetrics> {
        let e = Exposition::parse(text)?;
        let s = format!("stream=\"{STREAM}\"");
        let get = |name: &str, labels: &str| {
            e.value(name, labels).with_context(|| format!("no series {name}{{{labels}}} in the agent's /metrics"))
        };
        let count = |name: &str, labels: &str| get(name, labels).map(|v| v as u64);
        let dropped_prefix = format!("{s},reason=");
        Ok(AgentMetrics {
            received: count("backhaul_edge_records_received_total", &s)?,
            appended: count("backhaul_edge_records_appended_total", &s)?,
            dropped: e.sum("backhaul_edge_records_dropped_total", &dropped_prefix) as u64,
            unrouted: count("backhaul_edge_records_unrouted_total", "")?,
            acks: count("backhaul_edge_receive_to_ack_seconds_count", "")?,
            ack_seconds_sum: get("backhaul_edge_receive_to_ack_seconds_sum", "")?,
            ack_buckets: e.buckets("backhaul_edge_receive_to_ack_seconds"),
            batches: count("backhaul_edge_batches_total", &s)?,
            batch_raw_bytes: count("backhaul_edge_batch_raw_bytes_total", &s)?,
            batch_compressed_bytes: count("backhaul_edge_batch_compressed_bytes_total", &s)?,
            log_bytes: count("backhaul_edge_log_bytes", &s)?,
            append_errors: count("backhaul_edge_append_errors_total", &s)?,
            broker_dropped: count("backhaul_edge_broker_dropped_messages", "")?,
        })
    }

    /// Acks of CDRs since `before`: all acks less the probes'.
    pub fn cdr_acks_since(&self, before: &AgentMetrics) -> u64 {
        (self.acks - before.acks).saturating_sub(self.unrouted - before.unrouted)
    }
}

/// A one-shot HTTP/1.1 GET: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    })
    .await
    .with_context(|| format!("GET http://{addr}{path}: no answer within 5 s"))?
    .with_context(|| format!("GET http://{addr}{path}"))
    .and_then(|response| {
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").context("no end of the response head")?;
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status code")?;
        Ok((code, body.to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_every_setting_of_the_scenario() {
        let s = AgentSettings {
            inflight: 321,
            linger_ms: 5,
            fsync_interval_ms: 7,
            batch_bytes_max: "256KiB",
            zstd_level: 1,
        };
        let text = config_toml(&s, Path::new("/tmp/x"), SocketAddr::from(([127, 0, 0, 1], 9)), 1884);
        for want in [
            "inflight_max = 321",
            "url = \"mqtt://127.0.0.1:1884\"",
            "listen = \"127.0.0.1:9\"",
            "linger = \"5ms\"",
            "fsync_interval = \"7ms\"",
            "batch_bytes_max = \"256KiB\"",
            "zstd_level = 1",
            "format = \"json\"",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }

    #[test]
    fn metrics_are_read_from_an_exposition() {
        let text = "backhaul_edge_records_received_total{stream=\"cdr\"} 10\n\
            backhaul_edge_records_appended_total{stream=\"cdr\"} 9\n\
            backhaul_edge_records_appended_total{stream=\"_deadletter\"} 1\n\
            backhaul_edge_records_dropped_total{stream=\"cdr\",reason=\"too_large\"} 1\n\
            backhaul_edge_records_dropped_total{stream=\"cdr\",reason=\"duplicate\"} 2\n\
            backhaul_edge_records_dropped_total{stream=\"_deadletter\",reason=\"duplicate\"} 5\n\
            backhaul_edge_records_unrouted_total 3\n\
            backhaul_edge_receive_to_ack_seconds_bucket{le=\"0.005\"} 8\n\
            backhaul_edge_receive_to_ack_seconds_bucket{le=\"+Inf\"} 13\n\
            backhaul_edge_receive_to_ack_seconds_sum 0.1\n\
            backhaul_edge_receive_to_ack_seconds_count 13\n\
            backhaul_edge_batches_total{stream=\"cdr\"} 2\n\
            backhaul_edge_batch_raw_bytes_total{stream=\"cdr\"} 5000\n\
            backhaul_edge_batch_compressed_bytes_total{stream=\"cdr\"} 1000\n\
            backhaul_edge_log_bytes{stream=\"cdr\"} 1200\n\
            backhaul_edge_append_errors_total{stream=\"cdr\"} 0\n\
            backhaul_edge_broker_dropped_messages 0\n";
        let m = AgentMetrics::parse(text).unwrap();
        assert_eq!((m.received, m.appended, m.dropped, m.unrouted, m.acks), (10, 9, 3, 3, 13));
        assert_eq!(m.ack_buckets.len(), 2);
        let before = AgentMetrics { acks: 2, unrouted: 2, ..m.clone() };
        assert_eq!(m.cdr_acks_since(&before), 10);
        assert!(AgentMetrics::parse("backhaul_edge_records_unrouted_total 3\n").is_err());
    }
}
