//! Fuzz target `query`: the input format and the checks are documented at
//! `herald_fuzz::query` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::query(data));
