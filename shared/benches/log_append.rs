//! `Log::append` throughput on the real file system under each fsync policy, beside plain
//! `std::fs::File` writes of the same bytes with the same fsyncs.
//!
//! One iteration appends a group of [`GROUP`] batches of about 64 KiB (zstd-1 CDR batches, as
//! the batcher makes them) and then:
//! - `always`: the log fsyncs every append (`FsyncPolicy::Always`); the peer calls `sync_data`
//!   after every `write_all`;
//! - `interval`: group commit, one `Log::sync` per group (the owner's timer would call it; here
//!   it is called every [`GROUP`] batches, 1 MiB); the peer calls `sync_data` once per group;
//! - `never`: no fsync (`FsyncPolicy::Never`; the log still fsyncs a segment when it rolls at
//!   64 MiB, the default); the peer never calls `sync_data`.
//!
//! The peer writes exactly the log's bytes per append: frame header plus batch. Each criterion
//! sample starts from a new, empty log directory (or file) under `CARGO_TARGET_TMPDIR`, created
//! and removed outside the timed part. Throughput is MB/s (10^6 bytes) of batch bytes.
//!
//! fsync latency here drifts by several times from minute to minute (other work on the disk),
//! so log and file measured one after the other can differ for that reason alone. After
//! criterion, an interleaved pass alternates log and file groups for a few seconds per policy
//! and prints their ratio, which that drift moves much less.
//!
//! Run pinned to one core: `taskset -c 1 cargo bench -p backhaul-shared --bench log_append`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shared::batch::{Attr, Batch, BatchBuilder, BatchEncoder, BatchLimits, Compression, PayloadFormat, attr};
use shared::log::segment::FRAME_HEADER_LEN;
use shared::log::storage::FsStorage;
use shared::log::{FsyncPolicy, Log, LogConfig};
use shared::synth;
use tempfile::TempDir;

/// Target stored size of one batch.
const BATCH_BYTES: usize = 64 << 10;
/// Batches per iteration, and per group commit under `interval`.
const GROUP: usize = 16;
const SAMPLE_SIZE: usize = 10;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(3);
/// How long the interleaved pass runs per policy.
const PAIRED_TIME: Duration = Duration::from_secs(3);
/// At most this many rounds (of one log and one file group) per policy: 1 GiB per file.
const PAIRED_ROUNDS_MAX: u64 = 1024;

#[derive(Clone, Copy)]
enum Policy {
    Always,
    Interval,
    Never,
}

const POLICIES: [(&str, Policy); 3] =
    [("always", Policy::Always), ("interval", Policy::Interval), ("never", Policy::Never)];

fn main() {
    let batch = cdr_batch();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).expect("create the bench's temp root");
    eprintln!(
        "\nbatch: {} bytes stored ({} CDRs, zstd 1), frame {} bytes; {GROUP} batches per iteration; files under {}",
        batch.bytes().len(),
        batch.header().record_count,
        FRAME_HEADER_LEN + batch.bytes().len(),
        root.display(),
    );
    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .configure_from_args();
    let samples = Samples::default();
    let mut group = c.benchmark_group("log_append/64KiB");
    group.sampling_mode(SamplingMode::Flat).throughput(Throughput::BytesDecimal((GROUP * batch.bytes().len()) as u64));
    for (name, policy) in POLICIES {
        let key = format!("log/{name}");
        group.bench_function(BenchmarkId::new("log", name), |b| {
            b.iter_custom(|iters| samples.record(&key, iters, append_log(&root, &batch, policy, iters)));
        });
        let key = format!("file/{name}");
        group.bench_function(BenchmarkId::new("file", name), |b| {
            b.iter_custom(|iters| samples.record(&key, iters, write_file(&root, &batch, policy, iters)));
        });
    }
    group.finish();
    c.final_summary();
    print_summary(&samples, batch.bytes().len());
    // Only after a full run (not under `--test`, `--list` or a filter).
    let full =
        samples.0.borrow().len() == 2 * POLICIES.len() && samples.0.borrow().values().all(|v| v.len() >= SAMPLE_SIZE);
    if full {
        print_paired(&root, &batch);
    }
}

