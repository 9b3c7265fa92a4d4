//! Harness of the subscribe-mode integration tests: a real Mosquitto on an ephemeral port, the
//! real `edge-agent` binary, a rumqttc publisher that counts the broker's PUBACKs, and a reader
//! of the agent's logs that goes through `shared::log`, not through the agent. For forwarding:
//! a private CA with its certificates, the real `core-ingest` binary, and a reader of a core's
//! partition logs (through `shared::log` too: the edge does not depend on core-ingest).
//!
//! Every wait is bounded and panics naming what it waited for, with the agent's log tail.
//! Processes are killed by PID when their handle drops; temporary directories go with them.

// Not every test uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shared::batch::Record;
use shared::ids::Offset;
use shared::log::storage::FsStorage;
use shared::log::verify::stream_dir;
use shared::log::{Log, LogConfig};

/// The agent binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_edge-agent");
/// `edge_id` of every agent started here.
pub const EDGE_ID: &str = "edge-test";
/// Name of the broker connection in the configs built here.
pub const BROKER_NAME: &str = "main";
/// Subscribed last, routed nowhere: a probe published there shows up as an unrouted record
/// once every subscription before it is active (see [`Agent::wait_subscribed`]).
pub const PROBE_FILTER: &str = "probe/#";

/// How long a process gets to start or stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// A port that was free a moment ago (bind to 0, read it, drop it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    l.local_addr().expect("local address of a bound socket").port()
}

/// Polls `poll` until it returns `Some`, for at most `timeout`; panics naming `what` and
/// `context()` otherwise.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut poll: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = poll() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", context());
        }
        std::thread::sleep(POLL);
    }
}

/// The last `lines` lines of a text file (or why it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

// ---- Mosquitto -----------------------------------------------------------------------------

/// A Mosquitto broker of its own: persistent sessions, no queue limit, a wide in-flight window
/// (deploy/mosquitto/backhaul.conf), `$SYS` every second.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts a broker with `extra_conf` appended to the base settings and waits until it
    /// accepts connections.
    pub fn start(extra_conf: &str) -> Mosquitto {
        let exe = mosquitto_exe();
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let log_path = dir.path().join("mosquitto.log");
        // A port freed by `free_port` may be taken again before mosquitto binds it: retry.
        for attempt in 1..=3 {
            let port = free_port();
            let conf = format!(
                "# Written by edge-agent/tests/common.\n\
                 user root\n\
                 listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence true\n\
                 persistence_location {}/\n\
                 max_queued_messages 0\n\
                 max_inflight_messages 1000\n\
                 sys_interval 1\n\
                 {extra_conf}\n",
                dir.path().display()
            );
            let conf_path = dir.path().join("mosquitto.conf");
            fs::write(&conf_path, conf).expect("writing mosquitto.conf");
            let log = File::create(&log_path).expect("creating mosquitto.log");
            let mut child = Command::new(&exe)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
            match wait_listening(&mut child, port) {
                Ok(()) => return Mosquitto { child, port, dir },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = tail(&log_path, 40);
                    if attempt < 3 && log.contains("in use") {
                        continue;
                    }
                    panic!("mosquitto did not start: {why}\n--- mosquitto log ---\n{log}");
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The tail of the broker's own log.
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("mosquitto.log"), 40)
    }
}

/// Waits until `port` accepts TCP connections, or `child` exits, for at most 10 s.
fn wait_listening(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), POLL).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("port {port} not accepting connections after 10 s"));
        }
        std::thread::sleep(POLL);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_exe() -> PathBuf {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let candidates =
        path_dirs.into_iter().chain(["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"].map(PathBuf::from));
    for dir in candidates {
        let exe = dir.join("mosquitto");
        if exe.is_file() {
            return exe;
        }
    }
    panic!("mosquitto is not installed (not on PATH nor in /usr/sbin): .ci/run installs it (apt-get install mosquitto)")
}

// ---- the agent -----------------------------------------------------------------------------

