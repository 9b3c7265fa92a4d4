//! Seeded generators of realistic payloads: JSON CDRs and SenML sensor readings.
//!
//! For benches and `loadgen`. Output depends only on the RNG's state and the record number `i`,
//! so a seed reproduces a run byte for byte. Values follow plausible distributions rather than
//! repeating a template: subscribers are drawn from a pool of [`SUBSCRIBERS`] (a few heavy users,
//! a long tail), durations and volumes are log-normal, cells belong to the record's site, charging
//! ids are random. Compression ratios measured on these payloads are therefore not inflated by
//! repeats; what compresses is what compresses in real CDRs (key names, PLMN prefixes, TACs).
//!
//! Record `i` belongs to site `i % SITES`; its topic, its cell and its time all follow from `i`:
//!
//! ```text
//! cdr/site-{i % 8}/probe-{i / 8 % 16}          {"seq":..,"type":"data","imsi":"310260..",..}
//! sensors/site-{d % 8}/{kind}-{d}, d = i % 512  [{"bn":"urn:dev:mac:..:","bt":..,"n":..,"u":..,"v":..},..]
//! ```

use std::io::Write;

use rand::Rng;

use crate::ndjson::rfc3339_ms;

/// Sites (edges) the generated records spread over.
pub const SITES: u64 = 8;
/// Network probes per site publishing CDRs.
pub const PROBES_PER_SITE: u64 = 16;
/// Sensors publishing SenML, spread over the sites.
pub const SENSORS: u64 = 512;
/// Subscribers the CDRs are drawn from.
pub const SUBSCRIBERS: u64 = 1_000_000;
/// Publish time of record 0: 2024-06-01T00:00:00Z, ms.
pub const START_MS: i64 = 1_717_200_000_000;
/// Publish interval between consecutive records, ms (100 records/s in all).
pub const INTERVAL_MS: i64 = 10;

/// The meta of a synthetic batch in `format`, as the benches encode them: producer
/// `edge-bench`, epoch `0x5eed`, stream `cdr` for JSON (`sensors` otherwise), first seq 0.
pub fn batch_meta(format: crate::batch::PayloadFormat) -> crate::batch::BatchMeta {
    use crate::batch::PayloadFormat;
    crate::batch::BatchMeta {
        producer: "edge-bench".into(),
        epoch: crate::ids::Epoch(0x5eed),
        stream: if format == PayloadFormat::Json { "cdr".into() } else { "sensors".into() },
        base_seq: crate::ids::Seq(0),
        payload_format: format,
    }
}

/// When record `i` is published (its event time at the edge), ms since the Unix epoch.
pub fn ts_ms(i: u64) -> i64 {
    START_MS + i as i64 * INTERVAL_MS
}

/// MQTT topic of CDR `i`, e.g. `cdr/site-3/probe-12`.
pub fn cdr_topic(i: u64) -> String {
    format!("cdr/site-{}/probe-{}", i % SITES, i / SITES % PROBES_PER_SITE)
}

/// MQTT topic of sensor reading `i`, e.g. `sensors/site-1/env-137`.
pub fn sensor_topic(i: u64) -> String {
    let d = i % SENSORS;
    format!("sensors/site-{}/{}-{d}", d % SITES, PROFILES[(d % 4) as usize].kind)
}

