//! `log verify`: a read-only check of a data directory's logs, for operators.
