//! Newtypes for the identifiers of the glossary (docs/ARCHITECTURE.md): a record is named by
//! (producer, epoch, stream, seq) everywhere; a log position is an [`Offset`].

use std::fmt;

/// Position of a record inside one log (edge stream or core partition), counted in records.
///
/// On the edge a stream's offsets equal its seqs; on the core they are the partition's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64);

/// Sequence number of a record within (producer, epoch, stream), contiguous from 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

/// Random 64-bit number drawn when an edge's data directory is created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
