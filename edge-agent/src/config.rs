//! The agent's TOML config: parsed strictly (unknown keys are errors), then validated as a
//! whole so an operator learns every mistake at start, each with its key and the reason.
//! `deploy/edge-agent.example.toml` documents every field; a test loads it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shared::batch::{BatchLimits, is_valid_stream_name};
use shared::units::{ByteSize, Millis};

/// Name of the stream that holds records that could not be taken as they are.
pub const DEADLETTER_STREAM: &str = "_deadletter";

/// The whole config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This edge's id: the producer of every batch. At the core it must equal the id in the
    /// edge's client certificate.
    pub edge_id: String,
    /// Where the logs and the identity live. Created on first start. Relative file names in
    /// this file are relative to the file's directory.
    pub data_dir: PathBuf,
    /// The admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Disk use over all streams.
    #[serde(default)]
    pub disk: DiskConfig,
    /// Broker connections of subscribe mode, each with its subscriptions.
    #[serde(default, rename = "broker")]
    pub brokers: Vec<BrokerConfig>,
    /// Ordered routing rules: the first whose filter matches a topic names its stream.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// What happens to topics no rule matches.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Streams by name (`[streams.cdr]`). `_deadletter` exists even when not listed.
    #[serde(default)]
    pub streams: BTreeMap<String, StreamConfig>,
    /// Forwarding to core-ingest over QUIC. Absent: the agent keeps data locally only.
    pub forward: Option<ForwardConfig>,
    /// Listen mode: devices publish to the agent itself (`crate::listen::config`).
    pub listen: Option<crate::listen::config::ListenConfig>,
}

/// Congestion control of the QUIC connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CongestionConfig {
    /// Cubic (default).
    Cubic,
    /// quinn's experimental BBR, for lossy links.
    Bbr,
}

/// `[forward]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Core endpoints, `host:port`. Rendezvous hashing of `edge_id` picks this edge's node;
    /// the next one takes over when it is lost.
    pub cores: Vec<String>,
    /// Name the core certificates carry (a `--name` of `core-ingest certs init`). Default:
    /// the host part of each endpoint.
    pub server_name: Option<String>,
    /// CA certificate (PEM) the core certificates chain to.
    pub ca_file: PathBuf,
    /// This edge's client certificate (PEM); its common name must equal `edge_id`.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// Most bytes sent and not yet acknowledged, over all streams.
    #[serde(default = "ForwardConfig::default_window_bytes")]
    pub window_bytes: ByteSize,
    /// Cap on the bytes sent per second (metered backhaul); unset: no cap.
    pub bandwidth_bytes_per_s: Option<ByteSize>,
    /// QUIC keep-alive; at most 15 s so NAT bindings on mobile backhaul do not expire.
    #[serde(default = "ForwardConfig::default_keep_alive")]
    pub keep_alive: Millis,
    /// A connection silent this long is given up.
    #[serde(default = "ForwardConfig::default_idle_timeout")]
    pub idle_timeout: Millis,
    /// `cubic` or `bbr`.
    #[serde(default = "ForwardConfig::default_congestion")]
    pub congestion: CongestionConfig,
    /// QUIC packets: the UDP payload size the backhaul is known to carry (packets start
    /// there). Default 1200, QUIC's floor.
    #[serde(default = "shared::quic::Mtu::default_min")]
    pub mtu_min: u16,
    /// Path MTU discovery probes up to this UDP payload size: 1452 suits Ethernet; a
    /// 9000-byte jumbo-frame backhaul up to 8972 (the core's `mtu_max` must allow it too).
    #[serde(default = "shared::quic::Mtu::default_max")]
    pub mtu_max: u16,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(default = "BrokerConfig::default_reconnect_min")]
    pub reconnect_min: Millis,
    /// Longest reconnect delay.
    #[serde(default = "BrokerConfig::default_reconnect_max")]
    pub reconnect_max: Millis,
    /// After a failover, how long to stay on the other node before trying the primary again.
    #[serde(default = "ForwardConfig::default_hold_down")]
    pub failover_hold_down: Millis,
}

impl ForwardConfig {
    fn default_window_bytes() -> ByteSize {
        ByteSize(8 << 20)
    }
    fn default_keep_alive() -> Millis {
        Millis(10_000)
    }
    fn default_idle_timeout() -> Millis {
        Millis(60_000)
    }
    fn default_congestion() -> CongestionConfig {
        CongestionConfig::Cubic
    }
    fn default_hold_down() -> Millis {
        Millis(300_000)
    }
    /// The QUIC packet sizes.
    pub fn mtu(&self) -> shared::quic::Mtu {
        shared::quic::Mtu { min: self.mtu_min, max: self.mtu_max }
    }
}

