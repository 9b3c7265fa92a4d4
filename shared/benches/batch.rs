//! Batch codec throughput, beside plain zstd on the same bytes.
//!
//! For each payload (synthetic CDR JSON, SenML), batch size (16 KiB, 64 KiB, 1 MiB of payload
//! bytes) and codec (none, zstd 1, zstd 3):
//! - `encode`: `BatchBuilder::push` of every record (topic, payload, MQTT client id and packet
//!   id, as the agent keeps them) and `BatchEncoder::finish` (compress, header, CRCs);
//! - `decode`: `Batch::from_bytes` (both CRCs) and `Batch::records` (decompress, parse);
//! - the peer, `zstd_compress` / `zstd_decompress`: zstd's bulk API at the same level on the
//!   payloads concatenated, context reused as the encoder reuses its own.
//!
//! Throughput is MB/s (10^6 bytes) of payload bytes, the same count for the batch and its peer.
//! The compression ratios are printed first; tables of MB/s, records/s and the ratio to the peer
//! are printed last, computed from criterion's own measurement samples, both per second of wall
//! time and per second on a CPU (what one core gives when the machine is shared).
//!
//! Run pinned to one core: `taskset -c 1 cargo bench -p backhaul-shared --bench batch`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, black_box};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shared::batch::{Attr, Batch, BatchBuilder, BatchEncoder, BatchLimits, Compression, PayloadFormat, attr};
use shared::synth;

/// Payload bytes per batch.
const BATCH_SIZES: [(&str, usize); 3] = [("16KiB", 16 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)];
const CODECS: [(&str, Compression); 3] =
    [("none", Compression::None), ("zstd1", Compression::Zstd { level: 1 }), ("zstd3", Compression::Zstd { level: 3 })];
const SAMPLE_SIZE: usize = 20;
const WARM_UP: Duration = Duration::from_millis(500);
const MEASUREMENT: Duration = Duration::from_millis(1500);
const SEED: u64 = 0x0bac_4a01;

fn main() {
    let cases = cases();
    print_ratios(&cases);
    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .configure_from_args();
    let samples = Samples::default();
    for case in &cases {
        bench_case(&mut c, case, &samples);
    }
    c.final_summary();
    print_summary(&cases, &samples);
}

/// One payload kind at one batch size: the records and the peer's concatenated payloads.
struct Case {
    payload: &'static str,
    size: &'static str,
    format: PayloadFormat,
    records: Vec<Input>,
    payload_bytes: usize,
    concat: Vec<u8>,
}

struct Input {
    ts_ms: i64,
    topic: String,
    payload: Vec<u8>,
    attrs: Vec<Attr>,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (payload, format) in [("cdr", PayloadFormat::Json), ("senml", PayloadFormat::Senml)] {
        for (size, bytes) in BATCH_SIZES {
            out.push(make_case(payload, format, size, bytes));
        }
    }
    out
}

fn make_case(payload: &'static str, format: PayloadFormat, size: &'static str, bytes: usize) -> Case {
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut records = Vec::new();
    let mut concat = Vec::with_capacity(bytes);
    for i in 0.. {
        let (topic, body) = match format {
            PayloadFormat::Json => (synth::cdr_topic(i), synth::cdr_json(&mut rng, i)),
            _ => (synth::sensor_topic(i), synth::senml(&mut rng, i)),
        };
        if concat.len() + body.len() > bytes {
            break;
        }
        concat.extend_from_slice(&body);
        let client = topic.rsplit('/').next().unwrap_or_default().to_owned();
        let attrs = vec![
            Attr { key: attr::MQTT_CLIENT.into(), value: client },
            Attr { key: attr::MQTT_PACKET_ID.into(), value: (i % 65_535 + 1).to_string() },
        ];
        records.push(Input { ts_ms: synth::ts_ms(i), topic, payload: body, attrs });
    }
    Case { payload, size, format, records, payload_bytes: concat.len(), concat }
}

fn encode(case: &Case, encoder: &mut BatchEncoder, builder: &mut BatchBuilder, out: &mut BytesMut) {
    out.clear();
    for r in &case.records {
        builder.push(r.ts_ms, &r.topic, &r.payload, &r.attrs).expect("synthetic records are within bounds");
    }
    encoder.finish(builder, &synth::batch_meta(case.format), out).expect("a non-empty builder encodes");
}

fn encoded(case: &Case, compression: Compression) -> Bytes {
    let mut out = BytesMut::new();
    let mut encoder = BatchEncoder::new(compression).expect("valid level");
    encode(case, &mut encoder, &mut BatchBuilder::new(), &mut out);
    out.freeze()
}

