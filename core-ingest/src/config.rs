//! core-ingest's TOML config: parsed strictly, validated as a whole, every problem with its
//! key. `deploy/core-ingest.example.toml` documents every field; a test loads it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shared::units::{ByteSize, Millis};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name, unique in the cluster (object keys and logs carry it).
    pub node: String,
    /// Logs, catalog and the node's incarnation live here.
    pub data_dir: PathBuf,
    /// UDP address QUIC listens on.
    pub listen: SocketAddr,
    /// Mutual TLS.
    pub tls: TlsConfig,
    /// Admin HTTP endpoint: /metrics, /healthz, /readyz. Loopback by default.
    #[serde(default = "Config::default_admin")]
    pub admin_listen: SocketAddr,
    /// Edge ids allowed to connect; unset: any edge with a certificate from the CA.
    pub allow_edges: Option<Vec<String>>,
    /// Most edge connections at once; more are refused with `overloaded`.
    #[serde(default = "Config::default_connections_max")]
    pub connections_max: usize,
    /// Partitions of a stream created on this node (fixed once the stream exists).
    #[serde(default = "Config::default_partitions")]
    pub partitions: u32,
    /// UDP socket buffer sizes (receive and send). The kernel default (~208 KiB) overflowed
    /// with 100 edges at full rate (7–8% of datagrams dropped, very unequal shares); the
    /// kernel caps it at `net.core.rmem_max` / `wmem_max`, and the node warns if it does.
    #[serde(default = "Config::default_udp_buffer_bytes")]
    pub udp_buffer_bytes: ByteSize,
    /// QUIC packets: the UDP payload size every path to this node carries (packets start
    /// there). Default 1200, QUIC's floor; see [`shared::quic::Mtu`].
    #[serde(default = "shared::quic::Mtu::default_min")]
    pub mtu_min: u16,
    /// Largest UDP payload this node accepts and path MTU discovery probes for: 1452 suits
    /// Ethernet; a 9000-byte jumbo-frame backhaul up to 8972 (fewer packets per GB, less CPU).
    #[serde(default = "shared::quic::Mtu::default_max")]
    pub mtu_max: u16,
    /// Segment files roll at this size.
    #[serde(default = "Config::default_segment_bytes_max")]
    pub segment_bytes_max: ByteSize,
    /// Append to the stream logs with direct IO (`O_DIRECT`), bypassing the page cache: on
    /// ext4 a third to a fifth of the kernel CPU per GB stored of buffered writes and
    /// `fdatasync` in busy rounds (~1 MB per fsync), the same in quiet ones. Where the file
    /// system refuses it (some FUSE, tmpfs on older kernels) the node warns and writes buffered.
    #[serde(default = "Config::default_direct_io")]
    pub direct_io: bool,
    /// Keep-alive towards edges (at most 15 s keeps NAT bindings on mobile backhaul alive).
    #[serde(default = "Config::default_keep_alive")]
    pub keep_alive: Millis,
    /// A connection silent this long is closed.
    #[serde(default = "Config::default_idle_timeout")]
    pub idle_timeout: Millis,
    /// The file this config was read from (not a key): SIGHUP reads `allow_edges` from it again.
    #[serde(skip)]
    pub source: PathBuf,
    /// Tiering to object storage.
    #[serde(default)]
    pub tier: TierConfig,
    /// The read API (HTTP, NDJSON).
    #[serde(default)]
    pub read_api: ReadApiConfig,
}

/// `[tier]`: closed segments go to object storage (DESIGN §5).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// `file:///abs/dir` or `s3://bucket[/prefix]` (S3, MinIO, Ceph RGW; credentials, region,
    /// endpoint and plain-HTTP allowance from the usual `AWS_*` variables). Unset: the embedded
    /// default, the directory `<data_dir>/bucket`.
    pub object_store: Option<String>,
    /// A closed segment whose file was last written this long ago is uploaded.
    #[serde(default = "TierConfig::default_tier_after")]
    pub tier_after: Millis,
    /// The local copy of a tiered segment goes once its file was last written this long ago
    /// (or sooner when the disk budget needs the room).
    #[serde(default = "TierConfig::default_local_retention")]
    pub local_retention: Millis,
    /// Local disk budget for segment files: past it, tiered copies go first; if it is still
    /// full of untiered data, the core stops acking (backpressure) instead of deleting anything.
    #[serde(default = "TierConfig::default_disk_budget_bytes")]
    pub disk_budget_bytes: ByteSize,
    /// How often the tierer looks for work.
    #[serde(default = "TierConfig::default_interval")]
    pub interval: Millis,
    /// First wait after a failed upload; doubles on each failure in a row.
    #[serde(default = "TierConfig::default_retry_backoff_initial")]
    pub retry_backoff_initial: Millis,
    /// Cap of that wait.
    #[serde(default = "TierConfig::default_retry_backoff_max")]
    pub retry_backoff_max: Millis,
    /// Segments at least this large are uploaded in parts (multipart upload).
    #[serde(default = "TierConfig::default_multipart_threshold_bytes")]
    pub multipart_threshold_bytes: ByteSize,
    /// Size of one part (S3 wants at least 5 MiB except for the last).
    #[serde(default = "TierConfig::default_part_bytes")]
    pub part_bytes: ByteSize,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            object_store: None,
            tier_after: TierConfig::default_tier_after(),
            local_retention: TierConfig::default_local_retention(),
            disk_budget_bytes: TierConfig::default_disk_budget_bytes(),
            interval: TierConfig::default_interval(),
            retry_backoff_initial: TierConfig::default_retry_backoff_initial(),
            retry_backoff_max: TierConfig::default_retry_backoff_max(),
            multipart_threshold_bytes: TierConfig::default_multipart_threshold_bytes(),
            part_bytes: TierConfig::default_part_bytes(),
        }
    }
}

