//! Model-based test of the log: random append / sync / read / roll / retention / fsync
//! failure / disk full / power loss / reopen sequences against an in-memory model.
//!
//! Power loss is [`SimStorage::crash`]: every write since the last fsync may vanish or be
//! torn, and so may directory entries not yet fsynced. The property: every batch the log
//! acknowledged (below its committed offset) survives with its bytes and offset; whatever
//! else comes back after a crash is a batch that really was appended at that offset; reads
//! never return uncommitted data. The seed of a failing run is printed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shared::batch::{Batch, BatchEncoder, BatchLimits, BatchMeta, Compression, PayloadFormat, Record};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::sim::{Faults, SimStorage};
use shared::log::{FsyncPolicy, Log, LogConfig, LogError, ProblemKind, Retention};

const DIR: &str = "/data/streams/cdr";

struct Model {
    /// Every batch appended at an offset and possibly still on disk: its bytes, its end, and
    /// whether the log acknowledged it (committed while the appending instance was alive, or
    /// read back after a reopen).
    history: BTreeMap<u64, (Bytes, u64, bool)>,
    /// Offsets below this may have been removed by retention.
    released: Offset,
}

impl Model {
    fn ack_committed(&mut self, committed: Offset) {
        for (_, end, acked) in self.history.values_mut() {
            if *end <= committed.0 {
                *acked = true;
            }
        }
    }

    /// After a reopen: what was not read back was never acknowledged (checked) and is gone;
    /// what was read back is durable now.
    fn reconcile(&mut self, seen: &[u64], start: Offset) {
        self.history.retain(|off, (_, _, acked)| *off < start.0 || seen.contains(off) || *acked);
        for off in seen {
            if let Some(e) = self.history.get_mut(off) {
                e.2 = true;
            }
        }
    }
}

fn make_batch(rng: &mut SmallRng, ts: &mut i64) -> Batch {
    let n = rng.gen_range(1..5);
    let records: Vec<Record> = (0..n)
        .map(|_| {
            *ts += rng.gen_range(0..1000);
            let len = rng.gen_range(10..600);
            let payload: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            Record { ts_ms: *ts, topic: "cdr/site-1".into(), payload: payload.into(), attrs: vec![] }
        })
        .collect();
    let meta = BatchMeta {
        producer: "edge-1".into(),
        epoch: Epoch(7),
        stream: "cdr".into(),
        base_seq: Seq(0),
        payload_format: PayloadFormat::Raw,
    };
    let mut out = BytesMut::new();
    BatchEncoder::new(Compression::None).unwrap().encode(&meta, &records, &mut out).unwrap();
    Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
}

fn config(policy: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        segment_age_ms: 0,
        index_interval_bytes: 1024,
        fsync: policy,
        retention: Retention::default(),
        ..LogConfig::default()
    }
}

/// Reads the whole committed log, checks it against the model, and reconciles the model.
fn check_log(log: &mut Log, model: &mut Model, seed: u64, after_crash: bool) {
    let committed = log.committed_offset();
    let mut from = log.start_offset();
    let mut seen = Vec::new();
    while from < committed {
        let read = log.read(from, 8192).unwrap_or_else(|e| panic!("seed {seed}: read at {from}: {e}"));
        // Power loss may tear unacknowledged writes; it never makes corruption.
        assert!(
            read.damage.iter().all(|p| p.kind == ProblemKind::TornWrite),
            "seed {seed}: damage {:?}\nsegments {:#?}\nproblems {:#?}",
            read.damage,
            log.segments(),
            log.problems()
        );
        for b in &read.batches {
            assert!(b.end() <= committed, "seed {seed}: read past committed");
            let expected = model.history.get(&b.offset.0).map(|e| &e.0);
            assert_eq!(expected, Some(b.batch.bytes()), "seed {seed}: batch at {} is not what was appended", b.offset);
            seen.push(b.offset.0);
        }
        assert!(read.next > from || read.batches.is_empty(), "seed {seed}: no progress");
        if read.next == from {
            break;
        }
        from = read.next;
    }
    // Every acknowledged batch that retention may not have removed is there.
    for (&off, (_, end, acked)) in model.history.range(model.released.0.max(log.start_offset().0)..) {
        if *acked {
            assert!(seen.contains(&off), "seed {seed}: acked batch at {off} lost (after crash: {after_crash})");
            assert!(log.next_offset().0 >= *end, "seed {seed}: next offset went below an acked batch");
        }
    }
    model.reconcile(&seen, log.start_offset());
}

