//! A private Mosquitto for a scenario: the settings of `deploy/mosquitto/backhaul.conf` (read
//! at build time, so the benchmark measures what ships), on an ephemeral 127.0.0.1 port, in the
//! scenario's temp dir, killed by PID when dropped.
//!
//! What the benchmark changes, and why (each change is a comment in the written file):
//! - `listener`: an ephemeral port on 127.0.0.1;
//! - `persistence false` (and no `persistence_location` / `autosave_interval`): a broker that
//!   lives for one run has no session to keep, and Mosquitto only writes its store on autosave
//!   and at exit anyway, never per message;
//! - `max_inflight_messages`: the scenario's window (the agent's `inflight_max`).
//!
//! The settings the benchmark depends on must be there as shipped: `max_queued_messages 0` (no
//! silent drops to a slow subscriber, DESIGN §9) and `set_tcp_nodelay true`.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::Proc;

/// `deploy/mosquitto/backhaul.conf` as shipped.
pub const SHIPPED_CONF: &str = include_str!("../../deploy/mosquitto/backhaul.conf");

/// Lines of the shipped file the benchmark needs unchanged.
const REQUIRED: [&str; 2] = ["max_queued_messages 0", "set_tcp_nodelay true"];
/// How long Mosquitto gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Mosquitto.
#[derive(Debug)]
pub struct Mosquitto {
    proc: Proc,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The config it runs with, as written.
    pub conf: String,
}

impl Mosquitto {
    /// Starts `exe` with [`bench_conf`] in `dir` and waits until it accepts connections.
    pub fn start(exe: &Path, dir: &Path, inflight: u16) -> anyhow::Result<Mosquitto> {
        Mosquitto::start_with(exe, dir, inflight, "")
    }

    /// [`Mosquitto::start`] with `extra` lines (e.g. a bridge) appended to the config.
    pub fn start_with(exe: &Path, dir: &Path, inflight: u16, extra: &str) -> anyhow::Result<Mosquitto> {
        let conf_path = dir.join("mosquitto.conf");
        let log_path = dir.join("mosquitto.log");
        // A port freed by `free_port` may be taken again before Mosquitto binds it: retry.
        for attempt in 1..=3 {
            let port = free_port()?;
            let conf = bench_conf(SHIPPED_CONF, port, inflight)? + extra;
            fs::write(&conf_path, &conf).with_context(|| format!("writing {}", conf_path.display()))?;
            let mut command = Command::new(exe);
            command.arg("-c").arg(&conf_path);
            let mut proc = Proc::spawn("mosquitto", command, &log_path)?;
            match wait_listening(&mut proc, port) {
                Ok(()) => return Ok(Mosquitto { proc, port, conf }),
                Err(why) if attempt < 3 && proc.log_tail(10).contains("in use") => {
                    tracing::debug!(port, %why, "port taken; retrying");
                }
                Err(why) => bail!("mosquitto did not start: {why}\n{}", proc.log_tail(30)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Stops it with SIGTERM (bounded wait).
    pub fn stop(self) -> anyhow::Result<()> {
        self.proc.terminate(Duration::from_secs(10)).map(drop)
    }
}

/// The shipped config rewritten for a benchmark on `port` with `inflight` messages in flight
/// per client (see the module doc). Fails if a setting the benchmark relies on is missing.
pub fn bench_conf(shipped: &str, port: u16, inflight: u16) -> anyhow::Result<String> {
    for line in REQUIRED {
        if !shipped.lines().any(|l| l.split_whitespace().eq(line.split_whitespace())) {
            bail!("deploy/mosquitto/backhaul.conf no longer says `{line}`: the benchmark would not measure what ships");
        }
    }
    let mut out = String::from("# deploy/mosquitto/backhaul.conf, rewritten by loadgen for a benchmark.\n");
    let mut saw = (false, false, false);
    for line in shipped.lines() {
        match line.split_whitespace().next() {
            Some("listener") => {
                out.push_str(&format!("# (loadgen) an ephemeral port\nlistener {port} 127.0.0.1\n"));
                saw.0 = true;
            }
            Some("persistence") => {
                out.push_str("# (loadgen) a one-run broker has no session to keep\npersistence false\n");
                saw.1 = true;
            }
            Some("persistence_location" | "autosave_interval") => {
                out.push_str(&format!("# (loadgen, unused) {line}\n"))
            }
            Some("max_inflight_messages") => {
                out.push_str(&format!("# (loadgen) --inflight\nmax_inflight_messages {inflight}\n"));
                saw.2 = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !saw.0 {
        out.push_str(&format!("# (loadgen) an ephemeral port\nlistener {port} 127.0.0.1\n"));
    }
    if !saw.1 {
        out.push_str("# (loadgen)\npersistence false\n");
    }
    if !saw.2 {
        out.push_str(&format!("# (loadgen) --inflight\nmax_inflight_messages {inflight}\n"));
    }
    Ok(out)
}

/// The `mosquitto` executable: on `PATH`, else in the sbin directories Debian and Homebrew use.
pub fn find_exe() -> anyhow::Result<PathBuf> {
    find_server("mosquitto", "apt-get install mosquitto, or pass --mosquitto")
}

/// A server executable `name`: on `PATH`, else in the sbin directories Debian and Homebrew
/// use (where servers live, often off a user's `PATH`); `install` says how to get it.
pub fn find_server(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let dirs = path.into_iter().chain(["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"].map(PathBuf::from));
    for dir in dirs {
        let exe = dir.join(name);
        if exe.is_file() {
            return Ok(exe);
        }
    }
    bail!("{name} is not installed (not on PATH nor in /usr/sbin): {install}")
}

/// A port that was free a moment ago (bind to 0, read it, drop it).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(l.local_addr().context("local address of a bound socket")?.port())
}

/// Waits until `port` accepts TCP connections, or `proc` exits.
fn wait_listening(proc: &mut Proc, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Some(status) = proc.exited() {
            bail!("exited with {status}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("port {port} not accepting connections after {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_settings_are_kept_and_the_three_overrides_applied() {
        let conf = bench_conf(SHIPPED_CONF, 41234, 777).unwrap();
        let active: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).map(str::trim).collect();
        for want in [
            "listener 41234 127.0.0.1",
            "persistence false",
            "max_inflight_messages 777",
            "max_queued_messages 0",
            "set_tcp_nodelay true",
            "allow_anonymous true",
        ] {
            assert_eq!(active.iter().filter(|l| **l == want).count(), 1, "{want} in\n{conf}");
        }
        for gone in ["listener 1883", "persistence true", "persistence_location", "max_inflight_messages 1000"] {
            assert!(!active.iter().any(|l| l.starts_with(gone)), "{gone} in\n{conf}");
        }
    }

    #[test]
    fn a_shipped_file_without_the_queue_setting_is_refused() {
        let e = bench_conf("listener 1883\nset_tcp_nodelay true\n", 1, 1).unwrap_err();
        assert!(e.to_string().contains("max_queued_messages 0"), "{e}");
    }
}
