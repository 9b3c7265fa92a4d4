//! CPU per GB stored with the log's direct IO on and off (`LogConfig::direct_io`), the same
//! batches through the same `Log` in the same run: the figure that made the core switch.
//!
//! Each case appends groups of about-64 KiB batches and syncs once per group (group commit as
//! the core's store does it), in four phases: buffered, direct, direct, buffered, each half the
//! bytes of a mode, so both meet the same disk (its speed drifts with whatever else runs). Not
//! group by group: a direct log's fdatasync right after a buffered log's writes pays for some
//! of them (one ext4 journal), which doubled the direct figures in a first version. Per mode it prints MB/s (10^6 B of frames) and
//! CPU seconds per GB of the appending thread: on-CPU time from `/proc/thread-self/schedstat`
//! (nanoseconds), split into user and system in the ratio of the tick counts of
//! `/proc/thread-self/stat`, as `getrusage` does. Page writeback that kernel threads do on
//! their own is not in it, which favours buffered writes.
//! Segments roll at 128 MiB as in the core and are removed once closed, so disk use stays small.
//!
//! Not criterion: the figure is CPU per byte, not a latency distribution. The kernel's share,
//! the one that matters here, does not depend on the build profile, so a debug build will do:
//! `cargo bench -p backhaul-shared --bench log_direct --profile dev` (`LOG_DIRECT_MB=N`: MB per
//! mode and case, default 1024). Files go under `CARGO_TARGET_TMPDIR`, which must not be tmpfs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shared::batch::{Batch, BatchEncoder, BatchLimits, Compression, PayloadFormat, Record};
use shared::log::segment::FRAME_HEADER_LEN;
use shared::log::storage::FsStorage;
use shared::log::{FsyncPolicy, Log, LogConfig};
use shared::synth;

/// The cases: (target stored bytes of a batch, batches per sync). About 1 MiB per fsync as in a
/// busy round of the core's store, with the edges' 64 KiB batches and with small ones (~10 KB,
/// as in the first measurement with a Python peer); and a quiet round of one batch per fsync.
const CASES: [(usize, usize); 3] = [(64 << 10, 16), (12 << 10, 100), (64 << 10, 1)];
/// The core's default segment size.
const SEGMENT_BYTES_MAX: u64 = 128 << 20;

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let mb: u64 = std::env::var("LOG_DIRECT_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).expect("create the bench's temp root");
    println!("\n{mb} MB per mode and case; uncompressed CDR batches; files under {}", root.display());
    println!("\n| batch B | batches per sync | mode | MB | MB/s | user s/GB | sys s/GB | CPU s/GB |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for (batch_bytes, group) in CASES {
        let batch = cdr_batch(batch_bytes);
        let frame = (FRAME_HEADER_LEN + batch.bytes().len()) as u64;
        let rounds = (mb * 1_000_000).div_ceil(2 * frame * group as u64);
        let mut sinks = [Sink::open(root, false), Sink::open(root, true)];
        assert!(sinks[1].log.is_direct_io(), "{} refuses O_DIRECT: nothing to compare", root.display());
        for mode in [0, 1, 1, 0] {
            for _ in 0..rounds {
                sinks[mode].group(&batch, group);
            }
        }
        let rounds = 2 * rounds;
        for (sink, mode) in sinks.iter().zip(["buffered", "direct"]) {
            let gb = (rounds * group as u64 * frame) as f64 / 1e9;
            let (user, sys) = sink.cpu.split_s();
            println!(
                "| {} | {group} | {mode} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} |",
                batch.bytes().len(),
                gb * 1e3,
                gb * 1e3 / sink.cpu.wall.as_secs_f64(),
                user / gb,
                sys / gb,
                (user + sys) / gb
            );
        }
    }
}

/// One log and the time spent in its appends and syncs.
struct Sink {
    log: Log,
    cpu: Spent,
    _dir: tempfile::TempDir,
}

