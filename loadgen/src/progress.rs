//! The live view of a run: on a terminal an indicatif bar over the run's time with the count
//! and its rate beside it; otherwise (CI, a pipe) one line every [`LINE_EVERY`] on stderr.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// How often the plain line is printed when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// What the bar fills towards.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// The run's planned duration.
    Time(Duration),
    /// A count of the run's units.
    Count(u64),
}

/// A running progress display; dropping it (or [`Progress::finish`]) stops it.
#[derive(Debug)]
pub struct Progress {
    task: JoinHandle<()>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Progress {
    /// Shows `label`'s progress towards `goal`, with `count()` (in `unit`s) and its rate over
    /// the last second.
    pub fn start(
        label: &'static str,
        goal: Goal,
        unit: &'static str,
        count: impl Fn() -> u64 + Send + 'static,
    ) -> Progress {
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let bar = std::io::stderr().is_terminal().then(|| {
                let (len, of) = match goal {
                    Goal::Time(d) => (d.as_secs().max(1), "s"),
                    Goal::Count(n) => (n.max(1), unit),
                };
                let b = indicatif::ProgressBar::new(len);
                let template = format!("{{prefix}} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {of}  {{msg}}");
                b.set_style(
                    indicatif::ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> "),
                );
                b.set_prefix(label);
                b
            });
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let (mut last, mut last_at, mut last_line) = (count(), Instant::now(), Instant::now());
            loop {
                tick.tick().await;
                let now = count();
                let rate = now.saturating_sub(last) as f64 / last_at.elapsed().as_secs_f64();
                (last, last_at) = (now, Instant::now());
                let msg = format!("{now} {unit}, {rate:.0} {unit}/s");
                match &bar {
                    Some(b) => {
                        b.set_position(match goal {
                            Goal::Time(d) => start.elapsed().as_secs().min(d.as_secs()),
                            Goal::Count(_) => now,
                        });
                        b.set_message(msg);
                    }
                    None if last_line.elapsed() >= LINE_EVERY => {
                        last_line = Instant::now();
                        let of = match goal {
                            Goal::Time(d) => format!("of {} s", d.as_secs()),
                            Goal::Count(n) => format!("({n} {unit} to go to)"),
                        };
                        eprintln!("{label} {:>5}s {of}  {msg}", start.elapsed().as_secs());
                    }
                    None => {}
                }
            }
        });
        Progress { task }
    }

    /// Stops the display.
    pub fn finish(self) {}
}
