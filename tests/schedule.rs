//! Scheduled snapshots, retention, expiry and consistent snapshots, as cron would run them.

use std::process::Command;

use serde_json::Value;

use crate::util::bin;

struct Sched {
    dir: tempfile::TempDir,
}

impl Sched {
    fn new(periods: &str) -> Sched {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("o.img"), vec![3u8; 4 << 20]).unwrap();
        std::fs::write(dir.path().join("s.img"), vec![0u8; 32 << 20]).unwrap();
        let s = Sched { dir };
        let cfg = format!("[store.db]\npath = \"{}\"\n{periods}", s.p("s.img"));
        std::fs::write(s.dir.path().join("c.toml"), cfg).unwrap();
        assert!(s
            .run(&["init", "s.img", "--origin", "o.img"])
            .status
            .success());
        s
    }
    fn p(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("SNAPCTL_CONFIG", self.p("c.toml"))
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .env_remove("SNAPCTL_STORE")
            .output()
            .unwrap()
    }
    fn json(&self, args: &[&str]) -> (i32, Value) {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        let v = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&o.stderr)));
        (o.status.code().unwrap_or(-1), v)
    }
    fn names(&self) -> Vec<String> {
        let (_, v) = self.json(&["-s", "s.img", "list"]);
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }
}

const HOURLY_DAILY: &str = "[[store.db.period]]\nname = \"hourly\"\nevery = \"1h\"\nkeep = 3\n\n[[store.db.period]]\nname = \"daily\"\nevery = \"1d\"\nretain = \"2d\"\n";

#[test]
fn schedule_run_takes_due_snapshots_once_and_prunes_by_retention() {
    let s = Sched::new(HOURLY_DAILY);
    let (code, v) = s.json(&["schedule", "run", "--now", "2026-11-22T08:05:00Z"]);
    assert_eq!(code, 0);
    let created: Vec<&str> = v["stores"][0]["created"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        created,
        ["hourly-20261122T080000Z", "daily-20261122T000000Z"]
    );
    // idempotent within the period
    let (_, v) = s.json(&["schedule", "run", "--now", "2026-11-22T08:55:00Z"]);
    assert!(v["stores"][0]["created"].as_array().unwrap().is_empty());
    // a manual snapshot is never pruned by a period
    assert!(s.run(&["-s", "s.img", "create", "manual"]).status.success());
    for h in 9..=12 {
        s.json(&[
            "schedule",
            "run",
            "--now",
            &format!("2026-11-22T{h:02}:01:00Z"),
        ]);
    }
    let names = s.names();
    let hourly: Vec<&String> = names.iter().filter(|n| n.starts_with("hourly-")).collect();
    assert_eq!(
        hourly,
        [
            "hourly-20261122T100000Z",
            "hourly-20261122T110000Z",
            "hourly-20261122T120000Z"
        ]
    );
    assert!(names.contains(&"manual".to_string()));
    // stamped with --now
    let (_, v) = s.json(&["-s", "s.img", "show", "hourly-20261122T120000Z"]);
    assert_eq!(v["snapshot"]["created"], "2026-11-22T12:01:00Z");
    assert_eq!(v["snapshot"]["labels"]["period"], "hourly");
    // after three days down: one catch-up per period, never a burst; old dailies beyond retain go
    let (_, v) = s.json(&["schedule", "run", "--now", "2026-11-25T07:30:00Z"]);
    let created = v["stores"][0]["created"].as_array().unwrap();
    assert_eq!(created.len(), 2);
    assert!(!s.names().contains(&"daily-20261122T000000Z".to_string()));
}

