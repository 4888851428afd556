//! The binary as users and scripts run it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::util::bin;

struct Env {
    dir: tempfile::TempDir,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Env {
    fn new() -> Env {
        let e = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        let mut img = vec![0u8; 8 << 20];
        for (i, b) in img.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        std::fs::write(e.p("origin.img"), &img).unwrap();
        std::fs::write(e.p("store.img"), vec![0u8; 32 << 20]).unwrap();
        e
    }
    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
    fn run(&self, args: &[&str]) -> Out {
        self.run_in(args, None)
    }
    fn run_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Out {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_LOCK_TIMEOUT", "0.5")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut si = child.stdin.take().unwrap();
            if let Some(d) = stdin {
                si.write_all(d).unwrap();
            }
        }
        let o = child.wait_with_output().unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.code, 0, "{args:?} failed: {}", o.stderr);
        o.stdout
    }
    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: {e}: {s}"));
        assert_eq!(v["schema_version"], 1);
        v
    }
    fn init(&self) {
        self.ok(&["init", "store.img", "--origin", "origin.img"]);
    }
    fn hash(&self) -> (blake3::Hash, blake3::Hash) {
        let h = |f: &str| blake3::hash(&std::fs::read(self.p(f)).unwrap_or_default());
        (h("store.img"), h("origin.img"))
    }
    /// The command fails with `code`, one line on stderr containing `needle`, nothing changed.
    fn fails(&self, args: &[&str], code: i32, needle: &str) {
        let before = self.hash();
        let o = self.run(args);
        assert_eq!(o.code, code, "{args:?}: stderr {}", o.stderr);
        assert!(
            o.stderr.contains(needle),
            "{args:?}: '{needle}' not in {}",
            o.stderr
        );
        assert_eq!(
            o.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            o.stderr
        );
        assert!(o.stderr.starts_with("snapctl: "), "{}", o.stderr);
        assert_eq!(self.hash(), before, "{args:?} changed the disk");
    }
}

#[test]
fn init_refuses_bad_input_and_changes_nothing() {
    let e = Env::new();
    e.fails(
        &["init", "origin.img", "--origin", "origin.img"],
        2,
        "same device",
    );
    e.fails(
        &["init", "store.img", "--origin", "nope.img"],
        3,
        "nope.img",
    );
    e.fails(
        &["init", "nope.img", "--origin", "origin.img"],
        3,
        "nope.img",
    );
    for bad in ["3K", "2M", "abc", "2048", "0"] {
        e.fails(
            &[
                "init",
                "store.img",
                "--origin",
                "origin.img",
                "--chunk-size",
                bad,
            ],
            2,
            "chunk",
        );
    }
    std::fs::write(e.p("tiny.img"), vec![0u8; 4 << 20]).unwrap();
    e.fails(
        &["init", "tiny.img", "--origin", "origin.img"],
        2,
        "too small",
    );
    e.init();
    e.fails(
        &["init", "store.img", "--origin", "origin.img"],
        4,
        "--force",
    );
    e.ok(&["create", "a"]);
    e.ok(&["init", "store.img", "--origin", "origin.img", "--force"]);
    assert!(e.json(&["list"])["snapshots"]
        .as_array()
        .unwrap()
        .is_empty());
    for cs in ["4096", "4K", "4KiB", "1M", "1MiB", "64k"] {
        let v = e.json(&[
            "init",
            "store.img",
            "--origin",
            "origin.img",
            "--force",
            "--chunk-size",
            cs,
        ]);
        assert!(v["store"]["chunk_size"].as_u64().unwrap().is_power_of_two());
    }
}

#[test]
fn init_never_writes_to_the_origin() {
    let e = Env::new();
    let before = std::fs::read(e.p("origin.img")).unwrap();
    e.init();
    assert!(std::fs::read(e.p("origin.img")).unwrap() == before);
}