impl Sink {
    fn open(root: &Path, direct_io: bool) -> Sink {
        let dir = tempfile::Builder::new().prefix("log-direct-").tempdir_in(root).expect("create temp dir");
        let config = LogConfig {
            segment_bytes_max: SEGMENT_BYTES_MAX,
            fsync: FsyncPolicy::Interval { interval_ms: 0 },
            direct_io,
            ..LogConfig::default()
        };
        let log = Log::open(Arc::new(FsStorage), &dir.path().join("cdr"), config, synth::START_MS).expect("open log");
        Sink { log, cpu: Spent::default(), _dir: dir }
    }

    /// Appends `n` batches and syncs; then (untimed) removes closed segments.
    fn group(&mut self, batch: &Batch, n: usize) {
        let start = Stat::now();
        for _ in 0..n {
            self.log.append(batch, synth::START_MS).expect("append");
        }
        self.log.sync().expect("sync");
        self.cpu.add(&start, &Stat::now());
        self.log.release_below(self.log.next_offset());
        self.log.apply_retention(synth::START_MS).expect("remove closed segments");
    }
}

#[derive(Default)]
struct Spent {
    wall: Duration,
    cpu_ns: u64,
    user_ticks: u64,
    sys_ticks: u64,
}

impl Spent {
    fn add(&mut self, from: &Stat, to: &Stat) {
        self.wall += to.at - from.at;
        self.cpu_ns += to.cpu_ns - from.cpu_ns;
        self.user_ticks += to.user_ticks - from.user_ticks;
        self.sys_ticks += to.sys_ticks - from.sys_ticks;
    }

    /// User and system CPU seconds.
    fn split_s(&self) -> (f64, f64) {
        let cpu_s = self.cpu_ns as f64 / 1e9;
        let ticks = (self.user_ticks + self.sys_ticks) as f64;
        if ticks == 0.0 {
            return (cpu_s, 0.0);
        }
        (cpu_s * self.user_ticks as f64 / ticks, cpu_s * self.sys_ticks as f64 / ticks)
    }
}

/// The calling thread's CPU time so far.
struct Stat {
    at: Instant,
    cpu_ns: u64,
    user_ticks: u64,
    sys_ticks: u64,
}

impl Stat {
    fn now() -> Stat {
        let text = std::fs::read_to_string("/proc/thread-self/stat").expect("read /proc/thread-self/stat");
        // Fields after the command name (which may hold spaces) end with ')': utime and stime
        // are fields 14 and 15 of the line, 12 and 13 after it.
        let rest = &text[text.rfind(')').expect("stat has a command name") + 2..];
        let fields: Vec<u64> = rest.split_whitespace().skip(11).take(2).map(|f| f.parse().expect("a number")).collect();
        let sched = std::fs::read_to_string("/proc/thread-self/schedstat").expect("read /proc/thread-self/schedstat");
        let cpu_ns = sched.split_whitespace().next().and_then(|f| f.parse().ok()).expect("on-CPU ns");
        Stat { at: Instant::now(), cpu_ns, user_ticks: fields[0], sys_ticks: fields[1] }
    }
}

/// An uncompressed batch of synthetic CDRs of about `bytes` (uncompressed so that building it
/// stays quick in a debug build; the log sees only bytes).
fn cdr_batch(bytes: usize) -> Batch {
    let mut rng = SmallRng::seed_from_u64(0x0bac_4a03);
    let mut records = Vec::new();
    let mut size = 0;
    for i in 0u64.. {
        let payload = synth::cdr_json(&mut rng, i);
        size += payload.len() + 64;
        if size > bytes - 1024 {
            break;
        }
        records.push(Record {
            ts_ms: synth::ts_ms(i),
            topic: synth::cdr_topic(i),
            payload: payload.into(),
            attrs: vec![],
        });
    }
    let meta = synth::batch_meta(PayloadFormat::Json);
    let mut out = BytesMut::new();
    BatchEncoder::new(Compression::None).expect("no compression").encode(&meta, &records, &mut out).expect("encode");
    Batch::from_bytes(out.freeze(), &BatchLimits::default()).expect("own batch")
}
