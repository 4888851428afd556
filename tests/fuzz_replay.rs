//! Replays the fuzz targets' inputs through the targets' own code (`snapctl::fuzzing`): every
//! file under `tests/fixtures/fuzz/<target>/` (inputs a fuzzer found, and hand-made nasty ones;
//! `tests/fixtures/fuzz/README.md` names each) and every seed a corpus starts from. The rule is
//! the fuzzers': no panic in snapctl's code, not even one a guard catches.
//!
//! The hand-made inputs are built by [`hand_made`] below; `SNAPCTL_WRITE_FIXTURES=1 cargo test
//! --release --test tests fuzz_replay` writes them, and without it the test checks that the files
//! are what the recipes make.

use std::path::{Path, PathBuf};

use snapctl::fuzzing::seeds::{frame, nbd_go_data, nbd_option, nbd_request};
use snapctl::fuzzing::{replay, seeds, under_panic_rule, CHUNK, META_LEN, ORIGIN_SIZE, TARGETS};
use snapctl::store::format::{OnFull, Superblock, META_OFFSET};

/// Where the metadata length block is (docs/FORMAT.md).
const LENBLOCK_OFFSET: u64 = 4096;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz")
}

/// The fixture files of `target`, sorted.
fn fixtures(target: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures_dir().join(target))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn replay_all(target: &str) {
    let files = fixtures(target);
    assert!(
        !files.is_empty(),
        "tests/fixtures/fuzz/{target}/ holds no input"
    );
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read fixture");
        if let Err(e) = replay(target, &data) {
            failed.push(format!("{}: {e}", f.display()));
        }
    }
    for (name, data) in seeds::of(target) {
        if let Err(e) = replay(target, &data) {
            failed.push(format!("seed {name}: {e}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn superblock_inputs_replay_without_panics() {
    replay_all("superblock");
}

#[test]
fn open_store_inputs_replay_without_panics() {
    replay_all("open_store");
}

#[test]
fn nbd_inputs_replay_without_panics() {
    replay_all("nbd");
}

#[test]
fn control_inputs_replay_without_panics() {
    replay_all("control");
}

#[test]
fn config_inputs_replay_without_panics() {
    replay_all("config");
}

#[test]
fn every_fixture_is_named_in_the_readme_and_every_target_has_seeds() {
    let readme = std::fs::read_to_string(fixtures_dir().join("README.md")).expect("README.md");
    for (target, _) in TARGETS {
        assert!(!seeds::of(target).is_empty(), "{target} has no seeds");
        for f in fixtures(target) {
            let name = f.file_name().map(|n| n.to_string_lossy().to_string());
            let entry = format!("{target}/{}", name.unwrap_or_default());
            assert!(readme.contains(&entry), "README.md does not name {entry}");
        }
    }
}

/// The rule has teeth: a panic that a guard catches still fails, one in redb does not.
#[test]
fn the_panic_rule_fails_on_a_caught_panic() {
    let e = under_panic_rule(|| {
        let _ = std::panic::catch_unwind(|| panic!("caught by a guard"));
    })
    .unwrap_err();
    assert!(e.contains("caught by a guard"), "{e}");
    assert!(under_panic_rule(|| {}).is_ok());
    assert!(replay("nosuch", b"").is_err());
}

/// A superblock like the fuzz template's, with a fixed uuid and time.
fn superblock() -> Superblock {
    Superblock {
        uuid: [0x5a; 16],
        chunk_size: CHUNK,
        origin_size: ORIGIN_SIZE,
        fingerprint: [0; 32],
        meta_offset: META_OFFSET,
        meta_len: META_LEN,
        data_offset: META_OFFSET + META_LEN,
        data_chunks: 96,
        on_full: OnFull::DropOldest,
        created: 1_800_000_000,
        origin_path: "(memory)".into(),
    }
}

/// `open_store` patch: at `off` from the length block.
fn patch(off: u64, bytes: &[u8]) -> Vec<u8> {
    let mut v = (off as u32).to_le_bytes().to_vec();
    v.push(bytes.len() as u8);
    v.extend_from_slice(bytes);
    v
}

/// A transmission request's header alone (a write without its payload).
fn header(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = nbd_request(flags, kind, cookie, offset, 0);
    b.truncate(b.len() - 4);
    b.extend_from_slice(&length.to_be_bytes());
    b
}

fn hello(store_id: &str) -> Vec<u8> {
    frame(&format!(
        r#"{{"hello": "snapctl-control", "version": 1, "store": "/dev/vdb", "store_id": {store_id}}}"#
    ))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The hand-made nasty inputs: (target, file name, bytes).
fn hand_made() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let sb = superblock();
    let with = |f: &dyn Fn(&mut Superblock)| {
        let mut s = superblock();
        f(&mut s);
        s.encode()
    };
    let raw = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = sb.encode();
        f(&mut b);
        b
    };
    let region = META_OFFSET - LENBLOCK_OFFSET; // open_store patch offsets start at the length block
    let go_origin = cat(&[
        &3u32.to_be_bytes(),
        &nbd_option(7, &nbd_go_data("origin", &[])),
    ]);
    let ok_hello = hello("[2049, 131]");
    let toml_ok = "[store.db]\npath = \"/dev/a\"\n[[store.db.period]]\nname = \"h\"\nevery = \"1h\"\nkeep = 3\n";
    vec![
        ("superblock", "empty", vec![]),
        ("superblock", "truncated-4095", sb.encode()[..4095].to_vec()),
        (
            "superblock",
            "data-chunks-overflow",
            with(&|s| s.data_chunks = u64::MAX / 2),
        ),
        (
            "superblock",
            "data-offset-overflow",
            with(&|s| {
                s.data_offset = u64::MAX - (CHUNK - 1);
                s.data_chunks = 1;
            }),
        ),
        (
            "superblock",
            "meta-region-past-the-device",
            with(&|s| {
                s.meta_offset = 1 << 62;
                s.data_offset = (1 << 62) + META_LEN;
                s.data_chunks = 0;
            }),
        ),
        ("superblock", "chunk-size-zero", with(&|s| s.chunk_size = 0)),
        (
            "superblock",
            "path-length-65535",
            raw(&|b| b[128..130].copy_from_slice(&[0xff, 0xff])),
        ),
        (
            "superblock",
            "path-not-utf8",
            raw(&|b| {
                b[128..130].copy_from_slice(&4u16.to_le_bytes());
                b[256..260].copy_from_slice(&[0xc3, 0x28, 0xff, 0xfe]);
            }),
        ),
        (
            "superblock",
            "version-2",
            raw(&|b| b[8..12].copy_from_slice(&2u32.to_le_bytes())),
        ),
        (
            "superblock",
            "lenblock-length-max",
            cat(&[b"SNAPLEN\0", &u64::MAX.to_le_bytes(), &[0; 496]]),
        ),
        ("open_store", "region-empty", vec![0]),
        ("open_store", "region-ff-4k", cat(&[&[0], &[0xff; 4096]])),
        (
            "open_store",
            "lenblock-length-max",
            cat(&[&[3], &patch(8, &u64::MAX.to_le_bytes())]),
        ),
        (
            "open_store",
            "lenblock-one-past-region",
            cat(&[&[3], &patch(8, &(META_LEN + 1).to_le_bytes())]),
        ),
        (
            "open_store",
            "lenblock-checksum-wrong",
            cat(&[&[1], &patch(8, &1234u64.to_le_bytes())]),
        ),
        (
            "open_store",
            "redb-header-zeroed",
            cat(&[
                &[1],
                &patch(region, &[0; 255]),
                &patch(region + 255, &[0; 255]),
            ]),
        ),
        (
            "open_store",
            "redb-header-ff",
            cat(&[
                &[1],
                &patch(region, &[0xff; 255]),
                &patch(region + 255, &[0xff; 255]),
            ]),
        ),
        (
            "nbd",
            "option-length-max",
            cat(&[
                &3u32.to_be_bytes(),
                &nbd_option(7, &[])[..12],
                &u32::MAX.to_be_bytes(),
            ]),
        ),
        (
            "nbd",
            "go-name-length-max",
            cat(&[
                &3u32.to_be_bytes(),
                &nbd_option(7, &cat(&[&u32::MAX.to_be_bytes(), b"origin", &[0, 0]])),
            ]),
        ),
        (
            "nbd",
            "go-info-count-wrong",
            cat(&[
                &3u32.to_be_bytes(),
                &nbd_option(
                    7,
                    &cat(&[&nbd_go_data("origin", &[1])[..10], &[0, 5, 0, 1]]),
                ),
            ]),
        ),
        ("nbd", "client-flags-all", u32::MAX.to_be_bytes().to_vec()),
        (
            "nbd",
            "export-name-unknown",
            cat(&[&1u32.to_be_bytes(), &nbd_option(1, b"nosuch")]),
        ),
        (
            "nbd",
            "write-length-max",
            cat(&[&go_origin, &header(0, 1, 1, 0, u32::MAX)]),
        ),
        (
            "nbd",
            "write-32mib-no-payload",
            cat(&[&go_origin, &header(0, 1, 1, 0, 32 << 20)]),
        ),
        (
            "nbd",
            "offsets-that-wrap",
            cat(&[
                &go_origin,
                &header(0, 0, 1, u64::MAX - 100, 4096),
                &header(0, 6, 2, u64::MAX - 100, 200),
                &header(0, 4, 3, u64::MAX, 1),
                &nbd_request(0, 1, 4, u64::MAX - 3, 8),
                &header(0, 0, 5, ORIGIN_SIZE, 0),
                &header(0, 0, 6, 0, (32 << 20) + 1),
            ]),
        ),
        (
            "nbd",
            "unknown-commands-and-flags",
            cat(&[
                &go_origin,
                &header(0xffff, 0, 1, 0, 512),
                &header(0, 0x55, 2, 0, 512),
                &header(2, 1, 3, 0, 0),
                &header(0, 2, 4, 0, 0),
                &header(0, 0, 5, 0, 512),
            ]),
        ),
        ("control", "length-prefix-max", cat(&[&[0], &[0xff; 4]])),
        (
            "control",
            "length-16mib-plus-one",
            cat(&[&[0], &((16u32 << 20) + 1).to_le_bytes(), b"{}"]),
        ),
        ("control", "hello-not-json", cat(&[&[0], &frame("hello?")])),
        (
            "control",
            "hello-wrong-magic",
            cat(&[
                &[0],
                &frame(r#"{"hello": "nbd", "version": 1, "store": "x", "store_id": [2049, 131]}"#),
            ]),
        ),
        (
            "control",
            "hello-another-store",
            cat(&[&[0], &hello("[2049, 132]")]),
        ),
        ("control", "hello-no-store-id", cat(&[&[0], &hello("null")])),
        (
            "control",
            "requests-without-descriptor",
            cat(&[
                &[0],
                &ok_hello,
                &frame(r#"{"id": 1, "request": {"op": "write", "offset": 0, "snapshot": null}}"#),
                &frame(r#"{"id": 2, "request": {"op": "export", "name": "origin"}}"#),
                &frame(
                    r#"{"id": 3, "request": {"op": "restore-to", "name": "a", "target": "/dev/x"}}"#,
                ),
            ]),
        ),
        (
            "control",
            "numbers-at-their-limits",
            cat(&[
                &[1],
                &ok_hello,
                &frame(
                    r#"{"id": 18446744073709551615, "request": {"op": "write", "offset": 18446744073709551615, "snapshot": null}}"#,
                ),
                &frame(
                    r#"{"id": 2, "request": {"op": "create", "name": "t", "expires": 9223372036854775807, "labels": {}, "from": null, "writable": false, "created": -9223372036854775808}}"#,
                ),
                &frame(
                    r#"{"id": 3, "request": {"op": "write", "offset": 656359, "snapshot": "b"}}"#,
                ),
                &frame(r#"{"id": 4, "request": {"op": "diff", "from": "nosuch", "to": "origin"}}"#),
                &frame(
                    r#"{"id": 5, "request": {"op": "delete", "names": ["a", "a", "nosuch"], "force": true}}"#,
                ),
                &frame(r#"{"id": 6, "request": {"op": "list"}}"#),
            ]),
        ),
        (
            "control",
            "create-label-70k",
            cat(&[
                &[0],
                &ok_hello,
                &frame(&format!(
                    r#"{{"id": 1, "request": {{"op": "create", "name": "big", "expires": null, "labels": {{"k": "{}"}}, "from": null, "writable": false, "created": null}}}}"#,
                    "\u{20ac}".repeat(23_334)
                )),
            ]),
        ),
        (
            "control",
            "json-nested-deep",
            cat(&[
                &[0],
                &ok_hello,
                &frame(&format!("{}{}", "[".repeat(20_000), "]".repeat(20_000))),
            ]),
        ),
        ("config", "empty.toml", vec![]),
        (
            "config",
            "unknown-keys.toml",
            format!("{toml_ok}bogus = 1\n[store.db.extra]\nx = 1\n[other]\ny = 2\n").into_bytes(),
        ),
        (
            "config",
            "every-max-seconds.toml",
            toml_ok
                .replace("\"1h\"", "\"9223372036854775807s\"")
                .into_bytes(),
        ),
        (
            "config",
            "every-max-weeks.toml",
            toml_ok
                .replace("\"1h\"", &format!("\"{}w\"", i64::MAX / 604_800))
                .into_bytes(),
        ),
        (
            "config",
            "keep-and-retain-max.toml",
            toml_ok
                .replace(
                    "keep = 3",
                    "keep = 9223372036854775807\nretain = \"9223372036854775807s\"",
                )
                .into_bytes(),
        ),
        (
            "config",
            "keep-negative.toml",
            toml_ok.replace("keep = 3", "keep = -1").into_bytes(),
        ),
        (
            "config",
            "period-named-twice.toml",
            format!("{toml_ok}[[store.db.period]]\nname = \"h\"\nevery = \"1d\"\nkeep = 1\n")
                .into_bytes(),
        ),
        (
            "config",
            "not-utf8.toml",
            cat(&[toml_ok.as_bytes(), &[0xff, 0xfe, b'\n']]),
        ),
        (
            "config",
            "arrays-nested-deep.toml",
            format!("x = {}{}\n", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        (
            "config",
            "tables-nested-deep.toml",
            format!("x = {}{}\n", "{a = ".repeat(10_000), "}".repeat(10_000)).into_bytes(),
        ),
    ]
}

#[test]
fn hand_made_fixtures_are_what_their_recipes_make() {
    let write = std::env::var_os("SNAPCTL_WRITE_FIXTURES").is_some();
    for (target, name, bytes) in hand_made() {
        let path = fixtures_dir().join(target).join(name);
        if write {
            std::fs::create_dir_all(fixtures_dir().join(target)).expect("mkdir");
            std::fs::write(&path, &bytes).expect("write fixture");
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} differs from its recipe in tests/fuzz_replay.rs",
            path.display()
        );
    }
}
