//! What both binaries' config files share: strict TOML parsing into a type, and an error that
//! lists every problem with its dotted key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Every problem found in a config file, each with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// `(key, reason)` pairs.
    pub problems: Vec<(String, String)>,
}

impl ConfigError {
    /// One problem.
    pub fn one(file: &Path, key: &str, reason: impl Into<String>) -> Self {
        ConfigError { file: file.into(), problems: vec![(key.into(), reason.into())] }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.file.display())?;
        for (key, reason) in &self.problems {
            write!(f, "\n  {key}: {reason}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Parses `text` (read from `path`) into `T`; a syntax error or unknown key names its key.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let key = e.span().map_or_else(|| "(syntax)".to_owned(), |s| key_at(text, s.start));
        ConfigError::one(path, &key, e.message())
    })
}

/// Reads `path` as text.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::one(path, "(file)", e.to_string()))
}

/// The dotted key around byte `pos` of a TOML text: the nearest `[table]` header above it and
/// the `key =` on its line.
fn key_at(text: &str, pos: usize) -> String {
    let before = &text[..pos.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split('=').next().filter(|_| line.contains('=')).map(str::trim).unwrap_or("");
    let table = before
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[').map(|t| t.trim_matches(|c| c == '[' || c == ']').to_owned()))
        .unwrap_or_default();
    match (table.is_empty(), key.is_empty()) {
        (true, true) => "(top level)".into(),
        (true, false) => key.into(),
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        b: u32,
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse_toml::<T>("a = 1\n[inner]\nb = \"x\"\n", Path::new("f.toml")).unwrap_err();
        assert_eq!(e.problems[0].0, "inner.b");
        let e = parse_toml::<T>("a = 1\nzzz = 2\n[inner]\nb = 1\n", Path::new("f.toml")).unwrap_err();
        assert_eq!(e.problems[0].0, "zzz", "{e}");
        assert!(e.to_string().starts_with("invalid config f.toml:"));
    }
}
