//! `config`: the body is `snapctl::fuzzing::config` (src/fuzzing.rs says what the input is);
//! tests/fuzz_replay.rs replays tests/fixtures/fuzz/config/ through the same function.
#![no_main]

libfuzzer_sys::fuzz_target!(init: snapctl::fuzzing::prepare(), |data: &[u8]| {
    snapctl::fuzzing::config(data)
});
