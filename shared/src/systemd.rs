//! The systemd notify protocol (`sd_notify(3)`), in a few lines over a Unix datagram socket:
//! `READY=1` once a service serves, `WATCHDOG=1` while its main loop is alive, `STOPPING=1`
//! when it begins to shut down. With no `$NOTIFY_SOCKET` (not started by systemd with
//! `Type=notify`) every call is a no-op.
//!
//! - The socket is a path (`/run/systemd/notify`) or, with a leading `@`, a Linux abstract
//!   address. Each message is one datagram of `KEY=VALUE` lines.
//! - Watchdog: systemd sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process it watches);
//!   a service pings at half that interval. [`Beat`] decides whether to ping: only when the
//!   main loop has made progress since the last ping, so a wedged loop is restarted, not kept
//!   alive by a blind timer.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Shortest watchdog ping interval accepted, so a tiny `WatchdogSec` cannot spin a loop.
pub const WATCHDOG_PING_MIN: Duration = Duration::from_millis(10);

/// Where notifications go: the socket named by `$NOTIFY_SOCKET`.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the environment: `None` when `$NOTIFY_SOCKET` is unset or empty.
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET").and_then(|s| Notifier::new(s.to_str()?))
    }

    /// Towards `socket` (a path, or `@name` for an abstract address); `None` if empty.
    pub fn new(socket: &str) -> Option<Notifier> {
        let target = match socket.strip_prefix('@') {
            Some("") => return None,
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            None if socket.is_empty() => return None,
            None => Target::Path(PathBuf::from(socket)),
        };
        Some(Notifier { target })
    }

    /// Sends one notification, e.g. `"READY=1"` or `"STOPPING=1\nSTATUS=draining"`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        match &self.target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?
            }
        };
        Ok(())
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, if it is set for this process
/// (`$WATCHDOG_PID` unset or equal to our pid). `None`: no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] over given values (pure, for tests).
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some((Duration::from_micros(usec) / 2).max(WATCHDOG_PING_MIN))
}

/// Sends `state` to `$NOTIFY_SOCKET` if systemd set it; a failure is logged, not fatal (the
/// service still works; systemd will say it never became ready).
pub fn notify_env(state: &str) {
    if let Some(n) = Notifier::from_env()
        && let Err(error) = n.notify(state)
    {
        tracing::warn!(%error, state, "sd_notify failed");
    }
}

/// Pings the watchdog every [`watchdog_interval`] while `progress` (the main loop's progress
/// counter, `None` if it did not answer) moves; returns at once without a watchdog.
pub async fn drive_watchdog<F, Fut>(mut progress: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let (Some(notifier), Some(interval)) = (Notifier::from_env(), watchdog_interval()) else { return };
    let mut beat = Beat::default();
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match progress().await {
            Some(p) if beat.handle_progress(p) => {
                if let Err(error) = notifier.notify("WATCHDOG=1") {
                    tracing::warn!(%error, "sd_notify WATCHDOG=1 failed");
                }
            }
            _ => tracing::warn!(
                interval_ms = interval.as_millis() as u64,
                "main loop made no progress since the last watchdog ping: not pinging"
            ),
        }
    }
}

/// Whether the watchdog may be pinged: the main loop's progress counter must have moved since
/// the last ping.
#[derive(Debug, Default)]
pub struct Beat {
    last: Option<u64>,
}

impl Beat {
    /// Given the loop's progress counter now, whether to send `WATCHDOG=1`.
    pub fn handle_progress(&mut self, progress: u64) -> bool {
        let moved = self.last != Some(progress);
        self.last = Some(progress);
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification within the timeout");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    }

    #[test]
    fn ready_and_watchdog_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1").unwrap();
        n.notify("WATCHDOG=1").unwrap();
        n.notify("STOPPING=1").unwrap();
        assert_eq!(recv(&socket), "READY=1");
        assert_eq!(recv(&socket), "WATCHDOG=1");
        assert_eq!(recv(&socket), "STOPPING=1");
    }

    #[test]
    fn ready_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("backhaul-test-{}-{}", std::process::id(), rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Notifier::new(&format!("@{name}")).unwrap().notify("READY=1").unwrap();
        assert_eq!(recv(&socket), "READY=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("absent").to_str().unwrap()).unwrap();
        assert!(n.notify("READY=1").is_err());
        assert!(Notifier::new("").is_none());
        assert!(Notifier::new("@").is_none());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_our_pid_only() {
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None, "another process is watched");
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("2"), None, 7), Some(WATCHDOG_PING_MIN));
    }

    #[test]
    fn beat_pings_only_after_progress() {
        let mut beat = Beat::default();
        assert!(beat.handle_progress(0), "the first check pings");
        assert!(!beat.handle_progress(0), "a loop that did not move is not vouched for");
        assert!(beat.handle_progress(1));
        assert!(beat.handle_progress(5));
        assert!(!beat.handle_progress(5));
    }
}
