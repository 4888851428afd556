//! `snapctl serve` with clients nobody here wrote (nbdinfo, qemu-io, qemu-img, nbdcopy, fio,
//! nbdfuse), and a raw protocol client for hostile input and the seeded model test.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::Value;

use crate::util::bin;

/// True when `tool` runs; in CI a missing tool is a failure (setup.sh installs them all).
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{tool} is missing in CI: scripts/setup.sh must install it"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    ok
}

pub struct Served {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    /// Environment the server runs with, besides the store's.
    pub env: Vec<(&'static str, &'static str)>,
}

impl Served {
    /// A 32 MiB origin of known bytes, a store, and a server on a unix socket.
    pub fn start() -> Served {
        Served::start_with(&[])
    }

    /// A directory for a store and an origin the test makes itself; no server yet.
    pub fn bare(env: &[(&'static str, &'static str)]) -> Served {
        Served {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            env: env.to_vec(),
        }
    }

    /// The same, the server run with `env`.
    pub fn start_with(env: &[(&'static str, &'static str)]) -> Served {
        let mut s = Served::bare(env);
        let img: Vec<u8> = (0..32usize << 20).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(s.p("origin.img"), &img).unwrap();
        std::fs::write(s.p("store.img"), vec![0u8; 96 << 20]).unwrap();
        let o = s.cli(&["init", "store.img", "--origin", "origin.img"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.p("serve.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "-v", "--socket"])
            .arg(self.sock())
            .current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .envs(self.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        assert!(
            snapctl::server::wait_for_socket(&self.sock(), Duration::from_secs(10)),
            "server did not start: {}",
            std::fs::read_to_string(self.p("serve.log")).unwrap_or_default()
        );
    }

    pub fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
    pub fn sock(&self) -> PathBuf {
        self.p("nbd.sock")
    }
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock().display())
    }
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .output()
            .unwrap()
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }
    pub fn export(&self, view: &str) -> Vec<u8> {
        let o = self.cli(&["export", view]);
        assert!(
            o.status.success(),
            "export {view}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal NBD client speaking the protocol byte by byte.
pub struct Raw {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

impl Raw {
    pub fn hello(sock: &Path) -> UnixStream {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut h = [0u8; 18];
        s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], b"NBDMAGIC");
        assert_eq!(&h[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        s
    }

    pub fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).unwrap();
    }

    /// One option reply: (type, data).
    pub fn opt_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x3e889045565a9
        );
        let kind = be32(&h[12..]);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        (kind, d)
    }

    pub fn go(sock: &Path, export: &str) -> Result<Raw, u32> {
        let mut s = Raw::hello(sock);
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        Raw::option(&mut s, 7, &d);
        let (mut size, mut flags) = (0, 0);
        loop {
            let (kind, data) = Raw::opt_reply(&mut s);
            match kind {
                1 => return Ok(Raw { s, size, flags }),
                3 if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                3 => {}
                e => return Err(e),
            }
        }
    }

    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, off: u64, len: u32, data: &[u8]) {
        let mut b = 0x25609513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply: (error, cookie); reads `payload` bytes after it when the error is 0.
    pub fn reply(&mut self, payload: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), 0x67446698);
        let err = be32(&h[4..]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = Vec::new();
        if err == 0 && payload > 0 {
            d = vec![0u8; payload];
            self.s.read_exact(&mut d).unwrap();
        }
        (err, cookie, d)
    }

    pub fn read(&mut self, off: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, 0, 1, off, len, &[]);
        let (e, _, d) = self.reply(len as usize);
        if e == 0 {
            Ok(d)
        } else {
            Err(e)
        }
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> u32 {
        self.request(1, 0, 2, off, data.len() as u32, data);
        self.reply(0).0
    }

    pub fn flush(&mut self) -> u32 {
        self.request(3, 0, 3, 0, 0, &[]);
        self.reply(0).0
    }

    /// True when the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn nbdinfo_lists_the_origin_and_every_snapshot_with_their_modes() {
    if !have("nbdinfo") {
        return;
    }
    let s = Served::start();
    s.ok(&["create", "before"]);
    let o = Command::new("nbdinfo")
        .args(["--list", "--json", &s.uri("")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let find = |n: &str| exports.iter().find(|e| e["export-name"] == n).cloned();
    let origin = find("origin").expect("origin export");
    assert_eq!(origin["is_read_only"], false);
    assert_eq!(origin["export-size"], 32 << 20);
    assert_eq!(origin["can_flush"], true);
    assert_eq!(origin["can_fua"], true);
    let snap = find("before").expect("snapshot export");
    assert_eq!(snap["is_read_only"], true);
}

#[test]
fn qemu_writes_go_through_copy_on_write_and_snapshots_compare_exact() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let s = Served::start();
    let before = std::fs::read(s.p("origin.img")).unwrap();
    std::fs::write(s.p("before.img"), &before).unwrap();
    s.ok(&["create", "s1"]);
    let qio = |export: &str, cmd: &str| {
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &s.uri(export)])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qemu-io {cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    qio("origin", "write -P 0xab 1000 3M");
    qio("origin", "write -P 0xcd 20M 64k");
    let out = qio("origin", "read -P 0xab 1000 3M");
    assert!(out.contains("read 3145728/3145728"), "{out}");
    let compare = |export: &str| {
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &s.uri(export)])
            .arg(s.p("before.img"))
            .output()
            .unwrap()
    };
    let cmp = compare("s1");
    assert!(
        cmp.status.success(),
        "snapshot differs: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // and the origin does not match the old image any more
    assert_eq!(compare("origin").status.code(), Some(1));
    // read-only: qemu-io opened read-only can read the snapshot
    let o = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xab 1000 3M",
            &s.uri("s1"),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
    s.ok(&["check"]);
}

