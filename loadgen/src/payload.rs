//! The messages a scenario publishes: seeded, realistic CDR JSON from [`shared::synth`], made
//! once before the clock starts and published identically in every run.
//!
//! `shared::synth::cdr_json` writes records of 245–275 bytes (mean ≈ 262). A record shorter
//! than the requested size is padded up to it; a longer one is left as it is, so the mean is
//! at least the request and is reported as measured. Padding of up to `SPACES_MAX` (16) bytes is
//! JSON whitespace before the closing brace; more is an `"ext"` field of random base-32 text,
//! which compresses about as badly as real opaque ids, not as well as a run of spaces.

use bytes::Bytes;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shared::synth;

/// Largest padding written as whitespace; beyond it an `"ext"` field carries random text.
const SPACES_MAX: usize = 16;
/// `,"ext":""` around the padding text.
const EXT_FIELD_OVERHEAD: usize = 9;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Mixed into the seed of the padding's random text.
const PAD_SEED: u64 = 0x7061_6464_696e_6721;

/// One MQTT message: topic and payload.
#[derive(Clone, Debug)]
pub struct Message {
    /// `cdr/site-{i % 8}/probe-{i / 8 % 16}`.
    pub topic: String,
    /// One JSON object.
    pub payload: Bytes,
}

/// The messages of a run and their total payload size.
#[derive(Debug)]
pub struct MessageSet {
    /// In publish order.
    pub messages: Vec<Message>,
    /// Sum of the payload lengths.
    pub payload_bytes: u64,
}

impl MessageSet {
    /// `n` CDRs from `seed`, each padded to at least `payload_bytes`.
    pub fn cdrs(n: u64, payload_bytes: usize, seed: u64) -> MessageSet {
        let mut rng = SmallRng::seed_from_u64(seed);
        // Its own stream, so the CDRs of a seed are the same whatever the padding.
        let mut pad_rng = SmallRng::seed_from_u64(seed ^ PAD_SEED);
        let mut total = 0;
        let messages: Vec<Message> = (0..n)
            .map(|i| {
                let mut payload = synth::cdr_json(&mut rng, i);
                pad(&mut payload, payload_bytes, &mut pad_rng);
                total += payload.len() as u64;
                Message { topic: synth::cdr_topic(i), payload: Bytes::from(payload) }
            })
            .collect();
        MessageSet { messages, payload_bytes: total }
    }

    /// Mean payload length in bytes.
    pub fn mean_payload_bytes(&self) -> f64 {
        self.payload_bytes as f64 / self.messages.len().max(1) as f64
    }
}

/// Pads the JSON object `json` to `target` bytes (see the module doc); a longer one is kept.
fn pad(json: &mut Vec<u8>, target: usize, rng: &mut impl Rng) {
    if json.len() >= target {
        return;
    }
    let close = json.pop().expect("a JSON object ends with its closing brace");
    debug_assert_eq!(close, b'}');
    let missing = target - json.len() - 1;
    if missing <= SPACES_MAX || missing < EXT_FIELD_OVERHEAD {
        json.resize(json.len() + missing, b' ');
    } else {
        json.extend_from_slice(b",\"ext\":\"");
        json.extend((0..missing - EXT_FIELD_OVERHEAD).map(|_| BASE32[rng.gen_range(0..32)]));
        json.push(b'"');
    }
    json.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_reaches_the_target_and_stays_json() {
        let natural = MessageSet::cdrs(500, 0, 3);
        for target in [0, 200, 250, 262, 270, 275, 280, 300, 1000] {
            let set = MessageSet::cdrs(500, target, 3);
            for (m, n) in set.messages.iter().zip(&natural.messages) {
                assert_eq!(m.payload.len(), n.payload.len().max(target));
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                let w: serde_json::Value = serde_json::from_slice(&n.payload).unwrap();
                assert_eq!(v["seq"], w["seq"]);
                assert_eq!(v["imsi"], w["imsi"], "the padding leaves the CDRs as they are");
            }
            assert!(set.mean_payload_bytes() >= target as f64);
        }
    }

    #[test]
    fn a_seed_repeats_the_set() {
        let (a, b) = (MessageSet::cdrs(100, 300, 9), MessageSet::cdrs(100, 300, 9));
        assert!(a.messages.iter().zip(&b.messages).all(|(x, y)| x.payload == y.payload && x.topic == y.topic));
        assert_eq!(a.payload_bytes, b.payload_bytes);
    }
}
