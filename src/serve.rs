//! `snapctl serve`: the NBD listeners, the control socket through which every other snapctl
//! command reaches a served store, and a clean shutdown on SIGTERM/SIGINT.
//!
//! Paths (documented in snapctl-serve(1)): `$SNAPCTL_RUN_DIR` (default `/run/snapctl`), holding
//! `<uuid>.sock` (the default NBD socket) and `<uuid>.ctl` (the control socket), where `<uuid>`
//! is the store's uuid, which the CLI reads from the superblock to find a running server.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{Superblock, SUPERBLOCK_SIZE};
use crate::nbd::{serve_connection, Shared};
use crate::store::{OpenOptions, Store};

/// Where sockets live.
pub fn run_dir() -> PathBuf {
    std::env::var_os("SNAPCTL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/snapctl"))
}

pub fn control_path(sb: &Superblock) -> PathBuf {
    run_dir().join(format!("{}.ctl", sb.uuid_string()))
}

pub fn default_socket(sb: &Superblock) -> PathBuf {
    run_dir().join(format!("{}.sock", sb.uuid_string()))
}

/// Reads a store's superblock without locking it (a server may hold the lock).
pub fn peek_superblock(store: &Path) -> Option<Superblock> {
    let mut f = File::open(store).ok()?;
    let mut b = vec![0u8; SUPERBLOCK_SIZE];
    f.read_exact(&mut b).ok()?;
    Superblock::decode(&b, &store.display().to_string()).ok()
}

static SIGNALED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALED.store(true, Ordering::SeqCst);
}

/// Whether SIGTERM or SIGINT arrived since `install_signals`.
pub fn stop_requested() -> bool {
    SIGNALED.load(Ordering::SeqCst)
}

/// SIGTERM and SIGINT set a flag instead of killing the process; SIGPIPE is ignored.
pub fn install_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let sa = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &sa) }.map_err(|e| Error::io("signal handler", e.into()))?;
    }
    // A client that vanishes must not kill the server.
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: ignoring SIGPIPE.
    unsafe { sigaction(Signal::SIGPIPE, &ign) }
        .map_err(|e| Error::io("signal handler", e.into()))?;
    Ok(())
}

/// Binds a unix socket at `path`, replacing a stale one; refuses one a live server answers on.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Busy(format!(
                "{} is in use by another server; stop it first",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    }
    UnixListener::bind(path).map_err(|e| Error::io(format!("socket {}", path.display()), e))
}

pub struct ServeOptions {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub verbose: bool,
}

/// `--listen PORT` or `HOST:PORT`; without a host, 127.0.0.1.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr> {
    let with_host = if s.parse::<u16>().is_ok() {
        format!("127.0.0.1:{s}")
    } else if let Some(port) = s.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else {
        s.to_string()
    };
    with_host
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::Invalid(format!("--listen '{s}' is not HOST:PORT or PORT")))
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
    Control(UnixListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) | Listener::Control(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Runs the server until SIGTERM/SIGINT; then finishes in-flight requests, commits, exits.
pub fn serve(store_path: &Path, opts: ServeOptions) -> Result<()> {
    let store = Store::open(
        store_path,
        OpenOptions {
            write_origin: true,
            ..OpenOptions::default()
        },
    )?;
    let sb = store.sb.clone();
    let nbd_path = opts.socket.clone().unwrap_or_else(|| default_socket(&sb));
    let ctl_path = control_path(&sb);
    let tcp = opts.listen.as_deref().map(parse_listen).transpose()?;
    install_signals()?;
    let mut listeners = vec![
        Listener::Unix(bind_unix(&nbd_path)?),
        Listener::Control(bind_unix(&ctl_path)?),
    ];
    if let Some(addr) = tcp {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("listen {addr}"), e))?;
        listeners.push(Listener::Tcp(l));
    }
    let served_id = file_id(store_path);
    let served_name: Arc<str> = store_path.display().to_string().into();
    let shared = Arc::new(Shared::new(store, opts.verbose));
    let engine = shared.lock().map(|s| s.engine()).unwrap_or("?");
    eprintln!(
        "snapctl serve: serving {} (origin {}) on nbd+unix:///origin?socket={}{}; I/O engine {engine}",
        store_path.display(),
        sb.origin_path,
        nbd_path.display(),
        tcp.map(|a| format!(" and nbd://{a}/origin")).unwrap_or_default()
    );
    let mut workers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !SIGNALED.load(Ordering::SeqCst) {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n <= 0 {
            workers.retain(|w| !w.is_finished());
            continue;
        }
        for (l, p) in listeners.iter().zip(&fds) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let sh = shared.clone();
            let served_name = served_name.clone();
            let w = match l {
                Listener::Unix(l) => match l.accept() {
                    Ok((s, _)) => std::thread::spawn(move || {
                        if let Err(e) = serve_connection(&sh, s) {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                eprintln!("snapctl serve: connection closed: {e}");
                            }
                        }
                    }),
                    Err(_) => continue,
                },
                Listener::Tcp(l) => match l.accept() {
                    Ok((s, _)) => std::thread::spawn(move || {
                        let _ = s.set_nodelay(true);
                        if let Err(e) = serve_connection(&sh, s) {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                eprintln!("snapctl serve: connection closed: {e}");
                            }
                        }
                    }),
                    Err(_) => continue,
                },
                Listener::Control(l) => match l.accept() {
                    Ok((s, _)) => std::thread::spawn(move || {
                        if let Err(e) = handle_control(&sh, s, served_id, &served_name) {
                            eprintln!("snapctl serve: control request failed: {e}");
                        }
                    }),
                    Err(_) => continue,
                },
            };
            workers.push(w);
        }
    }
    eprintln!("snapctl serve: stopping: finishing in-flight requests");
    shared.shutdown.store(true, Ordering::SeqCst);
    drop(listeners);
    let _ = std::fs::remove_file(&ctl_path);
    let _ = std::fs::remove_file(&nbd_path);
    for w in workers {
        let _ = w.join();
    }
    let store = shared.lock()?;
    store.flush()?;
    drop(store);
    drop(shared); // closes the metadata cleanly
    eprintln!("snapctl serve: stopped");
    Ok(())
}