#[test]
fn nbdcopy_round_trips_through_origin_and_snapshot() {
    if !have("nbdcopy") {
        return;
    }
    let s = Served::start();
    let before = std::fs::read(s.p("origin.img")).unwrap();
    s.ok(&["create", "old"]);
    let new: Vec<u8> = (0..32usize << 20).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(s.p("new.img"), &new).unwrap();
    let c = |a: &str, b: &str| {
        let o = Command::new("nbdcopy").args([a, b]).output().unwrap();
        assert!(
            o.status.success(),
            "nbdcopy {a} {b}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    c(&s.p("new.img").display().to_string(), &s.uri("origin"));
    c(&s.uri("origin"), &s.p("out.img").display().to_string());
    c(&s.uri("old"), &s.p("old.img").display().to_string());
    assert!(std::fs::read(s.p("out.img")).unwrap() == new);
    assert!(std::fs::read(s.p("old.img")).unwrap() == before);
}

#[test]
fn fio_verifies_across_a_snapshot() {
    if !have("fio") {
        return;
    }
    let s = Served::start();
    let fio = |seed: &str, rw: &str| {
        let o = Command::new("fio")
            .args([
                "--name=v",
                "--ioengine=nbd",
                &format!("--uri={}", s.uri("origin")),
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=32",
                "--size=8M",
                "--verify=crc32c",
                "--do_verify=1",
                &format!("--randseed={seed}"),
            ])
            .output()
            .unwrap();
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !out.contains("verify: bad"),
            "fio: {out}"
        );
    };
    fio("1", "randwrite");
    let image = s.export("origin");
    s.ok(&["create", "mid"]);
    fio("2", "randwrite");
    assert!(
        s.export("mid") == image,
        "the snapshot changed under later writes"
    );
    s.ok(&["check"]);
}

#[test]
fn hostile_requests_get_errors_or_a_closed_connection_never_a_crash() {
    let s = Served::start();
    let before = std::fs::read(s.p("origin.img")).unwrap();
    s.ok(&["create", "ro"]);
    let size = 32u64 << 20;
    // Out of range, oversized, unknown commands and flags: errors, the connection stays usable.
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    assert_eq!(c.size, size);
    assert_eq!(c.read(size - 10, 20), Err(22));
    assert_eq!(c.read(u64::MAX - 5, 10), Err(22));
    assert_eq!(c.read(0, 64 << 20), Err(22));
    assert_eq!(c.write(size - 2, &[1, 2, 3, 4]), 28);
    c.request(99, 0, 7, 0, 0, &[]);
    assert_eq!(c.reply(0).0, 22);
    c.request(0, 1 << 9, 8, 0, 16, &[]);
    assert_eq!(c.reply(16).0, 22);
    assert_eq!(c.read(0, 16).unwrap(), before[..16]);
    // Writes to a snapshot: EPERM, nothing changes.
    let mut r = Raw::go(&s.sock(), "ro").unwrap();
    assert_ne!(r.flags & 2, 0, "snapshot not flagged read-only");
    assert_eq!(r.write(0, &[9; 512]), 1);
    r.request(4, 0, 1, 0, 4096, &[]); // trim
    assert_eq!(r.reply(0).0, 1);
    assert_eq!(r.read(0, 512).unwrap(), before[..512]);
    // Unknown export, unknown option, malformed GO: option errors.
    assert_eq!(Raw::go(&s.sock(), "nope").err(), Some(0x8000_0006));
    let mut h = Raw::hello(&s.sock());
    Raw::option(&mut h, 4242, b"junk");
    assert_eq!(Raw::opt_reply(&mut h).0, 0x8000_0001);
    Raw::option(&mut h, 7, &[0, 0, 0, 200, 1]);
    assert_eq!(Raw::opt_reply(&mut h).0, 0x8000_0003);
    // Bad magic, a huge write, a giant option: the server hangs up on that client only.
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed());
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    c.request(1, 0, 1, 0, u32::MAX, &[]);
    assert!(c.closed());
    let mut h = Raw::hello(&s.sock());
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    h.write_all(&b).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(h.read(&mut buf), Ok(0) | Err(_)));
    let mut h = Raw::hello(&s.sock());
    h.write_all(b"GARBAGE!GARBAGE!").unwrap();
    assert!(matches!(h.read(&mut buf), Ok(0) | Err(_)));
    // Still serving, and nothing was written anywhere.
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), before[..4096]);
    drop(c);
    assert!(s.export("origin") == before);
    assert!(s.export("ro") == before);
    s.ok(&["check"]);
}

#[test]
fn a_snapshot_a_client_has_open_is_not_deleted_without_force() {
    let s = Served::start();
    s.ok(&["create", "held"]);
    let c = Raw::go(&s.sock(), "held").unwrap();
    let o = s.cli(&["delete", "held"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("open by 1 NBD client"));
    drop(c);
    // the server notices the disconnect
    let mut deleted = false;
    for _ in 0..50 {
        if s.cli(&["delete", "held"]).status.success() {
            deleted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(deleted);
    s.ok(&["create", "held2"]);
    let _c = Raw::go(&s.sock(), "held2").unwrap();
    s.ok(&["delete", "held2", "--force"]);
}

/// Clients that say nothing (one mid-handshake, one idle after it, one stalled half-way
/// through a request) do not keep a stopping server waiting.
#[test]
fn sigterm_does_not_wait_for_silent_clients() {
    let mut s = Served::start();
    let _handshaking = Raw::hello(&s.sock());
    let _idle = Raw::go(&s.sock(), "origin").unwrap();
    let mut stalled = Raw::go(&s.sock(), "origin").unwrap();
    stalled
        .s
        .write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0])
        .unwrap(); // 6 of a header's 28 bytes
    std::thread::sleep(Duration::from_millis(100));
    let mut child = s.child.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not stop within 10 s of SIGTERM with silent clients");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st:?}");
    let log = std::fs::read_to_string(s.p("serve.log")).unwrap();
    assert!(
        log.contains("stopped") && !log.contains("is stopping"),
        "{log}"
    );
}

