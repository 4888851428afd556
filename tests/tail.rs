//! Issue 18: an origin whose size is not a multiple of the chunk size (nor of 4 KiB, the O_DIRECT
//! alignment) is served byte-exact to its last byte, and never past it, by every path: `write`
//! to the origin and to a writable snapshot, `export`, `diff`, `check`, `restore` and
//! `restore --to`, the NBD server (nbdcopy, qemu-io), a loop device with an odd number of
//! sectors, and the I/O engines themselves.
//!
//! Every file lives on a disk file system (see [`scratch`]) so that O_DIRECT is really used: on
//! tmpfs the engines fall back to buffered I/O and the partial last block is never special.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::Value;
use snapctl::io::{engine_for, open_device, AlignedBuf, EngineChoice, OpenMode};

use crate::nbd::{have, Served};
use crate::util::bin;

const MIB: u64 = 1 << 20;
/// Bytes past 8 MiB: 1, 7, 25 and 129 sectors; never a multiple of 4 KiB.
const TAILS: [u64; 4] = [512, 3584, 12800, 66048];
const CHUNKS: [(&str, u64); 3] = [("4K", 4 << 10), ("64K", 64 << 10), ("1M", 1 << 20)];

/// Whether O_DIRECT opens work in `dir`.
fn direct_works(dir: &Path) -> bool {
    let p = dir.join(format!(".snapctl-direct-probe-{}", std::process::id()));
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// A scratch directory where O_DIRECT works: /var/tmp (a short path, which keeps the server's
/// unix socket paths well under their 108-byte limit), else the repository's target/. Returns
/// whether O_DIRECT works there (false only where both refuse it, as tmpfs does).
fn scratch() -> (tempfile::TempDir, bool) {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    for base in [PathBuf::from("/var/tmp"), target.clone()] {
        if base.is_dir() && direct_works(&base) {
            let d = tempfile::Builder::new()
                .prefix("snapctl-tail-")
                .tempdir_in(&base)
                .expect("scratch dir");
            return (d, true);
        }
    }
    eprintln!("warning: O_DIRECT works neither in /var/tmp nor in target/: buffered I/O only");
    std::fs::create_dir_all(&target).expect("create target/");
    let d = tempfile::Builder::new()
        .prefix("snapctl-tail-")
        .tempdir_in(&target)
        .expect("scratch dir");
    (d, false)
}

/// Panics naming the first differing offset (and how many bytes differ) unless equal.
fn same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} bytes, want {}",
        got.len(),
        want.len()
    );
    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    let (first, last) = (diff[0], diff[diff.len() - 1]);
    panic!(
        "{what}: first differing offset {first} (got {:#04x}, want {:#04x}); {} bytes differ, the last at {last} (of {})",
        got[first],
        want[first],
        diff.len(),
        got.len()
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One origin size and chunk size: a store on files, a model of every view, and the server
/// helper of tests/nbd.rs (which owns the scratch directory and kills the server on drop).
struct Case {
    srv: Served,
    size: u64,
    cs: u64,
    tag: String,
    model: BTreeMap<String, Vec<u8>>,
    /// Chunks written in the origin since s1 was taken (what `diff s1` may report).
    since_s1: BTreeSet<u64>,
    rng: SmallRng,
    /// SNAPCTL_IO_ENGINE for the commands (the server always picks its own).
    engine: &'static str,
}

impl Case {
    fn new(size: u64, chunk: &str, cs: u64, engine: &'static str) -> Case {
        let (dir, direct) = scratch();
        let mut rng = SmallRng::seed_from_u64(size * 31 + cs);
        let mut img = vec![0u8; size as usize];
        rng.fill(&mut img[..]);
        std::fs::write(dir.path().join("origin.img"), &img).expect("write origin.img");
        std::fs::File::create(dir.path().join("store.img"))
            .and_then(|f| f.set_len(64 * MIB))
            .expect("create store.img");
        let tag = format!(
            "origin of {size} bytes (8 MiB + {}), {chunk} chunks, {engine} engine",
            size - 8 * MIB
        );
        let c = Case {
            srv: Served {
                dir,
                child: None,
                env: Vec::new(),
            },
            size,
            cs,
            tag,
            model: BTreeMap::from([("origin".to_string(), img)]),
            since_s1: BTreeSet::new(),
            rng,
            engine,
        };
        c.ok(&[
            "init",
            "store.img",
            "--origin",
            "origin.img",
            "--chunk-size",
            chunk,
        ]);
        let line = stderr(&c.cli(&["-v", "info"]));
        let origin = line.split("; origin ").nth(1).unwrap_or_default();
        assert!(
            !direct || origin.contains("O_DIRECT"),
            "{}: the origin is not opened with O_DIRECT, the tail path is not exercised: {line}",
            c.tag
        );
        assert!(
            engine != "sync" || origin.contains("sync"),
            "{}: {line}",
            c.tag
        );
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .current_dir(self.srv.dir.path())
            .env("SNAPCTL_STORE", self.srv.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.srv.p("run"))
            .env("SNAPCTL_IO_ENGINE", self.engine)
            .output()
            .expect("run snapctl")
    }

    /// The origin file never changes size.
    fn origin_len(&self, step: &str) {
        let len = std::fs::metadata(self.srv.p("origin.img"))
            .expect("stat origin.img")
            .len();
        assert_eq!(
            len, self.size,
            "{}: after {step}, the origin file holds {len} bytes",
            self.tag
        );
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "{}: snapctl {args:?} exited {:?}: {}",
            self.tag,
            o.status.code(),
            stderr(&o)
        );
        self.origin_len(&format!("snapctl {args:?}"));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{}: {args:?}: {e}: {out}", self.tag));
        assert_eq!(v["schema_version"], 1);
        v
    }

    /// `snapctl write` of `len` random bytes at `off` into `view` (origin or a writable
    /// snapshot), and the same into the model.
    fn write(&mut self, view: &str, off: u64, len: u64) {
        assert!(off + len <= self.size && len > 0, "bad test write");
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data[..]);
        std::fs::write(self.srv.p("in.bin"), &data).expect("write in.bin");
        let off_s = off.to_string();
        let mut args = vec!["write", "--offset", &off_s, "-i", "in.bin"];
        if view != "origin" {
            args.extend(["--snapshot", view]);
        }
        let v = self.json(&args);
        assert_eq!(v["written_bytes"], len, "{}: {args:?}", self.tag);
        let m = self.model.get_mut(view).expect("model of the view");
        m[off as usize..(off + len) as usize].copy_from_slice(&data);
        if view == "origin" && self.model.contains_key("s1") {
            self.since_s1
                .extend(off / self.cs..(off + len).div_ceil(self.cs));
        }
    }

    /// `create NAME [extra]`, whose model is `from`'s.
    fn create(&mut self, name: &str, from: &str, extra: &[&str]) {
        let mut args = vec!["create", name];
        args.extend_from_slice(extra);
        self.ok(&args);
        let m = self.model[from].clone();
        self.model.insert(name.to_string(), m);
    }

    /// The origin file itself equals the model.
    fn origin_file(&self, when: &str) {
        self.origin_len(when);
        let got = std::fs::read(self.srv.p("origin.img")).expect("read origin.img");
        same(
            &format!("{}: the origin file {when}", self.tag),
            &got,
            &self.model["origin"],
        );
    }

    /// `export V -o FILE` of every view equals the model, and is exactly the origin's size.
    fn exports(&self, when: &str) {
        for (view, want) in &self.model {
            let out = self.srv.p(&format!("export-{view}.img"));
            self.ok(&["export", view, "-o", &out.display().to_string()]);
            let got = std::fs::read(&out).expect("read the export");
            assert_eq!(
                got.len() as u64,
                self.size,
                "{}: export of '{view}' {when} is {} bytes",
                self.tag,
                got.len()
            );
            same(
                &format!("{}: export of '{view}' {when}", self.tag),
                &got,
                want,
            );
            std::fs::remove_file(&out).expect("remove the export");
        }
    }

    /// `diff FROM TO`, text and JSON: the same ranges, at chunk granularity, none past the end,
    /// covering every byte where the two models differ; with `within`, only those chunks.
    fn diff(&self, from: &str, to: &str, within: Option<&BTreeSet<u64>>) {
        let what = format!("{}: diff {from} {to}", self.tag);
        let v = self.json(&["diff", from, to]);
        assert_eq!(v["chunk_size"], self.cs, "{what}");
        let ranges: Vec<(u64, u64)> = v["ranges"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no ranges in {v}"))
            .iter()
            .map(|r| {
                (
                    r["offset"].as_u64().expect("offset"),
                    r["length"].as_u64().expect("length"),
                )
            })
            .collect();
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(v["changed_bytes"], total, "{what}");
        // The text form lists the same ranges.
        let text = self.ok(&["diff", from, to]);
        let rows: Vec<(u64, u64)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect();
        assert_eq!(rows, ranges, "{what}: text and JSON disagree:\n{text}");
        assert!(
            text.contains(&format!("changed in {} range", ranges.len())),
            "{what}: {text}"
        );
        let mut covered = vec![false; self.size as usize];
        let mut prev_end = 0;
        for &(off, len) in &ranges {
            let end = off + len;
            assert!(len > 0, "{what}: empty range at {off}");
            assert!(
                end <= self.size,
                "{what}: range {off}+{len} ends at {end}, past the origin's end {}",
                self.size
            );
            assert!(off >= prev_end, "{what}: ranges out of order at {off}");
            assert_eq!(
                off % self.cs,
                0,
                "{what}: range at {off} is not chunk-aligned"
            );
            assert!(
                len % self.cs == 0 || end == self.size,
                "{what}: range {off}+{len} ends inside a chunk before the end"
            );
            if let Some(w) = within {
                for c in off / self.cs..end.div_ceil(self.cs) {
                    assert!(w.contains(&c), "{what}: chunk {c} reported, never written");
                }
            }
            covered[off as usize..end as usize].fill(true);
            prev_end = end;
        }
        let (a, b) = (&self.model[from], &self.model[to]);
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i] && !covered[i]) {
            panic!("{what}: byte {i} differs but no range covers it: {ranges:?}");
        }
    }

    fn check(&self) {
        let o = self.cli(&["check"]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}: check: {}{}",
            self.tag,
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
    }

    /// `restore VIEW --to FILE` (FILE of the origin's size) writes exactly VIEW's model.
    fn restore_to(&self, view: &str) {
        let f = self.srv.p(&format!("restored-{view}.img"));
        std::fs::File::create(&f)
            .and_then(|h| h.set_len(self.size))
            .expect("create the restore target");
        self.ok(&["restore", view, "--to", &f.display().to_string()]);
        let got = std::fs::read(&f).expect("read the restore target");
        same(
            &format!("{}: restore {view} --to FILE", self.tag),
            &got,
            &self.model[view],
        );
        std::fs::remove_file(&f).expect("remove the restore target");
    }

    /// `restore VIEW`: the origin becomes VIEW; the safety snapshot (unless `--no-backup`)
    /// holds the origin as it was.
    fn restore(&mut self, view: &str, backup: bool) {
        let mut args = vec!["restore", view];
        if !backup {
            args.push("--no-backup");
        }
        let v = self.json(&args);
        let before = self.model["origin"].clone();
        if backup {
            let name = v["backup"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no backup named in {v}", self.tag))
                .to_string();
            self.model.insert(name, before);
        }
        let m = self.model[view].clone();
        self.model.insert("origin".into(), m);
        self.origin_file(&format!("restore {view}"));
    }

    fn nbdcopy_all(&self, when: &str) {
        for (view, want) in &self.model {
            let out = self.srv.p(&format!("nbdcopy-{view}.img"));
            let o = Command::new("nbdcopy")
                .arg(self.srv.uri(view))
                .arg(&out)
                .output()
                .expect("run nbdcopy");
            assert!(
                o.status.success(),
                "{}: nbdcopy of '{view}' {when}: {}",
                self.tag,
                stderr(&o)
            );
            let got = std::fs::read(&out).expect("read the nbdcopy output");
            assert_eq!(
                got.len() as u64,
                self.size,
                "{}: nbdcopy of '{view}' {when}: {} bytes",
                self.tag,
                got.len()
            );
            same(
                &format!("{}: nbdcopy of '{view}' {when}", self.tag),
                &got,
                want,
            );
            std::fs::remove_file(&out).expect("remove the nbdcopy output");
        }
    }

    /// `qemu-io -f raw -c 'write -P PAT OFF LEN'` on an export, and the same into the model.
    fn qemu_write(&mut self, view: &str, pat: u8, off: u64, len: u64) {
        assert!(off + len <= self.size, "bad test write");
        let cmd = format!("write -P {pat:#04x} {off} {len}");
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", &cmd, &self.srv.uri(view)])
            .output()
            .expect("run qemu-io");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(&format!("wrote {len}/{len} bytes")),
            "{}: qemu-io '{cmd}' on '{view}': {out}{}",
            self.tag,
            stderr(&o)
        );
        self.origin_len(&format!("qemu-io '{cmd}' on '{view}'"));
        let m = self.model.get_mut(view).expect("model of the view");
        m[off as usize..(off + len) as usize].fill(pat);
        if view == "origin" {
            self.since_s1
                .extend(off / self.cs..(off + len).div_ceil(self.cs));
        }
    }
}

