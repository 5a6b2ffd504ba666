//! Fuzz target: the properties of [`tscf_core::fuzzing::cluster_director`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Running out of input is how the driver stops, not a finding.
    let _ = tscf_core::fuzzing::cluster_director(&mut libfuzzer_sys::arbitrary::Unstructured::new(
        data,
    ));
});
