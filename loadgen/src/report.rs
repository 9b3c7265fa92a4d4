//! The figures of `mqtt-ingest` and how they print: a Markdown table (so it pastes into
//! BENCHMARKS.md as it is), the verdict, and one `RESULT key=value …` line for scripts and tests.

use std::fmt::Write as _;
use std::process::ExitStatus;

/// The target: the agent takes at least this share of the broker's own
/// publish → subscriber rate.
pub const TARGET_RATIO: f64 = 0.9;

/// What one run measured. Times are seconds from the first PUBLISH.
#[derive(Clone, Debug, Default)]
pub struct RunFigures {
    /// Until the subscriber had every message (peer) or the agent had appended every one and
    /// released every ack (agent).
    pub wall_seconds: f64,
    /// Until the broker had acknowledged every PUBLISH to the publishers.
    pub published_seconds: f64,
    /// Mosquitto's CPU seconds during the run.
    pub broker_cpu_seconds: f64,
    /// loadgen's own CPU seconds during the run (publishers; in the peer run the subscriber too).
    pub loadgen_cpu_seconds: f64,
    /// The agent's CPU seconds during the run (agent run only).
    pub agent_cpu_seconds: Option<f64>,
    /// Busy CPU seconds of the whole machine during the run: above the sum of the run's own
    /// processes, other load shared the CPUs.
    pub machine_cpu_seconds: f64,
}

impl RunFigures {
    /// Busy CPU seconds of the machine not spent by the run's own processes.
    pub fn other_cpu_seconds(&self) -> f64 {
        let own = self.broker_cpu_seconds + self.loadgen_cpu_seconds + self.agent_cpu_seconds.unwrap_or(0.0);
        (self.machine_cpu_seconds - own).max(0.0)
    }
}

/// What the agent's metrics and its stop said (agent run only).
#[derive(Clone, Debug)]
pub struct AgentFigures {
    /// Records appended to stream `cdr` during the run.
    pub appended: u64,
    /// Records routed to `cdr` during the run.
    pub received: u64,
    /// Records of `cdr` dropped during the run, any reason.
    pub dropped: u64,
    /// Acks of CDRs released during the run.
    pub acks: u64,
    /// Receive → ack quantiles and mean, seconds (from the histogram's buckets).
    pub ack_p50_seconds: Option<f64>,
    /// 99th percentile.
    pub ack_p99_seconds: Option<f64>,
    /// Mean.
    pub ack_mean_seconds: f64,
    /// Batches appended.
    pub batches: u64,
    /// Bytes of the records in those batches before compression (payload, topic, attributes).
    pub batch_raw_bytes: u64,
    /// Bytes of those batches as written.
    pub batch_compressed_bytes: u64,
    /// The stream's log on disk at the end (segments and indexes).
    pub log_bytes: u64,
    /// Failed appends during the run.
    pub append_errors: u64,
    /// The broker's `$SYS` dropped-messages count as the agent last saw it.
    pub broker_dropped: u64,
    /// Exit status after SIGTERM.
    pub exit: ExitStatus,
    /// Exit status of `edge-agent log verify`.
    pub verify: ExitStatus,
    /// Output of `edge-agent log verify`.
    pub verify_output: String,
}

/// Everything `mqtt-ingest` reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// Messages per run.
    pub messages: u64,
    /// Their payload bytes in all.
    pub payload_bytes: u64,
    /// The broker → rumqttc subscriber run.
    pub peer: RunFigures,
    /// The broker → edge-agent run.
    pub agent: RunFigures,
    /// The agent's own figures.
    pub agent_detail: AgentFigures,
}

impl Report {
    /// Messages per second of a run.
    pub fn rate(&self, run: &RunFigures) -> f64 {
        self.messages as f64 / run.wall_seconds
    }

    /// Payload megabytes (10^6) per second of a run.
    pub fn mb_per_second(&self, run: &RunFigures) -> f64 {
        self.payload_bytes as f64 / 1e6 / run.wall_seconds
    }

