//! A consistent snapshot: pre-hook, freeze, create, thaw, post-hook. Hooks and freezes run in
//! the caller's process, with its rights and its environment; the snapshot itself is one
//! `create` request to whatever [`Client`] holds the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Client, CreateSpec, Request, Response};
use crate::error::{Error, Result};
use crate::store::Snapshot;

/// Runs `cmd` with `/bin/sh -c`, in a process group of its own so that everything it started
/// can be ended with it: after `timeout` seconds (a hook that hangs must not hold up the
/// snapshot, or a cron run, forever), or when SIGINT or SIGTERM reaches snapctl (the hook gets
/// the same signal, then snapctl says so and exits 128 + the signal). Its stdin is empty.
pub fn run_hook(what: &str, cmd: &str, timeout: i64) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let no_snapshot = if what == "pre-hook" {
        "; no snapshot was taken"
    } else {
        ""
    };
    let catch = super::catch::Catch::new();
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io(format!("{what} '{cmd}'"), e))?;
    let group = -(child.id() as i32);
    let start = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| Error::io(format!("{what} '{cmd}'"), e))?
        {
            break st;
        }
        if let Some(sig) = catch.caught() {
            // SAFETY: signalling the hook's own process group.
            unsafe { libc::kill(group, sig as i32) };
            let _ = child.wait();
            eprintln!(
                "snapctl: {what} '{cmd}' stopped by {}{no_snapshot}",
                sig.as_str()
            );
            std::process::exit(128 + sig as i32);
        }
        if start.elapsed().as_secs_f64() >= timeout as f64 {
            // SAFETY: killing the hook's own process group.
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = child.wait();
            return Err(Error::Invalid(format!(
                "{what} '{cmd}' did not finish within {timeout} s and was killed (if it needs longer, raise --hook-timeout, or hook_timeout in the configuration){no_snapshot}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if st.success() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} '{cmd}' failed ({st}){no_snapshot}"
        )))
    }
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Frozen file systems, thawed on drop, on SIGINT/SIGTERM, or when the timeout passes.
struct Frozen {
    mounts: Arc<std::sync::Mutex<Vec<(PathBuf, std::fs::File)>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

fn thaw_all(mounts: &std::sync::Mutex<Vec<(PathBuf, std::fs::File)>>, why: &str) {
    use std::os::unix::io::AsRawFd;
    if let Ok(mut m) = mounts.lock() {
        for (p, f) in m.drain(..) {
            // SAFETY: FITHAW on a directory fd we opened.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), FITHAW as _, 0) };
            if r != 0 {
                eprintln!(
                    "snapctl: could not thaw {}: {}",
                    p.display(),
                    std::io::Error::last_os_error()
                );
            } else if !why.is_empty() {
                eprintln!("snapctl: thawed {} {why}", p.display());
            }
        }
    }
}

/// The mount points of this process's mount namespace (`/proc/self/mountinfo`, field 5, with
/// its octal escapes for blanks undone).
fn mount_points() -> Option<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some(
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|m| {
                PathBuf::from(
                    m.replace("\\040", " ")
                        .replace("\\011", "\t")
                        .replace("\\012", "\n")
                        .replace("\\134", "\\"),
                )
            })
            .collect(),
    )
}

/// The file system (device number) whose writes the store waits on: a store file's, or for a
/// loop device the file behind it. None for another block device.
fn store_fs(store: &Path) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(store).ok()?;
    if m.is_file() {
        return Some(m.dev());
    }
    if !m.file_type().is_block_device() {
        return None;
    }
    let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    let backing =
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"))
            .ok()?;
    std::fs::metadata(backing.trim()).ok().map(|b| b.dev())
}

/// Refuses, before anything is frozen, what cannot work: a path that does not exist, one that
/// is not a mount point (FIFREEZE would freeze whatever file system holds it, `/` perhaps), and
/// the file system the store itself is written to (the snapshot would wait on the freeze).
fn check_freezable(paths: &[PathBuf], store: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mounts = mount_points();
    for p in paths {
        let m = std::fs::metadata(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!(
                "--freeze {}: no such directory; give the mount point of the file system to freeze",
                p.display()
            )),
            _ => Error::io(format!("--freeze {}", p.display()), e),
        })?;
        let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if mounts.as_ref().is_some_and(|ms| !ms.contains(&abs)) {
            return Err(Error::Invalid(format!(
                "--freeze {} is not a mount point (freezing it would freeze the whole file system it is on); give the mount point of the file system to freeze",
                p.display()
            )));
        }
        if store_fs(store) == Some(m.dev()) {
            return Err(Error::Invalid(format!(
                "--freeze {}: the store {} is on that file system, and a frozen store cannot take the snapshot; keep the store on another file system",
                p.display(),
                store.display()
            )));
        }
    }
    Ok(())
}