/// The `edge-agent run` process, with its config, data directory and log.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    work: tempfile::TempDir,
    /// `[admin] listen`.
    pub admin: SocketAddr,
    /// `data_dir`.
    pub data_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Writes a config (`edge_id`, `data_dir`, `[admin] listen` on a free port, then
    /// `config_body`: brokers, routes, streams), starts the agent and waits for `/readyz`.
    pub fn start(config_body: &str, data_dir: &Path) -> Agent {
        Agent::start_with(config_body, data_dir, &[], true)
    }

    /// As [`Agent::start`], with extra environment variables, waiting for `/readyz` or not.
    pub fn start_with(config_body: &str, data_dir: &Path, env: &[(&str, &str)], wait_ready: bool) -> Agent {
        let work = tempfile::tempdir().expect("temp dir for the agent");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            "edge_id = \"{EDGE_ID}\"\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"{admin}\"\n\n{config_body}",
            data_dir.display()
        );
        let config_path = work.path().join("edge-agent.toml");
        fs::write(&config_path, config).expect("writing the agent config");
        let log_path = work.path().join("edge-agent.log");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut agent =
            Agent { child: None, work, admin, data_dir: data_dir.to_path_buf(), config_path, log_path, env };
        agent.spawn();
        if wait_ready {
            agent.wait_ready();
        }
        agent
    }

    /// Starts the agent again with the same config and data directory (after a kill or
    /// a stop) and waits for `/readyz`.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the agent is still running");
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log_path).expect("agent log");
        writeln!(log, "===== edge-agent start at {:?}", SystemTime::now()).expect("writing the agent log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning edge-agent");
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200 (a broker connection is up).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("edge-agent exited with {status} before it was ready\n{}", self.log_tail());
            }
            if http_get(self.admin, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {START_TIMEOUT:?} waiting for /readyz on {}\n{}", self.admin, self.log_tail());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Publishes probes until one comes back as an unrouted record: every subscription is
    /// active. Call once, on the first start, before publishing anything the test counts.
    pub fn wait_subscribed(&self, publisher: &Publisher) {
        let before = self.metric("backhaul_edge_records_unrouted_total", "");
        let mut sent = 0u64;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            publisher.publish("probe/subscribed", format!("probe {sent}").into_bytes());
            sent += 1;
            std::thread::sleep(Duration::from_millis(100));
            if self.metric("backhaul_edge_records_unrouted_total", "") > before {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for the agent's subscriptions ({sent} probes)\n{}", self.log_tail());
            }
        }
    }

    /// The process id; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and reap it.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the agent is running");
        child.kill().expect("SIGKILL edge-agent");
        child.wait().expect("reaping edge-agent");
    }

    /// SIGTERM, and wait (bounded) for it to exit.
    pub fn sigterm_and_wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is running");
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM {} failed", child.id());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for edge-agent") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("edge-agent did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}", self.log_tail());
            }
            std::thread::sleep(POLL);
        }
    }

    /// `GET /metrics`, or `None` if the agent does not answer.
    pub fn try_metrics(&self) -> Option<String> {
        http_get(self.admin, "/metrics").filter(|(code, _)| *code == 200).map(|(_, body)| body)
    }

    /// `GET /metrics`; panics if the agent does not answer.
    pub fn metrics(&self) -> String {
        self.try_metrics().unwrap_or_else(|| panic!("no /metrics from {}\n{}", self.admin, self.log_tail()))
    }

    /// The value of series `name{labels}` (labels as exposed, e.g. `stream="cdr"`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.metrics();
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("no series {name}{{{labels}}} in:\n{text}"))
    }

    /// `backhaul_edge_records_appended_total` of `stream`, as a count.
    pub fn appended(&self, stream: &str) -> u64 {
        self.metric("backhaul_edge_records_appended_total", &format!("stream=\"{stream}\"")) as u64
    }

    /// Polls `poll` with this agent until it returns `Some` (bounded), panicking with the
    /// agent's log tail.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, mut poll: impl FnMut(&Agent) -> Option<T>) -> T {
        wait_for(what, timeout, || self.log_tail(), || poll(self))
    }

    /// The last lines the agent logged (over all its runs).
    pub fn log_tail(&self) -> String {
        format!("--- edge-agent log (tail) ---\n{}\n--- end of log ---", tail(&self.log_path, 60))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `[[broker]]` for `broker` (protocol `"3.1.1"` or `"5"`) subscribing to `filters` and then
/// [`PROBE_FILTER`].
pub fn broker_toml(broker: &Mosquitto, protocol: &str, filters: &[&str]) -> String {
    let subs: Vec<String> = filters.iter().chain(&[PROBE_FILTER]).map(|f| format!("\"{f}\"")).collect();
    format!(
        "[[broker]]\nname = \"{BROKER_NAME}\"\nurl = \"{}\"\nprotocol = \"{protocol}\"\ninflight_max = 1000\n\
         reconnect_min = \"50ms\"\nreconnect_max = \"1s\"\nsubscriptions = [{}]\n\n",
        broker.url(),
        subs.join(", ")
    )
}

/// The client id the agent uses towards the broker (the default).
pub fn agent_client_id() -> String {
    format!("backhaul-{EDGE_ID}-{BROKER_NAME}")
}

/// The value of `name{labels}` in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() { name.to_owned() } else { format!("{name}{{{labels}}}") };
    text.lines().find_map(|line| line.strip_prefix(&series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

/// A one-shot HTTP/1.1 GET: `(status, body)`, or `None` if nothing answered.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

// ---- the publisher -------------------------------------------------------------------------

/// One message a test publishes: a unique id, its topic and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// Unique over the test.
    pub id: u64,
    /// Topic.
    pub topic: String,
    /// Payload; carries `id` (see [`id_of`]).
    pub payload: Vec<u8>,
}

/// `n` messages with ids `first_id..first_id + n`, spread over `topics` in an irregular
/// pattern; each payload ~250 bytes (see [`payload`]), binary for topics under `sensors/`.
pub fn messages(first_id: u64, n: u64, topics: &[&str]) -> Vec<Msg> {
    let mut per_topic = vec![0u64; topics.len()];
    (first_id..first_id + n)
        .map(|id| {
            let t = ((id * 7 + id / 3) % topics.len() as u64) as usize;
            per_topic[t] += 1;
            let topic = topics[t].to_owned();
            let payload = payload(id, per_topic[t] - 1, 250, topic.starts_with("sensors/"));
            Msg { id, topic, payload }
        })
        .collect()
}

/// `{"id":ID,"topic_seq":K,"pad":"…"}` of about `len` bytes, the padding pseudo-random
/// (incompressible beyond its alphabet); with `binary_tail` followed by `\n` and bytes that
/// are not UTF-8 (for raw streams: the log must keep bytes as they are).
pub fn payload(id: u64, topic_seq: u64, len: usize, binary_tail: bool) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let head = format!("{{\"id\":{id},\"topic_seq\":{topic_seq},\"pad\":\"");
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let pad: String = (0..len.saturating_sub(head.len() + 2))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize] as char
        })
        .collect();
    let mut p = format!("{head}{pad}\"}}").into_bytes();
    if binary_tail {
        p.extend_from_slice(&[b'\n', 0xff, 0x00, 0xfe, 0x80, id as u8]);
    }
    p
}

