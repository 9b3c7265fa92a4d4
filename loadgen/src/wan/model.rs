//! What a bad WAN does to one direction of a UDP flow, as a pure function of time, datagram
//! length and a seeded RNG: loss, delay with jitter, reordering, duplication, a bandwidth cap
//! with a bounded queue, and scheduled outages. No sockets, no clock: the proxy passes the time
//! since it started, and gets back when (if ever) each copy of the datagram is to be delivered.
//!
//! Order of the decisions for a datagram arriving at `now`:
//! 1. inside an outage window → dropped (`outage`);
//! 2. random loss with probability `loss` → dropped (`lost`);
//! 3. the bandwidth cap: the link sends one datagram after another at `rate` bytes/s; a
//!    datagram that would wait behind more than `queue_bytes_max` bytes is dropped (`queue`),
//!    as a router's tail drop does;
//! 4. delay: `delay` plus a uniform jitter in `[-jitter, +jitter]` (never below zero);
//!    with probability `reorder` a further `reorder_hold`, so later datagrams overtake it;
//! 5. with probability `duplicate` a second copy, delivered `duplicate_gap` after the first.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A scheduled outage: nothing passes from `start` (since the proxy started) for `length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    /// When it begins, from the start of the run.
    pub start: Duration,
    /// How long it lasts.
    pub length: Duration,
}

impl Outage {
    /// Parses `LENGTH@START`, e.g. `30s@10s`: 30 s without a link, from 10 s into the run.
    pub fn parse(s: &str) -> Result<Outage, String> {
        let (len, at) = s.split_once('@').ok_or_else(|| format!("{s:?}: expected LENGTH@START, e.g. 30s@10s"))?;
        let d = |v: &str| shared::units::Millis::parse(v).map(|m| m.duration());
        Ok(Outage { start: d(at)?, length: d(len)? })
    }

    /// Whether `t` (from the start) falls inside it.
    pub fn covers(&self, t: Duration) -> bool {
        t >= self.start && t < self.start + self.length
    }
}

/// The impairments of one direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Impairment {
    /// Probability a datagram is lost, 0..=1.
    pub loss: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Uniform jitter around the delay.
    pub jitter: Duration,
    /// Probability a datagram is held back by `reorder_hold`, 0..=1.
    pub reorder: f64,
    /// Extra hold of a reordered datagram.
    pub reorder_hold: Duration,
    /// Probability a datagram is delivered twice, 0..=1.
    pub duplicate: f64,
    /// Time between a datagram and its duplicate.
    pub duplicate_gap: Duration,
    /// Link rate in bytes per second; `None` is unlimited.
    pub rate: Option<u64>,
    /// Most bytes waiting for the link when `rate` is set; more are tail-dropped.
    pub queue_bytes_max: u64,
    /// Outage windows.
    pub outages: Vec<Outage>,
}

impl Default for Impairment {
    /// A perfect link.
    fn default() -> Self {
        Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_hold: Duration::from_millis(5),
            duplicate: 0.0,
            duplicate_gap: Duration::from_micros(100),
            rate: None,
            queue_bytes_max: 1 << 20,
            outages: Vec::new(),
        }
    }
}

impl Impairment {
    /// Checks the values; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [("loss", self.loss), ("reorder", self.reorder), ("duplicate", self.duplicate)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be a probability in 0..=1 (a percentage / 100), got {p}"));
            }
        }
        if self.rate == Some(0) {
            return Err("rate must be above 0 bytes/s (leave it out for no cap)".into());
        }
        if self.queue_bytes_max == 0 {
            return Err("queue_bytes_max must be above 0".into());
        }
        Ok(())
    }
}

/// Why a datagram was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Inside an outage window.
    Outage,
    /// Random loss.
    Lost,
    /// The bandwidth cap's queue was full.
    Queue,
}