/// Stored bytes of the batch without the per-record MQTT attributes: what they cost.
fn encoded_len_without_attrs(case: &Case, compression: Compression) -> usize {
    let mut builder = BatchBuilder::new();
    for r in &case.records {
        builder.push(r.ts_ms, &r.topic, &r.payload, &[]).expect("synthetic records are within bounds");
    }
    let mut out = BytesMut::new();
    let mut encoder = BatchEncoder::new(compression).expect("valid level");
    encoder.finish(&mut builder, &synth::batch_meta(case.format), &mut out).expect("a non-empty builder encodes");
    out.len()
}

/// Stored bytes of the batch with its payloads column plain (not shredded).
fn encoded_len_unshredded(case: &Case, compression: Compression) -> usize {
    let mut out = BytesMut::new();
    let mut encoder = BatchEncoder::new(compression).expect("valid level");
    encoder.set_shred(false);
    encode(case, &mut encoder, &mut BatchBuilder::new(), &mut out);
    out.len()
}

fn raw_body_len(case: &Case) -> usize {
    encoded(case, Compression::None).len() - header_len(case)
}

fn header_len(case: &Case) -> usize {
    let batch = Batch::from_bytes(encoded(case, Compression::None), &BatchLimits::default()).expect("own batch");
    usize::from(batch.header().header_len)
}

fn bench_case(c: &mut Criterion, case: &Case, samples: &Samples) {
    let mut group = c.benchmark_group(format!("batch/{}/{}", case.payload, case.size));
    group.throughput(Throughput::BytesDecimal(case.payload_bytes as u64));
    let limits = BatchLimits::default();
    for (codec, compression) in CODECS {
        let mut encoder = BatchEncoder::new(compression).expect("valid level");
        let (mut builder, mut out) = (BatchBuilder::new(), BytesMut::new());
        let key = Samples::key_of(case, "encode", codec);
        group.bench_function(BenchmarkId::new("encode", codec), |b| {
            b.iter_custom(|iters| samples.time(&key, iters, || encode(case, &mut encoder, &mut builder, &mut out)));
        });
        let batch = encoded(case, compression);
        let key = Samples::key_of(case, "decode", codec);
        group.bench_function(BenchmarkId::new("decode", codec), |b| {
            b.iter_custom(|iters| {
                samples.time(&key, iters, || {
                    let batch = Batch::from_bytes(batch.clone(), &limits).expect("own batch");
                    black_box(batch.records().expect("own records"));
                })
            });
        });
        let Compression::Zstd { level } = compression else { continue };
        let mut zc = zstd::bulk::Compressor::new(level).expect("valid level");
        let mut zbuf = Vec::with_capacity(zstd::zstd_safe::compress_bound(case.concat.len()));
        let key = Samples::key_of(case, "zstd_compress", codec);
        group.bench_function(BenchmarkId::new("zstd_compress", codec), |b| {
            b.iter_custom(|iters| {
                samples.time(&key, iters, || {
                    zbuf.clear();
                    black_box(zc.compress_to_buffer(&case.concat, &mut zbuf).expect("bound reserved"));
                })
            });
        });
        let mut zd = zstd::bulk::Decompressor::new().expect("zstd context");
        let mut plain = Vec::with_capacity(case.concat.len());
        let key = Samples::key_of(case, "zstd_decompress", codec);
        group.bench_function(BenchmarkId::new("zstd_decompress", codec), |b| {
            b.iter_custom(|iters| {
                samples.time(&key, iters, || {
                    plain.clear();
                    black_box(zd.decompress_to_buffer(&zbuf, &mut plain).expect("own frame"));
                })
            });
        });
    }
    group.finish();
}

/// Compression ratios: payload bytes over the stored batch (header included), and over plain
/// zstd of the concatenated payloads.
fn print_ratios(cases: &[Case]) {
    eprintln!("\n## Compression ratios (ratio: payload bytes / stored batch bytes, header included)\n");
    eprintln!(
        "| payload | batch | records | payload B | raw body B | codec | batch B | ratio | raw body / batch \
         | batch B without attrs | batch B unshredded | ratio unshredded | zstd B | zstd ratio | batch / zstd size |"
    );
    eprintln!("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for case in cases {
        let raw_body = raw_body_len(case);
        for (codec, compression) in CODECS {
            let batch = encoded(case, compression).len();
            let ratio = case.payload_bytes as f64 / batch as f64;
            let peer = match compression {
                Compression::None => None,
                Compression::Zstd { level } => {
                    Some(zstd::bulk::compress(&case.concat, level).expect("zstd compresses").len())
                }
            };
            let (peer_b, peer_ratio, vs) = match peer {
                None => ("—".to_owned(), "—".to_owned(), "—".to_owned()),
                Some(p) => (
                    p.to_string(),
                    format!("{:.2}", case.payload_bytes as f64 / p as f64),
                    format!("{:.3}", batch as f64 / p as f64),
                ),
            };
            let plain = encoded_len_unshredded(case, compression);
            eprintln!(
                "| {} | {} | {} | {} | {raw_body} | {codec} | {batch} | {ratio:.2} | {:.2} | {} | {plain} | {:.2} | {peer_b} | {peer_ratio} | {vs} |",
                case.payload,
                case.size,
                case.records.len(),
                case.payload_bytes,
                raw_body as f64 / batch as f64,
                encoded_len_without_attrs(case, compression),
                case.payload_bytes as f64 / plain as f64,
            );
        }
    }
    eprintln!();
}

