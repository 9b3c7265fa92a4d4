//! `loadgen verify`: proves that every message a `loadgen mqtt` run had acknowledged arrived
//! exactly once, from the records the core gives back.
//!
//! Input: the run's manifest (written by `loadgen mqtt --manifest FILE`: per device the ranges
//! of message numbers that were acknowledged, and those published without an acknowledgement)
//! and the records as NDJSON (the `core-ingest read` / `GET /v1/streams/{s}/records` line
//! format: `payload` or `payload_b64`, `ts`, …), from a file, stdin or a command's stdout.
//!
//! Verdict ([`Verdict`]): every acknowledged message must be found once (missing = **lost**);
//! no message may be found twice (**duplicated**); a message published without an
//! acknowledgement may be found once or not at all; records that are not ours or not in the
//! manifest are counted apart. Latency is the record's `ts` (when the edge took it) less the
//! send time the payload carries, in an HDR histogram.

use std::collections::HashMap;
use std::io::BufRead;
use std::ops::Range;

use anyhow::Context as _;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use shared::ranges::RangeSet;

use crate::trace::{self, TraceId};

/// Most message numbers a device may have in a manifest (bounds the verifier's memory: one
/// byte per message).
pub const MESSAGES_PER_DEVICE_MAX: u64 = 100_000_000;

/// What a run published, device by device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The run's seed.
    pub seed: u64,
    /// The devices.
    pub devices: Vec<DeviceManifest>,
}

/// What one device published.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceManifest {
    /// Device number.
    pub device: u32,
    /// Message numbers acknowledged (QoS 1 PUBACK, QoS 2 PUBCOMP): must arrive exactly once.
    pub acked: Vec<(u64, u64)>,
    /// Message numbers published without an acknowledgement (QoS 0, or the connection ended
    /// first): may arrive once or not at all.
    pub unconfirmed: Vec<(u64, u64)>,
}

impl DeviceManifest {
    /// Builds the entry from range sets.
    pub fn new(device: u32, acked: &RangeSet, unconfirmed: &RangeSet) -> DeviceManifest {
        let pairs = |s: &RangeSet| s.ranges().iter().map(|r| (r.start, r.end)).collect();
        DeviceManifest { device, acked: pairs(acked), unconfirmed: pairs(unconfirmed) }
    }
}

/// The outcome.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Acknowledged messages in the manifest.
    pub expected: u64,
    /// Acknowledged messages found once.
    pub found: u64,
    /// Acknowledged messages not found.
    pub lost: u64,
    /// The first few lost ids.
    pub lost_examples: Vec<TraceId>,
    /// Messages found more than once (each counted once, however many copies).
    pub duplicated: u64,
    /// The first few duplicated ids.
    pub duplicated_examples: Vec<TraceId>,
    /// Unacknowledged messages that arrived anyway.
    pub unconfirmed_found: u64,
    /// Records of ours whose id is not in the manifest.
    pub unexpected: u64,
    /// Records that carry no id of ours.
    pub foreign: u64,
    /// Lines that are not a record (bad JSON, no payload).
    pub bad_lines: u64,
    /// Records read.
    pub records: u64,
    /// Edge ts − send time, ms (negative clamped to 0).
    pub latency_ms: Option<hdrhistogram::Histogram<u64>>,
}

impl Verdict {
    /// Whether nothing was lost or duplicated.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }

    /// Latency quantile in ms.
    pub fn latency(&self, q: f64) -> Option<u64> {
        self.latency_ms.as_ref().filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(q))
    }
}

const EXAMPLES: usize = 10;

/// Counts sightings of each message against the manifest.
#[derive(Debug)]
pub struct Verifier {
    devices: HashMap<u32, Device>,
    latency: hdrhistogram::Histogram<u64>,
    unexpected: u64,
    foreign: u64,
    bad_lines: u64,
    records: u64,
}

#[derive(Debug)]
struct Device {
    acked: RangeSet,
    unconfirmed: RangeSet,
    /// Sightings per message number, saturating.
    seen: Vec<u8>,
}

