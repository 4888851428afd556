//! Who may use the server's local sockets, and how they come to exist: the run directory and
//! socket modes (0700/0600, or 0710/0660 with `--group`), the peer-credential check on every
//! connection, what may be replaced at a socket's path, and the caps on live connections
//! (docs/DESIGN.md, "Local sockets").

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub(super) struct Access {
    pub(super) euid: u32,
    pub(super) group: Option<Group>,
}

#[derive(Clone, Debug)]
pub(super) struct Group {
    gid: u32,
    name: String,
}

impl Access {
    fn dir_mode(&self) -> u32 {
        if self.group.is_some() {
            0o710
        } else {
            0o700
        }
    }

    fn socket_mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    /// Whether the peer of an accepted connection may use the server.
    fn allows(&self, sock: &UnixStream, cred: &nix::sys::socket::UnixCredentials) -> bool {
        let uid = cred.uid();
        if uid == 0 || uid == self.euid {
            return true;
        }
        match &self.group {
            None => false,
            Some(g) => cred.gid() == g.gid || peer_groups(sock, cred.pid()).contains(&g.gid),
        }
    }

    /// "only root, uid 1000 and group disk may use this server"
    fn rule(&self) -> String {
        let mut who = vec!["root".to_string()];
        if self.euid != 0 {
            who.push(format!("uid {}", self.euid));
        }
        if let Some(g) = &self.group {
            who.push(format!("group {}", g.name));
        }
        let list = match who.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => who.join(""),
        };
        format!("only {list} may use this server")
    }
}

/// The peer's supplementary groups: SO_PEERGROUPS (as of connect), else `Groups:` in
/// /proc/PID/status. Empty when neither can be read.
fn peer_groups(sock: &UnixStream, pid: libc::pid_t) -> Vec<u32> {
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: buf holds len bytes; the kernel writes at most len bytes and sets len.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            buf.truncate(n.min(buf.len()));
            return buf;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= buf.len() {
            break;
        }
        buf.resize(n, 0);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the peer of `sock`, accepted on `path`, may use the server; logs one line when not.
pub(super) fn admit(sock: &UnixStream, path: &Path, access: &Access) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(sock, PeerCredentials) {
        Ok(cred) if access.allows(sock, &cred) => true,
        Ok(cred) => {
            eprintln!(
                "snapctl serve: refused a connection on {} from uid {} (pid {}): {}",
                path.display(),
                cred.uid(),
                cred.pid(),
                access.rule()
            );
            false
        }
        Err(e) => {
            eprintln!(
                "snapctl serve: refused a connection on {}: cannot read the peer's credentials ({e})",
                path.display()
            );
            false
        }
    }
}

/// `--group`: a group name or a numeric gid.
pub(super) fn resolve_group(spec: &str) -> Result<Group> {
    if let Ok(gid) = spec.parse::<u32>() {
        let name = group_entry(GroupKey::Gid(gid))?
            .map(|(_, n)| n)
            .unwrap_or_else(|| format!("gid {gid}"));
        return Ok(Group { gid, name });
    }
    match group_entry(GroupKey::Name(spec))? {
        Some((gid, name)) => Ok(Group { gid, name }),
        None => Err(Error::Invalid(format!(
            "--group '{spec}': no such group (give a group name or a numeric gid)"
        ))),
    }
}

#[derive(Clone, Copy)]
enum GroupKey<'a> {
    Name(&'a str),
    Gid(u32),
}

/// getgrnam_r / getgrgid_r: the group's gid and name, None when there is no such group.
fn group_entry(key: GroupKey) -> Result<Option<(u32, String)>> {
    let cname = match key {
        GroupKey::Name(n) => std::ffi::CString::new(n)
            .map_err(|_| Error::Invalid(format!("--group '{n}': no such group")))?,
        GroupKey::Gid(_) => std::ffi::CString::default(),
    };
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: a plain C struct; all-zero is a valid value to be overwritten.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::group = std::ptr::null_mut();
        // SAFETY: cname, grp, buf and res outlive the call; buf.len() is buf's size.
        let rc = unsafe {
            match key {
                GroupKey::Name(_) => libc::getgrnam_r(
                    cname.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut res,
                ),
                GroupKey::Gid(g) => {
                    libc::getgrgid_r(g, &mut grp, buf.as_mut_ptr(), buf.len(), &mut res)
                }
            }
        };
        if rc == libc::ERANGE && buf.len() < 1 << 22 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(Error::io(
                "--group: looking up the group",
                io::Error::from_raw_os_error(rc),
            ));
        }
        if res.is_null() || grp.gr_name.is_null() {
            return Ok(None);
        }
        // SAFETY: on success gr_name points at a NUL-terminated string inside buf.
        let n = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) }
            .to_string_lossy()
            .into_owned();
        return Ok(Some((grp.gr_gid, n)));
    }
}