fn run(seed: u64, policy: FsyncPolicy, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let sim = SimStorage::new();
    let storage = Arc::new(sim.clone());
    let dir = Path::new(DIR);
    let mut log = Log::open(storage.clone(), dir, config(policy), 0).unwrap();
    let mut model = Model { history: BTreeMap::new(), released: Offset(0) };
    let mut ts = 1_700_000_000_000i64;
    let mut now = 0i64;

    for step in 0..ops {
        now += 1;
        match rng.gen_range(0..100) {
            0..=49 => {
                let batch = make_batch(&mut rng, &mut ts);
                let at = log.next_offset();
                match log.append(&batch, now) {
                    Ok(a) => {
                        assert_eq!(a.offset, at, "seed {seed} step {step}");
                        // A reused offset (after unacked data was lost) now means this batch.
                        model.history.split_off(&at.0);
                        model.history.insert(at.0, (batch.bytes().clone(), a.end.0, false));
                    }
                    Err(e) if e.is_retryable() => {}
                    Err(LogError::Poisoned { .. }) | Err(LogError::Io { .. }) => {
                        // An fsync failed: reopen, which runs recovery. What was written may
                        // or may not be there; nothing acked may be missing.
                        let end = at.0 + u64::from(batch.header().record_count);
                        model.history.split_off(&at.0);
                        model.history.insert(at.0, (batch.bytes().clone(), end, false));
                        sim.set_faults(Faults::default());
                        drop(log);
                        log = Log::open(storage.clone(), dir, config(policy), now).unwrap();
                        check_log(&mut log, &mut model, seed, false);
                    }
                    Err(e) => panic!("seed {seed} step {step}: append: {e}"),
                }
            }
            50..=64 => match log.sync() {
                Ok(_) => {}
                Err(_) => {
                    assert!(log.is_poisoned(), "seed {seed}: a failed sync must poison");
                    assert!(log.sync().is_err(), "seed {seed}: a poisoned log refuses to sync again");
                    sim.set_faults(Faults::default());
                    drop(log);
                    log = Log::open(storage.clone(), dir, config(policy), now).unwrap();
                    check_log(&mut log, &mut model, seed, false);
                }
            },
            65..=74 => {
                let (start, next) = (log.start_offset().0, log.next_offset().0);
                let from = Offset(rng.gen_range(start..=next));
                let read = log.read(from, rng.gen_range(1..10_000)).unwrap();
                for b in &read.batches {
                    assert!(b.end() <= log.committed_offset(), "seed {seed}: read uncommitted data");
                    assert!(b.end() > from, "seed {seed}: read returned a batch before the offset asked");
                    assert_eq!(model.history.get(&b.offset.0).map(|e| &e.0), Some(b.batch.bytes()), "seed {seed}");
                }
            }
            75..=79 => {
                let committed = log.committed_offset().0;
                let start = log.start_offset().0;
                let upto = Offset(rng.gen_range(start..=committed));
                log.release_below(upto);
                model.released = model.released.max(upto);
                if let Ok(removed) = log.apply_retention(now) {
                    for seg in removed {
                        assert!(seg.end <= model.released, "seed {seed}: retention removed unreleased data");
                    }
                }
            }
            80..=83 => sim
                .set_faults(Faults { capacity_bytes: Some(sim.used_bytes() + rng.gen_range(0..3000)), fail_syncs: 0 }),
            84..=86 => sim.set_faults(Faults { capacity_bytes: None, fail_syncs: 1 }),
            87..=89 => sim.set_faults(Faults::default()),
            90..=94 => {
                // Power loss.
                drop(log);
                sim.set_faults(Faults::default());
                sim.crash(rng.r#gen());
                log = Log::open(storage.clone(), dir, config(policy), now).unwrap();
                check_log(&mut log, &mut model, seed, true);
            }
            _ => {
                // Clean reopen.
                drop(log);
                sim.set_faults(Faults::default());
                log = Log::open(storage.clone(), dir, config(policy), now).unwrap();
                check_log(&mut log, &mut model, seed, false);
            }
        }
        if !log.is_poisoned() {
            model.ack_committed(log.committed_offset());
        }
        assert!(log.committed_offset() <= log.next_offset());
    }
    sim.set_faults(Faults::default());
    drop(log);
    let mut log = Log::open(storage, dir, config(policy), now).unwrap();
    check_log(&mut log, &mut model, seed, false);
}

/// `count` seeds from `first`; `BH_MODEL_SEED=N` reruns one seed, `BH_MODEL_SEEDS=N` runs more.
fn seeds(first: u64, count: u64) -> std::ops::Range<u64> {
    let env = |k| std::env::var(k).ok().and_then(|v: String| v.parse::<u64>().ok());
    match (env("BH_MODEL_SEED"), env("BH_MODEL_SEEDS")) {
        (Some(seed), _) => seed..seed + 1,
        (None, Some(n)) => first..first + n,
        (None, None) => first..first + count,
    }
}

#[test]
fn model_interval_policy_survives_power_loss() {
    for seed in seeds(0, 150) {
        run(seed, FsyncPolicy::Interval { interval_ms: 5 }, 250);
    }
}

#[test]
fn model_always_policy_survives_power_loss() {
    for seed in seeds(1000, 100) {
        run(seed, FsyncPolicy::Always, 200);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// The `log_recovery` fuzz target's body on arbitrary bytes.
    #[test]
    fn recovery_of_arbitrary_bytes(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
        shared::fuzzing::log_recovery(&data);
    }

    /// ... and on real segments with arbitrary damage, which reaches deeper than noise.
    #[test]
    fn recovery_of_damaged_segments(seed in 0u64..u64::MAX, edits in proptest::collection::vec((0usize..1 << 16, proptest::prelude::any::<u8>()), 0..8), cut in 0usize..1 << 16) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut ts = 0;
        let mut seg = Vec::new();
        let mut offset = 0u64;
        for _ in 0..rng.gen_range(1..6) {
            let b = make_batch(&mut rng, &mut ts);
            shared::log::segment::encode_frame(Offset(offset), seg.len() as u64, b.bytes(), &mut seg);
            offset += u64::from(b.header().record_count);
        }
        for (at, v) in edits {
            let i = at % seg.len();
            seg[i] = v;
        }
        seg.truncate(seg.len() - cut % (seg.len() / 2 + 1));
        shared::fuzzing::log_recovery(&seg);
    }
}