impl Verifier {
    /// A verifier of `manifest`; refuses a manifest beyond the bounds or with overlapping sets.
    pub fn new(manifest: &Manifest) -> anyhow::Result<Verifier> {
        let mut devices = HashMap::new();
        for d in &manifest.devices {
            let set = |pairs: &[(u64, u64)], what: &str| -> anyhow::Result<RangeSet> {
                let mut s = RangeSet::new();
                for &(a, b) in pairs {
                    anyhow::ensure!(a < b, "device {}: {what} range {a}..{b} is empty or reversed", d.device);
                    anyhow::ensure!(
                        b <= MESSAGES_PER_DEVICE_MAX,
                        "device {}: {what} range ends at {b}, above {MESSAGES_PER_DEVICE_MAX}",
                        d.device
                    );
                    s.insert(a..b);
                }
                Ok(s)
            };
            let acked = set(&d.acked, "acked")?;
            let unconfirmed = set(&d.unconfirmed, "unconfirmed")?;
            anyhow::ensure!(
                !unconfirmed.ranges().iter().any(|r| acked.overlaps(r)),
                "device {}: a message is both acked and unconfirmed",
                d.device
            );
            let end = acked.ranges().iter().chain(unconfirmed.ranges()).map(|r| r.end).max().unwrap_or(0);
            let dev = Device { acked, unconfirmed, seen: vec![0; end as usize] };
            anyhow::ensure!(devices.insert(d.device, dev).is_none(), "device {} is listed twice", d.device);
        }
        // 1 ms to 30 days; a longer latency counts as 30 days.
        let latency = hdrhistogram::Histogram::new_with_bounds(1, 30 * 86_400_000, 3).expect("valid bounds");
        Ok(Verifier { devices, latency, unexpected: 0, foreign: 0, bad_lines: 0, records: 0 })
    }

    /// Takes one record: its payload and the time the edge took it.
    pub fn record(&mut self, payload: &[u8], ts_ms: Option<i64>) {
        self.records += 1;
        let Some((id, sent)) = trace::parse(payload) else {
            self.foreign += 1;
            return;
        };
        let Some(dev) = self.devices.get_mut(&id.device) else {
            self.unexpected += 1;
            return;
        };
        let Some(seen) = dev.seen.get_mut(id.n as usize) else {
            self.unexpected += 1;
            return;
        };
        let r: Range<u64> = id.n..id.n + 1;
        if !dev.acked.contains_range(&r) && !dev.unconfirmed.contains_range(&r) {
            self.unexpected += 1;
            return;
        }
        *seen = seen.saturating_add(1);
        if let Some(ts) = ts_ms {
            self.latency.saturating_record((ts - sent).max(0) as u64);
        }
    }

    /// Takes one NDJSON line of the read API.
    pub fn line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            self.bad_lines += 1;
            return;
        };
        let payload = match (v.get("payload").and_then(|p| p.as_str()), v.get("payload_b64").and_then(|p| p.as_str())) {
            (Some(p), _) => p.as_bytes().to_vec(),
            (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(p) => p,
                Err(_) => {
                    self.bad_lines += 1;
                    return;
                }
            },
            (None, None) => {
                self.bad_lines += 1;
                return;
            }
        };
        let ts = v.get("ts").and_then(|t| t.as_str()).and_then(shared::ndjson::parse_time_ms);
        self.record(&payload, ts);
    }

    /// Reads every line of `input`.
    pub fn read(&mut self, input: impl BufRead) -> anyhow::Result<()> {
        for line in input.lines() {
            self.line(&line.context("reading the records")?);
        }
        Ok(())
    }

    /// The verdict.
    pub fn finish(self) -> Verdict {
        let mut v = Verdict {
            unexpected: self.unexpected,
            foreign: self.foreign,
            bad_lines: self.bad_lines,
            records: self.records,
            latency_ms: Some(self.latency),
            ..Verdict::default()
        };
        let mut ids: Vec<_> = self.devices.into_iter().collect();
        ids.sort_by_key(|(d, _)| *d);
        for (device, d) in ids {
            for r in d.acked.ranges() {
                for n in r.clone() {
                    v.expected += 1;
                    match d.seen[n as usize] {
                        0 => {
                            v.lost += 1;
                            if v.lost_examples.len() < EXAMPLES {
                                v.lost_examples.push(TraceId { device, n });
                            }
                        }
                        1 => v.found += 1,
                        _ => {
                            v.found += 1;
                            v.duplicated += 1;
                            if v.duplicated_examples.len() < EXAMPLES {
                                v.duplicated_examples.push(TraceId { device, n });
                            }
                        }
                    }
                }
            }
            for r in d.unconfirmed.ranges() {
                for n in r.clone() {
                    match d.seen[n as usize] {
                        0 => {}
                        1 => v.unconfirmed_found += 1,
                        _ => {
                            v.unconfirmed_found += 1;
                            v.duplicated += 1;
                            if v.duplicated_examples.len() < EXAMPLES {
                                v.duplicated_examples.push(TraceId { device, n });
                            }
                        }
                    }
                }
            }
        }
        v
    }
}