/// CDR `i` as one JSON object of about 250 bytes: a data session, a voice call or an SMS,
/// closed at [`ts_ms`]`(i)`, with the subscriber's IMSI, MSISDN and IMEI, the serving cell of
/// the record's site, volumes, RAT, APN, QCI, charging id and closing cause.
pub fn cdr_json(rng: &mut impl Rng, i: u64) -> Vec<u8> {
    let site = i % SITES;
    let sub = Subscriber::draw(rng);
    let kind = match rng.gen_range(0..100) {
        0..70 => CdrKind::Data,
        70..92 => CdrKind::Voice,
        _ => CdrKind::Sms,
    };
    let rat = match (kind, rng.gen_range(0..100)) {
        (_, 0..25) => "NR",
        (_, 25..87) => "LTE",
        (CdrKind::Data, 87..97) | (CdrKind::Voice | CdrKind::Sms, 87..93) => "UMTS",
        _ => "GSM",
    };
    let usage = Usage::draw(rng, kind, rat);
    // eNB / gNB ids of a site are neighbours; three sectors each.
    let node = 40_000 + site * 61 + rng.gen_range(0..6);
    let sector = rng.gen_range(1..=3u64);
    let cell = if rat == "NR" { node * 4096 + sector } else { node * 256 + sector };
    let tac = 4100 + site * 3 + node % 3;
    let (type_name, apn) = match kind {
        CdrKind::Data => ("data", if sub.m2m { "iot.m2m" } else { "internet" }),
        // Circuit-switched calls and SMS (UMTS, GSM) have no APN.
        CdrKind::Voice => ("voice", if matches!(rat, "NR" | "LTE") { "ims" } else { "" }),
        CdrKind::Sms => ("sms", if matches!(rat, "NR" | "LTE") { "ims" } else { "" }),
    };
    let end_ms = ts_ms(i) - rng.gen_range(0..2_000);
    let start_ms = end_ms - usage.dur_ms;
    let mut out = Vec::with_capacity(320);
    write!(
        out,
        r#"{{"seq":{i},"type":"{type_name}","imsi":"{}","msisdn":"{}","imei":"{}","start":"{}","dur":{:.3},"ul":{},"dl":{},"rat":"{rat}","apn":"{apn}","tac":{tac},"cell":{cell},"qci":{},"chg":{},"cause":{}}}"#,
        sub.imsi,
        sub.msisdn,
        sub.imei,
        rfc3339_ms(start_ms),
        usage.dur_ms as f64 / 1000.0,
        usage.ul,
        usage.dl,
        usage.qci,
        rng.r#gen::<u32>(),
        usage.cause,
    )
    .expect("writing to a Vec cannot fail");
    out
}

