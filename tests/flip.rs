//! The flip harness: single-byte damage to the metadata region and to saved chunks, and for
//! each flip every view read through the command line and through the NBD server. No read may
//! succeed with wrong bytes; `check` (`check --data` for the data area) must fail for every flip
//! that changes what a read returns. `SNAPCTL_FLIPS=N` (scripts/flip.sh) runs more.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::nbd::have;
use crate::util::bin;

const PAGE: u64 = 4096;

struct Bench {
    dir: tempfile::TempDir,
    views: Vec<String>,
    expected: Vec<Vec<u8>>,
    pristine: Vec<u8>,
    meta: (u64, u64),
    data: (u64, u64, u64),
}

#[derive(Default, Debug)]
struct Counts {
    detected: u64,
    harmless: u64,
    wrong: u64,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum Read {
    Right,
    Refused,
    Wrong,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Bench {
    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .output()
            .expect("run snapctl")
    }

    fn ok(&self, args: &[&str]) {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn write(&self, rng: &mut SmallRng, snapshot: Option<&str>, size: u64) {
        let len = rng.gen_range(1..20_000u64).min(size);
        let off = rng.gen_range(0..=size - len);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        std::fs::write(self.p("w.bin"), &data).expect("write input");
        let off = off.to_string();
        let mut args = vec!["-q", "write", "--offset", &off, "-i", "w.bin"];
        if let Some(s) = snapshot {
            args.extend(["--snapshot", s]);
        }
        self.ok(&args);
    }

    /// A store with read-only and writable snapshots, a snapshot of a writable one, and enough
    /// records to fill several metadata pages.
    fn new(seed: u64) -> Bench {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let mut rng = SmallRng::seed_from_u64(seed);
        let size = (2u64 << 20) + 3000;
        let img: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
        std::fs::write(dir.path().join("origin.img"), &img).expect("origin");
        std::fs::write(dir.path().join("store.img"), vec![0u8; 16 << 20]).expect("store");
        let mut b = Bench {
            dir,
            views: vec!["origin".into()],
            expected: Vec::new(),
            pristine: Vec::new(),
            meta: (0, 0),
            data: (0, 0, 0),
        };
        b.ok(&["-q", "init", "store.img", "--origin", "origin.img"]);
        let script: &[(&str, &[&str])] = &[
            ("a", &["create", "a"]),
            ("", &["w"]),
            ("b", &["create", "b", "--writable"]),
            ("", &["wb"]),
            ("c", &["create", "c"]),
            ("", &["w"]),
            ("d", &["create", "d", "--from", "b"]),
            ("", &["wb"]),
            ("e", &["create", "e"]),
            ("", &["w"]),
            ("", &["set-writable", "c"]),
            ("", &["wc"]),
            ("f", &["create", "f"]),
            ("", &["w"]),
        ];
        for (name, step) in script {
            match step[0] {
                "w" | "wb" | "wc" => {
                    let target = match step[0] {
                        "wb" => Some("b"),
                        "wc" => Some("c"),
                        _ => None,
                    };
                    for _ in 0..12 {
                        b.write(&mut rng, target, size);
                    }
                }
                _ => {
                    let mut args = vec!["-q"];
                    args.extend_from_slice(step);
                    b.ok(&args);
                }
            }
            if !name.is_empty() {
                b.views.push(name.to_string());
            }
        }
        for v in b.views.clone() {
            let o = b.cli(&["export", &v]);
            assert!(o.status.success(), "export {v}");
            assert_eq!(o.stdout.len() as u64, size);
            b.expected.push(o.stdout);
        }
        let store = std::fs::read(b.p("store.img")).expect("read store");
        let lenblock = &store[4096..4096 + 512];
        b.meta = (u64_at(&store, 80), u64_at(lenblock, 8));
        let o = b.cli(&["--json", "check"]);
        assert!(o.status.success(), "the fresh store is clean");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let hw = v["check"]["high_water_chunks"].as_u64().unwrap_or(0);
        b.data = (u64_at(&store, 96), u64_at(&store, 32), hw);
        b.pristine = store;
        b
    }

    fn restore_pristine(&self) {
        std::fs::write(self.p("store.img"), &self.pristine).expect("restore store");
    }

    fn flip(&self, at: u64, mask: u8) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.p("store.img"))
            .expect("open store");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read byte");
        b[0] ^= mask;
        f.write_all_at(&b, at).expect("write byte");
    }