/// The verdict as a table and a `RESULT` line.
pub fn render(v: &Verdict) -> String {
    let ex = |ids: &[TraceId]| ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    let ms = |q| v.latency(q).map_or("-".to_owned(), |x| x.to_string());
    let mut out = String::new();
    out.push_str("| | |\n|---|---:|\n");
    for (k, val) in [
        ("records read", v.records.to_string()),
        ("acknowledged messages expected", v.expected.to_string()),
        ("found exactly once", v.found.to_string()),
        ("lost", v.lost.to_string()),
        ("duplicated", v.duplicated.to_string()),
        ("unacknowledged but stored", v.unconfirmed_found.to_string()),
        ("not in the manifest / not ours / bad lines", format!("{} / {} / {}", v.unexpected, v.foreign, v.bad_lines)),
        (
            "latency publish → edge p50 / p90 / p99 / max, ms",
            format!("{} / {} / {} / {}", ms(0.5), ms(0.9), ms(0.99), ms(1.0)),
        ),
    ] {
        out.push_str(&format!("| {k} | {val} |\n"));
    }
    if !v.lost_examples.is_empty() {
        out.push_str(&format!("lost, first {}: {}\n", v.lost_examples.len(), ex(&v.lost_examples)));
    }
    if !v.duplicated_examples.is_empty() {
        out.push_str(&format!("duplicated, first {}: {}\n", v.duplicated_examples.len(), ex(&v.duplicated_examples)));
    }
    out.push_str(&format!(
        "RESULT records={} expected={} found={} lost={} duplicated={} unconfirmed_found={} unexpected={} foreign={} \
         bad_lines={} p50_ms={} p99_ms={}\n",
        v.records,
        v.expected,
        v.found,
        v.lost,
        v.duplicated,
        v.unconfirmed_found,
        v.unexpected,
        v.foreign,
        v.bad_lines,
        ms(0.5),
        ms(0.99)
    ));
    out
}

/// `loadgen verify` options.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// The manifest `loadgen mqtt --manifest` wrote.
    #[arg(long)]
    pub manifest: std::path::PathBuf,
    /// NDJSON records to check: a file, or `-` for stdin. Without it, the command after `--`
    /// is run and its stdout read (e.g. `-- core-ingest read --config core.toml --stream cdr`).
    #[arg(long)]
    pub records: Option<std::path::PathBuf>,
    /// The command whose stdout is the records.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `loadgen verify`: exit status 1 (a failure returned) on any loss or duplicate.
