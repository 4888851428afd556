//! `superblock`: the body is `snapctl::fuzzing::superblock` (src/fuzzing.rs says what the input is);
//! tests/fuzz_replay.rs replays tests/fixtures/fuzz/superblock/ through the same function.
#![no_main]

libfuzzer_sys::fuzz_target!(init: snapctl::fuzzing::prepare(), |data: &[u8]| {
    snapctl::fuzzing::superblock(data)
});
