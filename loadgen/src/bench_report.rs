//! The report of a `loadgen bench` run: throughput over time, latency percentiles, counts and
//! the verdict, written as JSON (for scripts), Markdown (for BENCHMARKS.md) and an SVG chart of
//! the rates over time. Pure: no clock, no files; the caller writes the three strings.

use std::fmt::Write as _;

use serde::Serialize;

/// One second (or one sampling interval) of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the run started (end of the interval).
    pub t: f64,
    /// Named rates over the interval, per second (e.g. `published`, `acked`, `stored`).
    pub rates: Vec<(String, f64)>,
}

/// A named figure and its value, as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figure {
    /// What it is.
    pub name: String,
    /// Its value, formatted.
    pub value: String,
}

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BenchReport {
    /// Scenario name.
    pub scenario: String,
    /// The command line that ran it.
    pub command: String,
    /// Parameters, in order.
    pub params: Vec<Figure>,
    /// Rates over time.
    pub series: Vec<Sample>,
    /// Latency percentiles in ms: (label, value).
    pub latency_ms: Vec<(String, f64)>,
    /// Counts and other results.
    pub results: Vec<Figure>,
    /// Failed checks; empty when the run passed.
    pub failures: Vec<String>,
}

impl BenchReport {
    /// Adds a parameter.
    pub fn param(&mut self, name: &str, value: impl ToString) {
        self.params.push(Figure { name: name.into(), value: value.to_string() });
    }

    /// Adds a result.
    pub fn result(&mut self, name: &str, value: impl ToString) {
        self.results.push(Figure { name: name.into(), value: value.to_string() });
    }

    /// JSON, pretty-printed.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serialises")
    }

    /// Markdown: parameters, results, latency, the rates over time (at most 30 rows, evenly
    /// picked), the verdict.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "## loadgen bench {}\n\n`{}`\n", self.scenario, self.command);
        let _ = writeln!(o, "| parameter | value |\n|---|---|");
        for f in &self.params {
            let _ = writeln!(o, "| {} | {} |", f.name, f.value);
        }
        let _ = writeln!(o, "\n| result | value |\n|---|---:|");
        for f in &self.results {
            let _ = writeln!(o, "| {} | {} |", f.name, f.value);
        }
        if !self.latency_ms.is_empty() {
            let _ = writeln!(o, "\n| latency | ms |\n|---|---:|");
            for (k, v) in &self.latency_ms {
                let _ = writeln!(o, "| {k} | {v:.1} |");
            }
        }
        if let Some(first) = self.series.first() {
            let names: Vec<&str> = first.rates.iter().map(|(n, _)| n.as_str()).collect();
            let _ =
                writeln!(o, "\n| t, s | {} |", names.iter().map(|n| format!("{n}/s")).collect::<Vec<_>>().join(" | "));
            let _ = writeln!(o, "|---:|{}", "---:|".repeat(names.len()));
            let step = self.series.len().div_ceil(30).max(1);
            for s in self.series.iter().step_by(step) {
                let vals: Vec<String> = s.rates.iter().map(|(_, v)| format!("{v:.0}")).collect();
                let _ = writeln!(o, "| {:.0} | {} |", s.t, vals.join(" | "));
            }
        }
        let verdict =
            if self.failures.is_empty() { "PASS".to_owned() } else { format!("FAIL: {}", self.failures.join("; ")) };
        let _ = writeln!(o, "\n**{verdict}**");
        o
    }

    /// An SVG line chart of every rate over time.
    pub fn svg(&self) -> String {
        const W: f64 = 800.0;
        const H: f64 = 360.0;
        const L: f64 = 70.0;
        const R: f64 = 20.0;
        const T: f64 = 40.0;
        const B: f64 = 50.0;
        const COLOURS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
        let t_max = self.series.last().map_or(1.0, |s| s.t).max(1.0);
        let y_max = nice_ceiling(self.series.iter().flat_map(|s| s.rates.iter().map(|(_, v)| *v)).fold(1.0, f64::max));
        let x = |t: f64| L + (W - L - R) * t / t_max;
        let y = |v: f64| H - B - (H - T - B) * v / y_max;
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{L}" y="22" font-size="15">loadgen bench {} — rates per second</text>"#,
            xml(&self.scenario)
        );
        for k in 0..=4 {
            let v = y_max * f64::from(k) / 4.0;
            let _ = writeln!(
                o,
                r##"<line x1="{L}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
                y(v),
                W - R,
                L - 6.0,
                y(v) + 4.0,
                human(v)
            );
        }
        for k in 0..=5 {
            let t = t_max * f64::from(k) / 5.0;
            let _ = writeln!(o, r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.0} s</text>"#, x(t), H - B + 18.0);
        }
        let _ = writeln!(o, r##"<line x1="{L}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/>"##, H - B, W - R);
        let _ = writeln!(o, r##"<line x1="{L}" y1="{T}" x2="{L}" y2="{0}" stroke="#333"/>"##, H - B);
        let names: Vec<String> =
            self.series.first().map(|s| s.rates.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<String> = self
                .series
                .iter()
                .filter_map(|s| s.rates.get(i).map(|(_, v)| format!("{:.1},{:.1}", x(s.t), y(*v))))
                .collect();
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let lx = L + 10.0 + 150.0 * i as f64;
            let _ = writeln!(
                o,
                r#"<rect x="{lx}" y="{0}" width="12" height="3" fill="{colour}"/><text x="{1}" y="{2}">{3}/s</text>"#,
                H - 14.0,
                lx + 16.0,
                H - 10.0,
                xml(name)
            );
        }
        o.push_str("</svg>\n");
        o
    }
}

