//! `snapctl serve`: the NBD listeners, the control socket through which every other snapctl
//! command reaches a served store ([`control`]), and a clean shutdown on SIGTERM/SIGINT.
//!
//! Paths (documented in snapctl-serve(1)): `$SNAPCTL_RUN_DIR` (default `/run/snapctl`), holding
//! `<uuid>.sock` (the default NBD socket) and `<uuid>.ctl` (the control socket), where `<uuid>`
//! is the store's uuid, which the CLI reads from the superblock to find a running server.
//! Only root, the server's euid and `--group`'s members may use them ([`sockets`]).

pub(crate) mod control;
pub mod nbd;
mod sockets;
pub mod state;
pub mod tls;

use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ops::protocol::{control_path, default_socket, run_dir};
use crate::signals;
use crate::store::{OpenOptions, Store, Writeback};
use nbd::serve_connection;
use sockets::{
    admit, bind_unix, create_dirs, prepare_run_dir, resolve_group, spawn_worker, Access, Slot,
    MAX_CONTROL_CONNECTIONS, MAX_NBD_CONNECTIONS,
};
use state::Shared;

pub struct ServeOptions {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    /// `--tls-cert` and `--tls-key` (with `--tls-client-ca`, if given).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// `--no-tls`: plain NBD on `--listen`, allowed on a loopback address only.
    pub no_tls: bool,
    /// `--group`: a group name or gid whose members may use the sockets too.
    pub group: Option<String>,
    /// `--cache`: the store's memory for metadata (see `OpenOptions::cache_bytes`).
    pub cache_bytes: usize,
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

/// Where to listen on TCP, and with which TLS configuration (none: plain NBD).
type TcpSetup = (
    Option<std::net::SocketAddr>,
    Option<Arc<rustls::ServerConfig>>,
);

/// The checked `--listen` and TLS options: the address to listen on, and the TLS configuration
/// it requires (none with `--no-tls`, which only a loopback address may have). Reads the
/// certificate and key files, so a bad one is refused before anything else happens.
fn tcp_options(opts: &ServeOptions) -> Result<TcpSetup> {
    let any_tls = opts.tls_cert.is_some() || opts.tls_key.is_some() || opts.tls_client_ca.is_some();
    let Some(listen) = opts.listen.as_deref() else {
        let given: Vec<&str> = [
            (opts.tls_cert.is_some(), "--tls-cert"),
            (opts.tls_key.is_some(), "--tls-key"),
            (opts.tls_client_ca.is_some(), "--tls-client-ca"),
            (opts.no_tls, "--no-tls"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, flag)| *flag)
        .collect();
        if let Some((last, init)) = given.split_last() {
            let (what, them) = if init.is_empty() {
                (format!("{last} is"), "it")
            } else {
                (format!("{} and {last} are", init.join(", ")), "them")
            };
            return Err(Error::Invalid(format!(
                "{what} only for TCP: add --listen HOST:PORT, or leave {them} out (the unix socket is plain NBD, protected by its permissions)"
            )));
        }
        return Ok((None, None));
    };
    if opts.no_tls && any_tls {
        return Err(Error::Invalid(
            "--no-tls and --tls-cert/--tls-key/--tls-client-ca contradict each other: give one or the other".into(),
        ));
    }
    let addr = parse_listen(listen)?;
    if opts.no_tls {
        if !addr.ip().is_loopback() {
            return Err(Error::Invalid(format!(
                "--no-tls is only allowed on a loopback address (127.0.0.0/8 or ::1), not {addr}: anyone who can reach it could read and write the origin and every snapshot; give --tls-cert and --tls-key instead"
            )));
        }
        return Ok((Some(addr), None));
    }
    let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) else {
        let msg = match (&opts.tls_cert, &opts.tls_key) {
            (Some(_), None) => "--tls-cert needs --tls-key too (the certificate's private key, PEM)".to_string(),
            (None, Some(_)) => "--tls-key needs --tls-cert too (the server's certificate chain, PEM)".to_string(),
            _ if opts.tls_client_ca.is_some() => "--tls-client-ca needs --tls-cert and --tls-key too (the server's certificate chain and its private key, PEM)".to_string(),
            _ => format!("--listen {listen} serves NBD over TCP, which needs TLS: give --tls-cert FILE and --tls-key FILE (PEM), or --no-tls to serve plain NBD on a loopback address"),
        };
        return Err(Error::Invalid(msg));
    };
    let config = tls::load(&tls::TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: opts.tls_client_ca.clone(),
    })?;
    Ok((Some(addr), Some(config)))
}