/// The id a [`payload`] carries.
pub fn id_of(payload: &[u8]) -> Option<u64> {
    let json = payload.split(|&b| b == b'\n').next()?;
    serde_json::from_slice::<serde_json::Value>(json).ok()?.get("id")?.as_u64()
}

/// A rumqttc client (MQTT 3.1.1, clean session) on its own small tokio runtime, publishing at
/// QoS 1 with a bounded in-flight window and counting the broker's PUBACKs.
#[derive(Debug)]
pub struct Publisher {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
}

/// Unacknowledged publishes the client keeps in flight.
const PUBLISHER_INFLIGHT: u16 = 100;

impl Publisher {
    /// Connects to `broker` as `client_id`.
    pub fn connect(broker: &Mosquitto, client_id: &str) -> Publisher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the publisher");
        let mut o = MqttOptions::new(client_id, "127.0.0.1", broker.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(PUBLISHER_INFLIGHT)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, usize::from(PUBLISHER_INFLIGHT));
        let (acked, last_error) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(None)));
        let (a, e) = (acked.clone(), last_error.clone());
        rt.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        *e.lock().expect("error slot") = Some(error.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Publisher { rt, client, acked, queued: Arc::new(AtomicU64::new(0)), last_error }
    }

    /// Queues one QoS 1 publish (blocks while the client's window is full).
    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.rt.block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload)).expect("queueing a publish");
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues `msgs` in order.
    pub fn publish_all(&self, msgs: &[Msg]) {
        for m in msgs {
            self.publish(&m.topic, m.payload.clone());
        }
    }

    /// Publishes `msgs` in order from a background task, pausing `pause` after every
    /// `burst` messages. [`Publisher::queued`] counts its progress.
    pub fn spawn_all(&self, msgs: Vec<Msg>, burst: usize, pause: Duration) -> tokio::task::JoinHandle<()> {
        let (client, queued) = (self.client.clone(), self.queued.clone());
        self.rt.spawn(async move {
            for (i, m) in msgs.into_iter().enumerate() {
                client.publish(m.topic, QoS::AtLeastOnce, false, m.payload).await.expect("queueing a publish");
                queued.fetch_add(1, Ordering::Relaxed);
                if (i + 1) % burst == 0 {
                    tokio::time::sleep(pause).await;
                }
            }
        })
    }

    /// Publishes handed to the client so far.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// PUBACKs received from the broker so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until the broker has acknowledged every publish queued so far.
    pub fn wait_all_acked(&self, timeout: Duration) {
        let n = self.queued();
        wait_for(
            &format!("{n} PUBACKs from the broker"),
            timeout,
            || format!("acked {}, queued {}, last error {:?}", self.acked(), self.queued(), self.last_error()),
            || (self.acked() >= n).then_some(()),
        );
    }

    /// The last connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("error slot").clone()
    }
}