/// Order of forwarding after an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryConfig {
    /// New data first; the backlog drains behind it on its own lane.
    LiveFirst,
    /// Everything in seq order.
    OldestFirst,
}

/// When the edge may delete forwarded data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOn {
    /// Once the core has it fsynced.
    Durable,
    /// Once the core has it in the bucket (two copies until then): the core's TIERED frames
    /// on the control stream say which seqs are.
    Tiered,
}

/// `[admin]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address. Loopback by default: the metrics name topics and streams.
    #[serde(default = "AdminConfig::default_listen")]
    pub listen: SocketAddr,
}

impl AdminConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: Self::default_listen() }
    }
}

/// `[disk]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Most bytes all stream logs together may hold; past it each stream's `full_policy`
    /// applies. Unset: only the per-stream budgets (and the file system) bound it.
    pub budget_bytes: Option<ByteSize>,
}

/// MQTT protocol version towards the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// `[[broker]]`: one connection to the gateway's broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Name of the connection in logs and metrics.
    pub name: String,
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// `"3.1.1"` or `"5"`.
    #[serde(default = "BrokerConfig::default_protocol")]
    pub protocol: MqttVersion,
    /// Client id; stable, so the broker keeps the session across restarts. Default
    /// `backhaul-<edge_id>-<name>`.
    pub client_id: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Name of the environment variable that holds the password (never the password itself).
    pub password_env: Option<String>,
    /// CA certificate (PEM) that signed the broker's certificate, for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// Keep-alive interval.
    #[serde(default = "BrokerConfig::default_keep_alive")]
    pub keep_alive: Millis,
    /// How long the broker keeps the session while the agent is away (MQTT 5); MQTT 3.1.1
    /// sessions persist until the broker's own `persistent_client_expiration`.
    #[serde(default = "BrokerConfig::default_session_expiry")]
    pub session_expiry: Millis,
    /// Messages the broker may have in flight to the agent before an ack (MQTT 5 receive
    /// maximum; with 3.1.1 set the broker's `max_inflight_messages` to the same). Acks wait
    /// for the fsync, so this window bounds throughput: window / (linger + fsync).
    #[serde(default = "BrokerConfig::default_inflight_max")]
    pub inflight_max: u16,
    /// Topic filters subscribed at QoS 1 (`$share/<group>/<filter>` for shared subscriptions).
    pub subscriptions: Vec<String>,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(default = "BrokerConfig::default_reconnect_min")]
    pub reconnect_min: Millis,
    /// Longest reconnect delay.
    #[serde(default = "BrokerConfig::default_reconnect_max")]
    pub reconnect_max: Millis,
}

impl BrokerConfig {
    fn default_protocol() -> MqttVersion {
        MqttVersion::V311
    }
    fn default_keep_alive() -> Millis {
        Millis(30_000)
    }
    fn default_session_expiry() -> Millis {
        Millis(7 * 86_400_000)
    }
    fn default_inflight_max() -> u16 {
        1000
    }
    fn default_reconnect_min() -> Millis {
        Millis(100)
    }
    fn default_reconnect_max() -> Millis {
        Millis(30_000)
    }

    /// The client id to use.
    pub fn client_id(&self, edge_id: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("backhaul-{edge_id}-{}", self.name))
    }
}

/// `[[route]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// MQTT topic filter (`+` one level, `#` the rest).
    pub filter: String,
    /// Stream the matching messages go to.
    pub stream: String,
}

/// `[routing]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Stream for topics no rule matches; unset: they are acknowledged, dropped and counted.
    pub unmatched_stream: Option<String>,
}

/// What the payloads of a stream are; invalid ones go to `_deadletter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormatConfig {
    /// Any bytes.
    Raw,
    /// One JSON document per message.
    Json,
    /// CSV CDR lines; columns in `[streams.NAME.shape]` (shaped, re-encoded as JSON).
    Csv,
    /// SenML (RFC 8428) JSON packs (shaped, one JSON record per entry).
    SenmlJson,
    /// SenML (RFC 8428) CBOR packs (shaped, one JSON record per entry).
    SenmlCbor,
    /// Sparkplug B protobuf on `spBv1.0/…` topics (shaped, one JSON record per metric).
    Sparkplug,
    /// 3GPP CDR files: TS 32.297 framing, TS 32.298 BER records (shaped, one JSON record per CDR).
    CdrBer,
}