/// What happens to one datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Delivered at these times (since the start); two when duplicated.
    Deliver {
        /// The first copy.
        at: Duration,
        /// The duplicate, if any.
        again: Option<Duration>,
        /// Whether it was held back to be overtaken.
        reordered: bool,
    },
    /// Not delivered.
    Dropped(Drop),
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams offered.
    pub offered: u64,
    /// Bytes offered.
    pub offered_bytes: u64,
    /// Datagrams delivered (duplicates counted again).
    pub delivered: u64,
    /// Dropped in an outage.
    pub outage: u64,
    /// Dropped at random.
    pub lost: u64,
    /// Tail-dropped by the bandwidth cap's queue.
    pub queue: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
    /// Delivered twice.
    pub duplicated: u64,
}

/// One direction of the link.
#[derive(Debug)]
pub struct Link {
    imp: Impairment,
    rng: SmallRng,
    /// When the bandwidth-capped link finishes sending what it has taken.
    busy_until: Duration,
    counts: Counts,
}

impl Link {
    /// A link with these impairments; `seed` makes its random choices reproducible.
    pub fn new(imp: Impairment, seed: u64) -> Link {
        Link { imp, rng: SmallRng::seed_from_u64(seed), busy_until: Duration::ZERO, counts: Counts::default() }
    }

    /// Decides the fate of a datagram of `len` bytes arriving at `now`.
    pub fn offer(&mut self, now: Duration, len: usize) -> Fate {
        self.counts.offered += 1;
        self.counts.offered_bytes += len as u64;
        let fate = self.decide(now, len);
        match &fate {
            Fate::Dropped(Drop::Outage) => self.counts.outage += 1,
            Fate::Dropped(Drop::Lost) => self.counts.lost += 1,
            Fate::Dropped(Drop::Queue) => self.counts.queue += 1,
            Fate::Deliver { again, reordered, .. } => {
                self.counts.delivered += 1 + u64::from(again.is_some());
                self.counts.duplicated += u64::from(again.is_some());
                self.counts.reordered += u64::from(*reordered);
            }
        }
        fate
    }

    /// Adds an outage window (times from the link's start).
    pub fn add_outage(&mut self, o: Outage) {
        self.imp.outages.push(o);
    }