// ---- reading the logs ----------------------------------------------------------------------

/// A record as the log holds it, with its seq.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Its seq (the log offset).
    pub seq: u64,
    /// The record.
    pub record: Record,
}

/// Every committed record of `stream` under `data_dir`, read with `shared::log` opened
/// read-only. Errs on damage, gap batches, or seqs that are not contiguous from 0.
pub fn try_read_stream(data_dir: &Path, stream: &str) -> Result<Vec<Logged>, String> {
    let dir = stream_dir(data_dir, stream);
    let config = LogConfig { read_only: true, ..LogConfig::default() };
    let mut log =
        Log::open(Arc::new(FsStorage), &dir, config, 0).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let corrupt: Vec<String> =
        log.problems().iter().filter(|p| p.kind.is_corruption()).map(|p| format!("{p:?}")).collect();
    if !corrupt.is_empty() {
        return Err(format!("{stream}: corruption: {corrupt:?}"));
    }
    if log.start_offset() != Offset(0) {
        return Err(format!("{stream}: log starts at {}, not 0", log.start_offset()));
    }
    let mut out = Vec::new();
    let mut next = Offset(0);
    while next < log.committed_offset() {
        let read = log.read(next, 1 << 20).map_err(|e| format!("{stream}: read at {next}: {e}"))?;
        if !read.damage.is_empty() {
            return Err(format!("{stream}: damage at {next}: {:?}", read.damage));
        }
        for lb in &read.batches {
            let h = lb.batch.header();
            if lb.offset.0 != out.len() as u64 {
                return Err(format!(
                    "{stream}: batch at offset {} after {} records: seqs not contiguous",
                    lb.offset,
                    out.len()
                ));
            }
            if h.base_seq.0 != lb.offset.0 {
                return Err(format!("{stream}: batch at offset {} has base_seq {}", lb.offset, h.base_seq.0));
            }
            if h.is_gap() {
                return Err(format!("{stream}: gap batch at {}: {} seqs", lb.offset, h.record_count));
            }
            let records = lb.batch.records().map_err(|e| format!("{stream}: batch at {}: {e}", lb.offset))?;
            if records.len() != h.record_count as usize {
                return Err(format!(
                    "{stream}: batch at {} holds {} records, says {}",
                    lb.offset,
                    records.len(),
                    h.record_count
                ));
            }
            for record in records {
                out.push(Logged { seq: out.len() as u64, record });
            }
        }
        if read.next <= next {
            break;
        }
        next = read.next;
    }
    Ok(out)
}

/// [`try_read_stream`], panicking on any problem.
pub fn read_stream(data_dir: &Path, stream: &str) -> Vec<Logged> {
    try_read_stream(data_dir, stream).unwrap_or_else(|e| panic!("reading the log: {e}"))
}