    /// Every view through the command line.
    fn read_cli(&self, why: &mut Vec<String>) -> Vec<Read> {
        let mut out = Vec::new();
        for (v, want) in self.views.iter().zip(&self.expected) {
            let o = self.cli(&["export", v]);
            out.push(if !o.status.success() {
                why.push(format!(
                    "export {v}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                Read::Refused
            } else if &o.stdout == want {
                Read::Right
            } else {
                Read::Wrong
            });
        }
        out
    }

    /// Every view through the server and nbdcopy (all refused when the server will not start).
    fn read_nbd(&self, why: &mut Vec<String>) -> Vec<Read> {
        let sock = self.p("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let log = self.p("serve.log");
        let child = Command::new(bin())
            .args(["serve", "--socket"])
            .arg(&sock)
            .current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("spawn server");
        let mut server = Server(Some(child));
        if !wait_up(&mut server, &sock) {
            why.push(format!(
                "serve: {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            ));
            return vec![Read::Refused; self.views.len()];
        }
        let mut out = Vec::new();
        for (v, want) in self.views.iter().zip(&self.expected) {
            let dst = self.p("nbd.out");
            let _ = std::fs::remove_file(&dst);
            let st = Command::new("nbdcopy")
                .arg(format!("nbd+unix:///{v}?socket={}", sock.display()))
                .arg(&dst)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("nbdcopy");
            out.push(if !st.success() {
                why.push(format!("nbdcopy {v} failed"));
                Read::Refused
            } else if std::fs::read(&dst).ok().as_ref() == Some(want) {
                Read::Right
            } else {
                Read::Wrong
            });
        }
        out
    }

    fn check_fails(&self, data: bool) -> bool {
        let args: &[&str] = if data {
            &["check", "--data"]
        } else {
            &["check"]
        };
        !self.cli(args).status.success()
    }

    /// One flip: damage, check, read everything, undo. Returns the verdict.
    ///
    /// `check` runs first, on the damaged store as the flip left it: a read may legitimately
    /// change the store (opening it after an unclean close lets the metadata engine recover),
    /// and what must hold is that `check` of the damage itself fails whenever a read is affected.
    fn trial(&self, at: u64, mask: u8, data: bool, nbd: bool, what: &str) -> Read {
        self.flip(at, mask);
        let damaged = std::fs::read(self.p("store.img")).expect("read damaged store");
        let check_failed = self.check_fails(data);
        std::fs::write(self.p("store.img"), &damaged).expect("write damaged store back");
        let mut why = Vec::new();
        let mut reads = self.read_cli(&mut why);
        if nbd {
            reads.extend(self.read_nbd(&mut why));
        }
        let verdict = if reads.contains(&Read::Wrong) {
            Read::Wrong
        } else if reads.contains(&Read::Refused) {
            Read::Refused
        } else {
            Read::Right
        };
        if verdict != Read::Right {
            assert!(
                check_failed,
                "{what}: a flip of byte {at} (mask {mask:#x}) changed what reads return, but check passed: \
                 {reads:?}; {why:#?}"
            );
        }
        self.restore_pristine();
        verdict
    }
}

struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for the socket, or for the server to exit (it refused the store): false. A server that
/// neither answers nor exits within a minute is a failure of the test machine, not a verdict.
fn wait_up(s: &mut Server, sock: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(c) = s.0.as_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                return false;
            }
        }
        if snapctl::server::wait_for_socket(sock, Duration::from_millis(20)) {
            return true;
        }
    }
    panic!("the server neither started nor exited within 60 s");
}

fn flips(default: u64) -> u64 {
    std::env::var("SNAPCTL_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints the counts, and keeps them in target/flip-counts.txt, which scripts/test.sh prints
/// after the run (cargo captures a passing test's output).
fn report(line: &str) {
    use std::io::Write;
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../flip-counts.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn tally(c: &mut Counts, r: Read) {
    match r {
        Read::Right => c.harmless += 1,
        Read::Refused => c.detected += 1,
        Read::Wrong => c.wrong += 1,
    }
}

#[test]
fn metadata_flips_never_serve_wrong_bytes() {
    let nbd = have("nbdcopy");
    let b = Bench::new(17);
    let (off, len) = b.meta;
    // Used pages: the pages of the metadata region that hold anything.
    let pages: Vec<u64> = (0..len.div_ceil(PAGE))
        .map(|i| off + i * PAGE)
        .filter(|p| {
            let s = *p as usize;
            b.pristine[s..s + PAGE as usize].iter().any(|&x| x != 0)
        })
        .collect();
    assert!(
        pages.len() >= 8,
        "the store uses {} metadata pages",
        pages.len()
    );
    let n = flips(300);
    let mut rng = SmallRng::seed_from_u64(0xf11b);
    let mut c = Counts::default();
    for i in 0..n {
        // Every used page in turn, then random ones; a random byte and bit in it.
        let page = if (i as usize) < pages.len() {
            pages[i as usize]
        } else {
            pages[rng.gen_range(0..pages.len())]
        };
        let at = page + rng.gen_range(0..PAGE);
        let mask = 1u8 << rng.gen_range(0..8);
        let r = b.trial(at, mask, false, nbd, "metadata");
        if r == Read::Wrong {
            eprintln!("WRONG BYTES SERVED after a flip of byte {at} (mask {mask:#x}, page {page})");
        }
        tally(&mut c, r);
    }
    report(&format!(
        "metadata flips over {} used pages: {} detected, {} harmless, {} wrong",
        pages.len(),
        c.detected,
        c.harmless,
        c.wrong
    ));
    assert_eq!(c.wrong, 0, "{c:?}");
}

#[test]
fn data_flips_are_refused_on_every_path_and_named_by_check_data() {
    let nbd = have("nbdcopy");
    let b = Bench::new(18);
    let (data_off, cs, used) = b.data;
    assert!(used >= 50, "the store holds {used} chunks");
    let n = flips(60);
    let mut rng = SmallRng::seed_from_u64(0xda7a);
    let mut c = Counts::default();
    for _ in 0..n {
        let chunk = rng.gen_range(0..used);
        let at = data_off + chunk * cs + rng.gen_range(0..cs);
        let mask = 1u8 << rng.gen_range(0..8);
        tally(&mut c, b.trial(at, mask, true, nbd, "data"));
    }
    report(&format!(
        "data flips: {} detected, {} harmless, {} wrong",
        c.detected, c.harmless, c.wrong
    ));
    assert_eq!(c.wrong, 0, "{c:?}");
    assert!(c.detected > 0, "{c:?}");
}

#[test]
fn check_data_names_the_damaged_snapshot_and_range() {
    let b = Bench::new(19);
    let o = b.cli(&["--json", "check", "--data"]);
    assert!(o.status.success(), "clean before the damage");
    // Damage the first saved chunk: some snapshot reads it.
    let (data_off, _, _) = b.data;
    b.flip(data_off + 10, 0x40);
    let o = b.cli(&["--json", "check", "--data"]);
    assert_eq!(o.status.code(), Some(6));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let d = &v["check"]["damaged"];
    assert_eq!(d.as_array().map(|a| a.len()), Some(1), "{v}");
    assert_eq!(d[0]["store_chunk"], 0);
    assert!(
        d[0]["snapshots"].as_array().is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    // Plain check reads no data: it stays fast and says nothing of the damage.
    assert!(b.cli(&["check"]).status.success());
}