#[test]
fn the_json_contract_holds_for_every_command() {
    let e = Env::new();
    e.init();
    let c = e.json(&[
        "create",
        "first",
        "--label",
        "env=prod",
        "--label",
        "app=db",
        "--expires",
        "7d",
    ]);
    let s = &c["snapshot"];
    for k in [
        "name",
        "id",
        "parent",
        "created",
        "writable",
        "expires",
        "labels",
        "exclusive_bytes",
        "state",
    ] {
        assert!(s.get(k).is_some(), "snapshot lacks {k}: {s}");
    }
    assert_eq!(s["name"], "first");
    assert_eq!(s["parent"], "origin");
    assert_eq!(s["writable"], false);
    assert_eq!(s["state"], "valid");
    assert_eq!(s["labels"]["env"], "prod");
    assert!(s["id"].is_u64());
    assert!(chrono::DateTime::parse_from_rfc3339(s["created"].as_str().unwrap()).is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(s["expires"].as_str().unwrap()).is_ok());
    // first holds the copies of the first write alone, second those of the second.
    e.ok_write(&vec![8u8; 1 << 20], 0);
    e.json(&["create", "second"]);
    e.ok_write(&vec![9u8; 1 << 20], 0);
    let l = e.json(&["list"]);
    let names: Vec<&str> = l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(l["snapshots"][0]["exclusive_bytes"], 1 << 20);
    assert_eq!(l["snapshots"][1]["exclusive_bytes"], 1 << 20);
    assert_eq!(l["snapshots"][1]["expires"], Value::Null);
    let r = e.json(&["rename", "second", "third"]);
    assert_eq!(r["snapshot"]["name"], "third");
    assert_eq!(r["snapshot"]["id"], 2);
    let sh = e.json(&["show", "third"]);
    assert_eq!(sh["snapshot"]["exclusive_bytes"], 1 << 20);
    let i = e.json(&["info"]);
    for k in [
        "origin_size",
        "chunk_size",
        "used_bytes",
        "free_bytes",
        "snapshot_count",
    ] {
        assert!(i["store"][k].is_u64(), "info lacks integer {k}");
    }
    assert_eq!(i["store"]["snapshot_count"], 2);
    assert_eq!(i["store"]["used_bytes"], 2 << 20);
    assert_eq!(i["store"]["origin_size"], 8 << 20);
    let d = e.json(&["delete", "third", "first"]);
    assert_eq!(d["deleted"], serde_json::json!(["third", "first"]));
    assert_eq!(d["freed_bytes"], 2 << 20);
    // ids are never reused
    let n = e.json(&["create", "fourth"]);
    assert_eq!(n["snapshot"]["id"], 3);
    let ch = e.json(&["check"]);
    assert_eq!(ch["check"]["clean"], true);
}

