//! Fuzz target `redis_entry`: the input format and the checks are documented at
//! `herald_fuzz::redis_entry` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::redis_entry(data));
