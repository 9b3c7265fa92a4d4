//! The session state machines of both ends. Pure: no sockets, no clock, no log access. The IO
//! shells feed them events (`handle_*`) and ask what to do (`poll_*`).
//!
//! Edge ([`ForwardSession`]): per log stream, what the core holds (from WELCOME and ACKs) and
//! what is in flight decide what to send; the core, not the edge's memory, decides. With
//! live-first, data appended since the session began goes on the live lane and what the core
//! lacks from before goes on the backlog lane behind it; oldest-first uses the live lane only.
//! A window of in-flight bytes bounds what is unacknowledged. The release point of a stream is
//! where the contiguous acknowledged run from its first retained seq ends.
//!
//! Core ([`DedupIndex`], [`IngestSession`]): durable ranges per (edge, epoch, stream); a batch
//! is a duplicate only if its whole range is held, new only if none of it is, a conflict
//! otherwise. The session checks that every batch belongs to the certificate's edge, the
//! HELLO's epoch, and the stream its data stream was opened for.

use std::collections::HashMap;
use std::ops::Range;

use crate::batch::BatchHeader;
use crate::ranges::RangeSet;
use crate::wire::frame::{ErrorCode, Lane, StreamHeld, StreamOffer};

/// The protocol version this code speaks.
pub const VERSION: u16 = 1;

/// Order of delivery after an outage, per stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// New data first, the backlog behind it on its own lane.
    LiveFirst,
    /// Everything in seq order on one lane.
    OldestFirst,
}

/// One log stream's forwarding state.
#[derive(Clone, Debug)]
pub struct StreamSend {
    name: String,
    delivery: Delivery,
    first_retained: u64,
    log_end: u64,
    live_from: u64,
    held: RangeSet,
    inflight: RangeSet,
    welcomed: bool,
}

impl StreamSend {
    /// The stream as the edge log has it: seqs `[first_retained, log_end)` are committed.
    pub fn new(name: &str, delivery: Delivery, first_retained: u64, log_end: u64) -> Self {
        StreamSend {
            name: name.into(),
            delivery,
            first_retained,
            log_end,
            live_from: log_end,
            held: RangeSet::new(),
            inflight: RangeSet::new(),
            welcomed: false,
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the HELLO says of this stream.
    pub fn offer(&self) -> StreamOffer {
        StreamOffer { name: self.name.clone(), first_retained: self.first_retained, next: self.log_end }
    }

    /// The core said what it holds: the session starts; the live point is the log end now.
    pub fn handle_welcome(&mut self, held: RangeSet) {
        self.held = held;
        self.inflight = RangeSet::new();
        self.live_from = self.log_end;
        self.welcomed = true;
    }

    /// The edge log committed more: `[.., end)`.
    pub fn handle_log_end(&mut self, end: u64) {
        self.log_end = self.log_end.max(end);
    }

    /// The edge no longer holds seqs below `first_retained` (released or dropped).
    pub fn handle_released(&mut self, first_retained: u64) {
        self.first_retained = self.first_retained.max(first_retained);
    }

    /// The next range to send on `lane`, if any: the first range the core lacks and that is
    /// not in flight. The batch at its start may cover less (batches are what they are); a gap
    /// sent for it must cover no more (the core refuses a batch that overlaps what it holds).
    pub fn poll_send(&self, lane: Lane) -> Option<Range<u64>> {
        if !self.welcomed {
            return None;
        }
        let span = match (self.delivery, lane) {
            (Delivery::LiveFirst, Lane::Live) => self.live_from.max(self.first_retained)..self.log_end,
            (Delivery::LiveFirst, Lane::Backlog) => self.first_retained..self.live_from.min(self.log_end),
            (Delivery::OldestFirst, Lane::Live) => self.first_retained..self.log_end,
            (Delivery::OldestFirst, Lane::Backlog) => return None,
        };
        if span.start >= span.end {
            return None;
        }
        let mut taken = self.held.clone();
        for r in self.inflight.ranges() {
            taken.insert(r.clone());
        }
        taken.missing(span).into_iter().next()
    }

    /// The shell sent the batch covering `range`.
    pub fn handle_sent(&mut self, range: Range<u64>) {
        self.inflight.insert(range);
    }

    /// The core acknowledged `range` as durable.
    pub fn handle_ack(&mut self, range: Range<u64>) {
        self.inflight.remove(range.clone());
        self.held.insert(range);
    }

    /// The connection dropped: nothing is in flight any more; wait for the next WELCOME.
    pub fn handle_reset(&mut self) {
        self.inflight = RangeSet::new();
        self.welcomed = false;
    }

    /// Everything below this is acknowledged (from the first retained seq on): the edge may
    /// release it under `release_on = durable`.
    pub fn acked_through(&self) -> u64 {
        self.held.contiguous_end(self.first_retained)
    }

    /// Ranges the core holds, as far as this session knows.
    pub fn held(&self) -> &RangeSet {
        &self.held
    }

    /// Whether everything committed locally is acknowledged.
    pub fn is_caught_up(&self) -> bool {
        self.held.missing(self.first_retained..self.log_end).is_empty()
    }
}

/// What to send next: stream index, lane, and the range the core lacks from the first seq on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Index into the session's streams.
    pub stream: usize,
    /// Lane.
    pub lane: Lane,
    /// First seq of the batch to send.
    pub seq: u64,
    /// End of the missing range that starts at `seq`.
    pub missing_end: u64,
}

/// The edge's side of a connection: its streams in priority order and a window of bytes.
#[derive(Clone, Debug)]
pub struct ForwardSession {
    streams: Vec<StreamSend>,
    window_bytes: u64,
    inflight_bytes: u64,
    inflight: HashMap<(usize, u64), (u64, u64)>,
}

impl ForwardSession {
    /// Streams in priority order (first = highest), and the most bytes in flight.
    pub fn new(streams: Vec<StreamSend>, window_bytes: u64) -> Self {
        ForwardSession { streams, window_bytes, inflight_bytes: 0, inflight: HashMap::new() }
    }