impl Env {
    fn ok_write(&self, data: &[u8], off: u64) {
        let o = self.run_in(&["write", "--offset", &off.to_string()], Some(data));
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
}

#[test]
fn errors_are_one_line_or_one_json_object_and_change_nothing() {
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    e.fails(&["show", "nope"], 3, "no snapshot named 'nope'");
    e.fails(&["delete", "a", "nope"], 3, "nope");
    e.fails(&["delete", "a", "a"], 2, "twice");
    e.fails(&["create", "a"], 4, "already exists");
    e.fails(&["rename", "a", "origin"], 2, "reserved");
    e.fails(&["create", "--", "-bad"], 2, "must not start");
    e.fails(&["create", "has space"], 2, "contains ' '");
    e.fails(&["create", ".hidden"], 2, "must not start");
    e.fails(&["create", &"x".repeat(129)], 2, "128");
    e.fails(
        &["create", "b", "--expires", "2001-01-01T00:00:00Z"],
        2,
        "in the past",
    );
    e.fails(&["create", "b", "--expires", "tomorrow"], 2, "RFC 3339");
    e.fails(&["create", "b", "--label", "novalue"], 2, "KEY=VALUE");
    e.fails(
        &["create", "b", "--label", "k=1", "--label", "k=2"],
        2,
        "twice",
    );
    e.fails(&["export", "nope", "-o", "x.img"], 3, "nope");
    e.fails(&["write", "--offset", "9M"], 2, "beyond the end");
    e.fails(&["write", "-i", "missing.bin"], 3, "missing.bin");
    let o = e.run(&["--json", "show", "nope"]);
    assert_eq!(o.code, 3);
    assert!(o.stdout.is_empty());
    let v: Value = serde_json::from_str(o.stderr.trim()).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["error"]["kind"], "not-found");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    // no store given
    let o = Command::new(bin())
        .arg("list")
        .env_remove("SNAPCTL_STORE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("SNAPCTL_STORE"));
}

#[test]
fn a_file_that_is_not_a_store_is_named_as_such() {
    let e = Env::new();
    std::fs::write(e.p("random.img"), vec![1u8; 1 << 20]).unwrap();
    let o = e.run(&["-s", "random.img", "list"]);
    assert_eq!(o.code, 3);
    assert!(
        o.stderr.contains("random.img: not a snapctl store"),
        "{}",
        o.stderr
    );
}

#[test]
fn the_store_flag_works_before_or_after_the_subcommand() {
    let e = Env::new();
    e.init();
    let s = e.p("store.img");
    let s = s.to_str().unwrap();
    for args in [
        vec!["-s", s, "list"],
        vec!["list", "-s", s],
        vec!["list", "--store", s, "--json"],
    ] {
        let o = Command::new(bin())
            .args(&args)
            .env_remove("SNAPCTL_STORE")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}");
    }
}

fn flip(path: &Path, off: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[off as usize] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

#[test]
fn damaged_superblock_or_length_block_is_refused_with_a_clear_error() {
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    let good = std::fs::read(e.p("store.img")).unwrap();
    // every field of the superblock, the checksum, and the metadata length block
    for off in [
        0u64, 8, 16, 32, 40, 48, 80, 88, 96, 104, 112, 120, 128, 256, 4000, 4064, 4095, 4096, 4104,
        4200, 4600,
    ] {
        std::fs::write(e.p("store.img"), &good).unwrap();
        flip(&e.p("store.img"), off);
        let o = e.run(&["list"]);
        assert!(
            o.code == 6 || (off < 8 && o.code == 3),
            "flip at {off}: code {} {}",
            o.code,
            o.stderr
        );
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    }
}

#[test]
fn damaged_metadata_pages_never_crash_and_check_reports_them() {
    let e = Env::new();
    e.init();
    for i in 0..20 {
        e.ok(&["create", &format!("s{i}"), "--label", "k=v"]);
        e.ok_write(&vec![i as u8; 64 << 10], (i as u64) * (300 << 10));
    }
    let good = std::fs::read(e.p("store.img")).unwrap();
    let meta_len = {
        let b = &good[4096 + 8..4096 + 16];
        u64::from_le_bytes(b.try_into().unwrap())
    };
    let mut detected = 0;
    let mut page = 0u64;
    while page * 4096 < meta_len {
        std::fs::write(e.p("store.img"), &good).unwrap();
        flip(&e.p("store.img"), (1 << 20) + page * 4096 + 200);
        for cmd in ["list", "check"] {
            let o = e.run(&[cmd]);
            assert!(
                [0, 6, 9].contains(&o.code),
                "{cmd} after a flip in metadata page {page}: code {} {}",
                o.code,
                o.stderr
            );
            assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
            if cmd == "check" && o.code == 6 {
                detected += 1;
            }
        }
        page += 1;
    }
    assert!(detected > 0, "check detected no damaged page");
}

#[test]
fn check_tells_leaks_from_corruption() {
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    e.ok_write(&vec![3u8; 1 << 20], 0);
    assert_eq!(e.run(&["check"]).code, 0);
    let open = || snapctl::store::Store::open(&e.p("store.img"), Default::default()).unwrap();
    snapctl::store::testing::leak_chunks(&mut open(), 3).unwrap();
    let o = e.run(&["check"]);
    assert_eq!(o.code, 9, "{}", o.stdout);
    assert!(o.stdout.contains("leaked"), "{}", o.stdout);
    assert!(!o.stdout.contains("CORRUPT"), "{}", o.stdout);
    snapctl::store::testing::corrupt_used_counter(&mut open()).unwrap();
    let o = e.run(&["--json", "check"]);
    assert_eq!(o.code, 6);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["check"]["clean"], false);
    assert!(!v["check"]["corruption"].as_array().unwrap().is_empty());
}

