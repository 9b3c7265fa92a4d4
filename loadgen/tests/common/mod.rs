//! Helpers of the scenario tests: the binaries beside `loadgen`, running a scenario, and its
//! `RESULT key=value …` line.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `loadgen` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_loadgen");

/// `name` beside `loadgen` in `target/<profile>/`: cargo names only a package's own binaries
/// in `CARGO_BIN_EXE_*`, and `cargo test --workspace` builds every binary before any test runs.
#[allow(dead_code)] // not every test file starts the other binaries
pub fn sibling_bin(name: &str) -> PathBuf {
    let dir = Path::new(BIN).parent().expect("the loadgen binary is in a directory");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "no {name} at {}: `cargo test --workspace` builds it; with `-p loadgen` alone, run `cargo build -p {name}` \
         first",
        bin.display()
    );
    bin
}

/// Runs `loadgen <args>`; panics with its output unless it exits 0. Returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).env("RUST_LOG", "warn").output().expect("running loadgen");
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "loadgen exited with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", o.status);
    stdout.into_owned()
}

/// The fields of the `RESULT` line of `stdout`.
#[derive(Debug)]
pub struct ResultLine(String);

impl ResultLine {
    /// Finds the first line; panics if there is none.
    pub fn of(stdout: &str) -> ResultLine {
        let line =
            stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("no RESULT in\n{stdout}"));
        ResultLine(line.to_owned())
    }

    /// The value of `key`, as written.
    pub fn str(&self, key: &str) -> &str {
        self.0
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key} in {}", self.0))
    }

    /// The value of `key` as a number.
    pub fn num(&self, key: &str) -> u64 {
        self.str(key).parse().unwrap_or_else(|e| panic!("{key} in {}: {e}", self.0))
    }
}