/// A command forwarded by the CLI.
#[derive(Serialize, Deserialize)]
struct ControlRequest {
    argv: Vec<String>,
    cwd: PathBuf,
    /// Which file or device the client means ([`file_id`]): a copy of a store has the same
    /// uuid, so the uuid alone would send a command for the copy to the served original.
    #[serde(default)]
    store_id: Option<(u64, u64)>,
    /// The store path as the client named it, for the message when it is not this server's.
    #[serde(default)]
    store_name: String,
}

/// What identifies a store: a block device by its device number, a file by device and inode.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    if m.file_type().is_block_device() {
        Some((u64::MAX, m.rdev()))
    } else {
        Some((m.dev(), m.ino()))
    }
}

#[derive(Serialize, Deserialize)]
pub struct ControlReply {
    pub code: i32,
    pub stdout: String,
    pub error: Option<(String, String)>,
}

fn send_frame(sock: &UnixStream, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let len = (body.len() as u32).to_le_bytes();
    let iov = [IoSlice::new(&len), IoSlice::new(body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cm: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let total = 4 + body.len();
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    if sent < total {
        // The rest without descriptors.
        let mut all = len.to_vec();
        all.extend_from_slice(body);
        (&*sock).write_all(&all[sent..])?;
    }
    Ok(())
}

fn recv_frame(sock: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut first = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut first)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just gave us these descriptors; we own them now.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if n < 4 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short control message",
        ));
    }
    let len = u32::from_le_bytes([first[0], first[1], first[2], first[3]]) as usize;
    if len > 16 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message too long",
        ));
    }
    let mut body = first[4..n].to_vec();
    if body.len() < len {
        let mut rest = vec![0u8; len - body.len()];
        (&*sock).read_exact(&mut rest)?;
        body.extend_from_slice(&rest);
    }
    body.truncate(len);
    Ok((body, fds))
}

fn handle_control(
    shared: &Arc<Shared>,
    sock: UnixStream,
    served_id: Option<(u64, u64)>,
    served_name: &str,
) -> io::Result<()> {
    let (body, mut fds) = recv_frame(&sock)?;
    let req: ControlRequest = serde_json::from_slice(&body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if req.store_id.is_none() || req.store_id != served_id {
        // Same uuid, another file: a copy of the store. Acting here would change the wrong one.
        let reply = ControlReply {
            code: 2,
            stdout: String::new(),
            error: Some((
                "invalid-argument".into(),
                format!(
                    "store {} has the same uuid as {served_name}, which `snapctl serve` is serving, but is another file or device (a copy?); stop that server, or give the copy a store of its own with `snapctl init`",
                    req.store_name
                ),
            )),
        };
        let body = serde_json::to_vec(&reply).map_err(io::Error::other)?;
        return send_frame(&sock, &body, &[]);
    }
    let stdout = if fds.len() >= 2 {
        Some(File::from(fds.remove(1)))
    } else {
        None
    };
    let stdin = if !fds.is_empty() {
        Some(File::from(fds.remove(0)))
    } else {
        None
    };
    let reply = crate::cli::run_forwarded(shared.clone(), req.argv, req.cwd, stdin, stdout);
    let body = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    send_frame(&sock, &body, &[])
}

/// If a server holds `store`, runs the command there: None when no server answers, an error
/// when one answered and then failed.
pub fn forward(store: &Path, argv: &[String]) -> Option<Result<ControlReply>> {
    let sb = peek_superblock(store)?;
    let sock = UnixStream::connect(control_path(&sb)).ok()?;
    let lost = |e: io::Error| Error::io("lost the connection to snapctl serve", e);
    let run = || -> Result<ControlReply> {
        let cwd = std::env::current_dir().map_err(|e| Error::io("current directory", e))?;
        let body = serde_json::to_vec(&ControlRequest {
            argv: argv.to_vec(),
            cwd,
            store_id: file_id(store),
            store_name: store.display().to_string(),
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        send_frame(&sock, &body, &[0, 1]).map_err(lost)?;
        let (reply, _) = recv_frame(&sock).map_err(lost)?;
        serde_json::from_slice(&reply)
            .map_err(|e| Error::Corrupt(format!("bad reply from the server: {e}")))
    };
    Some(run())
}

/// Waits until a server answers on `path` (for tests and scripts).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
