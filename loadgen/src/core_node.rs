//! The `core-ingest` process of a scenario and its private CA: certificates made with
//! `shared::tls` in the scenario's temp dir, the node on ephemeral loopback ports (QUIC on UDP,
//! admin on TCP) with its data dir beside them, its metrics as `/metrics` serves them, its stop
//! and `core-ingest log verify`.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::agent::http_get;
use crate::mosquitto::free_port;
use crate::process::Proc;
use crate::prom::{Bucket, Exposition};

/// Name the server certificate carries; edges connect with it as the server name.
pub const SERVER_NAME: &str = "localhost";
/// `node` in the core's config.
pub const NODE: &str = "loadgen-core";
/// Days the scenario's certificates are valid (the CA one more: it must outlive them).
const CERT_DAYS: u32 = 2;
/// How long the node gets to start or stop.
const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The scenario's private CA and the core's server certificate, as PEM files in a directory.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    ca_cert: String,
    ca_key: String,
}

/// An edge's identity: its certificate and key (PEM) and the CA it trusts.
#[derive(Clone, Debug)]
pub struct EdgeCert {
    /// The edge id: the certificate's CommonName.
    pub id: String,
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// Client certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Where the certificate was written.
    pub cert_file: PathBuf,
    /// Where the key was written.
    pub key_file: PathBuf,
}

impl Pki {
    /// A new CA and a server certificate for `localhost` and `127.0.0.1`, written to `dir`
    /// (`ca.pem`, `server.pem`, `server.key`).
    pub fn create(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir.join("edges")).with_context(|| format!("creating {}", dir.display()))?;
        let (ca_cert, ca_key) = shared::tls::generate_ca("Backhaul loadgen CA", CERT_DAYS + 1)?;
        let names = [SERVER_NAME.to_owned(), "127.0.0.1".to_owned()];
        let (cert, key) = shared::tls::issue_server_cert(&ca_cert, &ca_key, &names, CERT_DAYS)?;
        for (name, text) in [("ca.pem", &ca_cert), ("server.pem", &cert), ("server.key", &key)] {
            write(&dir.join(name), text)?;
        }
        Ok(Pki { dir: dir.to_path_buf(), ca_cert, ca_key })
    }

    /// `ca.pem`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `server.pem`: the server certificate, for `localhost` and `127.0.0.1`.
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// `server.key`: its private key.
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// Issues a client certificate with CommonName `id`, written to `edges/<id>.pem` and `.key`.
    pub fn issue_edge(&self, id: &str) -> anyhow::Result<EdgeCert> {
        let (cert_pem, key_pem) = shared::tls::issue_edge_cert(&self.ca_cert, &self.ca_key, id, CERT_DAYS)?;
        let cert_file = self.dir.join("edges").join(format!("{id}.pem"));
        let key_file = self.dir.join("edges").join(format!("{id}.key"));
        write(&cert_file, &cert_pem)?;
        write(&key_file, &key_pem)?;
        Ok(EdgeCert { id: id.to_owned(), ca_pem: self.ca_cert.clone(), cert_pem, key_pem, cert_file, key_file })
    }
}

/// What the scenario sets in the core's config.
#[derive(Clone, Debug)]
pub struct CoreSettings {
    /// `partitions` (the shipped default is 4).
    pub partitions: u32,
    /// `mtu_min` / `mtu_max`.
    pub mtu: shared::quic::Mtu,
    /// `udp_buffer_bytes`; unset: the shipped default.
    pub udp_buffer_bytes: Option<u64>,
}

impl CoreSettings {
    /// `partitions` partitions, the shipped defaults otherwise.
    pub fn with_partitions(partitions: u32) -> CoreSettings {
        CoreSettings { partitions, mtu: shared::quic::Mtu::DEFAULT, udp_buffer_bytes: None }
    }
}

