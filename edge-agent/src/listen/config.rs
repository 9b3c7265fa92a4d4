//! `[listen]`: the agent as the devices' MQTT endpoint. Parsed with the rest of the config
//! (`deny_unknown_fields`), checked by [`ListenConfig::problems`], every problem with its key.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use shared::units::{ByteSize, Millis};

use super::auth::PasswordHash;

/// `[listen]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Plain TCP listeners (`host:port`). Use them on trusted networks only: passwords travel
    /// in clear.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners (`host:port`); need `cert_file` and `key_file`.
    #[serde(default)]
    pub tls: Vec<SocketAddr>,
    /// Server certificate chain (PEM) of the TLS listeners.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA (PEM) that signs device certificates. Set: TLS listeners require a client
    /// certificate chained to it, and such a device needs no password.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a device may connect without a password (on TLS with `client_ca_file` every
    /// device has a certificate anyway). Default false.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Devices and their password hashes (`edge-agent passwd` makes one).
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// Most device connections at once; one more is refused (MQTT 5: quota exceeded).
    #[serde(default = "ListenConfig::default_connections_max")]
    pub connections_max: usize,
    /// Per device: most QoS 1/2 PUBLISHes not yet acknowledged (MQTT 5 receive maximum; with
    /// 3.1.1 the agent stops reading the socket at this many). Acks wait for the fsync, so
    /// one device's rate is at most this / (linger + fsync interval).
    #[serde(default = "ListenConfig::default_inflight_max")]
    pub inflight_max: u16,
    /// Largest MQTT packet taken; a larger one closes the connection (MQTT 5: packet too large).
    #[serde(default = "ListenConfig::default_packet_bytes_max")]
    pub packet_bytes_max: ByteSize,
    /// Time a new connection has to send its CONNECT (slowloris guard).
    #[serde(default = "ListenConfig::default_connect_timeout")]
    pub connect_timeout: Millis,
    /// Longest keep-alive granted; a device asking for more (or for none) gets this (MQTT 5
    /// server keep alive; 3.1.1 devices are held to it too).
    #[serde(default = "ListenConfig::default_keep_alive_max")]
    pub keep_alive_max: Millis,
    /// Longest a device's session (QoS 2 packet ids, redelivery memory) is kept after it
    /// disconnects without clean start; MQTT 5 devices may ask for less.
    #[serde(default = "ListenConfig::default_session_expiry_max")]
    pub session_expiry_max: Millis,
    /// Most sessions kept for disconnected devices; past it the one expiring first goes.
    #[serde(default = "ListenConfig::default_sessions_max")]
    pub sessions_max: usize,
    /// Records at the tail of each log read at start to recognise redeliveries of devices
    /// (DUP, same client id and packet id) after a restart.
    #[serde(default = "ListenConfig::default_redelivery_window_records")]
    pub redelivery_window_records: u64,
}

/// `[[listen.user]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The MQTT user name.
    pub name: String,
    /// `pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>`, from `edge-agent passwd`.
    pub password_hash: String,
    /// Topic filters this user may publish to; unset: any. Others are refused (MQTT 5: not
    /// authorized; 3.1.1: the connection is closed).
    pub publish: Option<Vec<String>>,
}

impl ListenConfig {
    fn default_connections_max() -> usize {
        10_000
    }
    fn default_inflight_max() -> u16 {
        100
    }
    fn default_packet_bytes_max() -> ByteSize {
        ByteSize(1 << 20)
    }
    fn default_connect_timeout() -> Millis {
        Millis(10_000)
    }
    fn default_keep_alive_max() -> Millis {
        Millis(300_000)
    }
    fn default_session_expiry_max() -> Millis {
        Millis(3_600_000)
    }
    fn default_sessions_max() -> usize {
        10_000
    }
    fn default_redelivery_window_records() -> u64 {
        100_000
    }