/// A zstd-1 batch of synthetic CDRs whose stored size is just under [`BATCH_BYTES`].
fn cdr_batch() -> Batch {
    let mut rng = SmallRng::seed_from_u64(0x0bac_4a02);
    let records: Vec<(String, Vec<u8>, Vec<Attr>)> = (0..20_000u64)
        .map(|i| {
            let attrs = vec![Attr { key: attr::MQTT_PACKET_ID.into(), value: (i % 65_535 + 1).to_string() }];
            (synth::cdr_topic(i), synth::cdr_json(&mut rng, i), attrs)
        })
        .collect();
    let encode = |n: usize| {
        let mut builder = BatchBuilder::new();
        for (i, (topic, payload, attrs)) in records.iter().take(n).enumerate() {
            builder.push(synth::ts_ms(i as u64), topic, payload, attrs).expect("synthetic records are within bounds");
        }
        let meta = synth::batch_meta(PayloadFormat::Json);
        let mut out = BytesMut::new();
        let mut encoder = BatchEncoder::new(Compression::Zstd { level: 1 }).expect("valid level");
        encoder.finish(&mut builder, &meta, &mut out).expect("a non-empty builder encodes");
        Batch::from_bytes(out.freeze(), &BatchLimits::default()).expect("own batch")
    };
    // The largest record count that stays under the target (stored size grows with the count).
    let (mut lo, mut hi) = (1, records.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if encode(mid).bytes().len() <= BATCH_BYTES { lo = mid } else { hi = mid - 1 }
    }
    encode(lo)
}

/// A new log under `root`, removed on drop.
struct LogSink {
    log: Log,
    policy: Policy,
    _dir: TempDir,
}

impl LogSink {
    fn open(root: &Path, policy: Policy) -> Self {
        let dir = tempfile::Builder::new().prefix("log-append-").tempdir_in(root).expect("create temp dir");
        let fsync = match policy {
            Policy::Always => FsyncPolicy::Always,
            Policy::Interval => FsyncPolicy::Interval { interval_ms: 5 },
            Policy::Never => FsyncPolicy::Never,
        };
        let config = LogConfig { fsync, ..LogConfig::default() };
        let log = Log::open(Arc::new(FsStorage), &dir.path().join("cdr"), config, synth::START_MS).expect("open log");
        LogSink { log, policy, _dir: dir }
    }

    /// Appends one group; under `interval` the owner's sync closes it.
    fn group(&mut self, batch: &Batch) {
        for _ in 0..GROUP {
            self.log.append(batch, synth::START_MS).expect("append");
        }
        if let Policy::Interval = self.policy {
            self.log.sync().expect("sync");
        }
    }
}

/// A new file under `root`, written with plain `std::fs`, removed on drop.
struct FileSink {
    file: File,
    frame: Vec<u8>,
    policy: Policy,
    _dir: TempDir,
}

impl FileSink {
    fn open(root: &Path, batch: &Batch, policy: Policy) -> Self {
        let dir = tempfile::Builder::new().prefix("file-append-").tempdir_in(root).expect("create temp dir");
        // The log's bytes: a frame header (zeros here) and the batch.
        let mut frame = vec![0u8; FRAME_HEADER_LEN];
        frame.extend_from_slice(batch.bytes());
        // Created and made durable as the log makes its segment.
        let file = OpenOptions::new().create(true).append(true).open(dir.path().join("segment")).expect("create file");
        file.sync_all().expect("fsync file");
        File::open(dir.path()).and_then(|d| d.sync_all()).expect("fsync directory");
        FileSink { file, frame, policy, _dir: dir }
    }

    fn group(&mut self) {
        for _ in 0..GROUP {
            self.file.write_all(&self.frame).expect("write");
            if let Policy::Always = self.policy {
                self.file.sync_data().expect("fsync");
            }
        }
        if let Policy::Interval = self.policy {
            self.file.sync_data().expect("fsync");
        }
    }
}

/// Appends `iters` groups to a new log; times the appends and syncs only.
fn append_log(root: &Path, batch: &Batch, policy: Policy, iters: u64) -> Timed {
    let mut sink = LogSink::open(root, policy);
    let timer = Timer::start();
    for _ in 0..iters {
        sink.group(batch);
    }
    timer.stop()
}

/// Writes `iters` groups of the log's bytes to a new file; times the writes and syncs only.
fn write_file(root: &Path, batch: &Batch, policy: Policy, iters: u64) -> Timed {
    let mut sink = FileSink::open(root, batch, policy);
    let timer = Timer::start();
    for _ in 0..iters {
        sink.group();
    }
    timer.stop()
}

/// Log and file groups interleaved (log, file, file, log, …) for [`PAIRED_TIME`], so both
/// meet the same disk: its speed drifts with whatever else runs (2–10× between runs here).
fn paired(root: &Path, batch: &Batch, policy: Policy) -> (u64, Timed, Timed) {
    let (mut log, mut file) = (LogSink::open(root, policy), FileSink::open(root, batch, policy));
    let (mut log_t, mut file_t) = (Timed::default(), Timed::default());
    let start = Instant::now();
    let mut rounds = 0;
    while (start.elapsed() < PAIRED_TIME || rounds < 4) && rounds < PAIRED_ROUNDS_MAX {
        for step in 0..2 {
            if (rounds + step).is_multiple_of(2) {
                let t = Timer::start();
                log.group(batch);
                log_t += t.stop();
            } else {
                let t = Timer::start();
                file.group();
                file_t += t.stop();
            }
        }
        rounds += 1;
    }
    (rounds, log_t, file_t)
}