/// When a stream's appends are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncConfig {
    /// Every batch, before its acks.
    Always,
    /// Group commit every `fsync_interval`; acks after the covering fsync.
    Interval,
    /// Never; acks at once. Refused with `full_policy = "backpressure"`.
    Never,
}

/// What a stream does when its disk budget (or the total) is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Stop acknowledging, so the data stays with the broker; nothing is lost.
    Backpressure,
    /// Replace the oldest segment with a gap batch (counted, reported) and go on.
    DropOldest,
}

/// `[streams.NAME]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// `raw`, `json`, `csv`, `senml_json`, `senml_cbor`, `sparkplug` or `cdr_ber`.
    #[serde(default = "StreamConfig::default_format")]
    pub format: PayloadFormatConfig,
    /// Longest a record waits for its batch to fill.
    #[serde(default = "StreamConfig::default_linger")]
    pub linger: Millis,
    /// A batch is closed once its raw records reach this size.
    #[serde(default = "StreamConfig::default_batch_bytes_max")]
    pub batch_bytes_max: ByteSize,
    /// zstd level, 1..=19; 0 stores batches uncompressed.
    #[serde(default = "StreamConfig::default_zstd_level")]
    pub zstd_level: i32,
    /// `always`, `interval` or `never`.
    #[serde(default = "StreamConfig::default_fsync")]
    pub fsync: FsyncConfig,
    /// Group-commit interval for `fsync = "interval"`.
    #[serde(default = "StreamConfig::default_fsync_interval")]
    pub fsync_interval: Millis,
    /// Segment files roll at this size.
    #[serde(default = "StreamConfig::default_segment_bytes_max")]
    pub segment_bytes_max: ByteSize,
    /// Segment files roll at this age.
    #[serde(default = "StreamConfig::default_segment_age")]
    pub segment_age: Millis,
    /// Most bytes this stream's log may hold; unset: only the total budget applies.
    pub disk_budget_bytes: Option<ByteSize>,
    /// `backpressure` or `drop_oldest`.
    #[serde(default = "StreamConfig::default_full_policy")]
    pub full_policy: FullPolicy,
    /// Data older than this (by event time) that is still in the log is replaced by a gap
    /// batch, counted and reported: an explicit loss policy for data nobody will want late.
    /// Unset: kept until forwarded (or the disk policy decides).
    pub retention_age: Option<Millis>,
    /// Largest payload taken; a larger one is acknowledged, counted and dead-lettered
    /// without its payload, and never stalls other topics.
    #[serde(default = "StreamConfig::default_record_bytes_max")]
    pub record_bytes_max: ByteSize,
    /// `live_first` or `oldest_first` after an outage.
    #[serde(default = "StreamConfig::default_delivery")]
    pub delivery: DeliveryConfig,
    /// Forwarding priority: higher goes first (CDRs before sensor data).
    #[serde(default)]
    pub priority: i32,
    /// `durable` or `tiered`: when forwarded data may be deleted here.
    #[serde(default = "StreamConfig::default_release_on")]
    pub release_on: ReleaseOn,
    /// Whether this stream is forwarded at all (`_deadletter` is not, by default: it may hold
    /// raw personal data).
    #[serde(default = "StreamConfig::default_forwarded")]
    pub forwarded: bool,
    /// Decoding and rules (`[streams.NAME.shape]`, see `shape::config`).
    #[serde(default)]
    pub shape: crate::shape::config::ShapeConfig,
}

impl StreamConfig {
    fn default_format() -> PayloadFormatConfig {
        PayloadFormatConfig::Raw
    }
    fn default_linger() -> Millis {
        Millis(5)
    }
    fn default_batch_bytes_max() -> ByteSize {
        ByteSize(256 << 10)
    }
    fn default_zstd_level() -> i32 {
        1
    }
    fn default_fsync() -> FsyncConfig {
        FsyncConfig::Interval
    }
    fn default_fsync_interval() -> Millis {
        Millis(5)
    }
    fn default_segment_bytes_max() -> ByteSize {
        ByteSize(64 << 20)
    }
    fn default_segment_age() -> Millis {
        Millis(3_600_000)
    }
    fn default_full_policy() -> FullPolicy {
        FullPolicy::Backpressure
    }
    fn default_record_bytes_max() -> ByteSize {
        ByteSize(256 << 10)
    }
    fn default_delivery() -> DeliveryConfig {
        DeliveryConfig::LiveFirst
    }
    fn default_release_on() -> ReleaseOn {
        ReleaseOn::Durable
    }
    fn default_forwarded() -> bool {
        true
    }

