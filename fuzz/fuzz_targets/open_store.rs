//! `open_store`: the body is `snapctl::fuzzing::open_store` (src/fuzzing.rs says what the input is);
//! tests/fuzz_replay.rs replays tests/fixtures/fuzz/open_store/ through the same function.
#![no_main]

libfuzzer_sys::fuzz_target!(init: snapctl::fuzzing::prepare(), |data: &[u8]| {
    snapctl::fuzzing::open_store(data)
});