#[test]
fn a_dry_run_changes_nothing_and_status_flags_overdue_periods() {
    let s = Sched::new(HOURLY_DAILY);
    let before = std::fs::read(s.p("s.img")).unwrap();
    let (code, v) = s.json(&[
        "schedule",
        "run",
        "--dry-run",
        "--now",
        "2026-11-22T08:05:00Z",
    ]);
    assert_eq!(code, 0);
    assert_eq!(v["stores"][0]["created"].as_array().unwrap().len(), 2);
    assert!(
        std::fs::read(s.p("s.img")).unwrap() == before,
        "a dry run wrote to the store"
    );
    s.json(&["schedule", "run", "--now", "2026-11-22T08:05:00Z"]);
    let (code, v) = s.json(&["schedule", "status", "--now", "2026-11-22T08:30:00Z"]);
    assert_eq!(code, 0, "{v}");
    let (code, v) = s.json(&["schedule", "status", "--now", "2026-11-22T10:30:00Z"]);
    assert_eq!(code, 10);
    let hourly = v["periods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["period"] == "hourly")
        .unwrap()
        .clone();
    assert_eq!(hourly["overdue"], true);
    assert_eq!(hourly["newest"], "hourly-20261122T080000Z");
}

#[test]
fn concurrent_schedule_runs_take_each_snapshot_once() {
    let s = Sched::new(HOURLY_DAILY);
    let run = || {
        let d = s.dir.path().to_path_buf();
        std::thread::spawn(move || {
            Command::new(bin())
                .args(["schedule", "run", "--now", "2026-11-22T08:05:00Z"])
                .env("SNAPCTL_CONFIG", d.join("c.toml"))
                .env("SNAPCTL_LOCK_TIMEOUT", "30")
                .output()
                .unwrap()
        })
    };
    let (a, b) = (run(), run());
    assert!(a.join().unwrap().status.success());
    assert!(b.join().unwrap().status.success());
    assert_eq!(
        s.names(),
        ["hourly-20261122T080000Z", "daily-20261122T000000Z"]
    );
}

#[test]
fn prune_deletes_expired_snapshots_and_says_why_for_each() {
    let s = Sched::new(HOURLY_DAILY);
    s.run(&["-s", "s.img", "create", "short", "--expires", "1h"]);
    s.run(&["-s", "s.img", "create", "forever"]);
    let later = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let (code, v) = s.json(&["-s", "s.img", "prune", "--dry-run", "--now", &later]);
    assert_eq!(code, 0);
    let considered = v["stores"][0]["considered"].as_array().unwrap();
    let rule = |n: &str| considered.iter().find(|c| c["name"] == n).unwrap().clone();
    assert_eq!(rule("short")["delete"], true);
    assert!(rule("short")["rule"]
        .as_str()
        .unwrap()
        .starts_with("expired at"));
    assert_eq!(rule("forever")["rule"], "no expiry");
    assert_eq!(s.names(), ["short", "forever"]);
    s.json(&["-s", "s.img", "prune", "--now", &later]);
    assert_eq!(s.names(), ["forever"]);
}

#[test]
fn bad_configs_are_named_by_file_line_and_key() {
    let s = Sched::new("[[store.db.period]]\nname = \"hourly\"\nevery = \"sometimes\"\nkeep = 3\n");
    let o = s.run(&["schedule", "run"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("c.toml:5:") && e.contains("every"), "{e}");
    let o = Command::new(bin())
        .args(["schedule", "run", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn hooks_run_around_the_snapshot_and_a_failing_pre_hook_takes_none() {
    let s = Sched::new(HOURLY_DAILY);
    let o = s.run(&[
        "-s",
        "s.img",
        "create",
        "h1",
        "--pre-hook",
        "echo pre > pre.txt",
        "--post-hook",
        "echo post > post.txt",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::path::Path::new(&s.p("pre.txt")).exists()
            && std::path::Path::new(&s.p("post.txt")).exists()
    );
    let o = s.run(&[
        "-s",
        "s.img",
        "create",
        "h2",
        "--pre-hook",
        "exit 3",
        "--post-hook",
        "touch post2.txt",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no snapshot was taken"));
    assert!(!s.names().contains(&"h2".to_string()));
    assert!(
        !std::path::Path::new(&s.p("post2.txt")).exists(),
        "post-hook ran without a successful pre-hook"
    );
}

/// Needs root and a loop device: a mounted ext4 is frozen for the snapshot and always thawed.
#[test]
fn create_freezes_and_always_thaws() {
    if unsafe { libc::geteuid() } != 0 || Command::new("losetup").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and losetup");
        return;
    }
    let s = Sched::new(HOURLY_DAILY);
    std::fs::write(s.p("fs.img"), vec![0u8; 32 << 20]).unwrap();
    let dev = String::from_utf8(
        Command::new("losetup")
            .args(["--find", "--show", &s.p("fs.img")])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let mnt = s.p("mnt");
    std::fs::create_dir(&mnt).unwrap();
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("fsfreeze").args(["-u", &self.1]).output();
            let _ = Command::new("umount").arg(&self.1).output();
            let _ = Command::new("losetup").args(["-d", &self.0]).output();
        }
    }
    let _c = Cleanup(dev.clone(), mnt.clone());
    assert!(Command::new("mkfs.ext4")
        .args(["-q", &dev])
        .status()
        .unwrap()
        .success());
    assert!(Command::new("mount")
        .args([&dev, &mnt])
        .status()
        .unwrap()
        .success());
    // the pre-hook sees the file system not yet frozen; the post-hook sees it thawed
    let o = s.run(&[
        "-s",
        "s.img",
        "create",
        "frozen",
        "--freeze",
        &mnt,
        "--pre-hook",
        &format!("touch {mnt}/before"),
        "--post-hook",
        &format!("touch {mnt}/after"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::path::Path::new(&format!("{mnt}/after")).exists(),
        "not thawed after the snapshot"
    );
    // a snapshot that fails (the name exists) still thaws
    let o = s.run(&["-s", "s.img", "create", "frozen", "--freeze", &mnt]);
    assert_eq!(o.status.code(), Some(4));
    std::fs::write(format!("{mnt}/still-writable"), b"x").unwrap();
    // the store is busy for 3 s, the freeze may last 1 s: the watchdog thaws and says so
    use std::os::unix::io::AsRawFd;
    let lock = std::fs::File::open(s.p("s.img")).unwrap();
    // SAFETY: flock on a valid fd.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let o = Command::new(bin())
        .args([
            "-s",
            "s.img",
            "create",
            "slow",
            "--freeze",
            &mnt,
            "--freeze-timeout",
            "1s",
        ])
        .current_dir(s.dir.path())
        .env("SNAPCTL_LOCK_TIMEOUT", "3")
        .output()
        .unwrap();
    drop(lock);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("after the 1 s freeze timeout"), "{err}");
    std::fs::write(format!("{mnt}/writable-after-timeout"), b"x").unwrap();
    // SIGTERM during the freeze: thawed, and the run stops
    let lock = std::fs::File::open(s.p("s.img")).unwrap();
    // SAFETY: flock on a valid fd.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let child = Command::new(bin())
        .args(["-s", "s.img", "create", "sig", "--freeze", &mnt])
        .current_dir(s.dir.path())
        .env("SNAPCTL_LOCK_TIMEOUT", "20")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    drop(lock);
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("on a signal"));
    std::fs::write(format!("{mnt}/writable-after-signal"), b"x").unwrap();
    assert!(!s.names().contains(&"sig".to_string()));
    // not a mount point: a clear error
    let o = s.run(&["-s", "s.img", "create", "x", "--freeze", &s.p("")]);
    assert_ne!(o.status.code(), Some(0));
}