/// Runs the server until SIGTERM/SIGINT; then finishes in-flight requests, commits, exits.
///
/// Long on purpose: arguments, sockets, the accept loop and the shutdown are one sequence whose
/// order matters (refuse before touching anything; stop accepting before draining workers).
pub fn serve(store_path: &Path, opts: ServeOptions) -> Result<()> {
    // Arguments first: a refusal touches nothing.
    let (tcp, tls) = tcp_options(&opts)?;
    let access = Access {
        // SAFETY: geteuid cannot fail.
        euid: unsafe { libc::geteuid() },
        group: opts.group.as_deref().map(resolve_group).transpose()?,
    };
    let mut store = Store::open(
        store_path,
        OpenOptions {
            write_origin: true,
            cache_bytes: opts.cache_bytes,
            ..OpenOptions::default()
        },
    )?;
    // Origin writes queued behind the flush of their copies (store/writeback.rs), unless
    // SNAPCTL_PIPELINE=0 asks for each batch to be written before it is answered.
    if std::env::var_os("SNAPCTL_PIPELINE").is_none_or(|v| v != "0") {
        store.pipeline_writes(true)?;
    }
    let sb = store.sb.clone();
    let nbd_path = opts.socket.clone().unwrap_or_else(|| default_socket(&sb));
    let ctl_path = control_path(&sb);
    signals::install()?;
    prepare_run_dir(&run_dir(), &access)?;
    if let Some(dir) = nbd_path.parent() {
        create_dirs(dir, &access)?;
    }
    let what = if opts.socket.is_some() {
        "--socket"
    } else {
        "NBD socket"
    };
    let nbd = bind_unix(&nbd_path, what, &access)?;
    let ctl = match bind_unix(&ctl_path, "control socket", &access) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&nbd_path);
            return Err(e);
        }
    };
    let mut listeners = vec![Listener::Unix(nbd), Listener::Control(ctl)];
    if let Some(addr) = tcp {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(Listener::Tcp(l)),
            Err(e) => {
                let _ = std::fs::remove_file(&nbd_path);
                let _ = std::fs::remove_file(&ctl_path);
                return Err(Error::io(format!("listen {addr}"), e));
            }
        }
    }
    let served_id = crate::io::file_id(store_path);
    let served_name: Arc<str> = store_path.display().to_string().into();
    let shared = Arc::new(Shared::new(store, opts.verbose));
    let engine = shared.lock().map(|s| s.engine()).unwrap_or("?");
    eprintln!(
        "snapctl serve: serving {} (origin {}) on nbd+unix:///origin?socket={}{}; I/O engine {engine}; metadata cache {}",
        store_path.display(),
        sb.origin_path,
        nbd_path.display(),
        match (tcp, &tls) {
            (Some(a), Some(_)) => format!(" and nbds://{a}/origin (TLS)"),
            (Some(a), None) => format!(" and nbd://{a}/origin (no TLS)"),
            _ => String::new(),
        },
        crate::names::human_bytes(opts.cache_bytes as u64)
    );
    let nbd_live = Arc::new(AtomicUsize::new(0));
    let ctl_live = Arc::new(AtomicUsize::new(0));
    let nbd_name = nbd_path.display().to_string();
    let ctl_name = ctl_path.display().to_string();
    let tcp_name = tcp.map(|a| format!("nbd://{a}")).unwrap_or_default();
    // SNAPCTL_PIPELINE=held: staged writes wait for whatever settles them next (tests).
    let preserver = match std::env::var_os("SNAPCTL_PIPELINE").is_some_and(|v| v == "held") {
        true => None,
        false => start_preserver(&shared)?,
    };
    let mut workers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !signals::stop_requested() {
        workers.retain(|w| !w.is_finished());
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
            continue;
        }
        for (l, p) in listeners.iter().zip(&fds) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let sh = shared.clone();
            let served_name = served_name.clone();
            // Each arm accepts, checks the peer and the cap (dropping the connection closes
            // it), and starts a worker holding its slot until it ends.
            let w = match l {
                Listener::Unix(l) => {
                    let Ok((s, _)) = l.accept() else { continue };
                    if !admit(&s, &nbd_path, &access) {
                        continue;
                    }
                    let Some(slot) = Slot::take(&nbd_live, MAX_NBD_CONNECTIONS, "NBD", &nbd_name)
                    else {
                        continue;
                    };
                    spawn_worker(move || {
                        let _slot = slot;
                        if let Err(e) = serve_connection(&sh, s) {
                            if e.kind() != io::ErrorKind::UnexpectedEof && !nbd::stopping(&e) {
                                eprintln!("snapctl serve: connection closed: {e}");
                            }
                        }
                    })
                }
                Listener::Tcp(l) => {
                    let Ok((s, _)) = l.accept() else { continue };
                    let Some(slot) = Slot::take(&nbd_live, MAX_NBD_CONNECTIONS, "NBD", &tcp_name)
                    else {
                        continue;
                    };
                    let tls = tls.clone();
                    spawn_worker(move || {
                        let _slot = slot;
                        let _ = s.set_nodelay(true);
                        let r = match &tls {
                            Some(config) => tls::serve_connection(&sh, s, config),
                            None => serve_connection(&sh, s),
                        };
                        if let Err(e) = r {
                            if e.kind() != io::ErrorKind::UnexpectedEof && !nbd::stopping(&e) {
                                eprintln!("snapctl serve: connection closed: {e}");
                            }
                        }
                    })
                }
                Listener::Control(l) => {
                    let Ok((s, _)) = l.accept() else { continue };
                    if !admit(&s, &ctl_path, &access) {
                        continue;
                    }
                    let Some(slot) =
                        Slot::take(&ctl_live, MAX_CONTROL_CONNECTIONS, "control", &ctl_name)
                    else {
                        continue;
                    };
                    spawn_worker(move || {
                        let _slot = slot;
                        if let Err(e) = control::handle(&sh, s, served_id, &served_name) {
                            eprintln!("snapctl serve: control request failed: {e}");
                        }
                    })
                }
            };
            workers.extend(w);
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
    if let Some((wb, t)) = preserver {
        wb.end_staging();
        let _ = t.join();
    }
    let mut store = shared.lock()?;
    store.flush()?;
    drop(store);
    drop(shared); // closes the metadata cleanly
    if let Some(table) = crate::profile::report() {
        eprint!("{table}");
    }
    eprintln!("snapctl serve: stopped");
    Ok(())
}

/// The preserver: for a pipelined store, a thread that preserves the origin writes the
/// connections staged and answered (see `store/writeback.rs`), taking the store alone for each
/// settle, while the connections go on reading and staging requests. Ends at
/// `Writeback::end_staging`.
fn start_preserver(
    shared: &Arc<Shared>,
) -> Result<Option<(Arc<Writeback>, std::thread::JoinHandle<()>)>> {
    let Some((wb, _)) = shared.lock()?.stage() else {
        return Ok(None);
    };
    let (sh, w) = (shared.clone(), wb.clone());
    let t = std::thread::Builder::new()
        .name("snapctl-preserve".into())
        .spawn(move || {
            while w.wait_staged() {
                let Ok(mut store) = sh.lock() else { return };
                // The queue has stopped and says so to every later flush and read of what it
                // lost; the log says why.
                if let Err(e) = store.settle_staged() {
                    eprintln!("snapctl serve: answered writes lost: {e}");
                }
            }
        })
        .map_err(|e| Error::io("preserver thread: start".to_string(), e))?;
    Ok(Some((wb, t)))
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
