//! `check --repair` against every kind of damage we can inject: each is found, mended or named,
//! and afterwards every snapshot still marked valid reads back exactly what it held, while a
//! snapshot that lost data is refused (before repair) and marked invalid (with --drop-damaged).
//! Never a wrong byte at any step.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use snapctl::store::testing::{harm, Harm};
use snapctl::store::Store;

use crate::util::bin;

const CHUNK: u64 = 4096;
const ORIGIN: usize = 4 << 20;

struct Lab {
    dir: tempfile::TempDir,
    /// Every view's expected bytes (name, image), the origin first.
    views: Vec<(String, Vec<u8>)>,
    pristine: Vec<u8>,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Lab {
    /// An origin, a store with 4 KiB chunks, six snapshots with writes between them (one
    /// writable, written into; one a snapshot of a snapshot), and the bytes each should read.
    fn new() -> Lab {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut origin: Vec<u8> = (0..ORIGIN).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("origin.img"), &origin).expect("origin");
        std::fs::write(dir.path().join("store.img"), vec![0u8; 32 << 20]).expect("store");
        let mut lab = Lab {
            dir,
            views: Vec::new(),
            pristine: Vec::new(),
        };
        lab.ok(&[
            "init",
            "store.img",
            "--origin",
            "origin.img",
            "--chunk-size",
            "4K",
        ]);
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..5u64 {
            let name = format!("s{i}");
            lab.ok(&["create", &name]);
            snaps.push((name, origin.clone()));
            // Writes that cross groups (128 chunks = 512 KiB) and overlap earlier ones.
            for k in 0..4u64 {
                let off = ((i * 3 + k * 5) % 60) * 65536 + i * 4096;
                let data = vec![(0x10 + i * 4 + k) as u8; 48 << 10];
                lab.write(&data, off, None);
                origin[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
        lab.ok(&["create", "w", "--writable"]);
        let mut w = origin.clone();
        let data = vec![0xee; 80 << 10];
        lab.write(&data, 1 << 20, Some("w"));
        w[1 << 20..(1 << 20) + data.len()].copy_from_slice(&data);
        snaps.push(("w".into(), w));
        lab.ok(&["create", "s2b", "--from", "s2"]);
        let s2 = snaps[2].1.clone();
        snaps.push(("s2b".into(), s2));
        let data = vec![0x77; 20 << 10];
        lab.write(&data, 3 << 20, None);
        origin[3 << 20..(3 << 20) + data.len()].copy_from_slice(&data);
        lab.views.push(("origin".into(), origin));
        lab.views.extend(snaps);
        assert_eq!(lab.run(&["check", "--data"]).code, 0);
        for (name, want) in &lab.views {
            assert!(
                lab.export(name).as_deref() == Some(want.as_slice()),
                "{name}"
            );
        }
        lab.pristine = std::fs::read(lab.p("store.img")).expect("read store");
        lab
    }

    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn run(&self, args: &[&str]) -> Out {
        let o = Command::new(bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .env("SNAPCTL_LOCK_TIMEOUT", "0.5")
            .output()
            .expect("run snapctl");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.code, 0, "{args:?}: {}{}", o.stdout, o.stderr);
        o.stdout
    }

    fn write(&self, data: &[u8], off: u64, snapshot: Option<&str>) {
        std::fs::write(self.p("w.bin"), data).expect("write input");
        let off = off.to_string();
        let mut a = vec!["-q", "write", "--offset", &off, "-i", "w.bin"];
        if let Some(s) = snapshot {
            a.extend(["--snapshot", s]);
        }
        self.ok(&a);
    }

    /// A view's bytes, or None when snapctl refuses to read it.
    fn export(&self, name: &str) -> Option<Vec<u8>> {
        let _ = std::fs::remove_file(self.p("out.img"));
        let o = self.run(&["-q", "export", name, "-o", "out.img"]);
        if o.code != 0 {
            assert!(
                [6, 8].contains(&o.code) && o.stderr.lines().count() == 1,
                "export {name}: code {} {}",
                o.code,
                o.stderr
            );
            return None;
        }
        Some(std::fs::read(self.p("out.img")).expect("read export"))
    }

    /// Back to the state `new` made, in the same file (the store's identity is its inode).
    fn reset(&self) {
        std::fs::write(self.p("store.img"), &self.pristine).expect("reset store");
    }

    fn check(&self, args: &[&str]) -> (i32, Value) {
        let mut a = vec!["--json", "check"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        let v: Value = serde_json::from_str(&o.stdout)
            .unwrap_or_else(|_| panic!("check {args:?}: {} {}", o.stdout, o.stderr));
        (o.code, v["check"].clone())
    }

    fn invalid(&self) -> Vec<String> {
        let o = self.ok(&["--json", "list"]);
        let v: Value = serde_json::from_str(&o).expect("list json");
        v["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["state"] == "invalid")
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect()
    }

    /// Every view reads its exact bytes, or is refused; never anything else. The names refused.
    fn never_wrong(&self, when: &str) -> Vec<String> {
        let mut refused = Vec::new();
        for (name, want) in &self.views {
            match self.export(name) {
                Some(got) => assert!(got == *want, "{when}: '{name}' read wrong bytes"),
                None => refused.push(name.clone()),
            }
        }
        refused
    }

    fn harm(&self, h: Harm) -> bool {
        let mut s = Store::open(&self.p("store.img"), Default::default()).expect("open");
        harm(&mut s, h).expect("harm")
    }

    fn flip(&self, at: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.p("store.img"))
            .expect("open store");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0x20;
        f.write_all_at(&b, at).expect("write");
    }

    /// `check --repair` twice: the first mends (exit 10, saying what it did), the second finds
    /// nothing left (exit 0); then every view is exact.
    fn repairs_cleanly(&self, what: &str, extra: &[&str]) -> Value {
        let mut a = vec!["--repair"];
        a.extend_from_slice(extra);
        let (code, rep) = self.check(&a);
        assert_eq!(code, 10, "{what}: check --repair: {rep}");
        assert!(
            !rep["repaired"].as_array().is_none_or(|r| r.is_empty()),
            "{what}: {rep}"
        );
        let (code, again) = self.check(&["--repair", "--data"]);
        assert_eq!(code, 0, "{what}: second repair: {again}");
        assert!(again["repaired"].as_array().is_some_and(|r| r.is_empty()));
        rep
    }
}

#[test]
fn repair_mends_leaks_indexes_and_counters_without_changing_a_byte() {
    let lab = Lab::new();
    type Damage<'a> = &'a dyn Fn(&Lab) -> bool;
    let cases: [(&str, Damage, i32); 8] = [
        (
            "leaked chunks",
            &|l| {
                let mut s = Store::open(&l.p("store.img"), Default::default()).expect("open");
                snapctl::store::testing::leak_chunks(&mut s, 5).is_ok()
            },
            9,
        ),
        (
            "used counter",
            &|l| {
                let mut s = Store::open(&l.p("store.img"), Default::default()).expect("open");
                snapctl::store::testing::corrupt_used_counter(&mut s).is_ok()
            },
            6,
        ),
        ("time index", &|l| l.harm(Harm::DropTimeIndex), 6),
        ("stale heads", &|l| l.harm(Harm::StaleHeads), 6),
        ("name index", &|l| l.harm(Harm::DropNames), 6),
        ("live-point index", &|l| l.harm(Harm::DropLiveIndex), 6),
        (
            "a chunk both free and in use",
            &|l| l.harm(Harm::FreeAChunkInUse),
            6,
        ),
        ("exclusive counts", &|l| l.harm(Harm::WrongExclusive), 6),
    ];
    for (what, damage, code) in cases {
        lab.reset();
        assert!(damage(&lab), "{what}: nothing to damage");
        let (got, rep) = lab.check(&[]);
        assert_eq!(got, code, "{what}: check: {rep}");
        // Indexes and counters never lose data: every view is still exact (or refused, for a
        // chain whose head went stale), and nothing is marked invalid by the repair.
        lab.never_wrong(what);
        lab.repairs_cleanly(what, &[]);
        assert!(lab.invalid().is_empty(), "{what}: {:?}", lab.invalid());
        assert!(
            lab.never_wrong(what).is_empty(),
            "{what}: a view is refused"
        );
    }
}

#[test]
fn a_damaged_superblock_is_rewritten_from_its_backup() {
    let lab = Lab::new();
    // A flipped byte, then the whole first 4 KiB gone (a stray dd, another tool's label).
    for (what, damage) in [
        ("flipped", &(|l: &Lab| l.flip(100)) as &dyn Fn(&Lab)),
        ("zeroed", &|l: &Lab| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(l.p("store.img"))
                .expect("open");
            f.write_all_at(&[0u8; 4096], 0).expect("zero");
        }),
    ] {
        lab.reset();
        damage(&lab);
        let o = lab.run(&["list"]);
        assert_eq!(o.code, 6, "{what}: {}", o.stderr);
        assert!(
            o.stderr.contains("check --repair") && o.stderr.lines().count() == 1,
            "{what}: {}",
            o.stderr
        );
        let (code, rep) = lab.check(&[]);
        assert_eq!(code, 6, "{what}: {rep}");
        assert!(rep.to_string().contains("superblock"), "{rep}");
        lab.repairs_cleanly(what, &[]);
        assert_eq!(
            std::fs::read(lab.p("store.img")).expect("read")[..4096],
            lab.pristine[..4096],
            "{what}: the rewritten superblock is the original"
        );
        assert!(lab.never_wrong(what).is_empty());
    }
    // The backup damaged: found and rewritten; missing (an older store): a note, and written.
    lab.reset();
    lab.flip((512 << 10) + 300);
    let (code, rep) = lab.check(&[]);
    assert_eq!(code, 6, "{rep}");
    lab.repairs_cleanly("backup", &[]);
    lab.reset();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(lab.p("store.img"))
            .expect("open");
        f.write_all_at(&[0u8; 4096], 512 << 10).expect("zero");
    }
    let (code, rep) = lab.check(&[]);
    assert_eq!(code, 0, "{rep}");
    assert!(rep["notes"].to_string().contains("backup"), "{rep}");
    lab.repairs_cleanly("no backup", &[]);
    // Both copies damaged: named, nothing written, no panic.
    lab.reset();
    lab.flip(100);
    lab.flip((512 << 10) + 100);
    let before = std::fs::read(lab.p("store.img")).expect("read");
    for args in [&["check"][..], &["check", "--repair"]] {
        let o = lab.run(args);
        assert!([3, 6].contains(&o.code), "{args:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    }
    assert!(std::fs::read(lab.p("store.img")).expect("read") == before);
}

/// Damaged and vanished records, one at a time, each of them: before repair the views that
/// lost data are refused (never wrong); `--repair` alone names them and keeps refusing them;
/// `--repair --drop-damaged` marks exactly those invalid (at least every refused one) and
/// everything else reads back exact.
#[test]
fn damaged_rows_are_named_and_dropped_with_only_their_snapshots() {
    let lab = Lab::new();
    let records = {
        let s = Store::open(&lab.p("store.img"), Default::default()).expect("open");
        let mut s = s;
        s.check().expect("check").records as usize
    };
    assert!(records > 10, "only {records} records");
    let mut harms: Vec<Harm> = (0..records)
        .flat_map(|n| [Harm::DamageRecord(n), Harm::RemoveRecord(n)])
        .collect();
    harms.push(Harm::DamageOverlay(0));
    for h in harms {
        lab.reset();
        assert!(lab.harm(h), "{h:?}");
        let refused = lab.never_wrong(&format!("{h:?}"));
        let (code, rep) = lab.check(&[]);
        // A removed record no snapshot read any more is a leak at most.
        assert!(
            code == 6 || (refused.is_empty() && code == 9),
            "{h:?}: {rep}"
        );
        // Repair without --drop-damaged mends the rest but keeps refusing the damaged views.
        let (code, rep) = lab.check(&["--repair"]);
        if !refused.is_empty() {
            assert_eq!(code, 6, "{h:?}: {rep}");
            assert!(rep.to_string().contains("--drop-damaged"), "{h:?}: {rep}");
        }
        assert!(lab.invalid().is_empty(), "{h:?}");
        assert_eq!(lab.never_wrong(&format!("{h:?} after --repair")), refused);
        let (code, rep) = lab.check(&["--repair", "--drop-damaged"]);
        assert!([0, 10].contains(&code), "{h:?}: {rep}");
        let invalid = lab.invalid();
        for r in &refused {
            assert!(
                invalid.contains(r),
                "{h:?}: '{r}' was refused but not dropped: {rep}"
            );
        }
        assert!(!invalid.contains(&"origin".to_string()));
        for (name, want) in &lab.views {
            if !invalid.contains(name) {
                assert!(
                    lab.export(name).as_deref() == Some(want.as_slice()),
                    "{h:?}: '{name}' after --drop-damaged"
                );
            }
        }
        let (code, rep) = lab.check(&["--data"]);
        assert_eq!(code, 0, "{h:?}: after --drop-damaged: {rep}");
    }
}

#[test]
fn damaged_saved_bytes_drop_only_the_snapshots_that_read_them() {
    let lab = Lab::new();
    let sb = snapctl::store::peek_superblock(&lab.p("store.img")).expect("superblock");
    // Damage a few saved chunks in turn, each in the middle of the chunk.
    for k in [0u64, 7, 20, 33] {
        lab.reset();
        lab.flip(sb.data_offset + k * CHUNK + 1000);
        let refused = lab.never_wrong(&format!("chunk {k}"));
        let (code, rep) = lab.check(&["--data"]);
        assert_eq!(code, 6, "chunk {k}: {rep}");
        let named: Vec<String> = rep["damaged"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|d| d["snapshots"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        for r in &refused {
            assert!(named.contains(r), "chunk {k}: '{r}' refused but not named");
        }
        let (code, _) = lab.check(&["--repair", "--data"]);
        assert_eq!(code, 6);
        let (code, rep) = lab.check(&["--repair", "--drop-damaged", "--data"]);
        assert_eq!(code, 10, "chunk {k}: {rep}");
        let mut invalid = lab.invalid();
        invalid.sort();
        let mut named = named;
        named.sort();
        named.dedup();
        assert_eq!(invalid, named, "chunk {k}");
        for (name, want) in &lab.views {
            if !invalid.contains(name) {
                assert!(
                    lab.export(name).as_deref() == Some(want.as_slice()),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn drop_damaged_needs_repair() {
    let lab = Lab::new();
    let o = lab.run(&["check", "--drop-damaged"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--repair"), "{}", o.stderr);
}

/// A snapshot's catalog row damaged: every command refuses the store, naming `check`; `check`
/// opens it and names the snapshot; `--repair` alone frees nothing (what only that snapshot
/// held may look unread); `--drop-damaged` removes it, and every other view stays exact.
#[test]
fn a_damaged_snapshot_row_is_named_and_only_that_snapshot_dropped() {
    let lab = Lab::new();
    for n in [0usize, 3, 5] {
        lab.reset();
        assert!(lab.harm(Harm::DamageSnapshotRow(n)), "row {n}");
        let o = lab.run(&["list"]);
        assert_eq!(o.code, 6, "{}", o.stderr);
        assert!(o.stderr.contains("snapctl check"), "{}", o.stderr);
        let (code, before) = lab.check(&[]);
        assert_eq!(code, 6, "row {n}: {before}");
        assert!(before.to_string().contains("--drop-damaged"), "{before}");
        let (code, rep) = lab.check(&["--repair"]);
        assert_eq!(code, 6, "row {n}: {rep}");
        // Nothing freed: the chunks only that snapshot held still look in use.
        assert_eq!(rep["free_chunks"], before["free_chunks"], "row {n}: {rep}");
        assert_eq!(rep["used_chunks"], before["used_chunks"], "row {n}: {rep}");
        let (code, rep) = lab.check(&["--repair", "--drop-damaged"]);
        assert_eq!(code, 10, "row {n}: {rep}");
        let listed: Vec<String> = {
            let o = lab.ok(&["--json", "list"]);
            let v: Value = serde_json::from_str(&o).expect("json");
            v["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        };
        assert_eq!(listed.len(), lab.views.len() - 2, "row {n}: {listed:?}");
        for (name, want) in &lab.views {
            if name == "origin" || listed.contains(name) {
                assert!(
                    lab.export(name).as_deref() == Some(want.as_slice()),
                    "row {n}: '{name}'"
                );
            }
        }
        let (code, rep) = lab.check(&["--data"]);
        assert_eq!(code, 0, "row {n}: {rep}");
    }
}