/// Drives one origin size and chunk size through every path; `nbd` adds the server part.
fn one_case(size: u64, chunk: &str, cs: u64, engine: &'static str, nbd: bool) {
    let mut c = Case::new(size, chunk, cs, engine);
    let s = size;
    // The last whole-chunk boundary and the last O_DIRECT-aligned boundary; the bytes past
    // each are the partial chunk and the partial block.
    let b = s - s % cs;
    let a = s - s % 4096;
    assert!(
        b < s && a < s,
        "the sizes under test all have a partial chunk"
    );

    c.create("s1", "origin", &[]);
    // The first write to the partial chunk is one byte, the very last.
    c.write("origin", s - 1, 1);
    c.write("origin", s - 1000, 1000); // ends exactly at the last byte
    c.write("origin", b - 700, 700 + (s - b).div_ceil(2)); // crosses into the partial chunk
    c.write("origin", a - 100, 200); // crosses into the partial block
    c.write("origin", b, s - b); // the whole partial chunk
    c.write("origin", 12345, 9000); // elsewhere
    c.origin_file("after the origin writes");

    c.create("s2", "origin", &["--writable"]);
    c.write("s2", s - 300, 300);
    c.write("s2", b - 5, 10);
    let big = (2 * cs + 17).min(s);
    c.write("s2", s - big, big); // several chunks, through the end
    c.create("s3", "s2", &["--from", "s2"]);
    c.write("s2", s - 2000, 2000); // after s3: s3 keeps what s2 held

    c.write("origin", s - 4097, 4097);
    c.write("origin", b - 1, 2);
    c.write("origin", 0, 4096);
    c.origin_file("after the second origin writes");

    c.exports("after the CLI writes");
    c.diff("s1", "origin", Some(&c.since_s1.clone()));
    c.diff("origin", "s1", Some(&c.since_s1.clone()));
    c.diff("s1", "s2", None);
    c.diff("s3", "s2", None);
    c.diff("s1", "s3", None);
    c.check();
    c.restore_to("s1");
    c.restore_to("s2");

    if nbd {
        c.srv.spawn();
        c.nbdcopy_all("through the server");
        c.qemu_write("origin", 0xab, s - 512, 512);
        c.qemu_write("origin", 0xac, b - 1000, 1000 + (s - b).div_ceil(2));
        c.qemu_write("origin", 0xad, a - 512, 1024.min(s - (a - 512)));
        c.qemu_write("s2", 0xcd, s - 512, 512);
        c.qemu_write("s2", 0xce, b - 1000, 1000 + (s - b).div_ceil(2));
        c.nbdcopy_all("after the qemu-io writes");
        // Commands forwarded to the server read the same bytes.
        c.exports("through the server");
        c.diff("s1", "origin", Some(&c.since_s1.clone()));
        let st = c.srv.sigterm();
        assert!(st.success(), "{}: the server exited {st:?}", c.tag);
        c.origin_file("after the server stopped");
        c.exports("after the server stopped");
        c.check();
    }

    c.restore("s1", true);
    c.exports("after restore s1");
    c.diff("s1", "origin", None);
    c.check();
    let backup = c
        .model
        .keys()
        .find(|k| k.starts_with("pre-restore-"))
        .expect("a backup snapshot")
        .clone();
    c.restore(&backup, false);
    c.exports("after undoing the restore");
    c.check();
    c.restore("s3", false);
    c.exports("after restore s3");
    c.check();
}

