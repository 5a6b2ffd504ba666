//! Fuzz target: the properties of [`tscf_core::fuzzing::client`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Running out of input is how the driver stops, not a finding.
    let _ = tscf_core::fuzzing::client(&mut libfuzzer_sys::arbitrary::Unstructured::new(data));
});