/// How often each id occurs in `records` (those whose payload carries one).
pub fn id_counts<'a>(records: impl IntoIterator<Item = &'a Logged>) -> HashMap<u64, u32> {
    let mut counts = HashMap::new();
    for r in records {
        if let Some(id) = id_of(&r.record.payload) {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

// ---- a small file system -------------------------------------------------------------------

/// A tmpfs mounted on a temporary directory for the life of the value. Needs root.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=…`, e.g. `4m`). Panics if it cannot.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed ({}): {} (the disk-full test needs root, or CAP_SYS_ADMIN)",
            dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a file until writes fail, then shrinks the file so about
    /// `free_bytes` stay free. Returns the file; remove it to free the space.
    pub fn fill_leaving(&self, free_bytes: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = File::create(&path).expect("creating the filler");
        let chunk = vec![0x5au8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        let len = f.metadata().expect("filler metadata").len();
        assert!(len > free_bytes, "the tmpfs had only {len} bytes free");
        f.set_len(len - free_bytes).expect("shrinking the filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = self.dir.path().to_path_buf();
        let ok = Command::new("umount").arg(&p).status().is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file open there; detach it so the directory can go.
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

// ---- randomness ----------------------------------------------------------------------------

/// xorshift64*, seeded from `SUBSCRIBE_TEST_SEED` or the clock; print [`Rng::seed`] on
/// failure so a run can be repeated.
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    x: u64,
}

impl Rng {
    /// From the environment or the clock.
    pub fn new() -> Rng {
        let seed = std::env::var("SUBSCRIBE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
        Rng { seed, x: seed | 1 }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.x ^= self.x >> 12;
        self.x ^= self.x << 25;
        self.x ^= self.x >> 27;
        self.x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

// ---- certificates --------------------------------------------------------------------------

/// Name the core certificates made here carry; the edge configs built here connect with it.
pub const CORE_SERVER_NAME: &str = "localhost";

/// A deployment's private CA and the certificates it issued, made with `shared::tls` (what
/// `core-ingest certs init/issue` writes): one server certificate every core here uses, and
/// the client certificate of [`EDGE_ID`].
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
    /// CA certificate (PEM).
    pub ca_file: PathBuf,
    /// The cores' certificate, for [`CORE_SERVER_NAME`].
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The edge's client certificate (CommonName [`EDGE_ID`]).
    pub edge_cert: PathBuf,
    /// Its key.
    pub edge_key: PathBuf,
    /// The CA certificate and key (PEM), to issue more certificates (rotation tests).
    pub ca_pem: String,
    /// The CA's private key (PEM).
    pub ca_key_pem: String,
}

impl Pki {
    /// A new CA (three days) and a server and an edge certificate it issued (two days).
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let (ca, ca_key) = shared::tls::generate_ca("backhaul test CA", 3).expect("generating the CA");
        let (server, server_key) =
            shared::tls::issue_server_cert(&ca, &ca_key, &[CORE_SERVER_NAME.to_owned()], 2).expect("server cert");
        let (edge, edge_key) = shared::tls::issue_edge_cert(&ca, &ca_key, EDGE_ID, 2).expect("edge certificate");
        let write = |name: &str, pem: &str| -> PathBuf {
            let p = dir.path().join(name);
            fs::write(&p, pem).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
            p
        };
        Pki {
            ca_file: write("ca.pem", &ca),
            server_cert: write("server.pem", &server),
            server_key: write("server.key", &server_key),
            edge_cert: write("edge.pem", &edge),
            edge_key: write("edge.key", &edge_key),
            ca_pem: ca,
            ca_key_pem: ca_key,
            dir,
        }
    }
}

// ---- the core ------------------------------------------------------------------------------

/// The `core-ingest` binary, beside the agent's: `cargo test --workspace` builds every binary
/// of the workspace first.
pub fn core_bin() -> PathBuf {
    let exe = Path::new(BIN).parent().expect("the agent binary lies in a directory").join("core-ingest");
    assert!(
        exe.is_file(),
        "{} does not exist: the forwarding tests run the real core; build it first \
         (cargo build -p core-ingest, or run the tests with cargo test --workspace)",
        exe.display()
    );
    exe
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding an ephemeral UDP port");
    s.local_addr().expect("local address of a bound socket").port()
}

/// A `core-ingest run` process: its config (QUIC and admin on ports fixed when it is made, so
/// an edge config can name them before it starts and a restart keeps them), data directory
/// and log. Keep-alive 200 ms and idle timeout 2 s, so a killed peer is noticed quickly.
#[derive(Debug)]
pub struct Core {
    child: Option<Child>,
    work: tempfile::TempDir,
    /// `node`.
    pub node: String,
    /// `listen` (UDP).
    pub listen: SocketAddr,
    /// `admin_listen`.
    pub admin: SocketAddr,
    /// `data_dir`.
    pub data_dir: PathBuf,
    /// The config file it runs with (tests may rewrite it and SIGHUP the node).
    pub config_path: PathBuf,
    log_path: PathBuf,
    /// Extra environment variables for the next [`Core::start`].
    pub env: Vec<(String, String)>,
}

impl Core {
    /// Writes the config of node `node` storing under `data_dir`; does not start it.
    pub fn new(node: &str, pki: &Pki, data_dir: &Path) -> Core {
        Core::new_with(node, pki, data_dir, "")
    }

    /// [`Core::new`] with `extra` config lines (top-level keys, then tables such as `[tier]`)
    /// before its `[tls]` table.
    pub fn new_with(node: &str, pki: &Pki, data_dir: &Path, extra: &str) -> Core {
        let work = tempfile::tempdir().expect("temp dir for the core");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            "# Written by edge-agent/tests/common.\n\
             node = \"{node}\"\n\
             data_dir = \"{}\"\n\
             listen = \"{listen}\"\n\
             admin_listen = \"{admin}\"\n\
             partitions = 4\n\
             keep_alive = \"200ms\"\n\
             idle_timeout = \"2s\"\n{extra}\n\n\
             [tls]\n\
             ca_file = \"{}\"\n\
             cert_file = \"{}\"\n\
             key_file = \"{}\"\n",
            data_dir.display(),
            pki.ca_file.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        );
        let config_path = work.path().join("core-ingest.toml");
        fs::write(&config_path, config).expect("writing the core config");
        let log_path = work.path().join("core-ingest.log");
        Core {
            child: None,
            work,
            node: node.to_owned(),
            listen,
            admin,
            data_dir: data_dir.to_path_buf(),
            config_path,
            log_path,
            env: Vec::new(),
        }
    }

    /// Replaces `from` with `to` in the config file (takes effect at the next start).
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = fs::read_to_string(&self.config_path).expect("reading the core config");
        assert!(text.contains(from), "{from:?} is not in the core config");
        fs::write(&self.config_path, text.replacen(from, to, 1)).expect("writing the core config");
    }

    /// [`Core::new`], then [`Core::start`].
    pub fn started(node: &str, pki: &Pki, data_dir: &Path) -> Core {
        let mut core = Core::new(node, pki, data_dir);
        core.start();
        core
    }

    /// Starts the node (again, after a kill: same config, same data directory) and waits for
    /// `/readyz`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "core {} is still running", self.node);
        let exe = core_bin();
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log_path).expect("core log");
        writeln!(log, "===== core-ingest start at {:?}", SystemTime::now()).expect("writing the core log");
        let child = Command::new(&exe)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", exe.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("core {} exited with {status} before it was ready\n{}", self.node, self.log_tail());
            }
            if http_get(self.admin, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {START_TIMEOUT:?} waiting for core {} /readyz\n{}", self.node, self.log_tail());
            }
            std::thread::sleep(POLL);
        }
    }

    /// The process id; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the core is running").id()
    }

    /// Everything the node logged (over all its runs).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `127.0.0.1:<port>`, as `[forward] cores` names it.
    pub fn endpoint(&self) -> String {
        self.listen.to_string()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and reap it.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the core is running");
        child.kill().expect("SIGKILL core-ingest");
        child.wait().expect("reaping core-ingest");
    }

    /// SIGTERM, and wait (bounded) for it to exit.
    pub fn sigterm_and_wait(&mut self) -> ExitStatus {
        let child = self.child.take().expect("the core is running");
        terminate(child, "core-ingest").unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// `GET /metrics`, or `None` if the node does not answer.
    pub fn try_metrics(&self) -> Option<String> {
        http_get(self.admin, "/metrics").filter(|(code, _)| *code == 200).map(|(_, body)| body)
    }

    /// The value of the unlabelled series `name`; panics if the node does not answer.
    pub fn metric(&self, name: &str) -> u64 {
        let text =
            self.try_metrics().unwrap_or_else(|| panic!("no /metrics from core {}\n{}", self.node, self.log_tail()));
        metric_value(&text, name, "").unwrap_or_else(|| panic!("no series {name} in:\n{text}")) as u64
    }

    /// The last lines the node logged (over all its runs).
    pub fn log_tail(&self) -> String {
        format!("--- core-ingest {} log (tail) ---\n{}\n--- end of log ---", self.node, tail(&self.log_path, 60))
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM to `child`, then waits for it (bounded); on a timeout kills it and says so.
fn terminate(mut child: Child, what: &str) -> Result<ExitStatus, String> {
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("running kill");
    assert!(sent.success(), "kill -TERM {} ({what}) failed", child.id());
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not exit within {STOP_TIMEOUT:?} of SIGTERM"));
        }
        std::thread::sleep(POLL);
    }
}