fn print_summary(samples: &Samples, batch_len: usize) {
    let mut rows = Vec::new();
    for (name, policy) in POLICIES {
        let (Some(log), Some(file)) = (samples.rate(&format!("log/{name}")), samples.rate(&format!("file/{name}")))
        else {
            continue;
        };
        let mbs = |r: Rate| r.per_s * (GROUP * batch_len) as f64 / 1e6;
        let fsyncs = match policy {
            Policy::Always => GROUP.to_string(),
            Policy::Interval => "1".to_owned(),
            Policy::Never => "0".to_owned(),
        };
        rows.push(format!(
            "| {name} | {fsyncs} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} |",
            mbs(log),
            log.per_s * GROUP as f64,
            mbs(file),
            file.per_s * GROUP as f64,
            log.per_s / file.per_s,
            log.cpu_share,
            file.cpu_share,
        ));
    }
    if rows.is_empty() {
        return;
    }
    println!("\n## Summary (over criterion's {SAMPLE_SIZE} measurement samples; MB = 10^6 B of batch bytes)\n");
    println!(
        "| policy | fsyncs per {GROUP} batches | log MB/s | log batches/s | file MB/s | file batches/s | log / file \
         | log CPU / wall | file CPU / wall |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
}

fn print_paired(root: &Path, batch: &Batch) {
    let group_bytes = (GROUP * batch.bytes().len()) as f64;
    println!(
        "\n## Interleaved: log and file groups alternating (log, file, file, log, ...) for {} s per policy\n",
        PAIRED_TIME.as_secs()
    );
    println!("| policy | rounds | log MB/s | file MB/s | log / file | log CPU / wall | file CPU / wall |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, policy) in POLICIES {
        let (rounds, log, file) = paired(root, batch, policy);
        let mbs = |t: Timed| rounds as f64 * group_bytes / t.wall.as_secs_f64() / 1e6;
        let share = |t: Timed| t.cpu_ns as f64 / t.wall.as_nanos() as f64;
        println!(
            "| {name} | {rounds} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
            mbs(log),
            mbs(file),
            file.wall.as_secs_f64() / log.wall.as_secs_f64(),
            share(log),
            share(file),
        );
    }
}

/// Iterations and times of every call criterion made, per benchmark.
#[derive(Default)]
struct Samples(RefCell<BTreeMap<String, Vec<Sample>>>);

#[derive(Clone, Copy)]
struct Sample {
    iters: u64,
    wall: Duration,
    cpu_ns: u64,
}

#[derive(Clone, Copy)]
struct Rate {
    /// Iterations per second.
    per_s: f64,
    /// On-CPU time over wall time.
    cpu_share: f64,
}

impl Samples {
    /// Records one call of criterion's: `iters` iterations took `timed`; returns its wall time.
    fn record(&self, key: &str, iters: u64, timed: Timed) -> Duration {
        let sample = Sample { iters, wall: timed.wall, cpu_ns: timed.cpu_ns };
        self.0.borrow_mut().entry(key.to_owned()).or_default().push(sample);
        timed.wall
    }

    /// The rate over the last `SAMPLE_SIZE` calls: criterion's measurement (the calls before
    /// them are its warm-up). `None` if the benchmark did not run in full (filtered, `--test`).
    fn rate(&self, key: &str) -> Option<Rate> {
        let map = self.0.borrow();
        let all = map.get(key)?;
        let measured = all.get(all.len().checked_sub(SAMPLE_SIZE)?..)?;
        let iters: u64 = measured.iter().map(|s| s.iters).sum();
        let wall: Duration = measured.iter().map(|s| s.wall).sum();
        let cpu: u64 = measured.iter().map(|s| s.cpu_ns).sum();
        Some(Rate { per_s: iters as f64 / wall.as_secs_f64(), cpu_share: cpu as f64 / wall.as_nanos() as f64 })
    }
}

/// Wall and CPU time of a timed part.
struct Timer {
    wall: Instant,
    cpu_ns: u64,
}

#[derive(Clone, Copy, Default)]
struct Timed {
    wall: Duration,
    cpu_ns: u64,
}

impl std::ops::AddAssign for Timed {
    fn add_assign(&mut self, other: Timed) {
        self.wall += other.wall;
        self.cpu_ns += other.cpu_ns;
    }
}

impl Timer {
    fn start() -> Self {
        Timer { cpu_ns: cpu_ns(), wall: Instant::now() }
    }

    fn stop(self) -> Timed {
        let wall = self.wall.elapsed();
        Timed { wall, cpu_ns: cpu_ns().saturating_sub(self.cpu_ns) }
    }
}

/// Nanoseconds the bench thread (the only one) has run on a CPU, from `/proc/self/schedstat`;
/// 0 where that is unavailable.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