impl TierConfig {
    /// Ten minutes: segments roll at 128 MiB, so this mostly bounds how long a quiet
    /// partition's data waits for its second copy.
    fn default_tier_after() -> Millis {
        Millis(600_000)
    }
    /// A day of hot reads from local disk.
    fn default_local_retention() -> Millis {
        Millis(86_400_000)
    }
    fn default_disk_budget_bytes() -> ByteSize {
        ByteSize(64 << 30)
    }
    fn default_interval() -> Millis {
        Millis(5_000)
    }
    fn default_retry_backoff_initial() -> Millis {
        Millis(1_000)
    }
    fn default_retry_backoff_max() -> Millis {
        Millis(60_000)
    }
    fn default_multipart_threshold_bytes() -> ByteSize {
        ByteSize(16 << 20)
    }
    fn default_part_bytes() -> ByteSize {
        ByteSize(8 << 20)
    }
}

/// `[read_api]`: `GET /v1/streams`, `/v1/streams/{stream}/records`, `/v1/status`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadApiConfig {
    /// TCP address of the read API; unset: no HTTP read API (`core-ingest read` still works).
    /// It serves billing data: a non-loopback address needs TLS and tokens.
    pub listen: Option<SocketAddr>,
    /// Server certificate (PEM) for HTTPS; with `key_file`. Unset: plain HTTP.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Per-stream bearer tokens (`stream = "token"`, or `"env:VAR"` to take it from the
    /// environment). When set, a request for a stream's records needs `Authorization: Bearer
    /// <its token>`; `/v1/streams` and `/v1/status` need any of them.
    #[serde(default)]
    pub tokens: std::collections::BTreeMap<String, String>,
}

/// Shortest literal bearer token accepted.
pub const TOKEN_LEN_MIN: usize = 16;

impl ReadApiConfig {
    /// The tokens with `env:VAR` values read from the environment; the error names the key.
    pub fn resolved_tokens(&self) -> Result<std::collections::BTreeMap<String, String>, (String, String)> {
        let mut out = std::collections::BTreeMap::new();
        for (stream, value) in &self.tokens {
            let key = format!("read_api.tokens.{stream}");
            if !shared::batch::is_valid_stream_name(stream) {
                return Err((key, "not a valid stream name".into()));
            }
            let token = match value.strip_prefix("env:") {
                Some(var) => {
                    std::env::var(var).map_err(|_| (key.clone(), format!("environment variable {var} is not set")))?
                }
                None => value.clone(),
            };
            if token.len() < TOKEN_LEN_MIN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((key, format!("at least {TOKEN_LEN_MIN} printable ASCII characters, no spaces")));
            }
            out.insert(stream.clone(), token);
        }
        Ok(out)
    }
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM): edges' client certificates must chain to it.
    pub ca_file: PathBuf,
    /// This node's certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
}