    /// Agent rate / peer rate.
    pub fn ratio(&self) -> f64 {
        self.rate(&self.agent) / self.rate(&self.peer)
    }

    /// Checks that failed: lost or dropped records, a bad exit, a log that does not verify.
    pub fn failures(&self) -> Vec<String> {
        let d = &self.agent_detail;
        let mut f = Vec::new();
        if d.appended != self.messages {
            f.push(format!("the agent appended {} of {} messages", d.appended, self.messages));
        }
        if d.dropped != 0 || d.append_errors != 0 || d.broker_dropped != 0 {
            f.push(format!(
                "drops: agent {} records, {} append errors, broker $SYS dropped {}",
                d.dropped, d.append_errors, d.broker_dropped
            ));
        }
        if !d.exit.success() {
            f.push(format!("edge-agent exited with {} after SIGTERM", d.exit));
        }
        if !d.verify.success() {
            f.push(format!("edge-agent log verify exited with {}: {}", d.verify, d.verify_output.trim()));
        }
        f
    }

    /// The table, the verdict and the `RESULT` line.
    pub fn render(&self) -> String {
        let (p, a, d) = (&self.peer, &self.agent, &self.agent_detail);
        let ms = |s: Option<f64>| {
            s.map_or("-".into(), |s| if s.is_finite() { format!("{:.2}", s * 1e3) } else { "> 10000".into() })
        };
        let mut rows: Vec<[String; 3]> = vec![
            [
                "wall time, first publish → all delivered (peer) / appended and acked (agent), s".into(),
                f3(p.wall_seconds),
                f3(a.wall_seconds),
            ],
            ["rate, msg/s".into(), f0(self.rate(p)), f0(self.rate(a))],
            ["rate, payload MB/s".into(), f2(self.mb_per_second(p)), f2(self.mb_per_second(a))],
            ["publishers done (broker PUBACKed all), s".into(), f3(p.published_seconds), f3(a.published_seconds)],
            ["CPU s, mosquitto".into(), f2(p.broker_cpu_seconds), f2(a.broker_cpu_seconds)],
            ["CPU s, edge-agent".into(), "-".into(), a.agent_cpu_seconds.map_or("-".into(), f2)],
            [
                "CPU s, loadgen (publishers; peer: + subscriber)".into(),
                f2(p.loadgen_cpu_seconds),
                f2(a.loadgen_cpu_seconds),
            ],
            [
                "CPU s, other processes (machine busy − the above)".into(),
                f2(p.other_cpu_seconds()),
                f2(a.other_cpu_seconds()),
            ],
        ];
        let agent_cpu = a.agent_cpu_seconds.unwrap_or(0.0);
        let per_million = |secs: f64| secs * 1e6 / self.messages as f64;
        rows.push([
            "CPU s per 1M messages: edge-agent (mosquitto)".into(),
            format!("- ({})", f2(per_million(p.broker_cpu_seconds))),
            format!("{} ({})", f2(per_million(agent_cpu)), f2(per_million(a.broker_cpu_seconds))),
        ]);
        rows.push([
            "receive → ack p50 / p99 / mean, ms".into(),
            "-".into(),
            format!("{} / {} / {:.2}", ms(d.ack_p50_seconds), ms(d.ack_p99_seconds), d.ack_mean_seconds * 1e3),
        ]);
        rows.push([
            "appended / acked / dropped records".into(),
            "-".into(),
            format!("{} / {} / {}", d.appended, d.acks, d.dropped),
        ]);
        rows.push([
            "batches (records per batch)".into(),
            "-".into(),
            format!("{} ({:.0})", d.batches, d.appended as f64 / d.batches.max(1) as f64),
        ]);
        rows.push([
            "payload bytes → batch raw → compressed (ratio raw/compressed)".into(),
            "-".into(),
            format!(
                "{} → {} → {} (×{:.2})",
                self.payload_bytes,
                d.batch_raw_bytes,
                d.batch_compressed_bytes,
                d.batch_raw_bytes as f64 / d.batch_compressed_bytes.max(1) as f64
            ),
        ]);
        rows.push(["log on disk (segments + indexes), bytes".into(), "-".into(), d.log_bytes.to_string()]);
        rows.push([
            "SIGTERM exit / log verify exit".into(),
            "-".into(),
            format!("{} / {}", code(d.exit), code(d.verify)),
        ]);

        let mut out = String::new();
        let _ = writeln!(out, "| figure | peer: mosquitto → rumqttc subscriber | edge-agent |");
        let _ = writeln!(out, "|---|---:|---:|");
        for [label, peer, agent] in &rows {
            let _ = writeln!(out, "| {label} | {peer} | {agent} |");
        }
        let ratio = self.ratio();
        let verdict = if ratio >= TARGET_RATIO { "met" } else { "NOT met" };
        let _ = writeln!(out, "\nagent / peer rate: {ratio:.3} (target ≥ {TARGET_RATIO}: {verdict})");
        let _ = writeln!(
            out,
            "RESULT messages={} appended={} acked={} agent_exit={} log_verify_exit={} peer_msg_per_s={:.0} \
             agent_msg_per_s={:.0} ratio={ratio:.4} agent_cpu_s={:.3}",
            self.messages,
            d.appended,
            d.acks,
            code(d.exit),
            code(d.verify),
            self.rate(p),
            self.rate(a),
            agent_cpu,
        );
        out
    }
}