    /// The dead-letter stream's settings when the config has none: raw, kept by dropping
    /// its own oldest data, never blocking the streams that feed it.
    pub fn deadletter_default() -> Self {
        Self {
            disk_budget_bytes: Some(ByteSize(256 << 20)),
            segment_bytes_max: ByteSize(16 << 20),
            full_policy: FullPolicy::DropOldest,
            forwarded: false,
            ..Self::default()
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            format: Self::default_format(),
            linger: Self::default_linger(),
            batch_bytes_max: Self::default_batch_bytes_max(),
            zstd_level: Self::default_zstd_level(),
            fsync: Self::default_fsync(),
            fsync_interval: Self::default_fsync_interval(),
            segment_bytes_max: Self::default_segment_bytes_max(),
            segment_age: Self::default_segment_age(),
            disk_budget_bytes: None,
            full_policy: Self::default_full_policy(),
            retention_age: None,
            record_bytes_max: Self::default_record_bytes_max(),
            delivery: Self::default_delivery(),
            priority: 0,
            release_on: Self::default_release_on(),
            forwarded: Self::default_forwarded(),
            shape: Default::default(),
        }
    }
}

pub use shared::config::ConfigError;

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&shared::config::read(path)?, path)
    }

    /// Parses and validates `text` (as if read from `path`).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = shared::config::parse_toml(text, path)?;
        // Relative file names are relative to the config file, as for core-ingest.
        let base = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<&mut PathBuf> = vec![&mut config.data_dir];
        files.extend(config.brokers.iter_mut().filter_map(|b| b.ca_file.as_mut()));
        if let Some(f) = config.forward.as_mut() {
            files.extend([&mut f.ca_file, &mut f.cert_file, &mut f.key_file]);
        }
        for f in files {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        if let Some(l) = config.listen.as_mut() {
            l.resolve_files(base);
        }
        for s in config.streams.values_mut() {
            s.shape.resolve_paths(base);
        }
        config.streams.entry(DEADLETTER_STREAM.into()).or_insert_with(StreamConfig::deadletter_default);
        let problems = config.problems();
        if problems.is_empty() { Ok(config) } else { Err(ConfigError { file: path.into(), problems }) }
    }

    /// The password of broker `b`, from the environment variable it names.
    pub fn broker_password(b: &BrokerConfig) -> Result<Option<String>, String> {
        match &b.password_env {
            None => Ok(None),
            Some(var) => std::env::var(var).map(Some).map_err(|_| format!("environment variable {var} is not set")),
        }
    }

    /// Stream names in a fixed order (their index is the stream id everywhere).
    pub fn stream_names(&self) -> Vec<String> {
        self.streams.keys().cloned().collect()
    }

    fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.edge_id.is_empty() || self.edge_id.len() > 64 || self.edge_id.chars().any(char::is_control) {
            p.push(("edge_id".into(), "1 to 64 bytes without control characters".into()));
        }
        if self.brokers.is_empty() && self.listen.is_none() {
            p.push(("broker".into(), "no [[broker]] and no [listen]: nothing to ingest".into()));
        }
        if let Some(l) = &self.listen {
            p.extend(l.problems());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, b) in self.brokers.iter().enumerate() {
            let k = |f: &str| format!("broker[{i}].{f}");
            if !names.insert(b.name.as_str()) {
                p.push((k("name"), "used by another [[broker]]".into()));
            }
            if let Err(e) = parse_broker_url(&b.url) {
                p.push((k("url"), e));
            }
            if b.subscriptions.is_empty() {
                p.push((k("subscriptions"), "at least one topic filter".into()));
            }
            for (j, s) in b.subscriptions.iter().enumerate() {
                if let Err(e) = crate::route::check_filter(crate::route::strip_share(s)) {
                    p.push((format!("broker[{i}].subscriptions[{j}]"), e));
                }
            }
            if b.inflight_max == 0 {
                p.push((k("inflight_max"), "must be at least 1".into()));
            }
            if b.keep_alive.0 < 1000 || b.keep_alive.0 > 65_535_000 {
                p.push((k("keep_alive"), "between 1s and 65535s".into()));
            }
            if b.reconnect_min.0 == 0 || b.reconnect_min > b.reconnect_max {
                p.push((k("reconnect_min"), "above zero and not above reconnect_max".into()));
            }
            if let Err(e) = Config::broker_password(b) {
                p.push((k("password_env"), e));
            }
            if let Some(ca) = &b.ca_file
                && !ca.is_file()
            {
                p.push((k("ca_file"), format!("{} is not a readable file", ca.display())));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Err(e) = crate::route::check_filter(&r.filter) {
                p.push((format!("route[{i}].filter"), e));
            }
            if !self.streams.contains_key(&r.stream) {
                p.push((format!("route[{i}].stream"), format!("no [streams.{}]", r.stream)));
            }
        }
        if let Some(s) = &self.routing.unmatched_stream
            && !self.streams.contains_key(s)
        {
            p.push(("routing.unmatched_stream".into(), format!("no [streams.{s}]")));
        }
        if let Some(f) = &self.forward {
            if f.cores.is_empty() {
                p.push(("forward.cores".into(), "at least one core endpoint".into()));
            }
            for (i, c) in f.cores.iter().enumerate() {
                if let Err(e) = split_host_port(c) {
                    p.push((format!("forward.cores[{i}]"), e));
                }
            }
            for (key, file) in [
                ("forward.ca_file", &f.ca_file),
                ("forward.cert_file", &f.cert_file),
                ("forward.key_file", &f.key_file),
            ] {
                if !file.is_file() {
                    p.push((key.into(), format!("{} is not a readable file", file.display())));
                }
            }
            if f.cert_file.is_file() {
                match cert_file_edge_id(&f.cert_file) {
                    Ok(id) if id == self.edge_id => {}
                    Ok(id) => p.push((
                        "forward.cert_file".into(),
                        format!("the certificate names edge {id:?}, edge_id is {:?}", self.edge_id),
                    )),
                    Err(e) => p.push(("forward.cert_file".into(), e.to_string())),
                }
            }
            if f.keep_alive.0 == 0 || f.keep_alive.0 > 15_000 {
                p.push((
                    "forward.keep_alive".into(),
                    "between 1ms and 15s (NAT bindings on mobile backhaul expire)".into(),
                ));
            }
            if f.idle_timeout <= f.keep_alive {
                p.push(("forward.idle_timeout".into(), "above keep_alive".into()));
            }
            p.extend(f.mtu().problem("forward."));
            if f.window_bytes.0 < 64 << 10 {
                p.push(("forward.window_bytes".into(), "at least 64KiB".into()));
            }
            if f.bandwidth_bytes_per_s.is_some_and(|b| b.0 < 1024) {
                p.push(("forward.bandwidth_bytes_per_s".into(), "at least 1KiB (or unset)".into()));
            }
        }
        for (name, s) in &self.streams {
            let k = |f: &str| format!("streams.{name}.{f}");
            if !is_valid_stream_name(name) {
                p.push((format!("streams.{name}"), "a stream name is 1 to 64 of a-z 0-9 _ . -".into()));
            }
            let body_max = u64::from(BatchLimits::default().body_bytes_max);
            if s.batch_bytes_max.0 == 0 || s.batch_bytes_max.0 > body_max {
                p.push((k("batch_bytes_max"), format!("between 1 and {}", ByteSize(body_max))));
            }
            // A record must fit a batch with its topic and attributes beside it.
            let record_max = body_max - (64 << 10);
            if s.record_bytes_max.0 == 0 || s.record_bytes_max.0 > record_max {
                p.push((k("record_bytes_max"), format!("between 1 and {}", ByteSize(record_max))));
            }
            if !(0..=19).contains(&s.zstd_level) {
                p.push((k("zstd_level"), "0 (off) to 19".into()));
            }
            if s.fsync == FsyncConfig::Never && s.full_policy == FullPolicy::Backpressure {
                p.push((
                    k("fsync"),
                    "\"never\" would ack what the disk does not hold: refused with full_policy = \"backpressure\""
                        .into(),
                ));
            }
            if s.fsync == FsyncConfig::Interval && s.fsync_interval.0 == 0 {
                p.push((k("fsync_interval"), "above zero".into()));
            }
            let backpressure = s.full_policy == FullPolicy::Backpressure;
            p.extend(crate::shape::config::problems(name, s.format, &s.shape, backpressure));
            if s.segment_bytes_max.0 < 4096 {
                p.push((k("segment_bytes_max"), "at least 4KiB".into()));
            }
            if let Some(budget) = s.disk_budget_bytes
                && budget.0 < 4 * s.segment_bytes_max.0
            {
                p.push((
                    k("disk_budget_bytes"),
                    format!("at least 4 × segment_bytes_max ({})", ByteSize(4 * s.segment_bytes_max.0)),
                ));
            }
        }
        p
    }
}