impl Frozen {
    fn freeze(paths: &[PathBuf], timeout: i64, store: &Path) -> Result<Frozen> {
        use std::os::unix::io::AsRawFd;
        use std::sync::atomic::{AtomicBool, Ordering};
        check_freezable(paths, store)?;
        crate::signals::install()?;
        let mounts = Arc::new(std::sync::Mutex::new(Vec::new()));
        for p in paths {
            let f = std::fs::File::open(p)
                .map_err(|e| Error::io(format!("--freeze {}", p.display()), e))?;
            // SAFETY: FIFREEZE on a directory fd we opened.
            if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
                let e = std::io::Error::last_os_error();
                thaw_all(&mounts, "");
                return Err(match e.raw_os_error() {
                    Some(libc::EBUSY) => Error::Busy(format!(
                        "--freeze {}: already frozen by someone else; wait until it is thawed (fsfreeze -u {})",
                        p.display(),
                        p.display()
                    )),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
                        Error::Invalid(format!(
                            "--freeze {}: not the mount point of a file system that can be frozen",
                            p.display()
                        ))
                    }
                    _ => Error::io(format!("--freeze {}", p.display()), e),
                });
            }
            if let Ok(mut m) = mounts.lock() {
                m.push((p.clone(), f));
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let (m2, d2, t2) = (mounts.clone(), done.clone(), timed_out.clone());
        let start = std::time::Instant::now();
        let watchdog = std::thread::spawn(move || {
            while !d2.load(Ordering::SeqCst) {
                if crate::signals::stop_requested() {
                    thaw_all(&m2, "on a signal; no snapshot was taken");
                    std::process::exit(130);
                }
                if start.elapsed().as_secs_f64() >= timeout as f64 {
                    t2.store(true, Ordering::SeqCst);
                    thaw_all(&m2, &format!("after the {timeout} s freeze timeout"));
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        Ok(Frozen {
            mounts,
            done,
            timed_out,
            watchdog: Some(watchdog),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        thaw_all(&self.mounts, "");
    }
}

/// What to do around a snapshot.
#[derive(Debug, Clone, Default)]
pub struct Around {
    /// Mount points to freeze while the snapshot is taken.
    pub freeze: Vec<PathBuf>,
    /// Seconds after which the file systems are thawed whatever happens.
    pub freeze_timeout: i64,
    /// Seconds after which a hook still running is killed.
    pub hook_timeout: i64,
    pub pre_hook: Option<String>,
    pub post_hook: Option<String>,
}

impl Around {
    pub fn is_empty(&self) -> bool {
        self.freeze.is_empty() && self.pre_hook.is_none() && self.post_hook.is_none()
    }
}

/// pre-hook, freeze, create, thaw, post-hook: the thaw and the post-hook happen whatever the
/// outcome once the pre-hook succeeded. `quiet` keeps a failed post-hook's line off stderr when
/// the create failed too (the create's error is the one returned). Returns the new snapshot
/// and the store's chunk size.
pub fn create(
    client: &mut dyn Client,
    store: &Path,
    spec: CreateSpec,
    around: &Around,
    quiet: bool,
) -> Result<(Snapshot, u64)> {
    if let Some(cmd) = &around.pre_hook {
        run_hook("pre-hook", cmd, around.hook_timeout)?;
    }
    let timeout = around.freeze_timeout;
    let result = (|| {
        let frozen = if around.freeze.is_empty() {
            None
        } else {
            Some(Frozen::freeze(&around.freeze, timeout, store)?)
        };
        let r = client
            .ask(Request::Create(spec))
            .and_then(|reply| match reply.response {
                Response::Snapshot {
                    snapshot,
                    chunk_size,
                } => Ok((snapshot, chunk_size)),
                other => Err(Error::Corrupt(format!(
                    "create was answered with {other:?}"
                ))),
            });
        if let Some(f) = frozen {
            let late = f.timed_out.load(std::sync::atomic::Ordering::SeqCst);
            drop(f);
            if late {
                return Err(Error::io(
                    format!(
                        "the freeze timed out ({timeout} s) before the snapshot was taken{}",
                        r.as_ref()
                            .map(|(s, _)| format!("; snapshot '{}' may not be consistent", s.name))
                            .unwrap_or_default()
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
        }
        r
    })();
    if let Some(cmd) = &around.post_hook {
        if let Err(e) = run_hook("post-hook", cmd, around.hook_timeout) {
            return match result {
                Ok((s, _)) => Err(Error::Invalid(format!(
                    "{e}; snapshot '{}' was taken",
                    s.name
                ))),
                Err(orig) => {
                    if !quiet {
                        eprintln!("snapctl: {e}");
                    }
                    Err(orig)
                }
            };
        }
    }
    result
}