    /// The HELLO's stream offers.
    pub fn offers(&self) -> Vec<StreamOffer> {
        self.streams.iter().map(StreamSend::offer).collect()
    }

    /// Applies a WELCOME; streams it does not mention are held empty.
    pub fn handle_welcome(&mut self, held: &[StreamHeld]) {
        for s in &mut self.streams {
            let h = held.iter().find(|h| h.name == s.name).map(|h| h.held.clone()).unwrap_or_default();
            s.handle_welcome(h);
        }
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// The next batch to send, highest-priority stream first, live lanes before backlog
    /// lanes; `None` when the window is full or nothing is missing.
    pub fn poll_transmit(&self) -> Option<Transmit> {
        if self.inflight_bytes >= self.window_bytes {
            return None;
        }
        for lane in [Lane::Live, Lane::Backlog] {
            for (i, s) in self.streams.iter().enumerate() {
                if let Some(r) = s.poll_send(lane) {
                    return Some(Transmit { stream: i, lane, seq: r.start, missing_end: r.end });
                }
            }
        }
        None
    }

    /// The shell sent a batch of `bytes` covering `range` on stream `i`.
    pub fn handle_sent(&mut self, i: usize, range: Range<u64>, bytes: u64) {
        self.streams[i].handle_sent(range.clone());
        self.inflight.insert((i, range.start), (range.end, bytes));
        self.inflight_bytes += bytes;
    }

    /// The core acknowledged `range` of stream `i`.
    pub fn handle_ack(&mut self, i: usize, range: Range<u64>) {
        if let Some((_, bytes)) = self.inflight.remove(&(i, range.start)) {
            self.inflight_bytes = self.inflight_bytes.saturating_sub(bytes);
        }
        self.streams[i].handle_ack(range);
    }

    /// The connection dropped.
    pub fn handle_reset(&mut self) {
        for s in &mut self.streams {
            s.handle_reset();
        }
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Stream `i`.
    pub fn stream(&self, i: usize) -> &StreamSend {
        &self.streams[i]
    }

    /// Stream `i`, to update its log end or release point.
    pub fn stream_mut(&mut self, i: usize) -> &mut StreamSend {
        &mut self.streams[i]
    }

    /// Bytes in flight.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }
}

/// Names a producer's stream at the core.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProducerKey {
    /// Edge id.
    pub edge: String,
    /// Producer epoch.
    pub epoch: u64,
    /// Stream.
    pub stream: String,
}

/// What to do with a batch at the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// None of it is held: store it.
    New {
        /// The first batch this node sees of the producer's stream, starting above seq 0:
        /// the edge came here after a failover or rebalance, not a loss.
        handover: bool,
    },
    /// All of it is held: acknowledge, do not store.
    Duplicate,
    /// Part of it is held: refuse.
    Conflict,
}

/// Durable (or about to be) seq ranges per producer stream, at one core node.
#[derive(Clone, Debug, Default)]
pub struct DedupIndex {
    // foldhash: SipHash's cost showed in the core's per-batch profile; the keys come from
    // authenticated edges only, and foldhash's seed is random per process.
    held: HashMap<ProducerKey, RangeSet, foldhash::fast::RandomState>,
}

impl DedupIndex {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// What to do with a batch covering `range` of `key`.
    pub fn check(&self, key: &ProducerKey, range: &Range<u64>) -> Verdict {
        match self.held.get(key) {
            None => Verdict::New { handover: range.start > 0 },
            Some(h) if h.contains_range(range) => Verdict::Duplicate,
            Some(h) if h.overlaps(range) => Verdict::Conflict,
            Some(_) => Verdict::New { handover: false },
        }
    }

