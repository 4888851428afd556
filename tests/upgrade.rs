//! A store written by the previous format (version 2, a fixture made by snapctl 0.1 with
//! snapshots, a writable snapshot, a snapshot of it and an origin with a partial last chunk) is
//! refused with a message naming `snapctl upgrade`, and upgraded in place with every view exact.

use std::path::Path;
use std::process::Command;

use crate::util::bin;

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("SNAPCTL_STORE", dir.join("store.img"))
        .env("SNAPCTL_RUN_DIR", dir.join("run"))
        .output()
        .expect("run snapctl")
}

/// Unpacks the fixture and points its superblock at the unpacked origin (path and identity),
/// keeping version 2.
fn unpack(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2-store.tar.gz");
    let st = Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .current_dir(dir)
        .status()
        .expect("tar");
    assert!(st.success());
    let store = dir.join("store.img");
    let mut img = std::fs::read(&store).expect("read store");
    let (mut sb, version) = snapctl::store::format::Superblock::decode_any(&img[..4096], "fixture")
        .expect("superblock");
    assert_eq!(version, 2);
    let origin = dir.join("origin.img");
    sb.origin_path = origin.display().to_string();
    sb.fingerprint = snapctl::store::origin_fingerprint(&origin).expect("fingerprint");
    img[..4096].copy_from_slice(&superblock_of_version(&sb, 2));
    std::fs::write(&store, img).expect("write store");
}

/// `list` is refused with one line naming the store's version and `snapctl -s ... upgrade`.
fn refused_naming_upgrade(d: &Path, version: &str) {
    let o = cli(d, &["list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(version) && err.contains("snapctl -s") && err.contains("upgrade"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A directory with a 4 MiB origin (bytes from `mul`) and a 64 MiB store file, not made yet.
fn new_lab(mul: u32) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let d = dir.path();
    let origin: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i * mul + i / 4096) as u8)
        .collect();
    std::fs::write(d.join("origin.img"), &origin).expect("origin");
    let f = std::fs::File::create(d.join("store.img")).expect("store");
    f.set_len(64 << 20).expect("size");
    (dir, origin)
}

