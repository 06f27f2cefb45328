//! Fuzz target `decoder`: the input format and the checks are documented at
//! `herald_fuzz::decoder` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::decoder(data));
