//! Any bytes as the last segment of a log: recovery keeps exactly the whole frames.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::fuzzing::log_recovery(data));
