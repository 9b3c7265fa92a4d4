//! Seeded simulation of the edge and core sessions (`shared::wire::session`) over a link that
//! drops connections (losing everything in flight), reorders across streams and lanes, and so
//! makes the edge send again; the core group-commits and crashes (losing what it had not
//! synced). Property: once the faults stop, every seq the edge logged is stored at the core
//! exactly once, and the edge's release point reaches its log end. The seed of a failing run
//! is printed; `BH_SIM_SEED=N` reruns one.

use std::collections::VecDeque;
use std::ops::Range;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shared::ranges::RangeSet;
use shared::wire::Lane;
use shared::wire::frame::StreamHeld;
use shared::wire::session::{DedupIndex, Delivery, ForwardSession, ProducerKey, StreamSend, Verdict};

const STREAMS: [(&str, Delivery); 2] = [("cdr", Delivery::LiveFirst), ("sensors", Delivery::OldestFirst)];

struct Edge {
    /// Per stream, the batches of the log in order.
    logs: Vec<Vec<Range<u64>>>,
    session: ForwardSession,
}

#[derive(Default)]
struct Core {
    /// Everything appended (synced or not): what dedup sees.
    appended: DedupIndex,
    /// Only what is synced: what WELCOME says.
    durable: DedupIndex,
    /// Appended since the last sync.
    pending: Vec<(usize, Range<u64>)>,
    /// Acks waiting for the next sync.
    acks_after_sync: Vec<(usize, Range<u64>)>,
    /// Every batch stored durably, per stream.
    stored: Vec<Vec<Range<u64>>>,
}

fn key(stream: usize) -> ProducerKey {
    ProducerKey { edge: "edge-1".into(), epoch: 7, stream: STREAMS[stream].0.into() }
}

fn welcome(core: &Core) -> Vec<StreamHeld> {
    (0..STREAMS.len()).map(|i| StreamHeld { name: STREAMS[i].0.into(), held: core.durable.held(&key(i)) }).collect()
}

struct Link {
    /// Edge → core, one FIFO per (stream, lane): QUIC streams are ordered, not among each other.
    up: Vec<VecDeque<Range<u64>>>,
    /// Core → edge acks, per stream.
    down: Vec<VecDeque<Range<u64>>>,
    connected: bool,
}

impl Link {
    fn lane_index(stream: usize, lane: Lane) -> usize {
        stream * 2 + usize::from(lane == Lane::Backlog)
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let streams = STREAMS.iter().map(|(n, d)| StreamSend::new(n, *d, 0, 0)).collect();
    let mut edge = Edge { logs: vec![Vec::new(); STREAMS.len()], session: ForwardSession::new(streams, 4000) };
    let mut core = Core { stored: vec![Vec::new(); STREAMS.len()], ..Core::default() };
    let mut link = Link {
        up: vec![VecDeque::new(); STREAMS.len() * 2],
        down: vec![VecDeque::new(); STREAMS.len()],
        connected: false,
    };

    let total_steps = steps * 3;
    for step in 0..total_steps {
        let faults = step < steps;
        // The edge logs more data (only while faults run, so the end can drain).
        if faults && rng.gen_bool(0.4) {
            let s = rng.gen_range(0..STREAMS.len());
            let start = edge.logs[s].last().map_or(0, |r| r.end);
            let range = start..start + rng.gen_range(1..6);
            edge.logs[s].push(range.clone());
            edge.session.stream_mut(s).handle_log_end(range.end);
        }
        // Connect: HELLO → WELCOME from what the core holds durably.
        if !link.connected && rng.gen_bool(0.3) {
            link.connected = true;
            edge.session.handle_welcome(&welcome(&core));
        }
        if link.connected {
            // The edge sends what the session asks for, within its window.
            while let Some(t) = edge.session.poll_transmit() {
                let batch = edge.logs[t.stream].iter().find(|r| r.start == t.seq).cloned();
                let batch = batch.unwrap_or_else(|| panic!("seed {seed}: seq {} is not a batch start", t.seq));
                edge.session.handle_sent(t.stream, batch.clone(), 10 * (batch.end - batch.start));
                link.up[Link::lane_index(t.stream, t.lane)].push_back(batch);
            }
            // Deliver some frames, from random lanes, in order within each.
            for _ in 0..rng.gen_range(0..6) {
                let lane = rng.gen_range(0..link.up.len());
                if let Some(range) = link.up[lane].pop_front() {
                    let s = lane / 2;
                    match core.appended.check(&key(s), &range) {
                        Verdict::New { .. } => {
                            core.appended.insert(&key(s), range.clone());
                            core.pending.push((s, range.clone()));
                            core.acks_after_sync.push((s, range));
                        }
                        Verdict::Duplicate => core.acks_after_sync.push((s, range)),
                        Verdict::Conflict => panic!("seed {seed} step {step}: conflict on {range:?}"),
                    }
                }
            }
            for _ in 0..rng.gen_range(0..4) {
                let s = rng.gen_range(0..link.down.len());
                if let Some(range) = link.down[s].pop_front() {
                    edge.session.handle_ack(s, range);
                }
            }
            // The edge releases whatever its session counts as acknowledged.
            for s in 0..STREAMS.len() {
                let through = edge.session.stream(s).acked_through();
                edge.session.stream_mut(s).handle_released(through);
            }
        }
        // Group commit at the core: pending becomes durable, then the acks leave.
        if rng.gen_bool(0.3) {
            for (s, r) in core.pending.drain(..) {
                core.durable.insert(&key(s), r.clone());
                core.stored[s].push(r);
            }
            for (s, r) in core.acks_after_sync.drain(..) {
                if link.connected {
                    link.down[s].push_back(r);
                }
            }
        }
        if faults && link.connected && rng.gen_bool(0.05) {
            // The connection drops: everything in flight is lost both ways.
            link.connected = false;
            link.up.iter_mut().for_each(VecDeque::clear);
            link.down.iter_mut().for_each(VecDeque::clear);
            core.acks_after_sync.clear();
            edge.session.handle_reset();
        }
        if faults && rng.gen_bool(0.02) {
            // The core crashes: what it had not synced is gone, dedup is rebuilt from disk.
            core.pending.clear();
            core.acks_after_sync.clear();
            core.appended = core.durable.clone();
            link.connected = false;
            link.up.iter_mut().for_each(VecDeque::clear);
            link.down.iter_mut().for_each(VecDeque::clear);
            edge.session.handle_reset();
        }
    }

    for (s, log) in edge.logs.iter().enumerate() {
        let end = log.last().map_or(0, |r| r.end);
        let mut stored = core.stored[s].clone();
        stored.sort_by_key(|r| r.start);
        for w in stored.windows(2) {
            assert!(
                w[0].end <= w[1].start,
                "seed {seed}: stream {s}: {:?} stored twice or overlapping {:?}",
                w[0],
                w[1]
            );
        }
        let union = RangeSet::from_ranges(stored.iter().cloned());
        let expected: Vec<Range<u64>> = std::iter::once(0..end).filter(|r| !r.is_empty()).collect();
        assert_eq!(union.ranges(), &expected[..], "seed {seed}: stream {s}: not everything arrived");
        assert_eq!(edge.session.stream(s).acked_through(), end, "seed {seed}: stream {s}: release point behind");
    }
}

fn seeds() -> Range<u64> {
    match std::env::var("BH_SIM_SEED").ok().and_then(|v| v.parse().ok()) {
        Some(seed) => seed..seed + 1,
        None => 0..500,
    }
}

#[test]
fn every_record_is_stored_exactly_once_over_a_faulty_link() {
    for seed in seeds() {
        run(seed, 400);
    }
}
