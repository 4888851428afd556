//! `snapctl serve`: the NBD listeners, the control socket through which every other snapctl
//! command reaches a served store ([`control`]), and a clean shutdown on SIGTERM/SIGINT.
//!
//! Paths (documented in snapctl-serve(1)): `$SNAPCTL_RUN_DIR` (default `/run/snapctl`), holding
//! `<uuid>.sock` (the default NBD socket) and `<uuid>.ctl` (the control socket), where `<uuid>`
//! is the store's uuid, which the CLI reads from the superblock to find a running server.

mod control;
pub mod nbd;
pub mod state;

use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ops::protocol::{control_path, default_socket};
use crate::signals;
use crate::store::{OpenOptions, Store};
use nbd::serve_connection;
use state::Shared;

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
    signals::install()?;
    let mut listeners = vec![
        Listener::Unix(bind_unix(&nbd_path)?),
        Listener::Control(bind_unix(&ctl_path)?),
    ];
    if let Some(addr) = tcp {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("listen {addr}"), e))?;
        listeners.push(Listener::Tcp(l));
    }
    let served_id = crate::io::file_id(store_path);
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
    while !signals::stop_requested() {
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
                        if let Err(e) = control::handle(&sh, s, served_id, &served_name) {
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
