//! [`Client`]: how a caller reaches a store. [`Local`] opens the store in this process;
//! [`Remote`] talks to the `snapctl serve` that holds it, through its control socket. [`connect`]
//! picks the right one, so every command behaves the same with a server running and without.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockWriteGuard};

use super::protocol::{self, Envelope, Hello, Message, Welcome};
use super::{exec, Access, Data, Host, Progress, Reply, Request};
use crate::error::{Error, Result};
use crate::store::{OpenOptions, Store};

/// Something that runs requests on one store.
pub trait Client {
    /// Runs `req` with `data` beside it (see [`Request::takes_data`]); `progress` hears
    /// (done, total) bytes of long operations.
    fn call(&mut self, req: Request, data: Data, progress: Progress<'_>) -> Result<Reply>;

    /// [`Client::call`] without data or progress.
    fn ask(&mut self, req: Request) -> Result<Reply> {
        self.call(req, None, &mut |_, _| {})
    }

    /// Whether requests run inside a server.
    fn remote(&self) -> bool;
}

/// The store's client: the server's when one holds it, else this process's.
pub fn connect(store: &Path, verbose: bool) -> Result<Box<dyn Client>> {
    match Remote::connect(store)? {
        Some(r) => Ok(Box::new(r)),
        None => Ok(Box::new(Local::new(store, verbose))),
    }
}

/// Opens the store for each request, with the access the request needs, and runs it here.
pub struct Local {
    path: PathBuf,
    verbose: bool,
}

impl Local {
    pub fn new(path: &Path, verbose: bool) -> Self {
        Local {
            path: path.to_path_buf(),
            verbose,
        }
    }
}

/// A store this process opened.
struct Own(RwLock<Store>);

impl Host for Own {
    fn lock(&self) -> Result<RwLockWriteGuard<'_, Store>> {
        self.0
            .write()
            .map_err(|_| Error::Corrupt("the store's lock was poisoned by a failed step".into()))
    }
}

impl Client for Local {
    fn call(&mut self, req: Request, data: Data, progress: Progress<'_>) -> Result<Reply> {
        let how = req.access();
        let store = Store::open(
            &self.path,
            OpenOptions {
                write_origin: how == Access::Write,
                exclusive_origin: how != Access::Read,
                // `check` reports a damaged superblock (and `--repair` rewrites it) instead of
                // refusing to open the store.
                for_check: matches!(req, Request::Check { .. }),
                // A create of the origin and a delete touch a few catalog rows, whatever the
                // number of snapshots: reading them all would make both grow with it.
                catalog_on_demand: match &req {
                    Request::Create(c) => c.from.is_none() && !c.writable,
                    Request::Delete { .. } => true,
                    _ => false,
                },
                ..OpenOptions::default()
            },
        )?;
        if self.verbose {
            eprintln!(
                "snapctl: store {} uses the {} engine; origin {} uses {}",
                self.path.display(),
                store.engine(),
                store.sb.origin_path,
                store.origin_engine()
            );
        }
        exec(&Own(RwLock::new(store)), req, data, progress)
    }

    fn remote(&self) -> bool {
        false
    }
}

/// A connection to the control socket of the server holding a store.
pub struct Remote {
    sock: UnixStream,
    next: u64,
}

impl Remote {
    /// The server holding `store`, if one answers on its control socket (found by the uuid in
    /// the store's superblock); an error when it answers but refuses this store.
    pub fn connect(store: &Path) -> Result<Option<Remote>> {
        let Some(sb) = crate::store::peek_superblock(store) else {
            return Ok(None);
        };
        let Ok(sock) = UnixStream::connect(protocol::control_path(&sb)) else {
            return Ok(None);
        };
        let hello = Hello {
            hello: protocol::MAGIC.into(),
            version: protocol::VERSION,
            store: store.display().to_string(),
            store_id: crate::io::file_id(store),
        };
        let refused = |e: std::io::Error| {
            Error::io(
                format!(
                    "the snapctl serve holding {} closed the connection without answering (it admits only root, its own user and its --group; its log says why)",
                    store.display()
                ),
                aborted(e),
            )
        };
        protocol::send(&sock, &hello, None, protocol::MAX_REQUEST).map_err(refused)?;
        match protocol::recv::<Welcome>(&sock, protocol::MAX_REPLY).map_err(refused)?.0 {
            Welcome::Welcome { version, .. } if version == protocol::VERSION => {
                Ok(Some(Remote { sock, next: 1 }))
            }
            Welcome::Welcome { version, server } => Err(Error::Invalid(format!(
                "the snapctl serve holding {} (snapctl {server}) speaks control protocol {version}, this snapctl {}; use the same snapctl for both",
                store.display(),
                protocol::VERSION
            ))),
            Welcome::Refused { error } => Err(Error::from_wire(error)),
        }
    }
}

fn lost(e: std::io::Error) -> Error {
    Error::io("lost the connection to snapctl serve", aborted(e))
}

/// A broken control connection is an error of its own, never mistaken for a reader of stdout
/// that stopped early (EPIPE).
fn aborted(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e.to_string())
    } else {
        e
    }
}

impl Client for Remote {
    fn call(&mut self, req: Request, data: Data, progress: Progress<'_>) -> Result<Reply> {
        let id = self.next;
        self.next += 1;
        let env = Envelope { id, request: req };
        protocol::send(
            &self.sock,
            &env,
            data.as_ref().map(|f| f.as_raw_fd()),
            protocol::MAX_REQUEST,
        )
        .map_err(lost)?;
        drop(data);
        loop {
            let (m, _) =
                protocol::recv::<Message>(&self.sock, protocol::MAX_REPLY).map_err(lost)?;
            match m {
                Message::Progress { id: i, done, total } if i == id => progress(done, total),
                Message::Ok { id: i, reply } if i == id => return Ok(reply),
                Message::Err { id: i, error } if i == id => return Err(Error::from_wire(error)),
                _ => {
                    return Err(Error::Corrupt(format!(
                        "snapctl serve answered another request than {id}"
                    )))
                }
            }
        }
    }

    fn remote(&self) -> bool {
        true
    }
}