/// `[forward]` towards `cores` (in this order) with the certificates of `pki`, reconnecting
/// within 50–500 ms and noticing a dead core within 2 s; `extra` adds `key = value` lines.
pub fn forward_toml(cores: &[&Core], pki: &Pki, extra: &str) -> String {
    let cores: Vec<String> = cores.iter().map(|c| format!("\"{}\"", c.endpoint())).collect();
    format!(
        "[forward]\ncores = [{}]\nserver_name = \"{CORE_SERVER_NAME}\"\nca_file = \"{}\"\ncert_file = \"{}\"\n\
         key_file = \"{}\"\nkeep_alive = \"200ms\"\nidle_timeout = \"2s\"\nreconnect_min = \"50ms\"\n\
         reconnect_max = \"500ms\"\n{extra}\n\n",
        cores.join(", "),
        pki.ca_file.display(),
        pki.edge_cert.display(),
        pki.edge_key.display()
    )
}

// ---- reading what a core stored ------------------------------------------------------------

/// A batch as a core's partition log holds it.
#[derive(Clone, Debug)]
pub struct CoreBatch {
    /// Partition.
    pub partition: usize,
    /// Its offset in the partition log: the order the core stored it in.
    pub offset: u64,
    /// The batch, bytes as the edge made them.
    pub batch: shared::batch::Batch,
}

