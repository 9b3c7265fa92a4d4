//! `core-ingest log verify` and `log dump` as an operator runs them: the built binary over a
//! data directory in the core's layout (`streams/<stream>/partitions`, `streams/<stream>/<p>/`),
//! written by the real log, with the seqs of several edges and epochs interleaved in one
//! partition and out of seq order, as live-first delivery stores them.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use bytes::BytesMut;
use core_ingest::store::partition_dir;
use serde_json::Value;
use shared::batch::{
    Attr, Batch, BatchEncoder, BatchLimits, BatchMeta, Compression, GapReason, PayloadFormat, Record, encode_gap,
};
use shared::ids::{Epoch, Seq};
use shared::log::segment::{self, FrameInfo};
use shared::log::storage::FsStorage;
use shared::log::verify::stream_dir;
use shared::log::{FsyncPolicy, Log, LogConfig, SegmentSummary};

const BIN: &str = env!("CARGO_BIN_EXE_core-ingest");
const T0_MS: i64 = 1_795_369_718_000;
const STREAM: &str = "cdr";

/// A record's name: (edge, epoch, seq).
type Key = (String, u64, u64);

/// A core data directory and every record in it.
struct DataDir {
    tmp: tempfile::TempDir,
    records: BTreeMap<Key, Record>,
}

impl DataDir {
    fn arg(&self) -> &str {
        self.tmp.path().to_str().expect("temp paths are UTF-8")
    }

    fn log(&self, p: usize) -> Log {
        open_log(self.tmp.path(), p)
    }
}

fn config() -> LogConfig {
    LogConfig { segment_bytes_max: 4096, fsync: FsyncPolicy::Always, ..LogConfig::default() }
}

fn open_log(data: &Path, p: usize) -> Log {
    Log::open(Arc::new(FsStorage), &partition_dir(data, STREAM, p), config(), 0).unwrap()
}

fn meta(edge: &str, epoch: u64, seq: u64) -> BatchMeta {
    BatchMeta {
        producer: edge.into(),
        epoch: Epoch(epoch),
        stream: STREAM.into(),
        base_seq: Seq(seq),
        payload_format: PayloadFormat::Json,
    }
}

fn record(edge: &str, epoch: u64, seq: u64) -> Record {
    // Hex noise so the batches fill several 4 KiB segments.
    let noise: String = (1..=4u64).map(|k| format!("{:016x}", (seq + k).wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect();
    Record {
        ts_ms: T0_MS + seq as i64 * 10,
        topic: format!("cdr/{edge}"),
        payload: format!(r#"{{"edge":"{edge}","epoch":{epoch},"seq":{seq},"note":"{noise}"}}"#).into_bytes().into(),
        attrs: vec![Attr { key: "site".into(), value: "lyon-3".into() }],
    }
}

fn data_batch(edge: &str, epoch: u64, seqs: std::ops::Range<u64>, records: &mut BTreeMap<Key, Record>) -> Batch {
    let recs: Vec<Record> = seqs.clone().map(|s| record(edge, epoch, s)).collect();
    for (s, r) in seqs.clone().zip(&recs) {
        records.insert((edge.into(), epoch, s), r.clone());
    }
    let mut out = BytesMut::new();
    BatchEncoder::new(Compression::None).unwrap().encode(&meta(edge, epoch, seqs.start), &recs, &mut out).unwrap();
    Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
}

fn gap_batch(edge: &str, epoch: u64, seqs: std::ops::Range<u64>) -> Batch {
    let mut out = BytesMut::new();
    let n = (seqs.end - seqs.start) as u32;
    encode_gap(&meta(edge, epoch, seqs.start), n, GapReason::DiskFullDropOldest, (T0_MS, T0_MS), &mut out).unwrap();
    Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
}

/// Two partitions.
/// - 0: edge-a epoch a1, seqs [0, 30) in batches of 5, a gap [30, 35), then [35, 45);
///   interleaved with edge-a epoch a2 (the edge wiped) seqs [0, 10).
/// - 1: edge-b epoch b1, seqs [25, 50) first (live), then [0, 25) (the backlog behind it).
fn build() -> DataDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = stream_dir(tmp.path(), STREAM);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("partitions"), "2\n").unwrap();
    let mut records = BTreeMap::new();
    let (mut p0, mut p1) = (open_log(tmp.path(), 0), open_log(tmp.path(), 1));
    for base in (0..30).step_by(5) {
        p0.append(&data_batch("edge-a", 0xa1, base..base + 5, &mut records), 0).unwrap();
        if base < 10 {
            p0.append(&data_batch("edge-a", 0xa2, base..base + 5, &mut records), 0).unwrap();
        }
    }
    p0.append(&gap_batch("edge-a", 0xa1, 30..35), 0).unwrap();
    for base in [35, 40] {
        p0.append(&data_batch("edge-a", 0xa1, base..base + 5, &mut records), 0).unwrap();
    }
    for base in (25..50).step_by(5).chain((0..25).step_by(5)) {
        p1.append(&data_batch("edge-b", 0xb1, base..base + 5, &mut records), 0).unwrap();
    }
    assert!(p0.segments().len() >= 3, "partition 0 needs several segments");
    assert!(p1.segments().len() >= 2, "partition 1 needs several segments");
    DataDir { tmp, records }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

fn dump(data: &DataDir, extra: &[&str]) -> Output {
    let mut args = vec!["log", "dump", "--data-dir", data.arg(), "--stream", STREAM];
    args.extend_from_slice(extra);
    run(&args)
}

fn verify(data: &DataDir) -> Output {
    run(&["log", "verify", "--data-dir", data.arg()])
}

/// Parses a dump: every line's record, by name, checked against what was written.
fn parse_dump(out: &str, data: &DataDir) -> Vec<Key> {
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            let edge = v["edge"].as_str().unwrap().to_owned();
            let epoch = u64::from_str_radix(v["epoch"].as_str().unwrap(), 16).unwrap();
            let seq = v["seq"].as_u64().unwrap();
            let key = (edge, epoch, seq);
            let r = data.records.get(&key).unwrap_or_else(|| panic!("{key:?} was never written: {l}"));
            assert_eq!(v["stream"], STREAM);
            assert_eq!(
                (v["topic"].as_str(), v["payload"].as_str()),
                (Some(r.topic.as_str()), std::str::from_utf8(&r.payload).ok()),
                "{l}"
            );
            assert_eq!(shared::ndjson::parse_time_ms(v["ts"].as_str().unwrap()), Some(r.ts_ms));
            assert_eq!(v["attrs"]["site"], "lyon-3");
            key
        })
        .collect()
}