#[test]
fn a_different_origin_is_refused() {
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    // Same path, another file (a copy has another identity).
    let data = std::fs::read(e.p("origin.img")).unwrap();
    std::fs::rename(e.p("origin.img"), e.p("orig.bak")).unwrap();
    std::fs::write(e.p("origin.img"), &data).unwrap();
    e.fails(&["list"], 6, "not the device");
    std::fs::rename(e.p("orig.bak"), e.p("origin.img")).unwrap();
    e.ok(&["list"]);
    // Same file, another size.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(e.p("origin.img"))
        .unwrap();
    f.set_len(9 << 20).unwrap();
    e.fails(&["list"], 6, "bytes");
    f.set_len(8 << 20).unwrap();
    std::fs::remove_file(e.p("origin.img")).unwrap();
    e.fails(&["list"], 3, "no such file");
}

#[test]
fn a_second_snapctl_waits_then_reports_busy() {
    use std::os::unix::io::AsRawFd;
    let e = Env::new();
    e.init();
    let f = std::fs::File::open(e.p("store.img")).unwrap();
    // SAFETY: flock on a valid fd.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    e.fails(&["create", "a"], 5, "busy");
    drop(f);
    e.ok(&["create", "a"]);
}

#[test]
fn concurrent_invocations_never_corrupt_the_store() {
    let e = Env::new();
    e.init();
    let store = e.p("store.img");
    let spawn = |prefix: &'static str| {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..12 {
                let o = Command::new(bin())
                    .args(["create", &format!("{prefix}{i}")])
                    .env("SNAPCTL_STORE", &store)
                    .env("SNAPCTL_LOCK_TIMEOUT", "30")
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            }
        })
    };
    let (a, b) = (spawn("a"), spawn("b"));
    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(e.json(&["list"])["snapshots"].as_array().unwrap().len(), 24);
    assert_eq!(e.run(&["check"]).code, 0);
}

