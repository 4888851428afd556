//! The server's side of the control protocol (docs/CONTROL.md, [`crate::ops::protocol`]): a
//! hello checked against the served store, then typed requests run by [`crate::ops::exec`] on
//! the store the NBD clients share. The server runs no program, opens no path a client names
//! and reads no client environment: data comes only through a descriptor the client passed.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::state::Shared;
use crate::error::Error;
use crate::ops::protocol::{self, Envelope, Hello, Message, Welcome};

/// How long a client may take to say hello, and to send the rest of a frame it started.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until the client sends something: true, or false when the server is stopping (a
/// client may stay connected and idle between requests, running its hooks).
fn wait_for_client(sock: &UnixStream, shared: &Shared) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        if shared.shutdown.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(false);
        }
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 200) };
        if n > 0 {
            return Ok(true);
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Serves one control connection until the client closes it or the server stops.
pub(crate) fn handle(
    shared: &Shared,
    sock: UnixStream,
    served_id: Option<(u64, u64)>,
    served_name: &str,
) -> io::Result<()> {
    // A frame, once started, must arrive whole in time; a silent client cannot hold a worker.
    sock.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let (hello, _) = protocol::recv::<Hello>(&sock, protocol::MAX_REQUEST)?;
    if hello.hello != protocol::MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a snapctl control client",
        ));
    }
    let refuse = |e: Error| {
        let w = Welcome::Refused { error: e.to_wire() };
        protocol::send(&sock, &w, None, protocol::MAX_REPLY)
    };
    if hello.version != protocol::VERSION {
        return refuse(Error::Invalid(format!(
            "this snapctl serve (snapctl {}) speaks control protocol {}, the client {}; use the same snapctl for both",
            env!("CARGO_PKG_VERSION"),
            protocol::VERSION,
            hello.version
        )));
    }
    if hello.store_id.is_none() || hello.store_id != served_id {
        // Same uuid, another file: a copy of the store. Acting here would change the wrong one.
        return refuse(Error::Invalid(format!(
            "store {} has the same uuid as {served_name}, which `snapctl serve` is serving, but is another file or device (a copy?); stop that server, or give the copy a store of its own with `snapctl init`",
            hello.store
        )));
    }
    protocol::send(
        &sock,
        &Welcome::Welcome {
            version: protocol::VERSION,
            server: env!("CARGO_PKG_VERSION").into(),
        },
        None,
        protocol::MAX_REPLY,
    )?;
    loop {
        if !wait_for_client(&sock, shared)? {
            return Ok(());
        }
        let (env, fds) = match protocol::recv::<Envelope>(&sock, protocol::MAX_REQUEST) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = env.id;
        let data = fds.into_iter().next().map(File::from);
        if env.request.takes_data() && data.is_none() {
            let e = Error::Invalid("this request needs a descriptor beside it".into());
            protocol::send(
                &sock,
                &Message::Err {
                    id,
                    error: e.to_wire(),
                },
                None,
                protocol::MAX_REPLY,
            )?;
            continue;
        }
        let mut last = Instant::now();
        let mut progress = |done: u64, total: u64| {
            if done == total || last.elapsed() >= Duration::from_millis(100) {
                last = Instant::now();
                // A client that stopped listening finds out from the reply.
                let progress = Message::Progress { id, done, total };
                let _ = protocol::send(&sock, &progress, None, protocol::MAX_REPLY);
            }
        };
        let run = std::panic::AssertUnwindSafe(|| {
            crate::ops::exec(shared, env.request, data, &mut progress)
        });
        let msg = match std::panic::catch_unwind(run) {
            Ok(Ok(reply)) => Message::Ok { id, reply },
            Ok(Err(e)) => Message::Err {
                id,
                error: e.to_wire(),
            },
            Err(_) => Message::Err {
                id,
                error: Error::Internal(
                    "internal error in the server; the store's metadata may be damaged: run `snapctl check`".into(),
                )
                .to_wire(),
            },
        };
        match protocol::send(&sock, &msg, None, protocol::MAX_REPLY) {
            // Too long to send (nothing was): say so, instead of leaving the client to find
            // the connection closed.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                let e = Error::Invalid(format!(
                    "the reply is larger than the control protocol allows ({} MiB) and was not sent, though the request was carried out; stop the server to run `list` without this limit",
                    protocol::MAX_REPLY >> 20
                ));
                let refusal = Message::Err {
                    id,
                    error: e.to_wire(),
                };
                protocol::send(&sock, &refusal, None, protocol::MAX_REPLY)?;
            }
            other => other?,
        }
    }
}