fn code(s: ExitStatus) -> String {
    s.code().map_or_else(|| s.to_string(), |c| c.to_string())
}

fn f0(x: f64) -> String {
    format!("{x:.0}")
}
fn f2(x: f64) -> String {
    format!("{x:.2}")
}
fn f3(x: f64) -> String {
    format!("{x:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn report() -> Report {
        let run = |wall| RunFigures { wall_seconds: wall, published_seconds: wall / 2.0, ..RunFigures::default() };
        Report {
            messages: 1000,
            payload_bytes: 250_000,
            peer: run(1.0),
            agent: RunFigures { agent_cpu_seconds: Some(0.5), ..run(1.25) },
            agent_detail: AgentFigures {
                appended: 1000,
                received: 1000,
                dropped: 0,
                acks: 1000,
                ack_p50_seconds: Some(0.004),
                ack_p99_seconds: Some(f64::INFINITY),
                ack_mean_seconds: 0.005,
                batches: 10,
                batch_raw_bytes: 300_000,
                batch_compressed_bytes: 60_000,
                log_bytes: 61_000,
                append_errors: 0,
                broker_dropped: 0,
                exit: ExitStatus::from_raw(0),
                verify: ExitStatus::from_raw(0),
                verify_output: String::new(),
            },
        }
    }

    #[test]
    fn ratio_rates_and_result_line() {
        let r = report();
        assert_eq!(r.rate(&r.peer), 1000.0);
        assert_eq!(r.ratio(), 0.8);
        assert!(r.failures().is_empty());
        let text = r.render();
        assert!(text.contains("target ≥ 0.9: NOT met"), "{text}");
        assert!(
            text.contains("RESULT messages=1000 appended=1000 acked=1000 agent_exit=0 log_verify_exit=0"),
            "{text}"
        );
        assert!(text.contains("| 500.00 (0.00) |"), "agent CPU per 1M: {text}");
        assert!(text.contains("4.00 / > 10000 / 5.00"), "{text}");
    }

    #[test]
    fn failures_name_what_went_wrong() {
        let mut r = report();
        r.agent_detail.appended = 999;
        r.agent_detail.exit = ExitStatus::from_raw(1 << 8);
        let f = r.failures();
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].contains("999 of 1000") && f[1].contains("SIGTERM"), "{f:?}");
    }
}
