//! The operations layer seen from outside: every command behaves the same with a server holding
//! the store and without one. Errors keep their kind, exit status and message through the
//! control socket; hooks run in the caller's process with its environment; prune and schedule
//! read the caller's configuration, never the server's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::bin;

/// A directory of stores and the servers started on them (killed on drop, whatever happens).
struct Lab {
    dir: tempfile::TempDir,
    servers: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Lab {
    fn new() -> Lab {
        Lab {
            dir: tempfile::tempdir().expect("tempdir"),
            servers: Vec::new(),
        }
    }

    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// An origin of `origin_mb` MiB and a store file of `store_mb` MiB named `name`.img.
    fn store(&self, name: &str, origin_mb: usize, store_mb: usize, on_full: &str) -> PathBuf {
        let img: Vec<u8> = (0..origin_mb << 20).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(self.p(&format!("{name}-origin.img")), img).expect("origin");
        std::fs::write(self.p(&format!("{name}.img")), vec![0u8; store_mb << 20]).expect("store");
        let o = self.run_in(
            self.dir.path(),
            &[],
            &[
                "-q",
                "init",
                &format!("{name}.img"),
                "--origin",
                &format!("{name}-origin.img"),
                "--on-full",
                on_full,
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        self.p(&format!("{name}.img"))
    }

    /// snapctl with SNAPCTL_RUN_DIR set and `env` added, in `cwd`.
    fn run_in(&self, cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(cwd)
            .env_remove("SNAPCTL_STORE")
            .env_remove("SNAPCTL_CONFIG")
            .env("SNAPCTL_RUN_DIR", self.p("run"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run snapctl")
    }

    fn run(&self, store: &Path, args: &[&str]) -> Output {
        let s = store.display().to_string();
        self.run_in(self.dir.path(), &[("SNAPCTL_STORE", &s)], args)
    }

    fn ok(&self, store: &Path, args: &[&str]) -> String {
        let o = self.run(store, args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `snapctl serve` on `store`, with `env` in the server's environment only.
    fn serve(&mut self, store: &Path, env: &[(&str, &str)]) {
        let name = store
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sock = self.p(&format!("{name}.sock"));
        let log = std::fs::File::create(self.p(&format!("{name}.serve.log"))).expect("log");
        let mut c = Command::new(bin());
        c.args(["serve", "--socket"])
            .arg(&sock)
            .current_dir("/")
            .env("SNAPCTL_STORE", store)
            .env("SNAPCTL_RUN_DIR", self.p("run"))
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        self.servers.push(c.spawn().expect("spawn serve"));
        assert!(
            snapctl::server::wait_for_socket(&sock, Duration::from_secs(10)),
            "the server did not start: {}",
            std::fs::read_to_string(self.p(&format!("{name}.serve.log"))).unwrap_or_default()
        );
        // The control socket comes up with the NBD one.
        let ctl = std::fs::read_dir(self.p("run"))
            .expect("run dir")
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "ctl"));
        assert!(ctl, "no control socket");
    }

    fn stop_servers(&mut self) {
        for mut c in self.servers.drain(..) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// (exit status, JSON error kind, message) of a failing command.
fn failure(o: &Output) -> (i32, String, String) {
    let v: Value = serde_json::from_slice(&o.stderr).unwrap_or(Value::Null);
    (
        o.status.code().unwrap_or(-1),
        v["error"]["kind"].as_str().unwrap_or("?").to_string(),
        v["error"]["message"].as_str().unwrap_or("?").to_string(),
    )
}

#[test]
fn every_error_keeps_its_kind_status_and_message_through_the_server() {
    let mut lab = Lab::new();
    // Small stores that fill up: 8 MiB origins, 2 MiB or so for copies.
    let inv = lab.store("inv", 8, 11, "invalidate");
    let full = lab.store("full", 8, 11, "fail-writes");
    for s in [&inv, &full] {
        lab.ok(s, &["-q", "create", "s1"]);
        lab.ok(s, &["-q", "create", "rw", "--writable"]);
    }
    std::fs::write(lab.p("big.bin"), vec![0x5au8; 6 << 20]).expect("input");
    // Fills `inv`: s1 and rw lose their copies and become invalid.
    let o = lab.run(&inv, &["write", "-i", "big.bin"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cases: Vec<(&PathBuf, Vec<&str>, i32, &str)> = vec![
        (&inv, vec!["show", "nope"], 3, "not-found"),
        (&inv, vec!["create", "a b"], 2, "invalid-argument"),
        (&inv, vec!["create", "s1"], 4, "already-exists"),
        (
            &inv,
            vec!["export", "s1", "-o", "out.img"],
            8,
            "snapshot-invalid",
        ),
        (&full, vec!["write", "-i", "big.bin"], 7, "no-space"),
        (
            &full,
            vec!["write", "--snapshot", "s1", "-i", "big.bin"],
            2,
            "invalid-argument",
        ),
        (&full, vec!["restore", "nope"], 3, "not-found"),
        (&full, vec!["diff", "s1", "nope"], 3, "not-found"),
        (&full, vec!["rename", "s1", "rw"], 4, "already-exists"),
    ];
    let mut alone = Vec::new();
    for (store, args, code, kind) in &cases {
        let mut a = vec!["--json"];
        a.extend(args);
        let f = failure(&lab.run(store, &a));
        assert_eq!(
            (f.0, f.1.as_str()),
            (*code, *kind),
            "{args:?} without a server: {f:?}"
        );
        alone.push(f);
    }
    lab.serve(&inv, &[]);
    lab.serve(&full, &[]);
    for ((store, args, _, _), want) in cases.iter().zip(&alone) {
        let mut a = vec!["--json"];
        a.extend(args);
        let got = failure(&lab.run(store, &a));
        assert_eq!(&got, want, "{args:?} through the server");
    }
    // Text mode: one line, the same one.
    let o = lab.run(&inv, &["show", "nope"]);
    let line = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.starts_with("snapctl: "), "{line}");
    lab.stop_servers();
}

#[test]
fn prune_and_hooks_read_the_callers_environment_not_the_servers() {
    let mut lab = Lab::new();
    let a = lab.store("a", 4, 16, "drop-oldest");
    let b = lab.store("b", 4, 16, "drop-oldest");
    for s in [&a, &b] {
        lab.ok(s, &["-q", "create", "old", "--expires", "1h"]);
        lab.ok(s, &["-q", "create", "keep"]);
    }
    let config = lab.p("snapctl.toml");
    std::fs::write(
        &config,
        format!(
            "[store.a]\npath = \"{}\"\n[[store.a.period]]\nname = \"hourly\"\nevery = \"1h\"\nkeep = 2\n\
             [store.b]\npath = \"{}\"\n[[store.b.period]]\nname = \"hourly\"\nevery = \"1h\"\nkeep = 2\n",
            a.display(),
            b.display()
        ),
    )
    .expect("config");
    let later = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let prune = |lab: &Lab| -> Value {
        let s = a.display().to_string();
        let c = config.display().to_string();
        let o = lab.run_in(
            lab.dir.path(),
            &[("SNAPCTL_STORE", &s), ("SNAPCTL_CONFIG", &c)],
            &["--json", "prune", "--dry-run", "--now", &later],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("json")
    };
    let alone = prune(&lab);
    assert_eq!(
        alone["stores"].as_array().map(|v| v.len()),
        Some(1),
        "{alone}"
    );
    // The server has a configuration naming both stores; the client's store alone counts.
    let c = config.display().to_string();
    lab.serve(&a, &[("SNAPCTL_CONFIG", &c)]);
    let served = prune(&lab);
    assert_eq!(served, alone);
    let s = a.display().to_string();
    let o = lab.run_in(
        lab.dir.path(),
        &[("SNAPCTL_STORE", &s)],
        &["-q", "prune", "--now", &later],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names = |st: &Path| lab.ok(st, &["list"]);
    assert!(!names(&a).contains("old"), "pruned in a");
    assert!(names(&b).contains("old"), "b untouched: {}", names(&b));

    // A hook runs in the caller's process, in its directory, with its environment.
    let work = lab.p("work");
    std::fs::create_dir(&work).expect("work dir");
    let child = Command::new(bin())
        .args([
            "create",
            "hooked",
            "--pre-hook",
            "echo $PPID > ppid; pwd > cwd; echo \"$MARK\" > mark",
            "--post-hook",
            "echo done > post",
        ])
        .current_dir(&work)
        .env("SNAPCTL_STORE", &a)
        .env("SNAPCTL_RUN_DIR", lab.p("run"))
        .env("MARK", "client-only")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn create");
    let pid = child.id();
    let o = child.wait_with_output().expect("create");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |f: &str| {
        std::fs::read_to_string(work.join(f))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(
        read("ppid"),
        pid.to_string(),
        "the hook's parent is the client"
    );
    assert_eq!(read("mark"), "client-only");
    assert_eq!(
        PathBuf::from(read("cwd")).canonicalize().ok(),
        work.canonicalize().ok()
    );
    assert_eq!(read("post"), "done");
    assert!(names(&a).contains("hooked"));
    // Relative paths are the caller's: export -o lands in the caller's directory.
    let o = Command::new(bin())
        .args(["-q", "export", "keep", "-o", "keep.img"])
        .current_dir(&work)
        .env("SNAPCTL_STORE", &a)
        .env("SNAPCTL_RUN_DIR", lab.p("run"))
        .output()
        .expect("export");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(work.join("keep.img"))
            .map(|m| m.len())
            .ok(),
        Some(4 << 20)
    );
    lab.stop_servers();
}