/// The core's config: data under `data_dir`, QUIC on `listen`, admin on `admin`.
pub fn config_toml(s: &CoreSettings, pki: &Pki, data_dir: &Path, listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"# Written by loadgen.
node = "{NODE}"
data_dir = "{data_dir}"
listen = "{listen}"
admin_listen = "{admin}"
partitions = {partitions}
mtu_min = {mtu_min}
mtu_max = {mtu_max}
{udp_buffer}
[tls]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
"#,
        data_dir = data_dir.display(),
        partitions = s.partitions,
        mtu_min = s.mtu.min,
        mtu_max = s.mtu.max,
        udp_buffer = s.udp_buffer_bytes.map_or(String::new(), |b| format!("udp_buffer_bytes = \"{b}B\"\n")),
        ca = pki.ca_file().display(),
        cert = pki.server_cert_file().display(),
        key = pki.server_key_file().display(),
    )
}

/// A running core node.
#[derive(Debug)]
pub struct CoreNode {
    proc: Proc,
    exe: PathBuf,
    /// QUIC, UDP on 127.0.0.1.
    pub listen: SocketAddr,
    /// `admin_listen`.
    pub admin: SocketAddr,
    /// `data_dir`.
    pub data_dir: PathBuf,
    /// The config it runs with, as written.
    pub config: String,
}

impl CoreNode {
    /// Writes the config into `dir`, starts `exe run` and waits for `/readyz`.
    pub async fn start(exe: &Path, dir: &Path, pki: &Pki, settings: &CoreSettings) -> anyhow::Result<CoreNode> {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let data_dir = dir.join("core-data");
        let config = config_toml(settings, pki, &data_dir, listen, admin);
        let config_path = dir.join("core-ingest.toml");
        write(&config_path, &config)?;
        let mut command = Command::new(exe);
        command.arg("run").arg("--config").arg(&config_path).env("RUST_LOG", "info").env("NO_COLOR", "1");
        let proc = Proc::spawn("core-ingest", command, &dir.join("core-ingest.log"))?;
        let mut node = CoreNode { proc, exe: exe.to_path_buf(), listen, admin, data_dir, config };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(node.admin, "/readyz").await {
                return Ok(node);
            }
            node.check_alive()?;
            if Instant::now() >= deadline {
                bail!("core-ingest not ready within {TIMEOUT:?}\n{}", node.log_tail());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its metrics now.
    pub async fn metrics(&self) -> anyhow::Result<CoreMetrics> {
        let (code, body) = http_get(self.admin, "/metrics").await?;
        if code != 200 {
            bail!("GET /metrics of core-ingest: {code}: {body}");
        }
        CoreMetrics::parse(&body)
    }

    /// An error with its log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.proc.exited() {
            Some(status) => bail!("core-ingest exited with {status}\n{}", self.log_tail()),
            None => Ok(()),
        }
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail(40)
    }

    /// SIGTERM and its exit status; then `core-ingest log verify` on its data dir: its status
    /// and output.
    pub async fn stop_and_verify(self) -> anyhow::Result<(ExitStatus, ExitStatus, String)> {
        let CoreNode { proc, exe, data_dir, .. } = self;
        proc.stop_and_verify(TIMEOUT, exe, data_dir).await
    }
}

/// The core's series the scenarios read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CoreMetrics {
    /// `backhaul_core_batches_received_total`.
    pub batches_received: u64,
    /// `backhaul_core_batches_stored_total`.
    pub batches_stored: u64,
    /// `backhaul_core_stored_bytes_total`.
    pub stored_bytes: u64,
    /// `backhaul_core_records_stored_total`.
    pub records_stored: u64,
    /// `backhaul_core_duplicate_batches_total`.
    pub duplicates: u64,
    /// `backhaul_core_conflicting_batches_total`.
    pub conflicts: u64,
    /// `backhaul_core_group_commits_total`: rounds of the store's writer (append all queued,
    /// fsync each partition touched, answer).
    pub group_commits: u64,
    /// `backhaul_core_connections`.
    pub connections: u64,
    /// `backhaul_core_refused_total`, every reason.
    pub refused: u64,
    /// `backhaul_core_event_to_durable_seconds_bucket`.
    pub event_to_durable: Vec<Bucket>,
    /// `backhaul_core_event_to_durable_seconds_sum`.
    pub event_to_durable_sum: f64,
    /// `backhaul_core_event_to_durable_seconds_count`.
    pub event_to_durable_count: u64,
}