pub fn run(args: VerifyArgs) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(&args.manifest).with_context(|| format!("reading {}", args.manifest.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{}: not a loadgen manifest", args.manifest.display()))?;
    let mut verifier = Verifier::new(&manifest).with_context(|| args.manifest.display().to_string())?;
    match (&args.records, args.command.split_first()) {
        (Some(p), _) if p.as_os_str() == "-" => verifier.read(std::io::stdin().lock())?,
        (Some(p), _) => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            verifier.read(std::io::BufReader::new(f))?;
        }
        (None, Some((exe, rest))) => {
            let mut child = std::process::Command::new(exe)
                .args(rest)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("running {exe}"))?;
            let out = child.stdout.take().expect("piped");
            verifier.read(std::io::BufReader::new(out))?;
            let status = child.wait()?;
            anyhow::ensure!(status.success(), "{exe} exited with {status}");
        }
        (None, None) => anyhow::bail!("give --records FILE (or -) or a command after --"),
    }
    let v = verifier.finish();
    print!("{}", render(&v));
    let mut failures = Vec::new();
    if v.lost > 0 {
        failures.push(format!("{} acknowledged messages lost", v.lost));
    }
    if v.duplicated > 0 {
        failures.push(format!("{} messages stored more than once", v.duplicated));
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{DeviceGen, Kind};

    fn manifest(devices: u32, acked: u64, unconfirmed: u64) -> Manifest {
        Manifest {
            seed: 1,
            devices: (0..devices)
                .map(|device| DeviceManifest {
                    device,
                    acked: vec![(0, acked)],
                    unconfirmed: if unconfirmed > 0 { vec![(acked, acked + unconfirmed)] } else { vec![] },
                })
                .collect(),
        }
    }

    /// Device `d`'s messages `ns` as read-API lines, stored 3 ms after sending.
    fn lines(kind: Kind, d: u32, ns: impl Iterator<Item = u64>) -> Vec<String> {
        let mut g = DeviceGen::new(kind, 1, d, 0);
        ns.map(|n| {
            let sent = 1_717_200_000_000 + n as i64 * 10;
            let p = g.payload(n, sent);
            serde_json::json!({
                "edge": "e1", "stream": "cdr", "seq": n, "ts": shared::ndjson::rfc3339_ms(sent + 3),
                "topic": "t", "payload": String::from_utf8(p).unwrap(), "attrs": {}
            })
            .to_string()
        })
        .collect()
    }

    fn verify(m: &Manifest, lines: &[String]) -> Verdict {
        let mut v = Verifier::new(m).unwrap();
        v.read(lines.join("\n").as_bytes()).unwrap();
        v.finish()
    }

    #[test]
    fn a_complete_run_passes_with_its_latency() {
        let m = manifest(2, 50, 0);
        let all: Vec<String> = (0..2).flat_map(|d| lines(Kind::Cdr, d, 0..50)).collect();
        let v = verify(&m, &all);
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.expected, v.found, v.records), (100, 100, 100));
        assert_eq!(v.latency(0.99), Some(3));
    }

    #[test]
    fn latencies_beyond_a_few_ms_are_kept() {
        let m = manifest(1, 3, 0);
        let mut v = Verifier::new(&m).unwrap();
        let mut g = DeviceGen::new(Kind::Cdr, 1, 0, 0);
        for (n, delay) in [(0u64, 5i64), (1, 250), (2, 90_000)] {
            let sent = 1_717_200_000_000 + n as i64;
            v.record(&g.payload(n, sent), Some(sent + delay));
        }
        let v = v.finish();
        assert_eq!(v.latency(0.0), Some(5));
        assert!((249..=251).contains(&v.latency(0.5).unwrap()));
        assert!(v.latency(1.0).unwrap() >= 89_900, "{:?}", v.latency(1.0));
    }

    #[test]
    fn an_injected_loss_is_caught_and_named() {
        let m = manifest(1, 50, 0);
        let mut all = lines(Kind::Senml, 0, 0..50);
        all.remove(17);
        let v = verify(&m, &all);
        assert!(!v.ok());
        assert_eq!((v.lost, v.found), (1, 49));
        assert_eq!(v.lost_examples, vec![TraceId { device: 0, n: 17 }]);
        assert!(render(&v).contains("lost=1"));
    }

    #[test]
    fn an_injected_duplicate_is_caught_and_named() {
        let m = manifest(1, 50, 0);
        let mut all = lines(Kind::Cdr, 0, 0..50);
        all.push(all[33].clone());
        let v = verify(&m, &all);
        assert!(!v.ok());
        assert_eq!((v.duplicated, v.lost, v.found), (1, 0, 50));
        assert_eq!(v.duplicated_examples, vec![TraceId { device: 0, n: 33 }]);
    }

    #[test]
    fn unacknowledged_messages_may_arrive_once_but_not_twice() {
        let m = manifest(1, 10, 5);
        let mut all = lines(Kind::Cdr, 0, 0..12);
        assert!(verify(&m, &all).ok());
        assert_eq!(verify(&m, &all).unconfirmed_found, 2);
        all.push(all[11].clone());
        assert_eq!(verify(&m, &all).duplicated, 1);
    }

    #[test]
    fn foreign_unexpected_and_bad_lines_are_counted_apart() {
        let m = manifest(1, 5, 0);
        let mut all = lines(Kind::Cdr, 0, 0..5);
        all.extend(lines(Kind::Cdr, 9, 0..2)); // a device not in the manifest
        all.extend(lines(Kind::Cdr, 0, 5..6)); // a message number beyond it
        all.push(r#"{"payload":"{\"x\":1}","ts":"2024-06-01T00:00:00.000Z"}"#.into());
        all.push(r#"{"payload_b64":"eyJ4IjoxfQ=="}"#.into());
        all.push("not json".into());
        all.push(r#"{"ts":"x"}"#.into());
        let v = verify(&m, &all);
        assert!(v.ok());
        assert_eq!((v.unexpected, v.foreign, v.bad_lines), (3, 2, 2));
    }

    #[test]
    fn bad_manifests_are_refused() {
        let mut m = manifest(1, 5, 0);
        m.devices[0].unconfirmed = vec![(3, 7)];
        assert!(Verifier::new(&m).unwrap_err().to_string().contains("both acked and unconfirmed"));
        let mut m = manifest(1, 5, 0);
        m.devices[0].acked = vec![(5, 5)];
        assert!(Verifier::new(&m).is_err());
        let mut m = manifest(1, 5, 0);
        m.devices[0].acked = vec![(0, MESSAGES_PER_DEVICE_MAX + 1)];
        assert!(Verifier::new(&m).unwrap_err().to_string().contains("above"));
        let mut m = manifest(1, 5, 0);
        m.devices.push(m.devices[0].clone());
        assert!(Verifier::new(&m).unwrap_err().to_string().contains("twice"));
    }
}