/// Runs snapctl in `d`, which must succeed; its standard output.
fn ok(d: &Path, args: &[&str]) -> Vec<u8> {
    let o = cli(d, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Rewrites both superblocks of `d`'s store to say `version`; the store's bytes after.
fn make_version(d: &Path, version: u32, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let store = d.join("store.img");
    let mut img = std::fs::read(&store).expect("read store");
    let (sb, _) = snapctl::store::format::Superblock::decode_any(&img[..4096], "s").expect("sb");
    let b = superblock_of_version(&sb, version);
    img[..4096].copy_from_slice(&b);
    img[512 << 10..(512 << 10) + 4096].copy_from_slice(&b);
    edit(&mut img);
    std::fs::write(&store, &img).expect("write store");
    img
}

/// `sb` encoded as a superblock of format `version`, with its checksum.
fn superblock_of_version(sb: &snapctl::store::format::Superblock, version: u32) -> Vec<u8> {
    let mut b = sb.encode();
    b[8..12].copy_from_slice(&version.to_le_bytes());
    let sum = *blake3::hash(&b[..4064]).as_bytes();
    b[4064..].copy_from_slice(&sum);
    b
}

#[test]
fn a_version_2_store_is_refused_by_name_then_upgraded_in_place() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let d = dir.path();
    unpack(d);
    let before = std::fs::read(d.join("store.img")).expect("read");
    refused_naming_upgrade(d, "version 2");
    assert_eq!(std::fs::read(d.join("store.img")).expect("read"), before);

    let o = cli(d, &["upgrade"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("from format version 2 to 6"), "{out}");
    for v in ["a", "b", "c", "d", "e", "origin"] {
        let o = cli(d, &["export", v]);
        assert!(
            o.status.success(),
            "export {v}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = std::fs::read(d.join(format!("expected/{v}.img"))).expect("expected");
        assert!(o.stdout == want, "view {v} differs after the upgrade");
    }
    let o = cli(d, &["check", "--data"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Again: nothing to do. And the upgraded store takes new writes and snapshots.
    let o = cli(d, &["upgrade"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("already"));
    std::fs::write(d.join("w"), vec![7u8; 9000]).expect("w");
    assert!(cli(d, &["create", "g"]).status.success());
    assert!(cli(d, &["write", "--offset", "100", "-i", "w"])
        .status
        .success());
    assert!(
        cli(d, &["write", "--snapshot", "b", "--offset", "0", "-i", "w"])
            .status
            .success()
    );
    let o = cli(d, &["export", "g"]);
    assert!(o.stdout == std::fs::read(d.join("expected/origin.img")).expect("origin"));
    let o = cli(d, &["check", "--data"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Version 3 (before the copy journal): refused by name, upgraded by clearing the journal's
/// space (which a version-3 store may hold anything in, if it was not made by snapctl 0.x's
/// init) and rewriting the superblock; every view stays exact and the journal then works.
#[test]
fn a_version_3_store_is_refused_by_name_then_upgraded_in_place() {
    let (dir, origin) = new_lab(7);
    let d = dir.path();
    let ok = |args: &[&str]| ok(d, args);
    ok(&[
        "init",
        "store.img",
        "--origin",
        "origin.img",
        "--chunk-size",
        "4K",
    ]);
    ok(&["create", "a"]);
    std::fs::write(d.join("w"), vec![9u8; 20000]).expect("w");
    ok(&["write", "--offset", "5000", "-i", "w"]);
    let mut after = origin.clone();
    after[5000..25000].fill(9);

    // Make it a version-3 store: its superblocks say 3, and the journal's space holds bytes
    // that are no record (version 3 promised nothing there).
    let store = d.join("store.img");
    let img = make_version(d, 3, |img| {
        for (i, x) in img[8192..512 << 10].iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
    });

    refused_naming_upgrade(d, "version 3");
    assert_eq!(
        std::fs::read(&store).expect("read"),
        img,
        "a refused command wrote"
    );

    let out = String::from_utf8_lossy(&ok(&["upgrade"])).to_string();
    assert!(out.contains("from format version 3 to 6"), "{out}");
    let img = std::fs::read(&store).expect("read");
    assert!(
        img[8192..512 << 10].iter().all(|&x| x == 0),
        "journal not cleared"
    );
    assert_eq!(ok(&["export", "a"]), origin);
    assert_eq!(ok(&["export", "origin"]), after);
    // The journal in use: a first write after a new snapshot, then everything exact.
    ok(&["create", "b"]);
    let at_b = after.clone();
    ok(&["write", "--offset", "0", "-i", "w"]);
    after[..20000].fill(9);
    assert_eq!(ok(&["export", "a"]), origin);
    assert_eq!(ok(&["export", "b"]), at_b);
    assert_eq!(ok(&["export", "origin"]), after);
    ok(&["check", "--data"]);
}

/// Version 4 (each batch flushed before the next): refused by name, upgraded by rewriting the
/// superblock alone. Its journal is kept: here it holds the record of a batch whose server was
/// killed before any durable commit, and the snapshot is exact only if that record is replayed
/// after the upgrade (zeroing the journal, as from version 3, would lose the copy).
#[test]
fn a_version_4_store_keeps_its_journal_through_the_upgrade() {
    use crate::nbd::{Raw, Served};
    let mut s = Served::start_with(&[("SNAPCTL_PIPELINE", "0")]);
    let d = s.dir.path().to_path_buf();
    let before = std::fs::read(s.p("origin.img")).expect("origin");
    s.ok(&["create", "a"]);
    let mut c = Raw::go(&s.sock(), "origin").expect("connect");
    let mut after = before.clone();
    for (i, off) in [70_000u64, 5 << 20, 20 << 20].iter().enumerate() {
        assert_eq!(c.write(*off, &[i as u8 + 1; 9000]), 0);
        after[*off as usize..*off as usize + 9000].fill(i as u8 + 1);
    }
    drop(c);
    s.kill9();

    let store = d.join("store.img");
    let img = make_version(&d, 4, |img| {
        assert_eq!(&img[8192..8200], b"SNAPJRN\0", "no journal record");
    });

    refused_naming_upgrade(&d, "version 4");
    assert_eq!(
        std::fs::read(&store).expect("read"),
        img,
        "a refused command wrote"
    );
    let o = cli(&d, &["upgrade"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("from format version 4 to 6"), "{out}");
    assert!(
        s.export("a") == before,
        "snapshot a differs after the upgrade"
    );
    assert!(
        s.export("origin") == after,
        "the origin differs after the upgrade"
    );
    s.ok(&["check", "--data"]);
}

/// Version 5 (no live-point index): refused by name, upgraded by building the index from the
/// snapshot rows; a delete then reads only the rows it needs and accounts right, and the
/// store checks clean.
#[test]
fn a_version_5_store_gets_its_live_point_index() {
    let (dir, _) = new_lab(5);
    let d = dir.path();
    let ok = |args: &[&str]| String::from_utf8_lossy(&ok(d, args)).to_string();
    ok(&["init", "store.img", "--origin", "origin.img"]);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        ok(&["create", name]);
        std::fs::write(d.join("w"), vec![i as u8 + 1; 300_000]).expect("w");
        ok(&["write", "--offset", &(i * 100_000).to_string(), "-i", "w"]);
    }
    // A version-5 store: no live-point index, superblocks saying 5.
    let store = d.join("store.img");
    {
        use snapctl::store::testing::{harm, Harm};
        let mut s = snapctl::store::Store::open(&store, Default::default()).expect("open");
        assert!(harm(&mut s, Harm::DropLiveIndex).expect("harm"));
    }
    make_version(d, 5, |_| {});

    refused_naming_upgrade(d, "version 5");
    let out = ok(&["upgrade"]);
    assert!(out.contains("from format version 5 to 6"), "{out}");
    let a_before = ok(&["--json", "show", "a"]);
    ok(&["delete", "b"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&["--json", "list"])).expect("json");
    let names: Vec<&str> = v["snapshots"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "c"]);
    // a now holds alone what b held before (its window reaches c).
    let held = |j: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(j).expect("json");
        v["snapshot"]["exclusive_bytes"].as_u64().expect("bytes")
    };
    assert!(held(&ok(&["--json", "show", "a"])) > held(&a_before));
    ok(&["check", "--data"]);
}