impl CoreMetrics {
    /// Reads an exposition; every series named above must be in it.
    pub fn parse(text: &str) -> anyhow::Result<CoreMetrics> {
        let e = Exposition::parse(text)?;
        let get = |name: &str| e.value(name, "").with_context(|| format!("no series {name} in the core's /metrics"));
        let count = |name: &str| get(name).map(|v| v as u64);
        Ok(CoreMetrics {
            batches_received: count("backhaul_core_batches_received_total")?,
            batches_stored: count("backhaul_core_batches_stored_total")?,
            stored_bytes: count("backhaul_core_stored_bytes_total")?,
            records_stored: count("backhaul_core_records_stored_total")?,
            duplicates: count("backhaul_core_duplicate_batches_total")?,
            conflicts: count("backhaul_core_conflicting_batches_total")?,
            group_commits: count("backhaul_core_group_commits_total")?,
            connections: count("backhaul_core_connections")?,
            refused: e.sum("backhaul_core_refused_total", "reason=") as u64,
            event_to_durable: e.buckets("backhaul_core_event_to_durable_seconds"),
            event_to_durable_sum: get("backhaul_core_event_to_durable_seconds_sum")?,
            event_to_durable_count: count("backhaul_core_event_to_durable_seconds_count")?,
        })
    }
}

/// From the first line of `log verify`'s report of `stream` (`cdr: 4 partition(s), …, 12
/// batch(es) (0 gap), 3400 record(s), 81234 bytes`): batches and records.
pub fn verified_counts(report: &str, stream: &str) -> Option<(u64, u64)> {
    let line = report.lines().find(|l| l.strip_prefix(stream).is_some_and(|r| r.starts_with(": ")))?;
    let number_before = |unit: &str| -> Option<u64> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    Some((number_before(" batch(es)")?, number_before(" record(s)")?))
}

/// `(utime, stime)` clock ticks of `pid` (`None`: this process) from `/proc/<pid>/stat`: with
/// [`crate::process::CpuClock`]'s seconds, the split between user and kernel time.
pub fn cpu_ticks(pid: Option<u32>) -> Option<(u64, u64)> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    parse_stat_ticks(&std::fs::read_to_string(path).ok()?)
}

fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    // Fields count from the last `)`: the command name may hold spaces and parentheses.
    let mut f = stat[stat.rfind(')')? + 1..].split_ascii_whitespace().skip(11);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Datagrams the kernel dropped on the UDP socket bound to port `port` because its receive
/// buffer was full: the `drops` column of `/proc/net/udp`. `None` if no such socket.
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    parse_udp_drops(&std::fs::read_to_string("/proc/net/udp").ok()?, port)
}

/// Machine-wide UDP `(InDatagrams, RcvbufErrors)` from `/proc/net/snmp`.
pub fn udp_counters() -> Option<(u64, u64)> {
    parse_udp_counters(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

fn parse_udp_drops(text: &str, port: u16) -> Option<u64> {
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        if local_port != port {
            return None;
        }
        f.last()?.parse().ok()
    })
}

fn parse_udp_counters(text: &str) -> Option<(u64, u64)> {
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next()?, udp.next()?);
    let field = |name: &str| -> Option<u64> {
        let i = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(i)?.parse().ok()
    };
    Some((field("InDatagrams")?, field("RcvbufErrors")?))
}