    /// Relative file names resolve against `base` (the config file's directory).
    pub fn resolve_files(&mut self, base: &std::path::Path) {
        for f in [&mut self.cert_file, &mut self.key_file, &mut self.client_ca_file].into_iter().flatten() {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }

    /// Every problem, as `(key, reason)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let k = |f: &str| format!("listen.{f}");
        if self.tcp.is_empty() && self.tls.is_empty() {
            p.push((k("tcp"), "no listener: give listen.tcp or listen.tls addresses".into()));
        }
        if !self.tls.is_empty() {
            for (key, f) in [("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
                match f {
                    None => p.push((k(key), "required with listen.tls".into())),
                    Some(f) if !f.is_file() => p.push((k(key), format!("{} is not a readable file", f.display()))),
                    Some(_) => {}
                }
            }
        }
        if let Some(f) = &self.client_ca_file {
            if self.tls.is_empty() {
                p.push((k("client_ca_file"), "needs listen.tls: client certificates come with TLS".into()));
            } else if !f.is_file() {
                p.push((k("client_ca_file"), format!("{} is not a readable file", f.display())));
            }
        }
        if self.connections_max == 0 {
            p.push((k("connections_max"), "at least 1".into()));
        }
        if self.inflight_max == 0 {
            p.push((k("inflight_max"), "at least 1".into()));
        }
        // A PUBLISH needs a few bytes of header; MQTT's own bound is 256 MiB.
        if self.packet_bytes_max.0 < 128 || self.packet_bytes_max.0 > 268_435_455 {
            p.push((k("packet_bytes_max"), "between 128B and 268435455B (MQTT's largest packet)".into()));
        }
        if self.connect_timeout.0 == 0 {
            p.push((k("connect_timeout"), "above zero".into()));
        }
        if self.keep_alive_max.0 < 1000 || self.keep_alive_max.0 > 65_535_000 {
            p.push((k("keep_alive_max"), "between 1s and 65535s".into()));
        }
        if self.session_expiry_max.0 / 1000 > u64::from(u32::MAX) {
            p.push((k("session_expiry_max"), "at most 4294967295s".into()));
        }
        if self.sessions_max == 0 {
            p.push((k("sessions_max"), "at least 1".into()));
        }
        if !self.allow_anonymous && self.users.is_empty() && self.client_ca_file.is_none() {
            p.push((
                k("user"),
                "no [[listen.user]], no client_ca_file and allow_anonymous is false: no device could connect".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let k = |f: &str| format!("listen.user[{i}].{f}");
            if u.name.is_empty() || !names.insert(u.name.as_str()) {
                p.push((k("name"), "empty, or used by another [[listen.user]]".into()));
            }
            if let Err(e) = PasswordHash::parse(&u.password_hash) {
                p.push((k("password_hash"), e));
            }
            for (j, f) in u.publish.iter().flatten().enumerate() {
                if let Err(e) = crate::route::check_filter(f) {
                    p.push((format!("listen.user[{i}].publish[{j}]"), e));
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str = "edge_id = \"e\"\ndata_dir = \"/d\"\n";

    fn problems(listen: &str) -> String {
        match Config::parse(&format!("{BASE}{listen}"), Path::new("t.toml")) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn listen_alone_is_enough_to_ingest() {
        let c = Config::parse(
            &format!("{BASE}[listen]\ntcp = [\"127.0.0.1:1883\"]\nallow_anonymous = true\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let l = c.listen.unwrap();
        assert_eq!((l.inflight_max, l.packet_bytes_max.0, l.connections_max), (100, 1 << 20, 10_000));
        assert!(problems("").contains("no [[broker]] and no [listen]"));
    }

    #[test]
    fn every_listen_problem_names_its_key() {
        let e = problems("[listen]\ntls = [\"127.0.0.1:8883\"]\ninflight_max = 0\npacket_bytes_max = \"1B\"\n");
        for key in
            ["listen.cert_file", "listen.key_file", "listen.inflight_max", "listen.packet_bytes_max", "listen.user"]
        {
            assert!(e.contains(key), "{key} in {e}");
        }
        let e = problems(
            "[listen]\ntcp = [\"127.0.0.1:1\"]\nclient_ca_file = \"/nope\"\n[[listen.user]]\nname = \"d\"\npassword_hash = \"plain\"\npublish = [\"a/#/b\"]\n",
        );
        for key in ["listen.client_ca_file", "listen.user[0].password_hash", "listen.user[0].publish[0]"] {
            assert!(e.contains(key), "{key} in {e}");
        }
        assert!(problems("[listen]\ntcp = [\"127.0.0.1:1\"]\nbogus = 1\n").contains("bogus"));
    }
}