fn frames(seg: &SegmentSummary) -> Vec<FrameInfo> {
    segment::scan(&fs::read(&seg.path).unwrap(), seg.base, &BatchLimits::default()).frames
}

#[test]
fn verify_reports_partitions_and_the_seq_ranges_of_each_edge_and_epoch() {
    let data = build();
    let o = verify(&data);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    let batches = 6 + 2 + 1 + 2 + 10;
    assert!(out.starts_with("cdr: 2 partition(s), "), "{out}");
    assert!(out.contains(&format!("{batches} batch(es) (1 gap), {} record(s)", data.records.len())), "{out}");
    for line in [
        "  edge \"edge-a\" epoch 00000000000000a1: seqs [0, 45) (gaps [30, 35))",
        "  edge \"edge-a\" epoch 00000000000000a2: seqs [0, 10)",
        "  edge \"edge-b\" epoch 00000000000000b1: seqs [0, 50)",
        "1 stream(s) verified: no corruption",
    ] {
        assert!(out.lines().any(|l| l == line), "no line {line:?} in\n{out}");
    }
    let p0 = out.lines().find(|l| l.starts_with("cdr/0: ")).unwrap();
    assert!(p0.contains("offsets [0, 55)"), "partition offsets are the log's own: {p0}");
    assert!(out.lines().any(|l| l.starts_with("cdr/1: ") && l.contains("10 batch(es) (0 gap), 50 record(s)")), "{out}");
}

#[test]
fn dump_prints_every_record_once_with_the_seqs_of_its_batch_header() {
    let data = build();
    let o = dump(&data, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let keys = parse_dump(&text(&o.stdout), &data);
    assert_eq!(keys.len(), data.records.len());
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, data.records.keys().cloned().collect::<Vec<_>>(), "every record exactly once");
    // Stored order: edge-b's live batches [25, 50) before its backlog.
    let b: Vec<u64> = keys.iter().filter(|k| k.0 == "edge-b").map(|k| k.2).collect();
    assert_eq!(b, (25..50).chain(0..25).collect::<Vec<_>>());
    let err = text(&o.stderr);
    assert!(err.contains("cdr: 100 record(s) printed; 1 gap batch(es) covering 5 seq(s) not printed"), "{err}");
}

