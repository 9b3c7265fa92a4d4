//! Routing: ordered MQTT topic filters to streams. Pure.
//!
//! Filters follow MQTT: `+` matches one level, `#` (last) the rest including none; topics that
//! start with `$` are matched only by filters that name that first level literally.

/// A compiled routing table.
#[derive(Clone, Debug)]
pub struct Router {
    rules: Vec<(Vec<Level>, usize)>,
    unmatched: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    One,
    Rest,
}

impl Router {
    /// A router from `(filter, stream id)` rules in order, and the stream of unmatched topics.
    /// Filters must have passed [`check_filter`].
    pub fn new(rules: &[(String, usize)], unmatched: Option<usize>) -> Router {
        let rules = rules.iter().map(|(f, s)| (compile(f), *s)).collect();
        Router { rules, unmatched }
    }

    /// The stream for `topic`; `None`: no rule matched and no unmatched stream is set.
    pub fn route(&self, topic: &str) -> Option<usize> {
        self.rules.iter().find(|(f, _)| matches(f, topic)).map(|(_, s)| *s).or(self.unmatched)
    }
}

/// Whether `filter` is a valid MQTT topic filter.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() || filter.len() > 65_535 {
        return Err("a topic filter is 1 to 65535 bytes".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 != levels.len() => return Err(format!("{filter:?}: '#' must be the last level")),
            "#" | "+" => {}
            l if l.contains(['#', '+']) => return Err(format!("{filter:?}: a wildcard must fill its level")),
            l if l.contains('\0') => return Err(format!("{filter:?}: NUL in a topic filter")),
            _ => {}
        }
    }
    Ok(())
}

/// The filter inside a shared subscription `$share/<group>/<filter>`.
pub fn strip_share(subscription: &str) -> &str {
    subscription
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(subscription, |(_, filter)| filter)
}

fn compile(filter: &str) -> Vec<Level> {
    filter
        .split('/')
        .map(|l| match l {
            "+" => Level::One,
            "#" => Level::Rest,
            l => Level::Exact(l.to_owned()),
        })
        .collect()
}

fn matches(filter: &[Level], topic: &str) -> bool {
    if topic.starts_with('$') && !matches!(filter.first(), Some(Level::Exact(_))) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter {
        match f {
            Level::Rest => return true,
            Level::One => {
                if levels.next().is_none() {
                    return false;
                }
            }
            Level::Exact(e) => {
                if levels.next() != Some(e.as_str()) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_wins() {
        let r = Router::new(&[("cdr/+/voice".into(), 0), ("cdr/#".into(), 1), ("sensors/+/temp".into(), 2)], None);
        assert_eq!(r.route("cdr/site1/voice"), Some(0));
        assert_eq!(r.route("cdr/site1/data"), Some(1));
        assert_eq!(r.route("cdr"), Some(1), "'#' also matches the parent level");
        assert_eq!(r.route("sensors/a/temp"), Some(2));
        assert_eq!(r.route("sensors/a/b/temp"), None);
        assert_eq!(r.route("other"), None);
        let r = Router::new(&[("#".into(), 0)], Some(9));
        assert_eq!(r.route("$SYS/broker/load"), Some(9), "wildcards do not match $ topics");
        assert_eq!(r.route("a/b"), Some(0));
    }

    #[test]
    fn filters_are_checked() {
        assert!(check_filter("a/+/b/#").is_ok());
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("").is_err());
        assert_eq!(strip_share("$share/g1/cdr/#"), "cdr/#");
        assert_eq!(strip_share("cdr/#"), "cdr/#");
    }
}
