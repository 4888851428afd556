//! `control`: the body is `snapctl::fuzzing::control` (src/fuzzing.rs says what the input is);
//! tests/fuzz_replay.rs replays tests/fixtures/fuzz/control/ through the same function.
#![no_main]

libfuzzer_sys::fuzz_target!(init: snapctl::fuzzing::prepare(), |data: &[u8]| {
    snapctl::fuzzing::control(data)
});
