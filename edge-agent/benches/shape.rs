//! Shaping cost: a typical CDR rule set beside plain decode + re-encode of the same records.
//!
//! Records: 20 000 synthetic JSON CDRs from `shared::synth::cdr_json` (seed `0x5ba9e`), about
//! 260 bytes each. Both cases run through the same [`Shaper`]:
//! - `plain`: JSON decode into typed fields, JSON re-encode, no rules;
//! - `rules`: decode, two CEL predicates (`drop` short voice calls, `drop` GSM SMS),
//!   `pseudonymise` IMSI, MSISDN and IMEI (HMAC-SHA-256), re-encode.
//!
//! - `rules_cel`: the same rule set with the predicates written so that they have no native
//!   form (`record.type in ["voice"]`), so every record goes through the CEL interpreter.
//!
//! Criterion measures each; then, so the two share the same conditions, they run interleaved
//! for `ROUNDS` rounds and the bench prints records/s per second of wall time and per second
//! on a CPU (`/proc/thread-self/schedstat`), and the ratio of the two costs.
//!
//! Run pinned to one core: `taskset -c 1 cargo bench -p edge-agent --bench shape`.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, black_box};
use edge_agent::config::PayloadFormatConfig;
use edge_agent::shape::Shaper;
use edge_agent::shape::config::{ShapeConfig, compile};
use edge_agent::shape::decode::Format;
use rand::SeedableRng;
use rand::rngs::SmallRng;

const RECORDS: u64 = 20_000;
const SEED: u64 = 0x5ba9e;
const ROUNDS: usize = 10;

const RULES: &str = r#"
[[rules]]
name = "short_voice"
kind = "drop"
when = 'record.type == "voice" && record.dur < 1.0'
[[rules]]
name = "gsm_sms"
kind = "drop"
when = 'record.type == "sms" && record.rat == "GSM"'
[[rules]]
name = "pii"
kind = "pseudonymise"
fields = ["imsi", "msisdn", "imei"]
key_env = "BH_BENCH_PII_KEY"
"#;

fn main() {
    // The key comes from a file (setting an environment variable is unsafe in edition 2024).
    let key_file = std::env::temp_dir().join(format!("bh-shape-bench-{}.key", std::process::id()));
    std::fs::write(&key_file, "bench-key-0123456789abcdef").expect("writing the bench key");
    let rules_text =
        RULES.replace("key_env = \"BH_BENCH_PII_KEY\"", &format!("key_file = {:?}", key_file.display().to_string()));
    let cfg: ShapeConfig = toml::from_str(&rules_text).expect("bench rules parse");
    let mut rules = compile("cdr", PayloadFormatConfig::Json, &cfg).expect("bench rules compile").expect("shaped");
    let cel_text = rules_text
        .replace(r#"record.type == "voice""#, r#"record.type in ["voice"]"#)
        .replace(r#"record.type == "sms""#, r#"record.type in ["sms"]"#);
    let cel_cfg: ShapeConfig = toml::from_str(&cel_text).expect("bench rules parse");
    let mut rules_cel = compile("cdr", PayloadFormatConfig::Json, &cel_cfg).expect("compile").expect("shaped");
    let mut plain = Shaper::new(Format::Json, 10_000, Vec::new());
    let _ = std::fs::remove_file(&key_file);

    let mut rng = SmallRng::seed_from_u64(SEED);
    let payloads: Vec<(String, Vec<u8>)> =
        (0..RECORDS).map(|i| (shared::synth::cdr_topic(i), shared::synth::cdr_json(&mut rng, i))).collect();
    let bytes: usize = payloads.iter().map(|(_, p)| p.len()).sum();

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut g = c.benchmark_group("shape_cdr_json");
    g.throughput(Throughput::Elements(RECORDS));
    g.bench_function("plain", |b| b.iter(|| pass(&mut plain, &payloads)));
    g.bench_function("rules", |b| b.iter(|| pass(&mut rules, &payloads)));
    g.bench_function("rules_cel", |b| b.iter(|| pass(&mut rules_cel, &payloads)));
    g.finish();
    c.final_summary();

    let (mut p, mut r, mut rc) = (Tally::default(), Tally::default(), Tally::default());
    let (mut kept, mut kept_cel) = (0, 0);
    for _ in 0..ROUNDS {
        p.add(|| pass(&mut plain, &payloads));
        r.add(|| {
            kept = pass(&mut rules, &payloads);
            kept
        });
        rc.add(|| {
            kept_cel = pass(&mut rules_cel, &payloads);
            kept_cel
        });
    }
    assert_eq!(kept, kept_cel, "both rule sets keep the same records");
    println!();
    println!("shape bench: {RECORDS} CDRs ({} B avg), {ROUNDS} interleaved rounds each", bytes / RECORDS as usize);
    println!("| case | records/s (wall) | records/s per CPU-second | CPU / wall | records out |");
    println!("|---|---:|---:|---:|---:|");
    println!("| plain: decode + re-encode | {:.0} | {:.0} | {:.2} | {RECORDS} |", p.per_wall(), p.per_cpu(), p.share());
    println!(
        "| rules: decode, 2 predicates, pseudonymise 3 fields, re-encode | {:.0} | {:.0} | {:.2} | {kept} |",
        r.per_wall(),
        r.per_cpu(),
        r.share()
    );
    println!(
        "| rules_cel: the same, predicates through the CEL interpreter | {:.0} | {:.0} | {:.2} | {kept_cel} |",
        rc.per_wall(),
        rc.per_cpu(),
        rc.share()
    );
    println!("rules cost / plain cost (CPU): {:.2}x (target <= 2x)", p.per_cpu() / r.per_cpu());
    println!("rules_cel cost / plain cost (CPU): {:.2}x", p.per_cpu() / rc.per_cpu());
}

/// Shapes every payload once; the number of records that came out.
fn pass(s: &mut Shaper, payloads: &[(String, Vec<u8>)]) -> usize {
    let mut n = 0;
    for (i, (topic, p)) in payloads.iter().enumerate() {
        let out = s.handle(i as i64, topic, p);
        n += black_box(out).records.len();
    }
    n
}

#[derive(Default)]
struct Tally {
    records: u64,
    wall: Duration,
    cpu_ns: u64,
}

impl Tally {
    fn add(&mut self, f: impl FnOnce() -> usize) {
        let (t0, c0) = (Instant::now(), cpu_ns());
        black_box(f());
        self.wall += t0.elapsed();
        self.cpu_ns += cpu_ns().saturating_sub(c0);
        self.records += RECORDS;
    }
    fn per_wall(&self) -> f64 {
        self.records as f64 / self.wall.as_secs_f64()
    }
    fn share(&self) -> f64 {
        self.cpu_ns as f64 / self.wall.as_nanos() as f64
    }
    fn per_cpu(&self) -> f64 {
        if self.cpu_ns == 0 { self.per_wall() } else { self.records as f64 / (self.cpu_ns as f64 / 1e9) }
    }
}

/// Nanoseconds this thread has run on a CPU; 0 where unavailable.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
