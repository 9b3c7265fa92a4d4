//! One broker connection's ack session. Pure: no sockets, no clock (times come in as
//! microseconds on a monotonic scale the caller owns).
//!
//! Invariants:
//! - PUBACKs leave in the order the PUBLISHes came in (MQTT requires it), each only once the
//!   batch holding its record is committed (durable under the stream's fsync policy).
//! - A redelivered PUBLISH (DUP set, same packet id, same topic and payload as the record last
//!   taken under that packet id) is acknowledged when the original is committed, and is not
//!   taken again: a crash or reconnect between fsync and PUBACK makes no duplicate.
//! - When the connection drops, queued acks are forgotten: the broker redelivers every
//!   unacknowledged message of the session with DUP set, and each is matched above.

use std::collections::{HashMap, VecDeque};

/// Where a record waits to be committed: a stream and the number of the batch it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRef {
    /// Stream index.
    pub stream: usize,
    /// Batch number within the stream's run of this process.
    pub batch_no: u64,
}

/// What became of a PUBLISH, told with its ack (listen mode turns it into an MQTT 5 reason
/// code; subscribe mode acks every outcome alike).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// Stored in its stream.
    #[default]
    Stored,
    /// A redelivery of a record already stored.
    Duplicate,
    /// No route matched and no unmatched stream is set: counted and dropped.
    Unrouted,
    /// Not stored: its stream is full under `backpressure` and the connection takes refusals.
    QuotaExceeded,
    /// Invalid for its stream's format: dead-lettered.
    PayloadInvalid,
    /// Above `record_bytes_max` or a codec bound: dead-lettered without its payload, or dropped.
    TooLarge,
}

/// What to do with an incoming PUBLISH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// New data: take it.
    New,
    /// A redelivery of a record already taken; `None` if it is already durable.
    Duplicate(Option<BatchRef>),
}

#[derive(Debug)]
struct Ticket {
    pkid: u16,
    wait: Option<BatchRef>,
    received_us: u64,
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug)]
struct Recent {
    hash: u64,
    at: Option<BatchRef>,
}

/// The acks owed on one connection.
#[derive(Debug, Default)]
pub struct AckSession {
    queue: VecDeque<Ticket>,
    recent: HashMap<u16, Recent>,
}

impl AckSession {
    /// An empty session.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers a record found in the log at start, taken under `pkid` before a restart.
    pub fn remember_durable(&mut self, pkid: u16, hash: u64) {
        self.recent.insert(pkid, Recent { hash, at: None });
    }

    /// Whether a PUBLISH with `pkid`, `dup` flag and content `hash` is new.
    pub fn handle_publish(&self, pkid: u16, dup: bool, hash: u64) -> Admit {
        match self.recent.get(&pkid) {
            Some(r) if dup && r.hash == hash => Admit::Duplicate(r.at),
            _ => Admit::New,
        }
    }

    /// Queues the ack of a PUBLISH whose record was taken into `at` (or is durable already:
    /// `None`), and remembers it for redeliveries when `hash` is given.
    pub fn handle_taken(&mut self, pkid: u16, hash: Option<u64>, at: Option<BatchRef>, received_us: u64) {
        self.handle_taken_as(pkid, hash, at, received_us, Outcome::Stored);
    }

    /// [`AckSession::handle_taken`], with what became of the PUBLISH.
    pub fn handle_taken_as(
        &mut self,
        pkid: u16,
        hash: Option<u64>,
        at: Option<BatchRef>,
        received_us: u64,
        outcome: Outcome,
    ) {
        if let Some(hash) = hash {
            self.recent.insert(pkid, Recent { hash, at });
        }
        self.queue.push_back(Ticket { pkid, wait: at, received_us, outcome });
    }

    /// The batch `at` is committed: records remembered in it are durable.
    pub fn handle_committed(&mut self, is_committed: impl Fn(BatchRef) -> bool) {
        for r in self.recent.values_mut() {
            if r.at.is_some_and(&is_committed) {
                r.at = None;
            }
        }
    }

    /// The acks that may leave now, in order: `(pkid, received_us, outcome)`.
    pub fn poll_acks(&mut self, is_committed: impl Fn(BatchRef) -> bool) -> Vec<(u16, u64, Outcome)> {
        let mut out = Vec::new();
        while let Some(t) = self.queue.front() {
            if t.wait.is_some_and(|at| !is_committed(at)) {
                break;
            }
            out.push((t.pkid, t.received_us, t.outcome));
            self.queue.pop_front();
        }
        out
    }

    /// The connection dropped: forget the queued acks (see the module doc).
    pub fn handle_reset(&mut self) {
        self.queue.clear();
    }

    /// Whether any record is remembered for redeliveries.
    pub fn remembers_any(&self) -> bool {
        !self.recent.is_empty()
    }

    /// Acks owed and not yet sent.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Streams the waiting acks depend on.
    pub fn waiting_streams(&self) -> impl Iterator<Item = usize> + '_ {
        self.queue.iter().filter_map(|t| t.wait.map(|w| w.stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(stream: usize, batch_no: u64) -> Option<BatchRef> {
        Some(BatchRef { stream, batch_no })
    }

    #[test]
    fn acks_leave_in_receive_order_once_committed() {
        let mut s = AckSession::new();
        s.handle_taken(1, Some(11), at(0, 0), 10);
        s.handle_taken(2, Some(22), at(1, 0), 20);
        s.handle_taken(3, None, None, 30);
        // Stream 1 committed first: nothing may leave before pkid 1.
        assert!(s.poll_acks(|b| b.stream == 1).is_empty());
        let ok = Outcome::Stored;
        assert_eq!(s.poll_acks(|_| true), vec![(1, 10, ok), (2, 20, ok), (3, 30, ok)]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn redelivery_is_recognised_by_pkid_dup_and_content() {
        let mut s = AckSession::new();
        s.handle_taken(7, Some(0xabc), at(0, 3), 1);
        assert_eq!(s.handle_publish(7, true, 0xabc), Admit::Duplicate(at(0, 3)));
        assert_eq!(s.handle_publish(7, false, 0xabc), Admit::New, "without DUP the pkid was reused");
        assert_eq!(s.handle_publish(7, true, 0xdef), Admit::New, "other content under a reused pkid");
        s.handle_committed(|b| b.batch_no <= 3);
        assert_eq!(s.handle_publish(7, true, 0xabc), Admit::Duplicate(None));
        s.remember_durable(9, 5);
        assert_eq!(s.handle_publish(9, true, 5), Admit::Duplicate(None));
    }

    #[test]
    fn reset_forgets_queued_acks_but_not_what_was_taken() {
        let mut s = AckSession::new();
        s.handle_taken(1, Some(1), at(0, 0), 0);
        s.handle_reset();
        assert_eq!(s.pending(), 0);
        assert_eq!(s.handle_publish(1, true, 1), Admit::Duplicate(at(0, 0)));
    }
}