    /// Records `range` of `key` as held (the key is cloned only the first time).
    pub fn insert(&mut self, key: &ProducerKey, range: Range<u64>) {
        match self.held.get_mut(key) {
            Some(held) => held.insert(range),
            None => {
                self.held.insert(key.clone(), RangeSet::from_ranges([range]));
            }
        }
    }

    /// What is held of `key`.
    pub fn held(&self, key: &ProducerKey) -> RangeSet {
        self.held.get(key).cloned().unwrap_or_default()
    }

    /// Every producer stream known.
    pub fn keys(&self) -> impl Iterator<Item = &ProducerKey> {
        self.held.keys()
    }

    /// Keeps only the producer streams for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&ProducerKey) -> bool) {
        self.held.retain(|k, _| keep(k));
    }
}

/// A refusal: the code to close with and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Code.
    pub code: ErrorCode,
    /// For the log and the peer.
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

/// The core's side of one edge connection, after the TLS handshake named the edge.
#[derive(Clone, Debug)]
pub struct IngestSession {
    edge: String,
    epoch: Option<u64>,
}

impl IngestSession {
    /// A session with the edge whose certificate says `edge`.
    pub fn new(edge: &str) -> Self {
        IngestSession { edge: edge.into(), epoch: None }
    }

    /// The certificate's edge id.
    pub fn edge(&self) -> &str {
        &self.edge
    }

    /// Checks a HELLO; returns the producer keys of its streams, for the WELCOME.
    pub fn handle_hello(
        &mut self,
        version: u16,
        epoch: u64,
        claimed: &str,
        streams: &[StreamOffer],
    ) -> Result<Vec<ProducerKey>, Refusal> {
        if version != VERSION {
            return Err(Refusal::new(
                ErrorCode::UnsupportedVersion,
                format!("version {version}; this core speaks {VERSION}"),
            ));
        }
        if claimed != self.edge {
            return Err(Refusal::new(
                ErrorCode::WrongProducer,
                format!("hello says {claimed:?}, certificate says {:?}", self.edge),
            ));
        }
        self.epoch = Some(epoch);
        Ok(streams.iter().map(|s| ProducerKey { edge: self.edge.clone(), epoch, stream: s.name.clone() }).collect())
    }

    /// The key of every batch this session may send on a data stream for `stream`.
    pub fn producer_key(&self, stream: &str) -> Result<ProducerKey, Refusal> {
        let Some(epoch) = self.epoch else {
            return Err(Refusal::new(ErrorCode::Protocol, "batch before hello"));
        };
        Ok(ProducerKey { edge: self.edge.clone(), epoch, stream: stream.into() })
    }

    /// Checks a batch that came on a data stream opened for `stream`; returns its range. Its
    /// key, once it passes, is [`IngestSession::producer_key`]`(stream)`.
    pub fn check_batch(&self, stream: &str, h: &BatchHeader) -> Result<Range<u64>, Refusal> {
        let Some(epoch) = self.epoch else {
            return Err(Refusal::new(ErrorCode::Protocol, "batch before hello"));
        };
        if h.producer != self.edge {
            return Err(Refusal::new(
                ErrorCode::WrongProducer,
                format!("batch producer {:?} is not the certificate's {:?}", h.producer, self.edge),
            ));
        }
        if h.epoch.0 != epoch {
            return Err(Refusal::new(
                ErrorCode::WrongProducer,
                format!("batch epoch {} is not the session's {epoch:016x}", h.epoch),
            ));
        }
        if h.stream != stream {
            return Err(Refusal::new(
                ErrorCode::WrongProducer,
                format!("batch of stream {:?} on a data stream for {stream:?}", h.stream),
            ));
        }
        Ok(h.base_seq.0..h.end_seq().0)
    }
}