#[test]
fn sigterm_finishes_commits_and_exits_zero() {
    let mut s = Served::start();
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    assert_eq!(c.write(4096, &[7u8; 8192]), 0);
    s.ok(&["create", "t"]);
    assert_eq!(c.write(4096, &[8u8; 8192]), 0);
    let st = s.sigterm();
    assert!(st.success(), "{st:?}");
    assert!(!s.sock().exists(), "socket left behind");
    // Served no more: the CLI opens the store itself.
    let img = s.export("t");
    assert!(img[4096..12288].iter().all(|&b| b == 7));
    let now = s.export("origin");
    assert!(now[4096..12288].iter().all(|&b| b == 8));
    s.ok(&["check"]);
}

/// `n` writes of 1 to `max_len` bytes, each of one random value at a random offset of the
/// 32 MiB origin, applied to `model` too; then a flush.
fn random_writes(c: &mut Raw, rng: &mut SmallRng, model: &mut [u8], n: usize, max_len: usize) {
    for _ in 0..n {
        let len = rng.gen_range(1..max_len);
        let off = rng.gen_range(0..(32u64 << 20) - len as u64);
        let v: u8 = rng.gen();
        assert_eq!(c.write(off, &vec![v; len]), 0);
        model[off as usize..off as usize + len].fill(v);
    }
    assert_eq!(c.flush(), 0);
}

#[test]
fn after_kill_9_flushed_writes_and_every_snapshot_survive() {
    let mut s = Served::start();
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    let mut rng = SmallRng::seed_from_u64(5);
    let mut model = std::fs::read(s.p("origin.img")).unwrap();
    let mut snaps = BTreeMap::new();
    for round in 0..4 {
        random_writes(&mut c, &mut rng, &mut model, 20, 20000);
        let name = format!("r{round}");
        s.ok(&["create", &name]);
        snaps.insert(name, model.clone());
    }
    drop(c);
    s.kill9();
    s.spawn();
    for (n, img) in &snaps {
        assert!(s.export(n) == *img, "snapshot {n} differs after kill -9");
    }
    assert!(s.export("origin") == model);
    s.ok(&["check"]);
}

/// A server killed with its copy journal not yet folded, then a `create` and a `delete` run
/// without it: each opens the store with its catalog read on demand and replays the journal
/// first. The replay must index the copies it allocates (it once indexed none when the catalog
/// was not read whole, and the snapshots that needed them read the origin's new bytes).
#[test]
fn after_kill_9_a_create_or_delete_without_the_server_replays_the_journal_whole() {
    let mut s = Served::start();
    let mut model = std::fs::read(s.p("origin.img")).unwrap();
    let mut snaps = BTreeMap::new();
    let mut rng = SmallRng::seed_from_u64(11);
    for (round, next) in [(0, "create"), (1, "delete")] {
        for n in [format!("a{round}"), format!("b{round}")] {
            s.ok(&["create", &n]);
            snaps.insert(n, model.clone());
            let mut c = Raw::go(&s.sock(), "origin").unwrap();
            random_writes(&mut c, &mut rng, &mut model, 30, 70000);
        }
        // Journaled copies only: nothing has folded them into the metadata yet.
        s.kill9();
        match next {
            "create" => {
                s.ok(&["create", "after"]);
                snaps.insert("after".into(), model.clone());
            }
            _ => {
                s.ok(&["delete", "a0"]);
                snaps.remove("a0");
            }
        }
        let report = s.ok(&["check"]);
        assert!(
            report.contains("clean"),
            "after kill -9 and {next}: {report}"
        );
        for (n, img) in &snaps {
            assert!(
                s.export(n) == *img,
                "snapshot {n} differs after kill -9 and {next}"
            );
        }
        assert!(s.export("origin") == model);
        s.spawn();
    }
}

