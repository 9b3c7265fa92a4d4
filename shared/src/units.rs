//! Typed config values: byte sizes (`"64MiB"`, `"10GB"`, `4096`) and durations (`"5ms"`,
//! `"30s"`, `"7d"`), parsed strictly so a typo is an error naming the value, not a default.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A number of bytes. Accepts an integer or a string with a unit: B, KB, MB, GB, TB (powers
/// of 1000) or KiB, MiB, GiB, TiB (powers of 1024).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// A duration. Accepts a string with a unit: ms, s, m, h, d (e.g. `"250ms"`, `"1h30m"` is
/// refused: one number, one unit), or an integer of milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl ByteSize {
    /// Parses `s`; the error says what was expected.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (num, unit) = split_number(s)?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "mb" => 1000_u64.pow(2),
            "gb" => 1000_u64.pow(3),
            "tb" => 1000_u64.pow(4),
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use B, KB, MB, GB, KiB, MiB, GiB, …)")),
        };
        num.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl Millis {
    /// Parses `s`; the error says what was expected.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (num, unit) = split_number(s)?;
        let mult: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{s:?}: a duration needs a unit (ms, s, m, h, d)")),
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h, d)")),
        };
        num.checked_mul(mult).map(Millis).ok_or_else(|| format!("{s:?} is too large"))
    }

    /// As a `Duration`.
    pub fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

fn split_number(s: &str) -> Result<(u64, &str), String> {
    let t = s.trim();
    let end = t.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(t.len());
    if end == 0 {
        return Err(format!("{s:?}: expected a number followed by a unit"));
    }
    let digits: String = t[..end].chars().filter(|&c| c != '_').collect();
    let num = digits.parse::<u64>().map_err(|_| format!("{s:?}: number too large"))?;
    Ok((num, t[end..].trim()))
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, name) in units {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(86_400_000u64, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
        for (size, name) in units {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}ms", self.0)
    }
}

macro_rules! serde_unit {
    ($ty:ident, $what:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        Ok($ty(v))
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        u64::try_from(v).map($ty).map_err(|_| E::custom(format!("{v} is negative")))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        $ty::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

serde_unit!(ByteSize, "a byte size such as \"64MiB\" or an integer of bytes");
serde_unit!(Millis, "a duration such as \"5ms\", \"30s\", \"7d\" or an integer of milliseconds");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_durations() {
        assert_eq!(ByteSize::parse("64MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("10 GB"), Ok(ByteSize(10_000_000_000)));
        assert_eq!(ByteSize::parse("4_096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("12XB").unwrap_err().contains("unknown unit"));
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999TiB").is_err());
        assert_eq!(Millis::parse("5ms"), Ok(Millis(5)));
        assert_eq!(Millis::parse("7d"), Ok(Millis(604_800_000)));
        assert!(Millis::parse("30").unwrap_err().contains("needs a unit"));
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(Millis(90_000).to_string(), "90s");
    }
}