#[cfg(test)]
// One-range sets are the point of several assertions here, not a mistaken range literal.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn welcomed(delivery: Delivery, first: u64, end: u64, held: &[Range<u64>]) -> StreamSend {
        let mut s = StreamSend::new("cdr", delivery, first, end);
        s.handle_welcome(RangeSet::from_ranges(held.iter().cloned()));
        s
    }

    #[test]
    fn live_first_sends_new_data_on_live_and_the_rest_on_backlog() {
        let mut s = welcomed(Delivery::LiveFirst, 0, 100, &[0..40]);
        assert_eq!(s.poll_send(Lane::Live), None, "nothing new yet");
        assert_eq!(s.poll_send(Lane::Backlog), Some(40..100));
        s.handle_log_end(110);
        assert_eq!(s.poll_send(Lane::Live), Some(100..110));
        s.handle_sent(100..105);
        assert_eq!(s.poll_send(Lane::Live), Some(105..110));
        s.handle_sent(40..50);
        assert_eq!(s.poll_send(Lane::Backlog), Some(50..100));
        s.handle_ack(100..105);
        assert_eq!(s.acked_through(), 40, "the hole 40..100 holds the release point");
        s.handle_ack(40..50);
        assert_eq!(s.acked_through(), 50);
    }

    #[test]
    fn oldest_first_uses_one_lane() {
        let s = welcomed(Delivery::OldestFirst, 10, 100, &[20..30]);
        assert_eq!(s.poll_send(Lane::Live), Some(10..20));
        assert_eq!(s.poll_send(Lane::Backlog), None);
    }

    #[test]
    fn window_bounds_bytes_in_flight_and_reset_resends() {
        let streams = vec![
            StreamSend::new("cdr", Delivery::OldestFirst, 0, 10),
            StreamSend::new("sensors", Delivery::OldestFirst, 0, 10),
        ];
        let mut f = ForwardSession::new(streams, 1000);
        assert_eq!(f.poll_transmit(), None, "nothing before the welcome");
        f.handle_welcome(&[]);
        let t = f.poll_transmit().unwrap();
        assert_eq!((t.stream, t.seq), (0, 0), "the first stream has priority");
        f.handle_sent(0, 0..10, 1000);
        assert_eq!(f.poll_transmit(), None, "window full");
        f.handle_ack(0, 0..10);
        assert_eq!(f.poll_transmit().map(|t| t.stream), Some(1));
        f.handle_sent(1, 0..5, 10);
        f.handle_reset();
        f.handle_welcome(&[StreamHeld { name: "cdr".into(), held: RangeSet::from_ranges([0..10]) }]);
        assert_eq!(
            f.poll_transmit(),
            Some(Transmit { stream: 1, lane: Lane::Live, seq: 0, missing_end: 10 }),
            "unacked data is sent again"
        );
    }

    #[test]
    fn dedup_knows_duplicates_conflicts_and_handovers() {
        let mut d = DedupIndex::new();
        let k = ProducerKey { edge: "e".into(), epoch: 1, stream: "cdr".into() };
        assert_eq!(d.check(&k, &(0..10)), Verdict::New { handover: false });
        assert_eq!(d.check(&k, &(50..60)), Verdict::New { handover: true });
        d.insert(&k, 0..10);
        d.insert(&k, 20..30);
        assert_eq!(d.check(&k, &(0..10)), Verdict::Duplicate);
        assert_eq!(d.check(&k, &(10..20)), Verdict::New { handover: false });
        assert_eq!(d.check(&k, &(5..15)), Verdict::Conflict);
        let other_epoch = ProducerKey { epoch: 2, ..k };
        assert_eq!(
            d.check(&other_epoch, &(0..10)),
            Verdict::New { handover: false },
            "a new epoch is never a duplicate"
        );
    }
}