#[test]
fn dump_filters_by_edge_from_seq_and_limit() {
    let data = build();
    let o = dump(&data, &["--edge", "edge-b"]);
    let keys = parse_dump(&text(&o.stdout), &data);
    assert_eq!(keys.len(), 50);
    assert!(keys.iter().all(|k| k.0 == "edge-b"));
    assert!(!text(&o.stderr).contains("gap"), "edge-a's gap is not edge-b's: {}", text(&o.stderr));

    let o = dump(&data, &["--edge", "edge-a", "--from-seq", "20"]);
    let mut keys = parse_dump(&text(&o.stdout), &data);
    keys.sort();
    let expected: Vec<Key> = (20..30).chain(35..45).map(|s| ("edge-a".to_owned(), 0xa1, s)).collect();
    assert_eq!(keys, expected, "epoch a2 holds only seqs below 20");
    assert!(text(&o.stderr).contains("1 gap batch(es) covering 5 seq(s)"), "{}", text(&o.stderr));

    let o = dump(&data, &["--from-seq", "33", "--edge", "edge-a"]);
    assert!(text(&o.stderr).contains("covering 2 seq(s)"), "a gap cut by --from-seq: {}", text(&o.stderr));

    let o = dump(&data, &["--limit", "7"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(parse_dump(&text(&o.stdout), &data).len(), 7);

    let o = dump(&data, &["--edge", "nobody"]);
    assert_eq!((o.status.code(), o.stdout.len()), (Some(0), 0));
}

#[test]
fn damage_in_a_closed_segment_is_corruption_with_file_and_offset() {
    let data = build();
    let seg = data.log(0).segments()[1].clone();
    let hit = frames(&seg)[1].clone();
    let mut bytes = fs::read(&seg.path).unwrap();
    let start = hit.pos as usize + 40;
    bytes[start..start + 200].fill(0);
    fs::write(&seg.path, bytes).unwrap();

    let o = verify(&data);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let at = format!("{}@{}: Damage: ", seg.path.display(), hit.pos);
    assert!(out.lines().any(|l| l.starts_with(&at)), "no line starting {at:?} in\n{out}");
    assert!(out.contains("corruption in cdr"), "{out}");

    let o = dump(&data, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains(&at), "{}", text(&o.stderr));
    let printed = parse_dump(&text(&o.stdout), &data).len();
    assert!(printed < data.records.len() && printed >= data.records.len() - 10, "{printed}");
}

#[test]
fn seqs_stored_twice_are_reported() {
    let mut data = build();
    let mut log = data.log(1);
    let again = data_batch("edge-b", 0xb1, 10..15, &mut data.records);
    let at = log.append(&again, 0).unwrap();
    drop(log);
    let seg = data.log(1).segments().last().unwrap().clone();
    let pos = frames(&seg).iter().find(|f| f.offset == at.offset).unwrap().pos;

    let o = verify(&data);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = out.lines().find(|l| l.contains("SeqOverlap")).unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with(&format!("{}@{pos}: SeqOverlap: seqs [10, 15) of edge \"edge-b\"", seg.path.display())),
        "{line}"
    );
}

#[test]
fn layout_problems_are_reported() {
    let data = build();
    let stream = stream_dir(data.tmp.path(), STREAM);
    fs::create_dir(stream.join("2")).unwrap();
    let o = verify(&data);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("PartitionStray: partition 2 is beyond the stream's count 2"), "{out}");

    fs::remove_file(stream.join("partitions")).unwrap();
    let o = verify(&data);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(&format!("{}@0: PartitionCount: ", stream.join("partitions").display())), "{out}");
    assert!(
        out.contains("  edge \"edge-b\" epoch 00000000000000b1: seqs [0, 50)"),
        "the partitions are still read: {out}"
    );

    let o = dump(&data, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("partitions"), "{}", text(&o.stderr));
}

#[test]
fn missing_data_dir_or_stream_exits_2_naming_it() {
    let data = build();
    let o = dump(&data, &[]);
    assert_eq!(o.status.code(), Some(0));
    let o = run(&["log", "dump", "--data-dir", data.arg(), "--stream", "sensors"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no stream \"sensors\""), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cdr"), "the known streams are listed: {}", text(&o.stderr));
    let missing = data.tmp.path().join("nope");
    let o = run(&["log", "verify", "--data-dir", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains(&missing.display().to_string()), "{}", text(&o.stderr));
    let o = run(&["log", "dump", "--data-dir", data.arg(), "--stream", "Bad/Name"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
}

#[test]
fn closed_stdout_ends_dump_quietly() {
    let data = build();
    let mut child = Command::new(BIN)
        .args(["log", "dump", "--data-dir", data.arg(), "--stream", STREAM])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("Broken pipe"), "{}", text(&o.stderr));
}

#[test]
fn verify_and_dump_change_nothing() {
    let data = build();
    let listing = || {
        let mut v = Vec::new();
        for p in 0..2 {
            for e in fs::read_dir(partition_dir(data.tmp.path(), STREAM, p)).unwrap() {
                let e = e.unwrap();
                v.push((e.path(), fs::read(e.path()).unwrap()));
            }
        }
        v.sort();
        v
    };
    // A torn tail: the kind of thing a writable open would truncate.
    let seg = data.log(1).segments().last().unwrap().clone();
    let mut bytes = fs::read(&seg.path).unwrap();
    bytes.truncate(bytes.len() - 10);
    fs::write(&seg.path, &bytes).unwrap();
    let before = listing();
    let o = verify(&data);
    assert_eq!(o.status.code(), Some(0), "a torn tail is not corruption: {}", text(&o.stdout));
    assert!(text(&o.stdout).contains("TornTail"));
    assert_eq!(dump(&data, &[]).status.code(), Some(0));
    assert_eq!(listing(), before);
}
