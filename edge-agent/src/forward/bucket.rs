//! A token bucket for the bandwidth cap on metered backhaul. Pure: time comes in as `now_us`.

/// Bytes per second with a burst of one second's worth (at least one batch must fit).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last_us: u64,
}

impl TokenBucket {
    /// `rate` bytes per second; the bucket starts full.
    pub fn new(rate: u64, now_us: u64) -> Self {
        TokenBucket { rate, burst: rate, tokens: rate as f64, last_us: now_us }
    }

    /// Takes `bytes` (a frame larger than the burst may drive the bucket negative: it goes
    /// out, and later sends wait it off). Returns how long to wait first, µs.
    pub fn take(&mut self, bytes: u64, now_us: u64) -> u64 {
        let elapsed = now_us.saturating_sub(self.last_us) as f64 / 1e6;
        self.last_us = now_us.max(self.last_us);
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        let wait = if self.tokens >= bytes.min(self.burst) as f64 {
            0
        } else {
            ((bytes.min(self.burst) as f64 - self.tokens) / self.rate as f64 * 1e6).ceil() as u64
        };
        self.tokens -= bytes as f64;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_the_cap() {
        let mut b = TokenBucket::new(1000, 0);
        let mut now = 0;
        for _ in 0..100 {
            now += b.take(100, now);
        }
        // 10,000 bytes at 1,000 B/s with a 1,000-byte head start: about 9 s.
        assert!((8_900_000..=9_100_000).contains(&now), "{now}");
    }

    #[test]
    fn an_oversize_frame_passes_and_is_paid_for_later() {
        let mut b = TokenBucket::new(1000, 0);
        assert_eq!(b.take(5000, 0), 0);
        let wait = b.take(100, 0);
        assert!(wait >= 4_000_000, "{wait}");
    }
}
