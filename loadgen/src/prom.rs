//! The Prometheus text-format series the scenarios read from an agent's `/metrics`, and
//! quantiles of a histogram's buckets.
//!
//! `loadgen` depends on `shared` only, never on `edge-agent`, so it reads the exposition as
//! any scraper would: `name{label="value",…} value`, comments skipped, unknown series ignored.

use anyhow::{Context, bail};

/// One series: name, labels as written (`stream="cdr"`), value.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Metric name, e.g. `backhaul_edge_records_appended_total`.
    pub name: String,
    /// The text between the braces, e.g. `stream="cdr"`; empty without labels.
    pub labels: String,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    series: Vec<Series>,
}

impl Exposition {
    /// Parses every sample line; a line that is not `name[{labels}] value [timestamp]` is an
    /// error naming it.
    pub fn parse(text: &str) -> anyhow::Result<Exposition> {
        let mut series = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            series.push(parse_line(line).with_context(|| format!("metrics line {}: {line:?}", i + 1))?);
        }
        Ok(Exposition { series })
    }

    /// The value of `name{labels}` (`labels` exactly as exposed, `""` for none).
    pub fn value(&self, name: &str, labels: &str) -> Option<f64> {
        self.series.iter().find(|s| s.name == name && s.labels == labels).map(|s| s.value)
    }

    /// The sum of the series `name` whose labels start with `labels_prefix`.
    pub fn sum(&self, name: &str, labels_prefix: &str) -> f64 {
        self.series.iter().filter(|s| s.name == name && s.labels.starts_with(labels_prefix)).map(|s| s.value).sum()
    }

    /// The cumulative buckets of histogram `name` (its `name_bucket{le=…}` series), by `le`.
    pub fn buckets(&self, name: &str) -> Vec<Bucket> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<Bucket> = self
            .series
            .iter()
            .filter(|s| s.name == bucket)
            .filter_map(|s| {
                let le = s.labels.strip_prefix("le=\"")?.strip_suffix('"')?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some(Bucket { le, count: s.value })
            })
            .collect();
        out.sort_by(|a, b| a.le.total_cmp(&b.le));
        out
    }
}

/// A cumulative histogram bucket: `count` observations were at most `le` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    /// Upper bound; `f64::INFINITY` for `+Inf`.
    pub le: f64,
    /// Observations at most `le`.
    pub count: f64,
}

/// `after - before`, bucket by bucket: the observations made between two scrapes.
pub fn bucket_delta(after: &[Bucket], before: &[Bucket]) -> Vec<Bucket> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.le == a.le).map_or(0.0, |b| b.count);
            Bucket { le: a.le, count: a.count - b }
        })
        .collect()
}

/// The `q`-quantile of cumulative `buckets`, interpolated linearly within its bucket as
/// Prometheus' `histogram_quantile` does. `None` without observations; `Some(f64::INFINITY)`
/// if it lies beyond the highest finite bound.
pub fn quantile(buckets: &[Bucket], q: f64) -> Option<f64> {
    let total = buckets.last()?.count;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for b in buckets {
        if b.count >= rank {
            if b.le.is_infinite() {
                return Some(f64::INFINITY);
            }
            if b.count == below {
                return Some(lower);
            }
            return Some(lower + (b.le - lower) * (rank - below) / (b.count - below));
        }
        (lower, below) = (b.le, b.count);
    }
    Some(f64::INFINITY)
}

fn parse_line(line: &str) -> anyhow::Result<Series> {
    let (series, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}').context("unclosed labels")?;
            if close < open {
                bail!("unclosed labels");
            }
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_at(line.find(char::is_whitespace).context("no value")?),
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, &labels[..labels.len() - 1]),
        None => (series, ""),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        bail!("bad metric name");
    }
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().context("bad value")?,
    };
    Ok(Series { name: name.to_owned(), labels: labels.to_owned(), value })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP backhaul_edge_records_appended_total Records appended.\n\
        # TYPE backhaul_edge_records_appended_total counter\n\
        backhaul_edge_records_appended_total{stream=\"cdr\"} 1200\n\
        backhaul_edge_records_appended_total{stream=\"sensors\"} 3\n\
        backhaul_edge_records_unrouted_total 2\n\
        h_bucket{le=\"0.001\"} 10\n\
        h_bucket{le=\"0.0025\"} 30\n\
        h_bucket{le=\"+Inf\"} 40\n\
        h_sum 0.5\n\
        h_count 40\n";

    #[test]
    fn reads_series_by_name_and_labels() {
        let e = Exposition::parse(TEXT).unwrap();
        assert_eq!(e.value("backhaul_edge_records_appended_total", "stream=\"cdr\""), Some(1200.0));
        assert_eq!(e.value("backhaul_edge_records_appended_total", "stream=\"sensors\""), Some(3.0));
        assert_eq!(e.value("backhaul_edge_records_unrouted_total", ""), Some(2.0));
        assert_eq!(e.value("h_count", ""), Some(40.0));
        assert_eq!(e.value("nope", ""), None);
        assert_eq!(e.sum("backhaul_edge_records_appended_total", "stream="), 1203.0);
        assert!(Exposition::parse("x{a=\"b\" 1").is_err());
        assert!(Exposition::parse("x abc").is_err());
    }

    #[test]
    fn quantiles_interpolate_within_buckets_of_a_delta() {
        let e = Exposition::parse(TEXT).unwrap();
        let b = e.buckets("h");
        assert_eq!(b.len(), 3);
        assert_eq!(quantile(&b, 0.5), Some(0.001 + 0.0015 * 10.0 / 20.0));
        assert_eq!(quantile(&b, 0.25), Some(0.001));
        assert_eq!(quantile(&b, 0.99), Some(f64::INFINITY));
        let before = [
            Bucket { le: 0.001, count: 10.0 },
            Bucket { le: 0.0025, count: 10.0 },
            Bucket { le: f64::INFINITY, count: 10.0 },
        ];
        let d = bucket_delta(&b, &before);
        assert_eq!(d.iter().map(|b| b.count).collect::<Vec<_>>(), [0.0, 20.0, 30.0]);
        assert_eq!(quantile(&d, 0.5), Some(0.001 + 0.0015 * 15.0 / 20.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