/// Sets the process umask until dropped (the server binds its sockets before any worker runs).
struct Umask(libc::mode_t);

impl Umask {
    fn set(mask: libc::mode_t) -> Umask {
        // SAFETY: umask cannot fail.
        Umask(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(self.0) };
    }
}

/// Gives `path` the group and mode `access` asks for: the group first, then the mode, so the
/// path is never open to more than intended.
fn set_owner_mode(path: &Path, mode: u32, access: &Access) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(g) = &access.group {
        std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(|e| {
            Error::io(
                format!("{}: giving it to group {}", path.display(), g.name),
                e,
            )
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("{}: chmod {mode:o}", path.display()), e))
}

/// Creates `dir` and any missing parents, each with the run directory's mode (0700, or 0710
/// and group G with `--group`). Directories that exist are left alone.
pub(super) fn create_dirs(dir: &Path, access: &Access) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p);
        d = p.parent();
    }
    for p in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(p) {
            Ok(()) => set_owner_mode(p, access.dir_mode(), access)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(p.display().to_string(), e)),
        }
    }
    Ok(())
}

/// The run directory: created 0700 (0710, group G, with `--group`); if it exists it must be
/// ours, and gets that mode. One owned by another user is refused: whoever owns it could
/// replace the sockets in it.
pub(super) fn prepare_run_dir(dir: &Path, access: &Access) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    create_dirs(dir, access)?;
    let m = std::fs::metadata(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    if !m.is_dir() {
        return Err(Error::Invalid(format!(
            "run directory {} is not a directory; remove it or set SNAPCTL_RUN_DIR to another directory",
            dir.display()
        )));
    }
    if m.uid() != access.euid {
        return Err(Error::Invalid(format!(
            "run directory {} belongs to uid {}, not to this server's uid {}; remove it or set SNAPCTL_RUN_DIR to a directory of your own",
            dir.display(),
            m.uid(),
            access.euid
        )));
    }
    set_owner_mode(dir, access.dir_mode(), access)
}

/// Binds a unix socket at `path` (`what` names it in messages) with the mode `access` asks
/// for, from the first moment: it is bound under a umask of 0177 (0600), then given the group
/// and widened to 0660 with `--group`. A stale socket at `path` (nothing answers) is replaced;
/// one a live server answers on is refused (Busy), and anything that is not a socket — a
/// file, a directory, a symlink — is refused and never deleted (Exists, exit 4).
pub(super) fn bind_unix(path: &Path, what: &str, access: &Access) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::Busy(format!(
                    "{what} {} is in use by another server; stop it first",
                    path.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| {
                    Error::io(format!("removing the stale {what} {}", path.display()), e)
                })?;
            }
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "{what} {}: checking whether a server answers",
                        path.display()
                    ),
                    e,
                ))
            }
        },
        Ok(_) => {
            return Err(Error::Exists(format!(
                "{what} {} exists and is not a socket; remove it or choose another path",
                path.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("{what} {}", path.display()), e)),
    }
    let l = {
        let _mask = Umask::set(0o177);
        UnixListener::bind(path).map_err(|e| Error::io(format!("{what} {}", path.display()), e))?
    };
    if access.group.is_some() {
        if let Err(e) = set_owner_mode(path, access.socket_mode(), access) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    Ok(l)
}

/// Most NBD connections (unix and TCP together) and control connections served at once.
pub(super) const MAX_NBD_CONNECTIONS: usize = 64;
pub(super) const MAX_CONTROL_CONNECTIONS: usize = 32;

/// One live worker, counted in `live` until it is dropped.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A slot if fewer than `max` are taken; else logs that `on`'s new connection is refused.
    pub(super) fn take(live: &Arc<AtomicUsize>, max: usize, kind: &str, on: &str) -> Option<Slot> {
        // Only the accept loop takes slots, so the count cannot grow between load and add.
        if live.load(Ordering::SeqCst) >= max {
            eprintln!(
                "snapctl serve: refused a connection on {on}: already {max} {kind} connections, the most it serves at once"
            );
            return None;
        }
        live.fetch_add(1, Ordering::SeqCst);
        Some(Slot(live.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f` on a new thread; logs and returns None when no thread can be made.
pub(super) fn spawn_worker(
    f: impl FnOnce() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    match std::thread::Builder::new().spawn(f) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("snapctl serve: dropped a connection: cannot start a thread for it: {e}");
            None
        }
    }
}
