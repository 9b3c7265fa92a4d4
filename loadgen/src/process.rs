//! Child processes that die with their handle, and CPU seconds per process from `/proc`.
//!
//! A scenario's broker and agent are [`Proc`]s: dropping one (scenario done, error, Ctrl-C)
//! sends SIGKILL to its PID and reaps it, so nothing outlives `loadgen`. A clean stop is
//! [`Proc::terminate`]: SIGTERM, then a bounded wait for the exit status.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How often a wait for a process looks again.
const POLL: Duration = Duration::from_millis(20);

/// A running child process with its output in a log file; killed by PID on drop.
#[derive(Debug)]
pub struct Proc {
    name: &'static str,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Proc {
    /// Starts `command` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &'static str, mut command: Command, log_path: &Path) -> anyhow::Result<Proc> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating a log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Proc { name, child: Some(child), log_path: log_path.to_path_buf() })
    }

    /// Starts `command` with its stdin and stdout piped to this process and its stderr
    /// appended to `log_path`: a child driven line by line (`loadgen quic-sink`).
    pub fn spawn_piped(
        name: &'static str,
        mut command: Command,
        log_path: &Path,
    ) -> anyhow::Result<(Proc, ChildStdin, ChildStdout)> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let proc = Proc { name, child: Some(child), log_path: log_path.to_path_buf() };
        match (stdin, stdout) {
            (Some(i), Some(o)) => Ok((proc, i, o)),
            // Not reached: both were asked for. Dropping `proc` kills the child.
            _ => bail!("{name}: no stdin or stdout pipe"),
        }
    }

    /// Waits up to `timeout` for it to exit by itself; SIGKILL after that (an error).
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().expect("a Proc holds its child until terminate, wait or drop");
        self.reap(&mut child, timeout, "")
    }

    /// Waits up to `timeout` for `child` to exit; SIGKILL after that (an error, `after` saying
    /// since what).
    fn reap(&self, child: &mut Child, timeout: Duration, after: &str) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().with_context(|| format!("waiting for {}", self.name))? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within {timeout:?}{after}\n{}", self.name, self.log_tail(30));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then waits up to `timeout` for it to exit; SIGKILL after that (an error).
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().expect("a Proc holds its child until terminate, wait or drop");
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // std sends only SIGKILL; kill(1) keeps the crate free of unsafe and of a libc binding.
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().context("running kill")?;
        if !sent.success() {
            bail!("kill -TERM {} ({}) failed", child.id(), self.name);
        }
        self.reap(&mut child, timeout, " of SIGTERM")
    }

    /// SIGTERM (as [`Proc::terminate`]), then `<exe> log verify --data-dir <data_dir>`: the
    /// exit status, the verify status and its output. Blocking work, on a blocking thread.
    pub async fn stop_and_verify(
        self,
        timeout: Duration,
        exe: PathBuf,
        data_dir: PathBuf,
    ) -> anyhow::Result<(ExitStatus, ExitStatus, String)> {
        let name = self.name;
        tokio::task::spawn_blocking(move || {
            let exit = self.terminate(timeout)?;
            let out = Command::new(&exe)
                .args(["log", "verify", "--data-dir"])
                .arg(&data_dir)
                .output()
                .with_context(|| format!("running {name} log verify"))?;
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            Ok((exit, out.status, text))
        })
        .await
        .context("the stop task")?
    }

    /// The last `lines` lines of its output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return format!("({}: {e})", self.log_path.display()),
        };
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- {} log ({}) ---\n{}",
            self.name,
            self.log_path.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Converts the clock ticks of `/proc/<pid>/stat` to seconds.
#[derive(Clone, Copy, Debug)]
pub struct CpuClock {
    ticks_per_second: u64,
}

impl CpuClock {
    /// Asks `getconf CLK_TCK` (the kernel's `USER_HZ`, 100 on Linux) once.
    pub fn new() -> anyhow::Result<CpuClock> {
        let out = Command::new("getconf").arg("CLK_TCK").output().context("running getconf CLK_TCK")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ticks_per_second: u64 =
            text.trim().parse().with_context(|| format!("getconf CLK_TCK printed {:?}", text.trim()))?;
        if ticks_per_second == 0 {
            bail!("getconf CLK_TCK printed 0");
        }
        Ok(CpuClock { ticks_per_second })
    }

    /// User + system CPU seconds `pid` has used so far (`None`: this process).
    pub fn cpu_seconds(self, pid: Option<u32>) -> anyhow::Result<f64> {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/stat"),
            None => "/proc/self/stat".to_owned(),
        };
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let ticks = stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}: {stat:?}"))?;
        Ok(ticks as f64 / self.ticks_per_second as f64)
    }
}

/// Busy CPU seconds of the whole machine, every CPU and process (`/proc/stat`): user, nice,
/// system, irq, softirq and steal; not idle or iowait. Beside the seconds of a run's own
/// processes it shows how much other load shared the machine.
pub fn machine_busy_seconds(clock: CpuClock) -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = machine_busy_ticks(&stat).context("parsing the cpu line of /proc/stat")?;
    Ok(ticks as f64 / clock.ticks_per_second as f64)
}

/// CPU seconds the hypervisor gave other guests while this machine wanted them (steal, from
/// `/proc/stat`; part of [`machine_busy_seconds`]): on a shared VM, the run's noise.
pub fn machine_steal_seconds(clock: CpuClock) -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = machine_cpu_field(&stat, 7).context("parsing the cpu line of /proc/stat")?;
    Ok(ticks as f64 / clock.ticks_per_second as f64)
}

/// Field `i` (0: user) of the `cpu` line of `/proc/stat`; 0 when the kernel has fewer.
fn machine_cpu_field(stat: &str, i: usize) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_ascii_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    (v.len() >= 4).then(|| v.get(i).copied().unwrap_or(0))
}

fn machine_busy_ticks(stat: &str) -> Option<u64> {
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    [0, 1, 2, 5, 6, 7].into_iter().map(|i| machine_cpu_field(stat, i)).sum()
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces and parentheses itself, so fields count from the last
/// `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let stat = "4242 (edge (agent) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 269 0 0 20 0 9 0 123 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(1000));
        assert_eq!(stat_cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 5 6 7 0 0\ncpu0 50 1 15 2500 20 2 3 3 0 0\nintr 1\n";
        assert_eq!(machine_busy_ticks(stat), Some(150));
        assert_eq!(machine_busy_ticks("cpu0 1 2 3 4\n"), None);
        assert_eq!(machine_cpu_field(stat, 7), Some(7), "steal");
        assert_eq!(machine_cpu_field("cpu  1 2 3 4\n", 7), Some(0), "an old kernel without steal");
    }

    #[test]
    fn own_cpu_time_reads() {
        let clock = CpuClock::new().unwrap();
        assert!(clock.cpu_seconds(None).unwrap() >= 0.0);
    }
}