impl CoreBatch {
    /// (edge, epoch).
    pub fn producer(&self) -> (String, u64) {
        let h = self.batch.header();
        (h.producer.clone(), h.epoch.0)
    }

    /// The seqs it covers.
    pub fn seqs(&self) -> std::ops::Range<u64> {
        let h = self.batch.header();
        h.base_seq.0..h.end_seq().0
    }
}

/// Every batch of `stream` a core stored under `core_data`, partition by partition, each in
/// log order, read with `shared::log` opened read-only (the core may be running: a torn tail
/// mid-append is skipped, damage an fsync covered is an error). No stream yet: empty.
pub fn try_read_core_stream(core_data: &Path, stream: &str) -> Result<Vec<CoreBatch>, String> {
    let dir = stream_dir(core_data, stream);
    let count_file = dir.join("partitions");
    let partitions: usize = match fs::read_to_string(&count_file) {
        Ok(t) => t.trim().parse().map_err(|_| format!("{}: {t:?} is not a number", count_file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", count_file.display())),
    };
    let mut out = Vec::new();
    for p in 0..partitions {
        let batches = try_read_log_dir(&dir.join(p.to_string()))?;
        out.extend(batches.into_iter().map(|(offset, batch)| CoreBatch { partition: p, offset, batch }));
    }
    Ok(out)
}

/// Every committed batch of the log in `dir` with its offset, in log order, read with
/// `shared::log` opened read-only: a torn tail (an append under way) is left out, damage an
/// fsync covered is an error. No log there: empty.
pub fn try_read_log_dir(dir: &Path) -> Result<Vec<(u64, shared::batch::Batch)>, String> {
    let config = LogConfig { read_only: true, ..LogConfig::default() };
    let mut log =
        Log::open(Arc::new(FsStorage), dir, config, 0).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let corrupt: Vec<String> =
        log.problems().iter().filter(|p| p.kind.is_corruption()).map(|p| format!("{p:?}")).collect();
    if !corrupt.is_empty() {
        return Err(format!("{}: corruption: {corrupt:?}", dir.display()));
    }
    let mut out = Vec::new();
    let mut next = log.start_offset();
    while next < log.committed_offset() {
        let read = log.read(next, 4 << 20).map_err(|e| format!("{}: read at {next}: {e}", dir.display()))?;
        if !read.damage.is_empty() {
            return Err(format!("{}: damage at {next}: {:?}", dir.display(), read.damage));
        }
        out.extend(read.batches.into_iter().map(|b| (b.offset.0, b.batch)));
        if read.next <= next {
            break;
        }
        next = read.next;
    }
    Ok(out)
}

/// [`try_read_core_stream`], panicking on any problem.
pub fn read_core_stream(core_data: &Path, stream: &str) -> Vec<CoreBatch> {
    try_read_core_stream(core_data, stream).unwrap_or_else(|e| panic!("reading the core's log: {e}"))
}

/// Distinct seqs a core holds of `stream`, per epoch of [`EDGE_ID`] (0 while unreadable).
pub fn core_held(core_data: &Path, stream: &str) -> BTreeMap<u64, u64> {
    let mut held: BTreeMap<u64, shared::ranges::RangeSet> = BTreeMap::new();
    for b in try_read_core_stream(core_data, stream).unwrap_or_default() {
        let (edge, epoch) = b.producer();
        if edge == EDGE_ID {
            held.entry(epoch).or_default().insert(b.seqs());
        }
    }
    held.into_iter().map(|(e, r)| (e, r.len())).collect()
}

/// How the seqs of one producer stream stand in a set of stored batches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqCheck {
    /// One past the highest seq.
    pub end: u64,
    /// Seqs stored more than once (each range once per extra copy).
    pub duplicated: Vec<std::ops::Range<u64>>,
    /// Seqs below `end` stored nowhere.
    pub missing: Vec<std::ops::Range<u64>>,
    /// Ranges stored as gap batches.
    pub gaps: Vec<std::ops::Range<u64>>,
}

impl SeqCheck {
    /// Checks `batches` (any order).
    pub fn of<'a>(batches: impl IntoIterator<Item = &'a CoreBatch>) -> SeqCheck {
        let mut ranges: Vec<(std::ops::Range<u64>, bool)> =
            batches.into_iter().map(|b| (b.seqs(), b.batch.header().is_gap())).collect();
        ranges.sort_by_key(|(r, _)| (r.start, r.end));
        let mut c = SeqCheck::default();
        for (r, gap) in ranges {
            if gap {
                c.gaps.push(r.clone());
            }
            if r.start > c.end {
                c.missing.push(c.end..r.start);
            } else if r.start < c.end {
                c.duplicated.push(r.start..r.end.min(c.end));
            }
            c.end = c.end.max(r.end);
        }
        c
    }

    /// Every seq of `0..end` exactly once, no gap batch.
    pub fn is_exactly_once(&self) -> bool {
        self.duplicated.is_empty() && self.missing.is_empty() && self.gaps.is_empty()
    }
}

/// The batches of `batches` per producer (edge, epoch), each list in stored order.
pub fn by_producer(batches: &[CoreBatch]) -> BTreeMap<(String, u64), Vec<&CoreBatch>> {
    let mut out: BTreeMap<(String, u64), Vec<&CoreBatch>> = BTreeMap::new();
    for b in batches {
        out.entry(b.producer()).or_default().push(b);
    }
    out
}

/// The records of `batches` by seq (the first copy where a seq is stored twice).
pub fn records_by_seq<'a>(batches: impl IntoIterator<Item = &'a CoreBatch>) -> BTreeMap<u64, Record> {
    let mut out = BTreeMap::new();
    for b in batches {
        let records = b.batch.records().unwrap_or_else(|e| panic!("batch at offset {}: {e}", b.offset));
        for (seq, r) in b.seqs().zip(records) {
            out.entry(seq).or_insert(r);
        }
    }
    out
}