/// A UDP port that was free a moment ago.
fn free_udp_port() -> anyhow::Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0").context("binding an ephemeral UDP port")?;
    Ok(s.local_addr().context("local address of a bound socket")?.port())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_and_config_name_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::create(&tmp.path().join("pki")).unwrap();
        let edge = pki.issue_edge("loadgen-edge-007").unwrap();
        assert_eq!(shared::tls::cert_pem_edge_id(edge.cert_pem.as_bytes()).unwrap(), "loadgen-edge-007");
        assert!(edge.cert_file.is_file() && edge.key_file.is_file());
        let listen = SocketAddr::from(([127, 0, 0, 1], 4433));
        let admin = SocketAddr::from(([127, 0, 0, 1], 9465));
        let text = config_toml(&CoreSettings::with_partitions(3), &pki, Path::new("/tmp/d"), listen, admin);
        for want in ["partitions = 3", "listen = \"127.0.0.1:4433\"", "admin_listen = \"127.0.0.1:9465\"", "ca.pem"] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(!text.contains("udp_buffer_bytes"), "the shipped default unless asked:\n{text}");
        let jumbo = CoreSettings {
            partitions: 4,
            mtu: shared::quic::Mtu { min: 6500, max: 6500 },
            udp_buffer_bytes: Some(32 << 20),
        };
        let text = config_toml(&jumbo, &pki, Path::new("/tmp/d"), listen, admin);
        for want in ["mtu_min = 6500\n", "mtu_max = 6500\n", "udp_buffer_bytes = \"33554432B\"\n"] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert_eq!(shared::units::ByteSize::parse("33554432B"), Ok(shared::units::ByteSize(32 << 20)));
    }

    #[test]
    fn metrics_are_read_from_an_exposition() {
        let text = "backhaul_core_batches_received_total 12\n\
            backhaul_core_batches_stored_total 11\n\
            backhaul_core_stored_bytes_total 5000\n\
            backhaul_core_records_stored_total 2100\n\
            backhaul_core_duplicate_batches_total 1\n\
            backhaul_core_conflicting_batches_total 0\n\
            backhaul_core_group_commits_total 4\n\
            backhaul_core_event_to_durable_seconds_bucket{le=\"0.001\"} 2\n\
            backhaul_core_event_to_durable_seconds_bucket{le=\"+Inf\"} 11\n\
            backhaul_core_event_to_durable_seconds_sum 0.2\n\
            backhaul_core_event_to_durable_seconds_count 11\n\
            backhaul_core_connections 3\n\
            backhaul_core_refused_total{reason=\"tls\"} 1\n\
            backhaul_core_refused_total{reason=\"bad_input\"} 2\n";
        let m = CoreMetrics::parse(text).unwrap();
        assert_eq!((m.batches_received, m.batches_stored, m.duplicates, m.group_commits), (12, 11, 1, 4));
        assert_eq!((m.connections, m.refused, m.event_to_durable_count), (3, 3, 11));
        assert_eq!(m.records_stored, 2100);
        assert_eq!(m.event_to_durable.len(), 2);
        assert!(CoreMetrics::parse("backhaul_core_connections 3\n").is_err());
    }

    #[test]
    fn stat_ticks_split_user_and_system() {
        let stat = "4242 (core (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 269 0 0 20 0 9 0 123 0 0";
        assert_eq!(parse_stat_ticks(stat), Some((731, 269)));
        assert!(cpu_ticks(None).is_some());
    }

    #[test]
    fn udp_drops_and_counters_are_read_from_proc() {
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1: 0100007F:D7F3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n\
                   2: 0100007F:0050 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0\n";
        assert_eq!(parse_udp_drops(udp, 0xd7f3), Some(17));
        assert_eq!(parse_udp_drops(udp, 80), Some(0));
        assert_eq!(parse_udp_drops(udp, 81), None);
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 461516 2155 31254 495020 31254 0\n\
                    UdpLite: InDatagrams NoPorts\nUdpLite: 0 0\n";
        assert_eq!(parse_udp_counters(snmp), Some((461_516, 31_254)));
        assert!(udp_counters().is_some(), "this machine has /proc/net/snmp");
    }

    #[test]
    fn verify_report_counts_are_read() {
        let report = "cdr: 4 partition(s), 5 segment(s), 120 batch(es) (0 gap), 24000 record(s), 999 bytes\n\
                      cdr/0: 1 segment(s), 30 batch(es) (0 gap), 6000 record(s), offsets [0, 6000), 250 bytes\n\
                      1 stream(s) verified: no corruption\n";
        assert_eq!(verified_counts(report, "cdr"), Some((120, 24000)));
        assert_eq!(verified_counts(report, "sensors"), None);
    }
}
