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
    /// Segment files roll at this size.
    #[serde(default = "Config::default_segment_bytes_max")]
    pub segment_bytes_max: ByteSize,
    /// Keep-alive towards edges (at most 15 s keeps NAT bindings on mobile backhaul alive).
    #[serde(default = "Config::default_keep_alive")]
    pub keep_alive: Millis,
    /// A connection silent this long is closed.
    #[serde(default = "Config::default_idle_timeout")]
    pub idle_timeout: Millis,
    /// The file this config was read from (not a key): SIGHUP reads `allow_edges` from it again.
    #[serde(skip)]
    pub source: PathBuf,
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
    fn default_segment_bytes_max() -> ByteSize {
        ByteSize(128 << 20)
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
        for f in [&mut c.tls.ca_file, &mut c.tls.cert_file, &mut c.tls.key_file, &mut c.data_dir] {
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
        if c.segment_bytes_max.0 < 64 << 10 {
            p.push(("segment_bytes_max".into(), "at least 64KiB".into()));
        }
        if let Some(allow) = &c.allow_edges
            && allow.is_empty()
        {
            p.push(("allow_edges".into(), "empty: no edge could connect (remove the key to allow any)".into()));
        }
        if p.is_empty() { Ok(c) } else { Err(ConfigError { file: path.into(), problems: p }) }
    }
}

pub use shared::config::ConfigError;