/// Sensor reading `i` as a SenML (RFC 8428) JSON array of 1–4 measurements of sensor
/// `i % SENSORS`: the first carries the base name and base time, each has a name, unit and value.
pub fn senml(rng: &mut impl Rng, i: u64) -> Vec<u8> {
    let d = i % SENSORS;
    let profile = &PROFILES[(d % 4) as usize];
    let h = splitmix64(d ^ 0x5e4d_0000);
    let count = rng.gen_range(1..=profile.fields.len());
    let bt_ms = ts_ms(i) - rng.gen_range(0..500);
    // A daily cycle, so series move like real ones instead of pure noise.
    let phase = ((bt_ms - START_MS) as f64 / 86_400_000.0 + (h % 1000) as f64 / 1000.0) * std::f64::consts::TAU;
    let mut out = Vec::with_capacity(200);
    out.push(b'[');
    for (k, f) in profile.fields.iter().take(count).enumerate() {
        // Each sensor sits somewhere in the field's range and drifts around it.
        let spot = ((h >> (k * 12)) & 0xfff) as f64 / 4096.0;
        let base = f.lo + (f.hi - f.lo) * (0.3 + 0.4 * spot);
        let v = base + (f.hi - f.lo) * (0.15 * phase.sin() + 0.03 * (rng.r#gen::<f64>() - 0.5));
        let v = v.clamp(f.lo, f.hi);
        let r = if k == 0 {
            let bn = h & 0x00ff_ffff_ffff_ffff;
            write!(out, r#"{{"bn":"urn:dev:mac:{bn:016x}:","bt":{:.3},"#, bt_ms as f64 / 1000.0)
        } else {
            write!(out, ",{{")
        };
        r.and_then(|()| write!(out, r#""n":"{}","u":"{}","v":{:.*}}}"#, f.name, f.unit, f.decimals, v))
            .expect("writing to a Vec cannot fail");
    }
    out.push(b']');
    out
}

// ---- helpers -------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum CdrKind {
    Data,
    Voice,
    Sms,
}

/// Identifiers of one subscriber, stable across that subscriber's records.
struct Subscriber {
    imsi: String,
    msisdn: String,
    imei: String,
    m2m: bool,
}

/// Home network (MCC 310, MNC 260) and roaming partners: (IMSI prefix, MSISDN country code).
const PLMNS: [(&str, &str); 5] = [("310260", "1"), ("23415", "44"), ("26201", "49"), ("20801", "33"), ("44010", "81")];
/// Type allocation codes (first 8 IMEI digits) of a mix of handsets and IoT modules.
const TACS: [&str; 16] = [
    "35332811", "35391110", "35460610", "35925406", "35407115", "35899908", "86769104", "86891503", "35328511",
    "35676211", "01326300", "35209900", "86437001", "35161508", "35803106", "01420700",
];
const AREA_CODES: [u16; 8] = [415, 650, 408, 510, 212, 646, 312, 206];

impl Subscriber {
    /// Draws a subscriber, favouring heavy users: index `u² × SUBSCRIBERS` puts 3% of the
    /// records on the top 0.1% of subscribers.
    fn draw(rng: &mut impl Rng) -> Self {
        let u: f64 = rng.r#gen();
        let idx = ((u * u * SUBSCRIBERS as f64) as u64).min(SUBSCRIBERS - 1);
        let h = splitmix64(idx);
        let h2 = splitmix64(h);
        // 88% home subscribers, the rest inbound roamers.
        let (prefix, cc) = if h % 100 < 88 { PLMNS[0] } else { PLMNS[1 + (h >> 8) as usize % 4] };
        let msin_digits = 15 - prefix.len();
        let imsi = format!("{prefix}{:0w$}", (h >> 16) % 10u64.pow(msin_digits as u32), w = msin_digits);
        let msisdn = if cc == "1" {
            let npa = AREA_CODES[(h2 % 8) as usize];
            format!("1{npa}{:07}", (h2 >> 8) % 10_000_000)
        } else {
            format!("{cc}{:010}", (h2 >> 8) % 10_000_000_000)
        };
        let tac = TACS[(h2 >> 48) as usize % TACS.len()];
        let body = format!("{tac}{:06}", (h >> 40) % 1_000_000);
        let imei = format!("{body}{}", luhn_digit(&body));
        // Modules with an IoT TAC (01…/864…) use the M2M APN.
        let m2m = tac.starts_with("01") || tac.starts_with("864");
        Subscriber { imsi, msisdn, imei, m2m }
    }
}

/// What a CDR accounts for.
struct Usage {
    dur_ms: i64,
    ul: u64,
    dl: u64,
    qci: u8,
    /// Closing cause: 3GPP TS 32.298 causeForRecClosing for data, Q.850 for calls.
    cause: u8,
}

impl Usage {
    fn draw(rng: &mut impl Rng, kind: CdrKind, rat: &str) -> Self {
        match kind {
            CdrKind::Data => {
                // Median session 5 min; partial CDRs are cut at an hour (time limit).
                let dur_s = lognormal(rng, 300.0, 1.2);
                let (dur_s, time_limit) = if dur_s > 3600.0 { (3600.0, true) } else { (dur_s, false) };
                // Median 20 kB/s down, heavy-tailed; uplink a fraction of it.
                let rate = lognormal(rng, 20_000.0, 1.5).min(20_000_000.0);
                let dl = (rate * dur_s) as u64 + rng.gen_range(0..4096);
                let ul = (dl as f64 * rng.gen_range(0.03..0.35)) as u64 + rng.gen_range(0..2048);
                let (dl, volume_limit) = if dl > 2_000_000_000 { (2_000_000_000, true) } else { (dl, false) };
                let cause = match rng.gen_range(0..100) {
                    _ if volume_limit => 16,
                    _ if time_limit => 17,
                    0..84 => 0,
                    84..92 => 18,
                    92..96 => 4,
                    96..98 => 22,
                    _ => 23,
                };
                let qci = match rng.gen_range(0..100) {
                    0..82 => 9,
                    82..94 => 8,
                    _ => 6,
                };
                Usage { dur_ms: (dur_s * 1000.0) as i64, ul, dl, qci, cause }
            }
            CdrKind::Voice => {
                // 14% of attempts fail (busy, no answer, unreachable); answered calls last a
                // median 75 s.
                let (dur_s, cause) = match rng.gen_range(0..100) {
                    0..86 => (lognormal(rng, 75.0, 1.0).min(7200.0), if rng.gen_bool(0.9) { 16 } else { 31 }),
                    86..91 => (0.0, 17),
                    91..95 => (0.0, 19),
                    95..98 => (0.0, 18),
                    _ => (0.0, 41),
                };
                // VoLTE/VoNR AMR-WB with RTP/IP overhead ≈ 5 kB/s each way; CS calls carry none.
                let packet = matches!(rat, "NR" | "LTE");
                let mut bytes = || if packet { (dur_s * 5_000.0 * rng.gen_range(0.85..1.1)) as u64 } else { 0 };
                let (ul, dl) = (bytes(), bytes());
                Usage { dur_ms: (dur_s * 1000.0) as i64, ul, dl, qci: 1, cause }
            }
            CdrKind::Sms => {
                let len = rng.gen_range(40..=180);
                let (ul, dl) = if rng.gen_bool(0.5) { (len, 0) } else { (0, len) };
                let cause = if rng.gen_bool(0.97) { 0 } else { 4 };
                Usage { dur_ms: 0, ul, dl, qci: 5, cause }
            }
        }
    }
}

/// One measured quantity of a sensor profile: name, SenML unit, range and printed decimals.
struct Field {
    name: &'static str,
    unit: &'static str,
    lo: f64,
    hi: f64,
    decimals: usize,
}

struct Profile {
    kind: &'static str,
    fields: [Field; 4],
}

const fn field(name: &'static str, unit: &'static str, lo: f64, hi: f64, decimals: usize) -> Field {
    Field { name, unit, lo, hi, decimals }
}

/// Sensor kinds, by `sensor % 4`; units from the RFC 8428 registry.
const PROFILES: [Profile; 4] = [
    Profile {
        kind: "env",
        fields: [
            field("temp", "Cel", -10.0, 45.0, 2),
            field("hum", "%RH", 10.0, 95.0, 1),
            field("press", "Pa", 97_000.0, 104_000.0, 0),
            field("co2", "ppm", 380.0, 2_000.0, 0),
        ],
    },
    Profile {
        kind: "meter",
        fields: [
            field("voltage", "V", 215.0, 245.0, 2),
            field("current", "A", 0.0, 63.0, 3),
            field("power", "W", 0.0, 14_000.0, 1),
            field("freq", "Hz", 49.8, 50.2, 3),
        ],
    },
    Profile {
        kind: "vib",
        fields: [
            field("accel", "m/s2", 0.0, 20.0, 3),
            field("bearing", "Cel", 20.0, 95.0, 2),
            field("speed", "1/min", 0.0, 3_000.0, 1),
            field("rms", "m/s2", 0.0, 8.0, 3),
        ],
    },
    Profile {
        kind: "tank",
        fields: [
            field("level", "m", 0.0, 12.0, 3),
            field("flow", "m3/s", 0.0, 0.8, 4),
            field("temp", "Cel", 0.0, 35.0, 2),
            field("batt", "%EL", 0.0, 100.0, 1),
        ],
    },
];

/// A log-normal sample with the given median and shape (σ of the underlying normal).
fn lognormal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    // Box–Muller; `1 - u` keeps the logarithm finite.
    let (u1, u2): (f64, f64) = (rng.r#gen(), rng.r#gen());
    let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (sigma * z).exp()
}

/// The Luhn check digit of an IMEI's first 14 digits.
fn luhn_digit(digits: &str) -> u32 {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(k, b)| {
            let d = u32::from(b - b'0');
            if k.is_multiple_of(2) {
                let d2 = d * 2;
                d2 / 10 + d2 % 10
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// A fixed mixing function: stable identifiers derived from an index.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use serde_json::Value;

    fn cdrs(seed: u64, n: u64) -> Vec<Vec<u8>> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..n).map(|i| cdr_json(&mut rng, i)).collect()
    }

    fn digits(v: &Value, len: usize) -> bool {
        v.as_str().is_some_and(|s| s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
    }

    #[test]
    fn cdr_is_valid_json_with_plausible_fields() {
        for (i, cdr) in cdrs(1, 2_000).iter().enumerate() {
            let v: Value = serde_json::from_slice(cdr).unwrap_or_else(|e| panic!("cdr {i}: {e}"));
            assert_eq!(v["seq"], i as u64);
            assert!(digits(&v["imsi"], 15), "imsi of cdr {i}: {}", v["imsi"]);
            assert!(digits(&v["imei"], 15), "imei of cdr {i}: {}", v["imei"]);
            let imei = v["imei"].as_str().unwrap();
            assert_eq!(luhn_digit(&imei[..14]), u32::from(imei.as_bytes()[14] - b'0'));
            assert!(v["msisdn"].as_str().is_some_and(|s| (11..=13).contains(&s.len())));
            assert!(crate::ndjson::parse_time_ms(v["start"].as_str().unwrap()).unwrap() <= ts_ms(i as u64));
            assert!(v["dur"].as_f64().unwrap() >= 0.0);
            assert!(["NR", "LTE", "UMTS", "GSM"].contains(&v["rat"].as_str().unwrap()));
            assert!(v["ul"].is_u64() && v["dl"].is_u64() && v["chg"].is_u64() && v["cell"].is_u64());
        }
    }

    #[test]
    fn cdr_length_averages_200_to_320_bytes() {
        let all = cdrs(2, 10_000);
        let avg = all.iter().map(Vec::len).sum::<usize>() / all.len();
        assert!((200..=320).contains(&avg), "average CDR length {avg}");
        assert!(all.iter().all(|c| (150..=400).contains(&c.len())));
    }

    #[test]
    fn generators_are_deterministic_for_a_seed() {
        assert_eq!(cdrs(7, 200), cdrs(7, 200));
        assert_ne!(cdrs(7, 200), cdrs(8, 200));
        let sensors = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..200).map(|i| senml(&mut rng, i)).collect::<Vec<_>>()
        };
        assert_eq!(sensors(7), sensors(7));
        assert_ne!(sensors(7), sensors(8));
    }

    #[test]
    fn subscribers_repeat_but_rarely() {
        let all = cdrs(3, 4_000);
        let imsis: std::collections::HashSet<Value> =
            all.iter().map(|c| serde_json::from_slice::<Value>(c).unwrap()["imsi"].clone()).collect();
        // Heavy users recur; most records are still someone else.
        assert!(imsis.len() > 3_000 && imsis.len() < 4_000, "{} distinct of 4000", imsis.len());
    }

    #[test]
    fn senml_is_an_array_of_one_to_four_measurements() {
        let mut rng = SmallRng::seed_from_u64(4);
        for i in 0..2_000 {
            let v: Value = serde_json::from_slice(&senml(&mut rng, i)).unwrap();
            let pack = v.as_array().unwrap();
            assert!((1..=4).contains(&pack.len()));
            assert!(pack[0]["bn"].as_str().unwrap().starts_with("urn:dev:mac:"));
            let bt = pack[0]["bt"].as_f64().unwrap();
            assert!((bt * 1000.0 - ts_ms(i) as f64).abs() < 1_000.0);
            for m in pack {
                assert!(m["n"].is_string() && m["u"].is_string() && m["v"].is_number());
            }
        }
    }

    #[test]
    fn topics_name_site_and_source() {
        assert_eq!(cdr_topic(0), "cdr/site-0/probe-0");
        assert_eq!(cdr_topic(8 * 12 + 3), "cdr/site-3/probe-12");
        assert_eq!(sensor_topic(1), "sensors/site-1/meter-1");
        assert_eq!(sensor_topic(SENSORS + 4), "sensors/site-4/env-4");
    }
}