impl Config {
    fn default_admin() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9465))
    }
    fn default_connections_max() -> usize {
        10_000
    }
    fn default_partitions() -> u32 {
        4
    }
    fn default_udp_buffer_bytes() -> ByteSize {
        ByteSize(4 << 20)
    }
    /// The QUIC packet sizes.
    pub fn mtu(&self) -> shared::quic::Mtu {
        shared::quic::Mtu { min: self.mtu_min, max: self.mtu_max }
    }
    fn default_segment_bytes_max() -> ByteSize {
        ByteSize(128 << 20)
    }
    /// On: every commit is fsynced anyway, so the page cache buys the writer nothing.
    fn default_direct_io() -> bool {
        true
    }
    fn default_keep_alive() -> Millis {
        Millis(10_000)
    }
    fn default_idle_timeout() -> Millis {
        Millis(60_000)
    }

    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&shared::config::read(path)?, path)
    }

    /// Parses and validates `text` as if read from `path`; relative file names in it are
    /// taken relative to the file's directory.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = shared::config::parse_toml(text, path)?;
        c.source = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        for f in [&mut c.tls.ca_file, &mut c.tls.cert_file, &mut c.tls.key_file, &mut c.data_dir]
            .into_iter()
            .chain(c.read_api.cert_file.as_mut())
            .chain(c.read_api.key_file.as_mut())
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        let mut p = Vec::new();
        if c.node.is_empty()
            || c.node.len() > 64
            || !c.node.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            p.push(("node".into(), "1 to 64 of a-z A-Z 0-9 - _ .".into()));
        }
        for (key, f) in
            [("tls.ca_file", &c.tls.ca_file), ("tls.cert_file", &c.tls.cert_file), ("tls.key_file", &c.tls.key_file)]
        {
            if !f.is_file() {
                p.push((key.into(), format!("{} is not a readable file", f.display())));
            }
        }
        if c.partitions == 0 || c.partitions > 1024 {
            p.push(("partitions".into(), "1 to 1024".into()));
        }
        if c.connections_max == 0 {
            p.push(("connections_max".into(), "at least 1".into()));
        }
        if c.keep_alive.0 == 0 || c.keep_alive.0 > 15_000 {
            p.push(("keep_alive".into(), "between 1ms and 15s (NAT bindings on mobile backhaul expire)".into()));
        }
        if c.idle_timeout <= c.keep_alive {
            p.push(("idle_timeout".into(), "above keep_alive".into()));
        }
        p.extend(c.mtu().problem(""));
        if c.segment_bytes_max.0 < 64 << 10 {
            p.push(("segment_bytes_max".into(), "at least 64KiB".into()));
        }
        validate_tier(&c.tier, &mut p);
        validate_read_api(&c.read_api, &mut p);
        if let Some(allow) = &c.allow_edges
            && allow.is_empty()
        {
            p.push(("allow_edges".into(), "empty: no edge could connect (remove the key to allow any)".into()));
        }
        if p.is_empty() { Ok(c) } else { Err(ConfigError { file: path.into(), problems: p }) }
    }
}

fn validate_read_api(r: &ReadApiConfig, p: &mut Vec<(String, String)>) {
    let tls = match (&r.cert_file, &r.key_file) {
        (Some(c), Some(k)) => {
            for (key, f) in [("read_api.cert_file", c), ("read_api.key_file", k)] {
                if !f.is_file() {
                    p.push((key.into(), format!("{} is not a readable file", f.display())));
                }
            }
            true
        }
        (None, None) => false,
        _ => {
            p.push(("read_api.cert_file".into(), "cert_file and key_file go together".into()));
            false
        }
    };
    if let Err((key, why)) = r.resolved_tokens() {
        p.push((key, why));
    }
    let protected = tls && !r.tokens.is_empty();
    if !protected && r.listen.is_some_and(|a| !a.ip().is_loopback()) {
        p.push((
            "read_api.listen".into(),
            "a non-loopback address needs cert_file, key_file and tokens: the read API serves billing data".into(),
        ));
    }
}

fn validate_tier(t: &TierConfig, p: &mut Vec<(String, String)>) {
    if let Some(url) = &t.object_store
        && let Err(e) = crate::tier::store::parse_url(url)
    {
        p.push(("tier.object_store".into(), e));
    }
    if t.interval.0 == 0 {
        p.push(("tier.interval".into(), "above 0".into()));
    }
    if t.retry_backoff_initial.0 == 0 {
        p.push(("tier.retry_backoff_initial".into(), "above 0".into()));
    }
    if t.retry_backoff_max < t.retry_backoff_initial {
        p.push(("tier.retry_backoff_max".into(), "at least retry_backoff_initial".into()));
    }
    if t.part_bytes.0 < 5 << 20 || t.part_bytes.0 > 5 << 30 {
        p.push(("tier.part_bytes".into(), "5MiB to 5GiB (S3's part size limits)".into()));
    }
    if t.multipart_threshold_bytes < t.part_bytes {
        p.push(("tier.multipart_threshold_bytes".into(), "at least part_bytes".into()));
    }
    if t.disk_budget_bytes.0 < 1 << 20 {
        p.push(("tier.disk_budget_bytes".into(), "at least 1MiB".into()));
    }
}

pub use shared::config::ConfigError;