/// Writes `<dir>/<stem>.json`, `.md` and `.svg`.
pub fn write_report(dir: &std::path::Path, stem: &str, r: &BenchReport) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{stem}.json")), r.json())?;
    std::fs::write(dir.join(format!("{stem}.md")), r.markdown())?;
    std::fs::write(dir.join(format!("{stem}.svg")), r.svg())?;
    Ok(())
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v).unwrap_or(10.0 * p)
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BenchReport {
        let mut r =
            BenchReport { scenario: "demo".into(), command: "loadgen bench demo".into(), ..BenchReport::default() };
        r.param("devices", 100);
        r.result("lost", 0);
        r.latency_ms = vec![("p50".into(), 3.2), ("p99".into(), 17.5)];
        r.series = (1..=60)
            .map(|t| Sample {
                t: f64::from(t),
                rates: vec![("published".into(), 1000.0), ("stored".into(), if t < 30 { 0.0 } else { 2000.0 })],
            })
            .collect();
        r
    }

    #[test]
    fn json_round_trips_the_figures() {
        let v: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        assert_eq!(v["scenario"], "demo");
        assert_eq!(v["series"].as_array().unwrap().len(), 60);
        assert_eq!(v["series"][40]["rates"][1][1], 2000.0);
    }

    #[test]
    fn markdown_has_the_tables_and_the_verdict() {
        let mut r = report();
        let md = r.markdown();
        assert!(md.contains("| devices | 100 |") && md.contains("| p99 | 17.5 |") && md.contains("**PASS**"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| ") && l.ends_with(" |") && l.contains("1000")).count(), 30);
        r.failures.push("3 lost".into());
        assert!(r.markdown().contains("**FAIL: 3 lost**"));
    }

    #[test]
    fn the_chart_is_svg_with_a_line_per_rate() {
        let svg = report().svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("published/s") && svg.contains("stored/s"));
        assert!(svg.contains(">2.0k<"), "y axis up to a nice ceiling: {svg}");
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(1300.0), 2000.0);
        assert_eq!(nice_ceiling(4999.0), 5000.0);
        assert_eq!(nice_ceiling(7000.0), 10000.0);
    }
}