#[test]
fn export_writes_each_view_exactly() {
    let e = Env::new();
    e.init();
    let before = std::fs::read(e.p("origin.img")).unwrap();
    e.ok(&["create", "a"]);
    e.ok_write(&vec![0xee; 3 << 20], 12345);
    let after = std::fs::read(e.p("origin.img")).unwrap();
    assert!(after != before);
    e.ok(&["export", "a", "-o", "a.img"]);
    assert!(std::fs::read(e.p("a.img")).unwrap() == before);
    let o = Command::new(bin())
        .args(["export", "origin"])
        .env("SNAPCTL_STORE", e.p("store.img"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout == after);
    let v = e.json(&["export", "a", "-o", "a2.img"]);
    assert_eq!(v["bytes"], 8 << 20);
    // A reader that stops early (`| head -c`, `| cmp`) is not an error.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} export origin | head -c 1000 > /dev/null; exit ${{PIPESTATUS[0]}}",
            bin().display()
        ))
        .env("SNAPCTL_STORE", e.p("store.img"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn both_io_engines_give_the_same_bytes_and_verbose_names_them() {
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    e.ok_write(&vec![1u8; 100_000], 777);
    let mut images = Vec::new();
    for engine in ["sync", "uring"] {
        let o = Command::new(bin())
            .args(["-v", "export", "a", "-o", &format!("{engine}.img")])
            .current_dir(e.dir.path())
            .env("SNAPCTL_STORE", e.p("store.img"))
            .env("SNAPCTL_IO_ENGINE", engine)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if engine == "uring" && !o.status.success() && err.contains("I/O engine") {
            eprintln!("io_uring unavailable here; skipping its half");
            continue;
        }
        assert!(o.status.success(), "{err}");
        let name = if engine == "sync" {
            "sync (pread/pwrite"
        } else {
            "io_uring"
        };
        assert!(err.contains(name), "{err}");
        images.push(std::fs::read(e.p(&format!("{engine}.img"))).unwrap());
    }
    assert!(images.windows(2).all(|w| w[0] == w[1]));
}

/// Root and loop devices: a mounted origin or store is refused (O_EXCL).
#[test]
fn a_mounted_device_is_refused() {
    if unsafe { libc::geteuid() } != 0 || Command::new("losetup").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and losetup");
        return;
    }
    let e = Env::new();
    let fs = e.p("fs.img");
    std::fs::write(&fs, vec![0u8; 32 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&fs)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mnt = e.p("mnt");
    std::fs::create_dir(&mnt).unwrap();
    struct Cleanup(String, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.1).output();
            let _ = Command::new("losetup").args(["-d", &self.0]).output();
        }
    }
    let _c = Cleanup(dev.clone(), mnt.clone());
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F", &dev])
        .output()
        .unwrap()
        .status
        .success());
    assert!(Command::new("mount")
        .arg(&dev)
        .arg(&mnt)
        .output()
        .unwrap()
        .status
        .success());
    e.fails(&["init", "store.img", "--origin", &dev], 5, "in use");
    e.fails(&["init", &dev, "--origin", "origin.img"], 5, "in use");
    assert!(Command::new("umount")
        .arg(&mnt)
        .output()
        .unwrap()
        .status
        .success());
    // Unmounted, the loop device is a fine origin.
    e.ok(&["init", "store.img", "--origin", &dev]);
    e.ok(&["create", "a"]);
    let v = e.json(&["info"]);
    assert_eq!(v["store"]["origin_size"], 32 << 20);
}

/// ramfs refuses O_DIRECT (EINVAL), as some FUSE and network file systems do: snapctl must fall
/// back to buffered I/O by itself, and say so with -v.
#[test]
fn a_file_system_without_o_direct_falls_back_to_buffered_io() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting ramfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&mnt)
        .output()
        .unwrap();
    if !m.status.success() {
        eprintln!(
            "skipped: cannot mount ramfs: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).output();
        }
    }
    let _u = Unmount(mnt.clone());
    std::fs::write(mnt.join("o.img"), vec![5u8; 4 << 20]).unwrap();
    std::fs::write(mnt.join("s.img"), vec![0u8; 16 << 20]).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(&mnt)
            .env("SNAPCTL_STORE", "s.img")
            .output()
            .unwrap()
    };
    assert!(run(&["init", "s.img", "--origin", "o.img"])
        .status
        .success());
    assert!(run(&["create", "a"]).status.success());
    let o = run(&["-v", "export", "a", "-o", "a.img"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("buffered") && !err.contains("O_DIRECT"),
        "{err}"
    );
    assert!(std::fs::read(mnt.join("a.img")).unwrap() == vec![5u8; 4 << 20]);
}

/// Containers often forbid io_uring by seccomp: snapctl must fall back to pread/pwrite by itself.
#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_refused_by_seccomp_falls_back_to_pread_pwrite() {
    use std::os::unix::process::CommandExt;
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    e.ok_write(&vec![4u8; 200_000], 3);
    let mut c = Command::new(bin());
    c.args(["-v", "export", "a", "-o", "a.img"])
        .current_dir(e.dir.path())
        .env("SNAPCTL_STORE", e.p("store.img"));
    // SAFETY: only async-signal-safe prctl calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            const NR_IO_URING_SETUP: u32 = 425;
            let filter = [
                // A = syscall number
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                // if A == io_uring_setup: fall through to EPERM, else skip it
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: NR_IO_URING_SETUP,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x0005_0000 | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                },
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const _,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("sync (pread/pwrite") && !err.contains("io_uring"),
        "{err}"
    );
    let img = std::fs::read(e.p("a.img")).unwrap();
    assert!(
        img == std::fs::read(e.p("origin.img"))
            .map(|mut o| {
                // the snapshot predates the write: undo it in the expected image
                let want: Vec<u8> = (0..200_000usize)
                    .map(|i| ((i + 3) * 7 % 251) as u8)
                    .collect();
                o[3..200_003].copy_from_slice(&want);
                o
            })
            .unwrap()
    );
}