/// Random origin writes (any offset, any length, pipelined so that the server batches them)
/// interleaved with creates and deletes through the CLI while the server runs; every snapshot
/// and the origin are checked against an in-memory model.
#[test]
fn seeded_model_test_through_the_server() {
    let s = Served::start();
    let size = 32u64 << 20;
    let mut model = std::fs::read(s.p("origin.img")).unwrap();
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut rng = SmallRng::seed_from_u64(77);
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    for step in 0..40 {
        match rng.gen_range(0..10) {
            0..=5 => {
                // a pipelined burst
                let n = rng.gen_range(1..24);
                let mut expect = Vec::new();
                for k in 0..n {
                    let len = if rng.gen_bool(0.5) {
                        rng.gen_range(1..70000usize)
                    } else {
                        4096 * rng.gen_range(1..8)
                    };
                    let off = if rng.gen_bool(0.5) {
                        rng.gen_range(0..size - len as u64)
                    } else {
                        4096 * rng.gen_range(0..(size - len as u64) / 4096)
                    };
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    c.request(1, 0, k as u64, off, len as u32, &data);
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    expect.push(k as u64);
                }
                let mut got: Vec<u64> = (0..n)
                    .map(|_| {
                        let (e, cookie, _) = c.reply(0);
                        assert_eq!(e, 0, "step {step}");
                        cookie
                    })
                    .collect();
                got.sort_unstable();
                assert_eq!(got, expect);
            }
            6..=7 => {
                let name = format!("m{step}");
                s.ok(&["create", &name]);
                snaps.insert(name, model.clone());
            }
            _ => {
                if let Some(name) = snaps.keys().next().cloned() {
                    s.ok(&["delete", &name]);
                    snaps.remove(&name);
                }
            }
        }
        if step % 8 == 7 {
            // reads through NBD of a random range of each snapshot
            for (name, img) in &snaps {
                let mut r = Raw::go(&s.sock(), name).unwrap();
                let len = rng.gen_range(1..200_000u32);
                let off = rng.gen_range(0..size - len as u64);
                assert_eq!(
                    r.read(off, len).unwrap(),
                    img[off as usize..off as usize + len as usize],
                    "{name}"
                );
            }
        }
    }
    assert!(s.export("origin") == model);
    for (name, img) in &snaps {
        assert!(s.export(name) == *img, "snapshot {name} differs");
    }
    let o = s.cli(&["--json", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Origin writes are answered once staged, before their copies are made (store/writeback.rs):
/// reads in the same batch and after it see them, a FUA write that follows them lands after
/// them, a snapshot taken once they are answered holds them, and the snapshot taken before
/// holds none of them. Also through the origin's reads of every snapshot, with the preserver
/// racing them.
#[test]
fn staged_writes_are_read_back_in_order_and_snapshots_stay_exact() {
    // With the preserver racing the client, and without one (each write stays staged until the
    // FUA write or the create settles it).
    staged_writes_round_trip(Served::start());
    staged_writes_round_trip(Served::start_with(&[("SNAPCTL_PIPELINE", "held")]));
}

fn staged_writes_round_trip(s: Served) {
    let before = std::fs::read(s.p("origin.img")).unwrap();
    let mut model = before.clone();
    s.ok(&["create", "before"]);
    let mut rng = SmallRng::seed_from_u64(23);
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    for round in 0..30u64 {
        // A pipelined burst of writes, then a read of one of them in the same burst.
        let n = rng.gen_range(2..40);
        let mut last = (0u64, 0u32);
        for k in 0..n {
            let len = 4096 * rng.gen_range(1..4u32);
            let off = 4096 * rng.gen_range(0..(32u64 << 20) / 4096 - 4);
            let v: u8 = rng.gen();
            c.request(1, 0, k, off, len, &vec![v; len as usize]);
            model[off as usize..(off + len as u64) as usize].fill(v);
            last = (off, len);
        }
        c.request(0, 0, 999, last.0, last.1, &[]);
        for _ in 0..n {
            assert_eq!(c.reply(0).0, 0, "round {round}");
        }
        let (e, cookie, data) = c.reply(last.1 as usize);
        assert_eq!((e, cookie), (0, 999));
        assert!(
            data == model[last.0 as usize..(last.0 + last.1 as u64) as usize],
            "round {round}: a read in the burst missed its writes"
        );
        // A FUA write over the last one: it must land after everything staged before it.
        let v = (round as u8).wrapping_mul(7).wrapping_add(1);
        c.request(1, 1, 1000, last.0, last.1, &vec![v; last.1 as usize]);
        assert_eq!(c.reply(0).0, 0);
        model[last.0 as usize..(last.0 + last.1 as u64) as usize].fill(v);
        assert!(
            c.read(last.0, last.1).unwrap()
                == model[last.0 as usize..(last.0 + last.1 as u64) as usize],
            "round {round}: a FUA write was overtaken by writes staged before it"
        );
        if round % 10 == 9 {
            let name = format!("r{round}");
            s.ok(&["create", &name]);
            let mut r = Raw::go(&s.sock(), &name).unwrap();
            assert!(r.read(last.0, last.1).unwrap() == vec![v; last.1 as usize]);
        }
    }
    assert!(
        s.export("before") == before,
        "the older snapshot saw new bytes"
    );
    assert!(
        s.export("r29") == model,
        "a snapshot missed answered writes"
    );
    assert!(s.export("origin") == model);
    let report = s.ok(&["check"]);
    assert!(report.contains("clean"), "{report}");
}

/// A store short of room under fail-writes: a write that needs a copy the store cannot hold is
/// refused with ENOSPC before it is answered, never staged, answered and then lost; every
/// answered write reads back, FLUSH succeeds, and the snapshot stays exact.
#[test]
fn a_full_store_refuses_writes_before_answering_them() {
    let mut s = Served::bare(&[]);
    let img: Vec<u8> = (0..32usize << 20).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(s.p("origin.img"), &img).unwrap();
    std::fs::write(s.p("store.img"), vec![0u8; (9 << 20) + (64 << 10)]).unwrap();
    s.ok(&[
        "init",
        "store.img",
        "--origin",
        "origin.img",
        "--on-full",
        "fail-writes",
    ]);
    s.ok(&["create", "s1"]);
    s.spawn();
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    let mut model = img.clone();
    let (mut answered, mut refused) = (0, 0);
    // Pipelined bursts of 4 KiB writes, each to a chunk of its own, until some are refused.
    for burst in 0..64u64 {
        let offs: Vec<u64> = (0..32).map(|j| (burst * 32 + j) * 8192).collect();
        for (j, &off) in offs.iter().enumerate() {
            c.request(1, 0, j as u64, off, 4096, &[burst as u8 + 1; 4096]);
        }
        for _ in 0..offs.len() {
            let (e, cookie, _) = c.reply(0);
            let off = offs[cookie as usize] as usize;
            match e {
                0 => {
                    model[off..off + 4096].fill(burst as u8 + 1);
                    answered += 1;
                }
                28 => refused += 1,
                e => panic!("burst {burst}: error {e}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    assert_eq!(c.flush(), 0, "a flush after refused writes failed");
    drop(c);
    assert!(s.export("origin") == model, "an answered write was lost");
    assert!(s.export("s1") == img);
    let report = s.ok(&["check"]);
    assert!(report.contains("clean"), "{report}");
}

/// BLOCK_STATUS over a write still staged (answered, its copy not made yet) says data, so that
/// a client that skips zeros (nbdcopy, qemu-img convert) does not skip it; another connection
/// reads it back.
#[test]
fn block_status_counts_staged_writes_as_data() {
    if !have("nbdinfo") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let mut s = Served::bare(&[("SNAPCTL_PIPELINE", "held")]);
    std::fs::File::create(s.p("origin.img"))
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    std::fs::write(s.p("store.img"), vec![0u8; 96 << 20]).unwrap();
    s.ok(&["init", "store.img", "--origin", "origin.img"]);
    s.ok(&["create", "s1"]);
    s.spawn();
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    // Staged and held: nothing settles it while this connection stays open and quiet.
    assert_eq!(c.write(8 * MIB + 4096, &[0x77; 4096]), 0);
    let m = nbdinfo_map(&s.uri("origin"));
    assert!(
        !zero_at(&m, 8 * MIB + 4096),
        "a staged write reported as zeros: {m:?}"
    );
    let mut r = Raw::go(&s.sock(), "origin").unwrap();
    assert!(r.read(8 * MIB + 4096, 4096).unwrap() == vec![0x77; 4096]);
    assert!(r.read(8 * MIB, 4096).unwrap() == vec![0; 4096]);
    drop(c);
    assert!(s.export("s1") == vec![0; 32 << 20]);
}

/// Undoes one step of the filesystem test on drop, whatever happened.
struct Undo(Vec<String>);
impl Drop for Undo {
    fn drop(&mut self) {
        let _ = Command::new("sh").arg("-c").arg(self.0.join("; ")).output();
    }
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// nbdfuse exposes the origin as a file, a loop device on it carries ext4: write files, freeze,
/// snapshot, thaw, change the files; the snapshot's image then mounts with every file as it was
/// and e2fsck -fn finds it clean.
#[test]
fn a_frozen_filesystem_snapshots_consistently() {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    if !have("nbdfuse") {
        return;
    }
    let s = Served::start();
    let d = s.dir.path().display().to_string();
    for sub in ["fuse", "mnt", "snap"] {
        std::fs::create_dir(s.p(sub)).unwrap();
    }
    let mut fuse = Command::new("nbdfuse")
        .arg(s.p("fuse"))
        .arg(s.uri("origin"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _fuse = Undo(vec![format!("fusermount3 -u {d}/fuse")]);
    for _ in 0..100 {
        if s.p("fuse/nbd").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dev = sh(&format!("losetup --find --show {d}/fuse/nbd"))
        .trim()
        .to_string();
    let _loop = Undo(vec![format!("umount {d}/mnt"), format!("losetup -d {dev}")]);
    sh(&format!("mkfs.ext4 -q {dev} && mount {dev} {d}/mnt"));
    sh(&format!("echo hello > {d}/mnt/a.txt && head -c 3M /dev/urandom > {d}/mnt/b.bin && mkdir {d}/mnt/dir && echo x > {d}/mnt/dir/c.txt"));
    sh(&format!(
        "cd {d}/mnt && md5sum a.txt b.bin dir/c.txt > {d}/sums"
    ));
    // snapctl freezes the mounted file system itself, snapshots through the server, thaws
    let thaw = Undo(vec![format!("fsfreeze -u {d}/mnt")]);
    s.ok(&["create", "frozen", "--freeze", &format!("{d}/mnt")]);
    drop(thaw);
    sh(&format!("echo changed > {d}/mnt/a.txt && rm {d}/mnt/b.bin && rm -r {d}/mnt/dir && head -c 2M /dev/urandom > {d}/mnt/new.bin && sync"));
    s.ok(&["export", "frozen", "-o", "snap.img"]);
    sh(&format!("e2fsck -fn {d}/snap.img"));
    sh(&format!("mount -o ro,loop {d}/snap.img {d}/snap"));
    let _snap = Undo(vec![format!("umount {d}/snap")]);
    sh(&format!(
        "cd {d}/snap && md5sum -c {d}/sums && test ! -e new.bin"
    ));
    drop(_snap);
    drop(_loop);
    drop(_fuse);
    let _ = fuse.kill();
    let _ = fuse.wait();
}

/// While a client streams writes, `create` is a point in time: every write acknowledged before
/// create began is in the snapshot, none issued after it returned is.
#[test]
fn create_on_a_busy_volume_is_a_point_in_time() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let s = Served::start();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sock = s.sock();
    let (a, st) = (acked.clone(), stop.clone());
    // Write i (1, 2, 3, ...) stamps block i % 4096 with the number i.
    let writer = std::thread::spawn(move || {
        let mut c = Raw::go(&sock, "origin").unwrap();
        let mut i = 1u64;
        while !st.load(Ordering::SeqCst) {
            let mut blk = vec![0u8; 4096];
            blk[..8].copy_from_slice(&i.to_le_bytes());
            assert_eq!(c.write((i % 4096) * 4096, &blk), 0);
            a.store(i, Ordering::SeqCst);
            i += 1;
        }
    });
    let mut checks = Vec::new();
    for k in 0..5 {
        std::thread::sleep(Duration::from_millis(150));
        let before = acked.load(Ordering::SeqCst);
        s.ok(&["create", &format!("p{k}")]);
        let after = acked.load(Ordering::SeqCst);
        checks.push((format!("p{k}"), before, after));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    for (name, before, after) in checks {
        let img = s.export(&name);
        let stamps: Vec<u64> = (0..4096usize)
            .map(|b| u64::from_le_bytes(img[b * 4096..b * 4096 + 8].try_into().unwrap()))
            .collect();
        // The newest stamp in the image, and every earlier write still visible where not overwritten.
        let newest = stamps
            .iter()
            .copied()
            .filter(|&v| v < 1 << 40)
            .max()
            .unwrap_or(0);
        assert!(
            newest >= before,
            "{name}: acknowledged write {before} missing (newest {newest})"
        );
        assert!(
            newest <= after + 1,
            "{name}: holds write {newest}, issued after create returned ({after})"
        );
        for (b, &v) in stamps.iter().enumerate() {
            // block b holds the last write j <= newest with j % 4096 == b
            let want = if newest >= b as u64 {
                newest - ((newest - b as u64) % 4096)
            } else {
                0
            };
            let want_bytes = if want == 0 {
                u64::from_le_bytes(img_orig(b))
            } else {
                want
            };
            assert_eq!(
                v, want_bytes,
                "{name}: block {b} is not from one point in time"
            );
        }
    }
}

/// The first 8 bytes of block b of the test origin.
fn img_orig(b: usize) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (k, o) in out.iter_mut().enumerate() {
        *o = ((b * 4096 + k) * 13 % 251) as u8;
    }
    out
}

#[test]
fn tcp_only_when_asked_and_on_loopback_by_default() {
    if !have("nbdinfo") {
        return;
    }
    let mut s = Served::start();
    s.kill9();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Without TLS or --no-tls, --listen is refused.
    let o = Command::new(bin())
        .args(["serve", "--socket"])
        .arg(s.sock())
        .args(["--listen", &port.to_string()])
        .env("SNAPCTL_STORE", s.p("store.img"))
        .env("SNAPCTL_RUN_DIR", s.p("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("needs TLS") && err.contains("--no-tls"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let log = std::fs::File::create(s.p("serve2.log")).unwrap();
    let child = Command::new(bin())
        .args(["serve", "--socket"])
        .arg(s.sock())
        .args(["--listen", &port.to_string(), "--no-tls"])
        .env("SNAPCTL_STORE", s.p("store.img"))
        .env("SNAPCTL_RUN_DIR", s.p("run"))
        .stderr(log)
        .spawn()
        .unwrap();
    s.child = Some(child);
    assert!(snapctl::server::wait_for_socket(
        &s.sock(),
        Duration::from_secs(10)
    ));
    let o = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/origin"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ss = Command::new("ss").args(["-ltn"]).output();
    if let Ok(ss) = ss {
        let out = String::from_utf8_lossy(&ss.stdout);
        let line = out.lines().find(|l| l.contains(&format!(":{port} ")));
        if let Some(l) = line {
            assert!(l.contains("127.0.0.1"), "not on loopback: {l}");
        }
    }
}

/// The other handshake options, byte by byte: LIST names every export, INFO describes one
/// without entering transmission, EXPORT_NAME enters it the old way, ABORT ends politely.
#[test]
fn list_info_export_name_and_abort_follow_the_protocol() {
    let s = Served::start();
    s.ok(&["create", "one"]);
    // LIST
    let mut h = Raw::hello(&s.sock());
    Raw::option(&mut h, 3, &[]);
    let mut names = Vec::new();
    loop {
        let (kind, d) = Raw::opt_reply(&mut h);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 2);
        let n = be32(&d) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["origin", "one"]);
    // INFO on a snapshot: read-only flag, size, block sizes; then ABORT.
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"one");
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    Raw::option(&mut h, 6, &d);
    let (mut size, mut flags, mut block) = (0u64, 0u16, None);
    loop {
        let (kind, d) = Raw::opt_reply(&mut h);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 3);
        match u16::from_be_bytes([d[0], d[1]]) {
            0 => {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            3 => block = Some((be32(&d[2..]), be32(&d[6..]), be32(&d[10..]))),
            _ => {}
        }
    }
    assert_eq!(size, 32 << 20);
    assert_ne!(flags & 2, 0, "snapshot must be read-only");
    assert_eq!(block, Some((1, 4096, 32 << 20)));
    Raw::option(&mut h, 2, &[]);
    assert_eq!(Raw::opt_reply(&mut h).0, 1);
    let mut b = [0u8; 1];
    assert!(matches!(h.read(&mut b), Ok(0) | Err(_)));
    // EXPORT_NAME: size and flags, no zero padding (NO_ZEROES was negotiated), then requests.
    let mut h = Raw::hello(&s.sock());
    Raw::option(&mut h, 1, b"origin");
    let mut r = [0u8; 10];
    h.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 32 << 20);
    let mut c = Raw {
        s: h,
        size: 32 << 20,
        flags: 0,
    };
    assert_eq!(c.read(0, 8).unwrap().len(), 8);
    // EXPORT_NAME of an unknown export: the connection is closed.
    let mut h = Raw::hello(&s.sock());
    Raw::option(&mut h, 1, b"nope");
    assert!(matches!(h.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn restore_through_the_server_waits_for_an_idle_origin() {
    let s = Served::start();
    let before = std::fs::read(s.p("origin.img")).unwrap();
    s.ok(&["create", "base"]);
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    assert_eq!(c.write(0, &[5u8; 65536]), 0);
    let o = s.cli(&["restore", "base"]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("open by 1 NBD client"));
    drop(c);
    let mut done = false;
    for _ in 0..50 {
        if s.cli(&["restore", "base", "--no-backup"]).status.success() {
            done = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(done, "restore never went through");
    assert!(s.export("origin") == before);
    // --force while attached
    let mut c = Raw::go(&s.sock(), "origin").unwrap();
    assert_eq!(c.write(0, &[6u8; 4096]), 0);
    s.ok(&["restore", "base", "--force", "--no-backup"]);
    assert_eq!(c.read(0, 4096).unwrap(), before[..4096]);
}

#[test]
fn writable_snapshots_are_exported_read_write_and_change_nothing_else() {
    let s = Served::start();
    let before = std::fs::read(s.p("origin.img")).unwrap();
    s.ok(&["create", "ro"]);
    s.ok(&["create", "rw", "--writable"]);
    let mut c = Raw::go(&s.sock(), "rw").unwrap();
    assert_eq!(c.flags & 2, 0, "writable snapshot exported read-only");
    assert_eq!(c.write(100, &[0xee; 5000]), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.read(100, 5000).unwrap(), vec![0xee; 5000]);
    let mut want = before.clone();
    want[100..5100].fill(0xee);
    assert!(s.export("rw") == want);
    assert!(s.export("ro") == before);
    assert!(s.export("origin") == before);
    s.ok(&["check"]);
}

#[test]
fn a_copy_of_a_served_store_is_never_mistaken_for_it() {
    let s = Served::start();
    std::fs::copy(s.p("store.img"), s.p("copy.img")).unwrap();
    let o = Command::new(bin())
        .args(["-s", "copy.img", "create", "x"])
        .current_dir(s.dir.path())
        .env("SNAPCTL_RUN_DIR", s.p("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("same uuid") && err.contains("copy.img"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Nothing was created in the served store.
    let list = s.ok(&["--json", "list"]);
    assert!(!list.contains("\"x\""), "{list}");
    // The served store itself still works through the server.
    s.ok(&["create", "y"]);
}

/// BLOCK_STATUS (base:allocation, structured replies): holes of a sparse origin are reported
/// as zeros for every view that reads them from the origin, and never where a view holds its
/// own bytes (a chunk saved before an origin write, a writable snapshot's write); nbdcopy and
/// qemu-img skip them and copy exactly the bytes `export` gives.
/// (offset, length, reads as zeros) of each extent of an export, from `nbdinfo --map`.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let o = Command::new("nbdinfo")
        .args(["--map", "--json", uri])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nbdinfo --map {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() & 2 != 0,
            )
        })
        .collect()
}

/// Whether the extent of `m` covering `off` reads as zeros.
fn zero_at(m: &[(u64, u64, bool)], off: u64) -> bool {
    m.iter()
        .find(|e| e.0 <= off && off < e.0 + e.1)
        .map(|e| e.2)
        .unwrap_or_else(|| panic!("no extent covers {off}: {m:?}"))
}

#[test]
fn block_status_reports_holes_and_copies_skip_them() {
    if !have("nbdinfo") || !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let mut s = Served::bare(&[]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(s.p("origin.img")).unwrap();
        f.set_len(32 * MIB).unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut data = vec![0u8; 2 << 20];
        rng.fill(&mut data[..]);
        f.write_all_at(&data, 4 * MIB).unwrap();
        f.write_all_at(&data[..8192], 20 * MIB + 4096).unwrap();
    }
    std::fs::File::create(s.p("store.img"))
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    s.ok(&["init", "store.img", "--origin", "origin.img"]);
    s.ok(&["create", "s1"]);
    std::fs::write(s.p("w.bin"), vec![0x5a; 8192]).unwrap();
    // Into a hole of the origin: s1 saves those two zero chunks, the origin now holds data.
    s.ok(&["write", "--offset", &(12 * MIB).to_string(), "-i", "w.bin"]);
    s.ok(&["create", "w", "--writable"]);
    s.ok(&[
        "write",
        "--snapshot",
        "w",
        "--offset",
        &(24 * MIB).to_string(),
        "-i",
        "w.bin",
    ]);
    s.spawn();
    let size = 32 * MIB;
    let map = |view: &str| nbdinfo_map(&s.uri(view));
    for view in ["origin", "s1", "w"] {
        let m = map(view);
        // Consecutive, covering the whole export.
        let mut at = 0;
        for &(off, len, _) in &m {
            assert_eq!(off, at, "{view}: extents not consecutive: {m:?}");
            at += len;
        }
        assert_eq!(at, size, "{view}: extents end at {at}: {m:?}");
        // Every range reported as zeros reads as zeros.
        let img = s.export(view);
        for &(off, len, z) in &m {
            if z {
                let r = &img[off as usize..(off + len) as usize];
                assert!(
                    r.iter().all(|&b| b == 0),
                    "{view}: {off}+{len} reported as zeros holds data"
                );
            }
        }
        // The origin's data is data in every view, and its holes far from any write are zeros.
        assert!(!zero_at(&m, 4 * MIB + 100), "{view}: {m:?}");
        assert!(!zero_at(&m, 20 * MIB + 4096), "{view}: {m:?}");
        assert!(zero_at(&m, 0), "{view}: {m:?}");
        assert!(zero_at(&m, 30 * MIB), "{view}: {m:?}");
        // nbdcopy skips the zeros: the copy is sparse, and byte for byte the export.
        let out = s.p(&format!("{view}.copy"));
        let o = Command::new("nbdcopy")
            .arg(s.uri(view))
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(std::fs::read(&out).unwrap() == img, "nbdcopy of {view}");
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            blocks < 8 * MIB,
            "nbdcopy of {view} wrote {blocks} bytes of a 32 MiB export with 2 MiB of data"
        );
    }
    // Where each view holds its own bytes, never zeros: s1 saved the two chunks at 12 MiB (as
    // zeros) and the origin holds the write; the writable snapshot holds its write at 24 MiB,
    // which the origin does not.
    let (o, s1, w) = (map("origin"), map("s1"), map("w"));
    assert!(
        !zero_at(&o, 12 * MIB) && !zero_at(&s1, 12 * MIB),
        "{o:?} {s1:?}"
    );
    assert!(
        !zero_at(&w, 24 * MIB) && zero_at(&o, 24 * MIB),
        "{w:?} {o:?}"
    );
    // qemu-img sees the same through its own client.
    let o = Command::new("qemu-img")
        .args(["map", "-f", "raw", "--output=json", &s.uri("s1")])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["zero"], true, "qemu-img map of s1: {v}");
    assert_eq!(v[0]["start"], 0);
    // A plain read on a structured connection still returns the bytes.
    let o = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 25165824 8192",
            &s.uri("w"),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 8192/8192"),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The negotiation rules of structured replies and metadata contexts, byte by byte: contexts
/// only after structured replies, malformed queries refused, unknown namespaces ignored, and
/// BLOCK_STATUS only for the export the context was selected on; a structured read carries the
/// bytes in one chunk flagged done.
#[test]
fn structured_replies_and_meta_contexts_follow_the_protocol() {
    let s = Served::start();
    let meta = |export: &str, queries: &[&str]| {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    };
    let mut c = Raw::hello(&s.sock());
    // Before structured replies: refused.
    Raw::option(&mut c, 10, &meta("origin", &["base:allocation"]));
    assert_eq!(Raw::opt_reply(&mut c).0, 0x8000_0003);
    Raw::option(&mut c, 8, b"x");
    assert_eq!(
        Raw::opt_reply(&mut c).0,
        0x8000_0003,
        "data with STRUCTURED_REPLY"
    );
    Raw::option(&mut c, 8, &[]);
    assert_eq!(Raw::opt_reply(&mut c).0, 1);
    // Listing with no query names base:allocation.
    Raw::option(&mut c, 9, &meta("origin", &[]));
    let (k, d) = Raw::opt_reply(&mut c);
    assert_eq!((k, &d[4..]), (4, &b"base:allocation"[..]));
    assert_eq!(Raw::opt_reply(&mut c).0, 1);
    // A query length past the option's end; an unknown export.
    let mut bad = meta("origin", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    Raw::option(&mut c, 10, &bad);
    assert_eq!(Raw::opt_reply(&mut c).0, 0x8000_0003);
    Raw::option(&mut c, 10, &meta("nope", &["base:allocation"]));
    assert_eq!(Raw::opt_reply(&mut c).0, 0x8000_0006);
    // An unknown namespace is ignored; base:allocation gets a non-zero id.
    Raw::option(
        &mut c,
        10,
        &meta("origin", &["qemu:dirty-bitmap:x", "base:allocation"]),
    );
    let (k, d) = Raw::opt_reply(&mut c);
    assert_eq!(k, 4);
    let id = u32::from_be_bytes(d[..4].try_into().unwrap());
    assert!(id != 0 && &d[4..] == b"base:allocation");
    assert_eq!(Raw::opt_reply(&mut c).0, 1);
    // GO on the origin: block status is allowed there.
    let mut go = 6u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"origin");
    go.extend_from_slice(&0u16.to_be_bytes());
    Raw::option(&mut c, 7, &go);
    while Raw::opt_reply(&mut c).0 != 1 {}
    let mut r = Raw {
        s: c,
        size: 32 << 20,
        flags: 0,
    };
    // A structured reply chunk: (flags, type, cookie, payload).
    let chunk = |r: &mut Raw| {
        let mut h = [0u8; 20];
        r.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), 0x668e_33ef);
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut p = vec![0u8; be32(&h[16..]) as usize];
        r.s.read_exact(&mut p).unwrap();
        (flags, kind, cookie, p)
    };
    r.request(7, 0, 9, 0, 1 << 20, &[]);
    let (flags, kind, cookie, p) = chunk(&mut r);
    assert_eq!((flags, kind, cookie), (1, 5, 9));
    assert_eq!(be32(&p), id);
    let total: u64 = p[4..].chunks_exact(8).map(|e| be32(e) as u64).sum();
    assert!((1..=1 << 20).contains(&total), "{total}");
    // REQ_ONE: exactly one extent.
    r.request(7, 1 << 3, 10, 0, 1 << 20, &[]);
    let (_, kind, _, p) = chunk(&mut r);
    assert_eq!((kind, p.len()), (5, 12));
    // Past the end: an error chunk.
    r.request(7, 0, 11, 32 << 20, 4096, &[]);
    let (flags, kind, cookie, p) = chunk(&mut r);
    assert_eq!((flags, kind, cookie, be32(&p)), (1, 0x8001, 11, 22));
    // A read: the bytes in one data chunk, at its offset.
    r.request(0, 0, 12, 4096, 512, &[]);
    let (flags, kind, cookie, p) = chunk(&mut r);
    assert_eq!((flags, kind, cookie), (1, 1, 12));
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 4096);
    let img = std::fs::read(s.p("origin.img")).unwrap();
    assert_eq!(&p[8..], &img[4096..4608]);
    // Writes still get simple replies.
    assert_eq!(r.write(0, &[1u8; 512]), 0);
    // Selected for another export than the one entered: block status is refused.
    let mut c = Raw::hello(&s.sock());
    Raw::option(&mut c, 8, &[]);
    assert_eq!(Raw::opt_reply(&mut c).0, 1);
    s.ok(&["create", "snap"]);
    Raw::option(&mut c, 10, &meta("snap", &["base:allocation"]));
    while Raw::opt_reply(&mut c).0 != 1 {}
    Raw::option(&mut c, 7, &go);
    while Raw::opt_reply(&mut c).0 != 1 {}
    let mut r = Raw {
        s: c,
        size: 32 << 20,
        flags: 0,
    };
    r.request(7, 0, 13, 0, 4096, &[]);
    let (_, kind, _, p) = chunk(&mut r);
    assert_eq!((kind, be32(&p)), (0x8001, 22));
}