/// The edge id (common name) of the first certificate in a PEM file.
pub fn cert_file_edge_id(path: &Path) -> Result<String, String> {
    let pem = shared::tls::load_pem_file(path).map_err(|e| e.to_string())?;
    shared::tls::cert_pem_edge_id(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// `host:port` split; the error says what is wrong.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected host:port"))?;
    let port = port.parse::<u16>().map_err(|_| format!("{s:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?}: no host"));
    }
    Ok((host.to_owned(), port))
}

/// A broker URL's parts: (tls, host, port).
pub fn parse_broker_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!("{url:?}: expected mqtt://host:port or mqtts://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("{url:?}: bad port {p:?}"))?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?}: no host"));
    }
    Ok((tls, host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
edge_id = "edge-1"
data_dir = "/tmp/x"
[[broker]]
name = "main"
url = "mqtt://127.0.0.1:1883"
subscriptions = ["cdr/#"]
[[route]]
filter = "cdr/#"
stream = "cdr"
[streams.cdr]
format = "json"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults_and_a_deadletter_stream() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.stream_names(), vec!["_deadletter", "cdr"]);
        let cdr = &c.streams["cdr"];
        assert_eq!(
            (cdr.linger, cdr.fsync, cdr.full_policy),
            (Millis(5), FsyncConfig::Interval, FullPolicy::Backpressure)
        );
        assert_eq!(c.streams[DEADLETTER_STREAM].full_policy, FullPolicy::DropOldest);
        assert_eq!(c.brokers[0].client_id("edge-1"), "backhaul-edge-1-main");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_key() {
        let e = parse(&MIN.replace("format = \"json\"", "format = \"json\"\nlingr = \"5ms\"")).unwrap_err();
        assert_eq!(e.problems[0].0, "streams.cdr.lingr", "{e}");
        let e = parse(&MIN.replace("format = \"json\"", "linger = \"5 parsecs\"")).unwrap_err();
        assert_eq!(e.problems[0].0, "streams.cdr.linger", "{e}");
        assert!(e.problems[0].1.contains("unknown unit"), "{e}");
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let text = MIN
            .replace("stream = \"cdr\"", "stream = \"cdrs\"")
            .replace("format = \"json\"", "fsync = \"never\"\nzstd_level = 40")
            .replace("mqtt://127.0.0.1:1883", "http://x");
        let e = parse(&text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"route[0].stream"), "{e}");
        assert!(keys.contains(&"streams.cdr.fsync"), "{e}");
        assert!(keys.contains(&"streams.cdr.zstd_level"), "{e}");
        assert!(keys.contains(&"broker[0].url"), "{e}");
        assert!(e.to_string().contains("test.toml"));
    }

    #[test]
    fn forward_packet_sizes_are_checked_and_named() {
        let forward = "[forward]\ncores = [\"127.0.0.1:4433\"]\nca_file = \"ca.pem\"\ncert_file = \"e.pem\"\n\
                       key_file = \"e.key\"\n";
        for (extra, field) in [("mtu_max = 9001", "forward.mtu_max"), ("mtu_min = 1500", "forward.mtu_min")] {
            let e = parse(&format!("{MIN}{forward}{extra}\n")).unwrap_err();
            assert!(e.problems.iter().any(|(k, why)| k == field && why.contains("8972")), "{extra}: {e}");
        }
        // The defaults pass this check (the missing files are the only problems).
        let e = parse(&format!("{MIN}{forward}")).unwrap_err();
        assert!(e.problems.iter().all(|(k, _)| !k.contains("mtu")), "{e}");
    }

    #[test]
    fn password_comes_from_the_environment() {
        let text = MIN.replace("subscriptions", "password_env = \"BH_TEST_SURELY_UNSET_VAR\"\nsubscriptions");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.problems[0].0, "broker[0].password_env");
        assert!(e.problems[0].1.contains("BH_TEST_SURELY_UNSET_VAR"));
    }

    #[test]
    fn broker_urls() {
        assert_eq!(parse_broker_url("mqtt://gw.local"), Ok((false, "gw.local".into(), 1883)));
        assert_eq!(parse_broker_url("mqtts://10.0.0.1:8884"), Ok((true, "10.0.0.1".into(), 8884)));
        assert!(parse_broker_url("tcp://x:1").is_err());
        assert!(parse_broker_url("mqtt://x:99999").is_err());
    }
}