#[test]
fn diff_reports_exactly_the_chunks_written_between_two_views() {
    let e = Env::new();
    e.init();
    e.ok(&["create", "a"]);
    e.ok_write(&[1u8; 10_000], 8192); // chunks 2, 3, 4
    e.ok(&["create", "b"]);
    e.ok_write(&[2u8; 1], (5 << 20) + 7); // chunk 1280
    let ranges = |v: &Value| -> Vec<(u64, u64)> {
        v["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
            .collect()
    };
    let ab = e.json(&["diff", "a", "b"]);
    assert_eq!(ranges(&ab), [(8192, 12288)]);
    assert_eq!(ab["changed_bytes"], 12288);
    assert_eq!(ab["chunk_size"], 4096);
    let bo = e.json(&["diff", "b"]);
    assert_eq!(bo["to"], "origin");
    assert_eq!(ranges(&bo), [(5 << 20, 4096)]);
    let ao = e.json(&["diff", "origin", "a"]);
    assert_eq!(ranges(&ao), [(8192, 12288), (5 << 20, 4096)]);
    assert_eq!(ranges(&e.json(&["diff", "a", "a"])), []);
    let t = e.ok(&["diff", "a", "b"]);
    assert!(
        t.contains("12.0 KiB changed in 1 range between 'a' and 'b'"),
        "{t}"
    );
    e.fails(&["diff", "a", "nope"], 3, "nope");
}

#[test]
fn restore_brings_the_origin_back_keeps_every_snapshot_and_can_be_undone() {
    let e = Env::new();
    e.init();
    let v0 = std::fs::read(e.p("origin.img")).unwrap();
    e.ok(&["create", "v0"]);
    e.ok_write(&vec![7u8; 3 << 20], 1 << 20);
    let v1 = std::fs::read(e.p("origin.img")).unwrap();
    e.ok(&["create", "v1"]);
    e.ok(&["create", "v1-copy", "--from", "v1"]);
    e.ok_write(&vec![9u8; 1 << 20], 0);
    let v2 = std::fs::read(e.p("origin.img")).unwrap();
    let r = e.json(&["restore", "v0"]);
    assert_eq!(r["restored"], "v0");
    let backup = r["backup"].as_str().unwrap().to_string();
    assert!(backup.starts_with("pre-restore-"));
    // only the chunks that differ were written: the 3 MiB + 1 MiB written since v0 (they overlap)
    assert_eq!(r["written_bytes"], 4 << 20);
    assert!(std::fs::read(e.p("origin.img")).unwrap() == v0);
    e.ok(&["export", "v1", "-o", "v1.img"]);
    assert!(std::fs::read(e.p("v1.img")).unwrap() == v1);
    e.ok(&["export", "v1-copy", "-o", "v1c.img"]);
    assert!(std::fs::read(e.p("v1c.img")).unwrap() == v1);
    e.ok(&["export", &backup, "-o", "b.img"]);
    assert!(std::fs::read(e.p("b.img")).unwrap() == v2);
    // undo
    let r = e.json(&["restore", &backup, "--no-backup"]);
    assert_eq!(r["backup"], Value::Null);
    assert!(std::fs::read(e.p("origin.img")).unwrap() == v2);
    assert_eq!(e.run(&["check"]).code, 0);
    // --to writes the image elsewhere and leaves the origin alone
    std::fs::write(e.p("dest.img"), vec![0u8; 8 << 20]).unwrap();
    let r = e.json(&["restore", "v1", "--to", "dest.img"]);
    assert_eq!(r["to"], "dest.img");
    assert!(std::fs::read(e.p("dest.img")).unwrap() == v1);
    assert!(std::fs::read(e.p("origin.img")).unwrap() == v2);
    std::fs::write(e.p("small.img"), vec![0u8; 1 << 20]).unwrap();
    e.fails(
        &["restore", "v1", "--to", "small.img"],
        2,
        "less than the origin",
    );
    e.fails(
        &["restore", "v1", "--to", "origin.img"],
        2,
        "is the origin or the store",
    );
    e.fails(&["restore", "nope"], 3, "nope");
    e.fails(&["create", "c", "--from", "nope"], 3, "nope");
    let o = e.ok(&["restore", "--resume"]);
    assert!(o.contains("no restore was interrupted"), "{o}");
    let l = e.json(&["show", "v1-copy"]);
    assert_eq!(l["snapshot"]["parent"], "v1");
}

#[test]
fn writable_snapshots_are_clones_and_read_only_to_writable_is_one_way() {
    let e = Env::new();
    e.init();
    let v0 = std::fs::read(e.p("origin.img")).unwrap();
    let w = e.json(&["create", "clone", "--writable"]);
    assert_eq!(w["snapshot"]["writable"], true);
    let o = e.run_in(
        &["write", "--snapshot", "clone", "--offset", "5000"],
        Some(&[0x5a; 9000]),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut want = v0.clone();
    want[5000..14000].fill(0x5a);
    e.ok(&["export", "clone", "-o", "c.img"]);
    assert!(std::fs::read(e.p("c.img")).unwrap() == want);
    assert!(
        std::fs::read(e.p("origin.img")).unwrap() == v0,
        "a clone's write reached the origin"
    );
    // a snapshot of the clone freezes it
    let f = e.json(&["create", "frozen", "--from", "clone"]);
    assert_eq!(f["snapshot"]["parent"], "clone");
    assert_eq!(f["snapshot"]["writable"], false);
    e.run_in(
        &["write", "--snapshot", "clone", "--offset", "0"],
        Some(&[1u8; 4096]),
    );
    e.ok(&["export", "frozen", "-o", "f.img"]);
    assert!(std::fs::read(e.p("f.img")).unwrap() == want);
    // read-only snapshots refuse writes until set-writable; then writable for good
    e.ok(&["create", "ro"]);
    e.fails(
        &["write", "--snapshot", "ro", "-i", "/dev/null"],
        2,
        "set-writable",
    );
    let s = e.json(&["set-writable", "ro"]);
    assert_eq!(s["snapshot"]["writable"], true);
    assert_eq!(
        e.json(&["set-writable", "ro"])["snapshot"]["writable"],
        true
    );
    let t = e.ok(&["list", "--tree"]);
    assert!(t.starts_with("origin\n"), "{t}");
    assert!(
        t.contains("├── clone (rw") && t.contains("│   └── frozen (ro") && t.contains("└── ro (rw"),
        "{t}"
    );
    // deleting the parent leaves the child working
    e.ok(&["delete", "clone"]);
    e.ok(&["export", "frozen", "-o", "f2.img"]);
    assert!(std::fs::read(e.p("f2.img")).unwrap() == want);
    assert!(e.ok(&["list", "--tree"]).contains("from deleted 'clone'"));
    assert_eq!(e.run(&["check"]).code, 0);
}

#[test]
fn a_restore_killed_midway_is_finished_by_the_next_command() {
    let e = Env::new();
    // room for every round's copies: nothing may be dropped by the on-full policy here
    std::fs::write(e.p("store.img"), vec![0u8; 160 << 20]).unwrap();
    e.init();
    let v0 = std::fs::read(e.p("origin.img")).unwrap();
    e.ok(&["create", "v0"]);
    for delay_ms in [5u64, 20, 60, 150] {
        // rewrite the whole origin, so that the restore has 8 MiB to do
        let fresh: Vec<u8> = (0..8usize << 20)
            .map(|i| (i as u64 * 7 + delay_ms) as u8)
            .collect();
        e.ok_write(&fresh, 0);
        let other = format!("keep{delay_ms}");
        e.ok(&["create", &other]);
        let mut child = Command::new(bin())
            .args(["restore", "v0", "--no-backup"])
            .env("SNAPCTL_STORE", e.p("store.img"))
            .env("SNAPCTL_IO_ENGINE", "sync")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let o = e.run(&["restore", "--resume"]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let now = std::fs::read(e.p("origin.img")).unwrap();
        assert!(
            now == v0 || now == fresh,
            "after kill -9 at {delay_ms} ms the origin is half-restored"
        );
        e.ok(&["export", &other, "-o", "k.img"]);
        assert!(
            std::fs::read(e.p("k.img")).unwrap() == fresh,
            "snapshot {other} changed"
        );
        e.ok(&["export", "v0", "-o", "v.img"]);
        assert!(std::fs::read(e.p("v.img")).unwrap() == v0);
        assert_eq!(e.run(&["check"]).code, 0);
    }
}

/// `create` and `delete` read only the catalog rows they touch (the snapshot, and the live
/// points beside it). Deletes done so, of a point alone, of one of two snapshots at one point,
/// and of several at once, leave exactly what the same deletes leave on a copy of the store
/// whose whole catalog is loaded: the same snapshots, the same space held alone by each, the
/// same store usage; and both copies check clean.
#[test]
fn deletes_reading_the_catalog_on_demand_account_as_a_whole_catalog_does() {
    let e = Env::new();
    e.init();
    let mut fill = 1u8;
    let mut write = |offs: &[u64]| {
        for &o in offs {
            e.ok_write(&vec![fill; 1 << 20], o << 20);
            fill += 1;
        }
    };
    e.ok(&["create", "s0"]);
    write(&[0, 1]);
    e.ok(&["create", "s1"]);
    e.ok(&["create", "s1b", "--from", "s1"]);
    write(&[0, 2]);
    e.ok(&["create", "s2"]);
    write(&[0, 3]);
    e.ok(&["create", "s3"]);
    write(&[1, 3]);
    e.ok(&["create", "s4"]);
    write(&[0, 4]);
    e.ok(&["create", "s5"]);
    write(&[2, 5]);
    std::fs::copy(e.p("store.img"), e.p("whole.img")).unwrap();
    let rounds: [&[&str]; 4] = [&["s2"], &["s1b"], &["s4", "s0"], &["s5"]];
    for names in rounds {
        let mut a = vec!["delete"];
        a.extend_from_slice(names);
        e.ok(&a);
        let mut s = snapctl::store::Store::open(&e.p("whole.img"), Default::default())
            .expect("open the copy");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        s.delete(&names).expect("delete on the copy");
    }
    let facts = |store: &str| {
        let l = e.json(&["-s", store, "list"]);
        let snaps: Vec<(String, u64)> = l["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let n = s["name"].as_str().unwrap().to_string();
                (n, s["exclusive_bytes"].as_u64().unwrap())
            })
            .collect();
        let used = e.json(&["-s", store, "info"])["store"]["used_bytes"].as_u64();
        let ch = e.json(&["-s", store, "check", "--data"]);
        assert_eq!(ch["check"]["clean"], true, "{store}: {ch}");
        (snaps, used)
    };
    let (got, want) = (facts("store.img"), facts("whole.img"));
    assert_eq!(got, want);
    assert_eq!(
        got.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["s1", "s3"]
    );
    // s1 now holds alone all it preserved up to s3.
    assert!(got.0[0].1 > 0, "{got:?}");
    // The index a delete trusts, emptied: the delete that would need it refuses (a whole
    // catalog's load refuses too), and `check --repair` rebuilds it.
    {
        use snapctl::store::testing::{harm, Harm};
        let mut s = snapctl::store::Store::open(&e.p("store.img"), Default::default()).unwrap();
        assert!(harm(&mut s, Harm::DropLiveIndex).unwrap());
    }
    e.fails(&["delete", "s3"], 6, "live-point index");
    e.fails(&["list"], 6, "live-point index");
    assert_eq!(e.run(&["check", "--repair"]).code, 10);
    e.ok(&["delete", "s3"]);
}