    /// What happened so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    fn decide(&mut self, now: Duration, len: usize) -> Fate {
        if self.imp.outages.iter().any(|o| o.covers(now)) {
            return Fate::Dropped(Drop::Outage);
        }
        if self.imp.loss > 0.0 && self.rng.r#gen::<f64>() < self.imp.loss {
            return Fate::Dropped(Drop::Lost);
        }
        let mut sent = now;
        if let Some(rate) = self.imp.rate {
            let start = self.busy_until.max(now);
            let waiting = (start - now).as_secs_f64() * rate as f64;
            if waiting > self.imp.queue_bytes_max as f64 {
                return Fate::Dropped(Drop::Queue);
            }
            self.busy_until = start + Duration::from_secs_f64(len as f64 / rate as f64);
            sent = self.busy_until;
        }
        let mut at = sent + self.imp.delay;
        if !self.imp.jitter.is_zero() {
            let j = self.imp.jitter.as_secs_f64();
            let off = self.rng.gen_range(-j..=j);
            at = Duration::from_secs_f64((at.as_secs_f64() + off).max(sent.as_secs_f64()));
        }
        let reordered = self.imp.reorder > 0.0 && self.rng.r#gen::<f64>() < self.imp.reorder;
        if reordered {
            at += self.imp.reorder_hold;
        }
        let again = (self.imp.duplicate > 0.0 && self.rng.r#gen::<f64>() < self.imp.duplicate)
            .then(|| at + self.imp.duplicate_gap);
        Fate::Deliver { at, again, reordered }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn run(imp: Impairment, n: u32, every: Duration, len: usize) -> (Vec<Fate>, Counts) {
        let mut link = Link::new(imp, 7);
        let fates = (0..n).map(|i| link.offer(every * i, len)).collect();
        (fates, link.counts())
    }

    #[test]
    fn a_perfect_link_delivers_everything_at_once() {
        let (fates, c) = run(Impairment::default(), 100, MS, 1200);
        assert!(
            fates
                .iter()
                .enumerate()
                .all(|(i, f)| *f == Fate::Deliver { at: MS * i as u32, again: None, reordered: false })
        );
        assert_eq!((c.offered, c.delivered), (100, 100));
    }

    #[test]
    fn loss_drops_about_the_given_share() {
        let (_, c) = run(Impairment { loss: 0.01, ..Impairment::default() }, 100_000, MS, 1200);
        assert!((800..=1200).contains(&c.lost), "{c:?}");
        assert_eq!(c.delivered + c.lost, 100_000);
    }

    #[test]
    fn delay_and_jitter_stay_in_their_window() {
        let imp = Impairment { delay: 25 * MS, jitter: 5 * MS, ..Impairment::default() };
        let (fates, _) = run(imp, 1000, MS, 100);
        let mut spread = (Duration::MAX, Duration::ZERO);
        for (i, f) in fates.iter().enumerate() {
            let Fate::Deliver { at, .. } = f else { panic!("dropped without loss") };
            let d = *at - MS * i as u32;
            assert!(d >= 20 * MS && d <= 30 * MS, "{d:?}");
            spread = (spread.0.min(d), spread.1.max(d));
        }
        assert!(spread.1 - spread.0 > 8 * MS, "jitter varies the delay: {spread:?}");
    }

    #[test]
    fn outages_drop_everything_inside_the_window_only() {
        let imp = Impairment { outages: vec![Outage::parse("10ms@20ms").unwrap()], ..Impairment::default() };
        let (fates, c) = run(imp, 40, MS, 100);
        for (i, f) in fates.iter().enumerate() {
            assert_eq!(matches!(f, Fate::Dropped(Drop::Outage)), (20..30).contains(&i), "{i}");
        }
        assert_eq!(c.outage, 10);
    }

    #[test]
    fn the_rate_cap_spaces_datagrams_and_tail_drops_beyond_the_queue() {
        // 1000 B/s: a 100 B datagram takes 100 ms on the link; all offered at t = 0; the fifth
        // would wait behind 400 B.
        let imp = Impairment { rate: Some(1000), queue_bytes_max: 300, ..Impairment::default() };
        let (fates, c) = run(imp, 6, Duration::ZERO, 100);
        let at: Vec<_> =
            fates.iter().filter_map(|f| if let Fate::Deliver { at, .. } = f { Some(*at) } else { None }).collect();
        assert_eq!(at, vec![100 * MS, 200 * MS, 300 * MS, 400 * MS], "{fates:?}");
        assert_eq!(c.queue, 2);
    }

    #[test]
    fn reordering_lets_later_datagrams_overtake() {
        let imp = Impairment { reorder: 0.2, reorder_hold: 5 * MS, ..Impairment::default() };
        let (fates, c) = run(imp, 1000, MS, 100);
        let at: Vec<_> = fates.iter().map(|f| if let Fate::Deliver { at, .. } = f { *at } else { panic!() }).collect();
        let overtaken = at.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(overtaken > 100, "{overtaken}");
        assert!((150..=250).contains(&c.reordered), "{c:?}");
    }

    #[test]
    fn duplicates_come_a_gap_after_the_first_copy() {
        let imp = Impairment { duplicate: 0.5, ..Impairment::default() };
        let (fates, c) = run(imp, 1000, MS, 100);
        for f in &fates {
            if let Fate::Deliver { at, again: Some(a), .. } = f {
                assert_eq!(*a - *at, Duration::from_micros(100));
            }
        }
        assert!((400..=600).contains(&c.duplicated), "{c:?}");
        assert_eq!(c.delivered, 1000 + c.duplicated);
    }

    #[test]
    fn the_same_seed_gives_the_same_fates() {
        let imp = Impairment { loss: 0.1, jitter: 3 * MS, reorder: 0.1, duplicate: 0.1, ..Impairment::default() };
        assert_eq!(run(imp.clone(), 500, MS, 100).0, run(imp, 500, MS, 100).0);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Impairment { loss: 2.0, ..Impairment::default() }.validate().unwrap_err();
        assert!(e.contains("loss"), "{e}");
        let e = Impairment { rate: Some(0), ..Impairment::default() }.validate().unwrap_err();
        assert!(e.contains("rate"), "{e}");
        assert!(Outage::parse("30s").unwrap_err().contains("LENGTH@START"));
        assert_eq!(
            Outage::parse("30s@10s").unwrap(),
            Outage { start: Duration::from_secs(10), length: Duration::from_secs(30) }
        );
    }
}
