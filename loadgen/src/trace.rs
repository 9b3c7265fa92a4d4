//! Traceable device payloads: every message `loadgen` publishes carries an id and the time it
//! was sent, so `loadgen verify` can prove each one arrived exactly once and say how long it
//! took.
//!
//! - CDRs: `shared::synth::cdr_json` (record type voice / SMS / data, served IMSI, MSISDN, IMEI,
//!   cell, start time, duration, volume up / down, charging id, cause for closing) with
//!   `"id":"<device>-<n>","sent":<ms>` as the first two fields.
//! - Sensor readings: a SenML (RFC 8428) pack from `shared::synth::senml` with two more records
//!   at its end, `{"n":"loadgen.id","vs":"<device>-<n>"}` and `{"n":"loadgen.sent","v":<ms>}`.
//!
//! Device `d`'s message `n` is the same bytes for the same seed whatever else runs: each device
//! draws from its own RNG, seeded from (seed, d).

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde_json::Value;
use shared::synth;

/// What a device publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// 3GPP-style CDRs as JSON.
    Cdr,
    /// Sensor readings as SenML JSON.
    Senml,
}

/// Which message of which device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TraceId {
    /// Device number.
    pub device: u32,
    /// Message number of that device, from 0.
    pub n: u64,
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "d{}-{}", self.device, self.n)
    }
}

impl TraceId {
    /// Parses `d<device>-<n>`.
    pub fn parse(s: &str) -> Option<TraceId> {
        let (d, n) = s.strip_prefix('d')?.split_once('-')?;
        Some(TraceId { device: d.parse().ok()?, n: n.parse().ok()? })
    }
}

/// The payloads of one device.
#[derive(Debug)]
pub struct DeviceGen {
    kind: Kind,
    device: u32,
    rng: SmallRng,
    pad_to: usize,
}

impl DeviceGen {
    /// Device `device` of a run seeded `seed`; payloads are padded with JSON whitespace (CDRs)
    /// up to `pad_to` bytes.
    pub fn new(kind: Kind, seed: u64, device: u32, pad_to: usize) -> DeviceGen {
        let s = seed ^ (u64::from(device) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        DeviceGen { kind, device, rng: SmallRng::seed_from_u64(s), pad_to }
    }

    /// Message `n` (call in order), sent at `sent_ms`.
    pub fn payload(&mut self, n: u64, sent_ms: i64) -> Vec<u8> {
        let id = TraceId { device: self.device, n };
        // The synthetic record number spreads devices over sites like the benches do.
        let i = u64::from(self.device) + n * 1_000_003;
        match self.kind {
            Kind::Cdr => {
                let body = synth::cdr_json(&mut self.rng, i);
                let mut out = format!(r#"{{"id":"{id}","sent":{sent_ms},"#).into_bytes();
                out.extend_from_slice(&body[1..]);
                if out.len() < self.pad_to {
                    let close = out.pop();
                    out.resize(self.pad_to - 1, b' ');
                    out.extend(close);
                }
                out
            }
            Kind::Senml => {
                let mut body = synth::senml(&mut self.rng, i);
                body.pop();
                body.extend_from_slice(
                    format!(r#",{{"n":"loadgen.id","vs":"{id}"}},{{"n":"loadgen.sent","v":{sent_ms}}}]"#).as_bytes(),
                );
                body
            }
        }
    }
}

/// The id and send time (ms) a payload carries, if it is one of ours.
pub fn parse(payload: &[u8]) -> Option<(TraceId, i64)> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    match &v {
        Value::Object(o) => Some((TraceId::parse(o.get("id")?.as_str()?)?, o.get("sent")?.as_i64()?)),
        Value::Array(pack) => {
            let field = |name: &str, key: &str| {
                pack.iter().rev().find(|r| r.get("n").and_then(Value::as_str) == Some(name)).and_then(|r| r.get(key))
            };
            let id = TraceId::parse(field("loadgen.id", "vs")?.as_str()?)?;
            let sent = field("loadgen.sent", "v")?.as_f64()? as i64;
            Some((id, sent))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdrs_carry_their_id_send_time_and_the_3gpp_fields() {
        let mut g = DeviceGen::new(Kind::Cdr, 7, 12, 300);
        let p = g.payload(5, 1_717_200_000_123);
        assert_eq!(p.len(), 300);
        let v: Value = serde_json::from_slice(&p).unwrap();
        for key in ["type", "imsi", "msisdn", "imei", "cell", "start", "dur", "ul", "dl", "chg", "cause"] {
            assert!(v.get(key).is_some(), "{key} in {v}");
        }
        assert!(["voice", "sms", "data"].contains(&v["type"].as_str().unwrap()));
        assert_eq!(parse(&p), Some((TraceId { device: 12, n: 5 }, 1_717_200_000_123)));
    }

    #[test]
    fn senml_packs_carry_their_id_and_stay_senml() {
        let mut g = DeviceGen::new(Kind::Senml, 7, 3, 0);
        let p = g.payload(9, 1_717_200_000_500);
        let v: Value = serde_json::from_slice(&p).unwrap();
        let pack = v.as_array().unwrap();
        assert!(pack[0].get("bn").is_some() && pack[0].get("v").is_some(), "{v}");
        assert_eq!(parse(&p), Some((TraceId { device: 3, n: 9 }, 1_717_200_000_500)));
    }

    #[test]
    fn a_seed_repeats_each_device_and_devices_differ() {
        let run = |d| {
            let mut g = DeviceGen::new(Kind::Cdr, 1, d, 0);
            (0..20).map(|n| g.payload(n, 0)).collect::<Vec<_>>()
        };
        assert_eq!(run(4), run(4));
        assert_ne!(run(4), run(5));
    }

    #[test]
    fn foreign_payloads_are_not_ours() {
        for p in [&b"not json"[..], b"{}", br#"{"id":"x-1","sent":1}"#, br#"[{"n":"t","v":1}]"#, b"12"] {
            assert_eq!(parse(p), None, "{}", String::from_utf8_lossy(p));
        }
        assert_eq!(TraceId::parse("d3-4"), Some(TraceId { device: 3, n: 4 }));
        assert_eq!(TraceId { device: 3, n: 4 }.to_string(), "d3-4");
    }
}
