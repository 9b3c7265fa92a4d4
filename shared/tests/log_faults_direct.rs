//! The log's fault and behaviour tests of `log_faults.rs` again, with the active segment
//! appended through direct IO (`LogConfig::direct_io`); the included file tells which crate it
//! is compiled into by the crate's name.

#[path = "log_faults.rs"]
mod faults;
