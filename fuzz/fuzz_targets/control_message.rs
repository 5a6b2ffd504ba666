//! Fuzz target: the properties of [`tscf_core::fuzzing::control_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tscf_core::fuzzing::control_message(data));