#[test]
fn every_path_is_byte_exact_for_origins_with_a_partial_last_chunk() {
    let nbd = have("nbdcopy") && have("qemu-io");
    if !nbd {
        eprintln!("skipped: the NBD part (nbdcopy and qemu-io are needed)");
    }
    let t = Instant::now();
    // Every size with every chunk size; the commands alternate between the io_uring engine
    // (auto) and pread/pwrite. Two workers: the cases are mostly waiting on processes.
    let mut cases = Vec::new();
    for tail in TAILS {
        for (chunk, cs) in CHUNKS {
            let engine = if cases.len() % 2 == 0 { "auto" } else { "sync" };
            cases.push((8 * MIB + tail, chunk, cs, engine));
        }
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                while let Some(&(size, chunk, cs, engine)) =
                    cases.get(next.fetch_add(1, Ordering::SeqCst))
                {
                    let t0 = Instant::now();
                    one_case(size, chunk, cs, engine, nbd);
                    eprintln!(
                        "8 MiB + {} bytes, {chunk} chunks, {engine} engine{}: {:.1} s",
                        size - 8 * MIB,
                        if nbd { ", with the NBD part" } else { "" },
                        t0.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    eprintln!("all cases: {:.1} s", t.elapsed().as_secs_f64());
}

/// Detaches the loop device on drop, whatever happened.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let o = Command::new("losetup").args(["-d", &self.0]).output();
        if !matches!(&o, Ok(o) if o.status.success()) {
            eprintln!("warning: could not detach {}: {o:?}", self.0);
        }
    }
}

#[test]
fn a_loop_device_with_an_odd_number_of_sectors() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loop devices need root");
        return;
    }
    let (dir, _) = scratch();
    let p = |f: &str| dir.path().join(f);
    let size = 8 * MIB + 512 * 7;
    let mut rng = SmallRng::seed_from_u64(18);
    let mut model = vec![0u8; size as usize];
    rng.fill(&mut model[..]);
    std::fs::write(p("backing.img"), &model).expect("write the backing file");
    let o = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(p("backing.img"))
        .output();
    let dev = match o {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        o => {
            eprintln!("skipped: losetup does not work here: {o:?}");
            return;
        }
    };
    let guard = Loop(dev.clone());
    let dev_len = || {
        let d = open_device(
            Path::new(&dev),
            OpenMode {
                write: false,
                exclusive: false,
                buffered: false,
            },
        )
        .expect("open the loop device");
        assert!(d.is_block);
        d.size
    };
    assert_eq!(dev_len(), size, "{dev}: not 8 MiB + 7 sectors");
    std::fs::File::create(p("store.img"))
        .and_then(|f| f.set_len(64 * MIB))
        .expect("create store.img");
    let run = |args: &[&str]| -> String {
        let o = Command::new(bin())
            .args(args)
            .current_dir(dir.path())
            .env("SNAPCTL_STORE", p("store.img"))
            .env("SNAPCTL_RUN_DIR", p("run"))
            .output()
            .expect("run snapctl");
        assert!(
            o.status.success(),
            "snapctl {args:?} on {dev}: {}",
            stderr(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let export = |view: &str| -> Vec<u8> {
        let out = p(&format!("export-{view}.img"));
        run(&["export", view, "-o", &out.display().to_string()]);
        std::fs::read(out).expect("read the export")
    };
    let read_dev = || std::fs::read(&dev).expect("read the loop device");
    run(&["init", "store.img", "--origin", &dev, "--chunk-size", "4K"]);
    let o = Command::new(bin())
        .args(["-v", "info"])
        .env("SNAPCTL_STORE", p("store.img"))
        .env("SNAPCTL_RUN_DIR", p("run"))
        .output()
        .expect("run snapctl");
    let engines = stderr(&o);
    assert!(
        engines.matches("O_DIRECT").count() >= 2,
        "{dev} is not opened with O_DIRECT: {engines}"
    );
    run(&["create", "snap"]);
    let snap = model.clone();
    let a = size - size % 4096;
    let mut write = |model: &mut Vec<u8>, off: u64, len: u64| {
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        std::fs::write(p("in.bin"), &data).expect("write in.bin");
        run(&["write", "--offset", &off.to_string(), "-i", "in.bin"]);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    };
    write(&mut model, size - 512, 512); // the last sector
    write(&mut model, a - 1000, 2000); // across the last whole 4 KiB block into the tail
    write(&mut model, size - 1, 1);
    write(&mut model, 4096, 10000);
    same(&format!("{dev} read directly"), &read_dev(), &model);
    same(
        &format!("export of origin on {dev}"),
        &export("origin"),
        &model,
    );
    same(&format!("export of snap on {dev}"), &export("snap"), &snap);
    let d = run(&["--json", "diff", "snap"]);
    let v: Value = serde_json::from_str(&d).expect("diff JSON");
    let last = v["ranges"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .expect("a range");
    let (off, len) = (
        last["offset"].as_u64().expect("offset"),
        last["length"].as_u64().expect("length"),
    );
    assert!(
        off <= a - 4096 && off + len == size,
        "{dev}: diff's last range does not run from the write across the last whole block to the end: {v}"
    );
    run(&["check"]);
    run(&["restore", "snap"]);
    same(&format!("{dev} after restore"), &read_dev(), &snap);
    same(
        &format!("export of origin on {dev} after restore"),
        &export("origin"),
        &snap,
    );
    run(&["check"]);
    assert_eq!(dev_len(), size);
    drop(guard);
    // Through the loop device's page cache and back: the backing file holds the same bytes.
    let backing = std::fs::read(p("backing.img")).expect("read the backing file");
    same("the backing file after detaching", &backing, &snap);
}

/// The engines on a file of every awkward size, with O_DIRECT: random reads and writes (single
/// and batched, aligned and not, in memory and on disk) against a model; nothing past the end.
#[test]
fn engines_read_and_write_to_the_last_byte_of_any_size_with_o_direct() {
    let (dir, direct) = scratch();
    for size in [1u64, 100, 4095, 4096 * 3 + 100, 4096 * 3 + 1536, 8 * 4096] {
        for choice in [EngineChoice::Sync, EngineChoice::Auto] {
            let what = format!("{size}-byte file, {choice:?} engine");
            let path = dir.path().join(format!("dev-{size}-{choice:?}"));
            let mut rng = SmallRng::seed_from_u64(size);
            let mut model = vec![0u8; size as usize];
            rng.fill(&mut model[..]);
            std::fs::write(&path, &model).expect("write the file");
            let dev = open_device(
                &path,
                OpenMode {
                    write: true,
                    exclusive: true,
                    buffered: false,
                },
            )
            .expect("open_device");
            assert_eq!(dev.size, size);
            assert_eq!(dev.direct, direct, "{what}: O_DIRECT");
            let io = engine_for(dev, choice).expect("engine_for");
            if direct {
                assert!(io.engine().contains("O_DIRECT"), "{what}: {}", io.engine());
            }
            let len_ok = |step: &str| {
                let l = std::fs::metadata(&path).expect("stat").len();
                assert_eq!(l, size, "{what}: {step} changed the file's size to {l}");
            };
            // Past the end: refused, whether aligned or not.
            let mut b = AlignedBuf::new(4096);
            let end_block = size - size % 4096;
            assert!(io.read_at(b.as_mut_slice(), end_block).is_err(), "{what}");
            assert!(io.read_at(&mut [0u8; 2], size - 1).is_err(), "{what}");
            assert!(io.write_at(&[0u8; 2], size - 1).is_err(), "{what}");
            assert!(io.write_at(&[0u8; 1], size).is_err(), "{what}");
            len_ok("a refused request");
            let mut whole = vec![0u8; size as usize];
            io.read_at(&mut whole, 0).expect("read everything");
            same(&format!("{what}: whole read"), &whole, &model);
            for step in 0..300 {
                let range = |rng: &mut SmallRng| {
                    // Mostly near the end, sometimes anywhere.
                    let off = if rng.gen_bool(0.7) {
                        size - rng.gen_range(1..=size.min(9000))
                    } else {
                        rng.gen_range(0..size)
                    };
                    let len = rng.gen_range(1..=(size - off).min(10000));
                    (off, len as usize)
                };
                match rng.gen_range(0..4) {
                    0 => {
                        let (off, len) = range(&mut rng);
                        let mut buf = vec![0u8; len];
                        io.read_at(&mut buf, off).expect("read_at");
                        same(
                            &format!("{what}: step {step} read_at {off}+{len}"),
                            &buf,
                            &model[off as usize..off as usize + len],
                        );
                    }
                    1 => {
                        let (off, len) = range(&mut rng);
                        let mut buf = vec![0u8; len];
                        rng.fill(&mut buf[..]);
                        io.write_at(&buf, off).expect("write_at");
                        model[off as usize..off as usize + len].copy_from_slice(&buf);
                    }
                    2 => {
                        // Several reads in one batch: aligned ones (into aligned memory) too.
                        let mut specs = Vec::new();
                        for _ in 0..rng.gen_range(1..6) {
                            if rng.gen_bool(0.5) && size >= 4096 {
                                let blocks = size / 4096;
                                let o = rng.gen_range(0..blocks) * 4096;
                                let n = rng.gen_range(1..=(blocks - o / 4096).min(3)) * 4096;
                                specs.push((o, n as usize));
                            } else {
                                specs.push(range(&mut rng));
                            }
                        }
                        let mut bufs: Vec<AlignedBuf> =
                            specs.iter().map(|&(_, n)| AlignedBuf::new(n)).collect();
                        let mut reqs: Vec<(u64, &mut [u8])> = specs
                            .iter()
                            .zip(bufs.iter_mut())
                            .map(|(&(o, _), b)| (o, b.as_mut_slice()))
                            .collect();
                        io.read_many(&mut reqs).expect("read_many");
                        for (&(o, n), b) in specs.iter().zip(&bufs) {
                            same(
                                &format!("{what}: step {step} read_many {o}+{n}"),
                                b.as_slice(),
                                &model[o as usize..o as usize + n],
                            );
                        }
                    }
                    _ => {
                        // Non-overlapping writes in one batch: the last block, the tail
                        // alone, a whole aligned block, and anything else that does not overlap.
                        let mut specs: Vec<(u64, usize)> = Vec::new();
                        for _ in 0..rng.gen_range(1..6) {
                            let (o, n) = match rng.gen_range(0..3) {
                                0 if size > end_block => (end_block, (size - end_block) as usize),
                                1 if size >= 4096 => (rng.gen_range(0..size / 4096) * 4096, 4096),
                                _ => range(&mut rng),
                            };
                            let overlaps = specs
                                .iter()
                                .any(|&(p, m)| o < p + m as u64 && p < o + n as u64);
                            if !overlaps {
                                specs.push((o, n));
                            }
                        }
                        let bufs: Vec<AlignedBuf> = specs
                            .iter()
                            .map(|&(_, n)| {
                                let mut b = AlignedBuf::new(n);
                                rng.fill(b.as_mut_slice());
                                b
                            })
                            .collect();
                        let reqs: Vec<(u64, &[u8])> = specs
                            .iter()
                            .zip(&bufs)
                            .map(|(&(o, _), b)| (o, b.as_slice()))
                            .collect();
                        io.write_many(&reqs).expect("write_many");
                        for (&(o, n), b) in specs.iter().zip(&bufs) {
                            model[o as usize..o as usize + n].copy_from_slice(b.as_slice());
                        }
                    }
                }
                if step % 50 == 0 {
                    len_ok(&format!("step {step}"));
                }
            }
            io.flush().expect("flush");
            len_ok("flush");
            io.read_at(&mut whole, 0).expect("read everything");
            same(&format!("{what}: read back"), &whole, &model);
            drop(io);
            // What the file holds, read without the engine.
            let on_disk = std::fs::read(&path).expect("read the file");
            same(&format!("{what}: the file"), &on_disk, &model);
        }
    }
}