fn print_summary(cases: &[Case], samples: &Samples) {
    for (own, peer, title) in [("encode", "zstd_compress", "Encode"), ("decode", "zstd_decompress", "Decode")] {
        let mut rows = Vec::new();
        for case in cases {
            for (codec, _) in CODECS {
                let Some(r) = samples.rate(&Samples::key_of(case, own, codec)) else { continue };
                let p = samples.rate(&Samples::key_of(case, peer, codec));
                let mbs = |per_s: f64| per_s * case.payload_bytes as f64 / 1e6;
                let peer_cols = p.map_or_else(
                    || "— | — | — | —".to_owned(),
                    |p| {
                        format!(
                            "{:.0} | {:.0} | {:.2} | {:.2}",
                            mbs(p.per_s),
                            mbs(p.per_cpu_s),
                            r.per_s / p.per_s,
                            r.per_cpu_s / p.per_cpu_s
                        )
                    },
                );
                rows.push(format!(
                    "| {} | {} | {codec} | {:.0} | {:.0} | {:.2} | {:.2} | {peer_cols} |",
                    case.payload,
                    case.size,
                    mbs(r.per_s),
                    mbs(r.per_cpu_s),
                    r.per_s * case.records.len() as f64 / 1e6,
                    r.per_s / r.per_cpu_s,
                ));
            }
        }
        if rows.is_empty() {
            continue;
        }
        println!(
            "\n## {title} (criterion's last {SAMPLE_SIZE} samples; MB = 10^6 B of payload; per CPU-s = over on-CPU time)\n"
        );
        println!(
            "| payload | batch | codec | {own} MB/s | {own} MB per CPU-s | {own} M rec/s | CPU / wall \
             | {peer} MB/s | {peer} MB per CPU-s | {own} / {peer} | same, per CPU-s |"
        );
        println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows {
            println!("{row}");
        }
    }
    println!("\nbench thread CPU time: {:.1} s", cpu_ns() as f64 / 1e9);
}

/// Iterations and times of every call criterion made, per benchmark.
#[derive(Default)]
struct Samples(RefCell<BTreeMap<String, Vec<Sample>>>);

#[derive(Clone, Copy)]
struct Sample {
    iters: u64,
    start: Instant,
    end: Instant,
    start_cpu_ns: u64,
    end_cpu_ns: u64,
}

#[derive(Clone, Copy)]
struct Rate {
    /// Iterations per second of wall time.
    per_s: f64,
    /// Iterations per second on a CPU: the rate a core would give if nothing else ran on it.
    per_cpu_s: f64,
}

impl Samples {
    fn key_of(case: &Case, op: &str, codec: &str) -> String {
        format!("{}/{}/{op}/{codec}", case.payload, case.size)
    }

    /// Runs `f` `iters` times and records when it started and ended, in wall and CPU time.
    fn time(&self, key: &str, iters: u64, mut f: impl FnMut()) -> Duration {
        let start_cpu_ns = cpu_ns();
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        let end = Instant::now();
        let end_cpu_ns = cpu_ns();
        let sample = Sample { iters, start, end, start_cpu_ns, end_cpu_ns };
        self.0.borrow_mut().entry(key.to_owned()).or_default().push(sample);
        end - start
    }

    /// The rate over the last `SAMPLE_SIZE` calls: criterion's measurement (the calls before
    /// them are its warm-up). `None` if the benchmark did not run in full (filtered, `--test`).
    fn rate(&self, key: &str) -> Option<Rate> {
        let map = self.0.borrow();
        let all = map.get(key)?;
        let measured = all.get(all.len().checked_sub(SAMPLE_SIZE)?..)?;
        let iters: u64 = measured.iter().map(|s| s.iters).sum();
        let wall: Duration = measured.iter().map(|s| s.end - s.start).sum();
        let per_s = iters as f64 / wall.as_secs_f64();
        // The CPU share over the whole measurement, first sample's start to last one's end:
        // schedstat lags by up to a scheduler tick, too coarse for one short sample.
        let (first, last) = (measured.first()?, measured.last()?);
        let cpu_share =
            last.end_cpu_ns.saturating_sub(first.start_cpu_ns) as f64 / (last.end - first.start).as_nanos() as f64;
        Some(Rate { per_s, per_cpu_s: per_s / cpu_share })
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
