//! TLS on the TCP listener: `serve --listen` with `--tls-cert`/`--tls-key` (and optionally
//! `--tls-client-ca`), in the NBD protocol's FORCEDTLS mode (doc/proto.md, "TLS support").
//!
//! A TCP connection starts in plaintext: the greeting, then options. Until the client sends
//! NBD_OPT_STARTTLS every other option is refused ([`nbd::TlsMode::Required`]). STARTTLS is
//! acknowledged, the TLS handshake runs on the socket ([`handshake`]), and option haggling then
//! starts afresh inside TLS.
//!
//! The NBD code reads and writes its stream from two threads at once (a request reader and a
//! reply writer), and a rustls connection is one state machine that cannot be split that way.
//! So TLS ends in a relay thread ([`relay`]): it owns the TCP socket and the rustls connection
//! and copies plaintext to and from one end of a `UnixStream::pair()`; the NBD code runs
//! unchanged on the other end, as on the unix socket. The relay is non-blocking in both
//! directions (poll), with bounded buffers: a client that stops reading replies holds the
//! replies back (the NBD side blocks on a full socket), never memory.
//!
//! X.509 certificates only: rustls has no TLS-PSK (docs/DESIGN.md, "TLS on TCP").

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{InconsistentKeys, RootCertStore, ServerConfig, ServerConnection};

use super::nbd::{self, Ended, TlsMode};
use super::state::Shared;
use crate::error::{Error, Result};

/// The PEM files `serve` was given.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// `--tls-cert`: the server's certificate, then any intermediates.
    pub cert: PathBuf,
    /// `--tls-key`: the certificate's private key.
    pub key: PathBuf,
    /// `--tls-client-ca`: clients must present a certificate signed by one of these.
    pub client_ca: Option<PathBuf>,
}

/// A PEM file larger than this is not one of ours (and /dev/zero must not hang the start).
const MAX_PEM: u64 = 1 << 20;
/// A TCP client has this long for each read of the plaintext phase (greeting and options up to
/// NBD_OPT_STARTTLS), and again for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Once the NBD side has finished, the relay has this long to deliver the last replies.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The relay's buffer for each direction.
const RELAY_BUF: usize = 64 << 10;

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>> {
    let shown = path.display();
    let f = File::open(path)
        .map_err(|e| Error::Invalid(format!("{flag} {shown}: cannot open it: {e}")))?;
    let mut buf = Vec::new();
    f.take(MAX_PEM + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::Invalid(format!("{flag} {shown}: cannot read it: {e}")))?;
    if buf.len() as u64 > MAX_PEM {
        return Err(Error::Invalid(format!(
            "{flag} {shown}: larger than 1 MiB, so not a PEM file; give a PEM file"
        )));
    }
    Ok(buf)
}

fn pem_error(flag: &str, path: &Path, what: &str, e: pem::Error) -> Error {
    Error::Invalid(format!(
        "{flag} {}: not a valid PEM file ({e}); give {what} in PEM form",
        path.display()
    ))
}

fn certificates(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let what = "the certificate(s)";
    let pem = read_pem(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(flag, path, what, e))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{flag} {}: no certificate in it; give {what} in PEM form (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    let what = "the private key";
    let pem = read_pem(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => Error::Invalid(format!(
            "{flag} {}: no private key in it; give {what} in PEM form (-----BEGIN PRIVATE KEY-----, or RSA or EC PRIVATE KEY)",
            path.display()
        )),
        e => pem_error(flag, path, what, e),
    })
}

/// Loads and checks the certificate, key and client CA: every refusal is one line naming the
/// file, before any socket exists.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS set-up: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("--tls-client-ca", ca)? {
                roots.add(c).map_err(|e| {
                    Error::Invalid(format!(
                        "--tls-client-ca {}: a certificate in it cannot be used as a CA ({e}); give the PEM certificate of the CA that signs client certificates",
                        ca.display()
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    Error::Invalid(format!(
                        "--tls-client-ca {}: cannot verify clients with it ({e})",
                        ca.display()
                    ))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = certificates("--tls-cert", &files.cert)?;
    let key = private_key("--tls-key", &files.key)?;
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => Error::Invalid(format!(
            "--tls-key {} is not the private key of the certificate in --tls-cert {}; give the key the certificate was issued for",
            files.key.display(),
            files.cert.display()
        )),
        e => Error::Invalid(format!(
            "--tls-cert {} with --tls-key {}: cannot be used ({e}); give a PEM certificate chain and its private key (RSA, ECDSA or Ed25519)",
            files.cert.display(),
            files.key.display()
        )),
    })?;
    Ok(Arc::new(config))
}

/// Serves one TCP connection in FORCEDTLS mode: plaintext until NBD_OPT_STARTTLS, then the
/// handshake, then the rest of the NBD session through the relay.
pub(crate) fn serve_connection(
    shared: &Shared,
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
) -> io::Result<()> {
    // The plaintext phase is a few round trips for a real client: one that idles in it (it
    // is not known to be anyone yet) is sent away rather than holding a connection slot.
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let (early, no_zeroes) = match nbd::run(shared, &tcp, TlsMode::Required, None) {
        Ok(Ended::Done) => return Ok(()),
        Ok(Ended::StartTls { early, no_zeroes }) => (early, no_zeroes),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no TLS from {} within {} s: sent away",
                    peer_name(&tcp),
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            ));
        }
        Err(e) => return Err(e),
    };
    let conn = handshake(config, &tcp, &early)?;
    let (inner, outer) = UnixStream::pair()?;
    let relay = std::thread::Builder::new()
        .name("snapctl-tls".into())
        .spawn(move || relay(conn, tcp, outer))?;
    let r = nbd::run(shared, &inner, TlsMode::Active, Some(no_zeroes));
    drop(inner); // the relay sees the end, sends close_notify, and ends
    let _ = relay.join();
    r.map(|_| ())
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a client".into())
}

/// The TLS handshake, blocking, bounded by [`HANDSHAKE_TIMEOUT`]. A failure (a client whose
/// certificate does not verify, one that is not speaking TLS) ends the connection: after the
/// acknowledgement there is no going back to plaintext.
fn handshake(
    config: &Arc<ServerConfig>,
    tcp: &TcpStream,
    early: &[u8],
) -> io::Result<ServerConnection> {
    let peer = peer_name(tcp);
    let failed = |e: io::Error| io::Error::new(e.kind(), format!("TLS handshake with {peer}: {e}"));
    let mut conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
    let mut early = early;
    while !early.is_empty() {
        conn.read_tls(&mut early).map_err(failed)?;
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(&mut &*tcp);
            return Err(failed(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
    }
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut io = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(failed)?;
    }
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    Ok(conn)
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Copies between the TLS connection on `tcp` and the NBD code's end of the socket pair,
/// `nbd`, until the NBD side has finished and its last bytes went out (or the client is gone).
fn relay(mut conn: ServerConnection, mut tcp: TcpStream, nbd: UnixStream) {
    if tcp.set_nonblocking(true).is_err() || nbd.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = vec![0u8; RELAY_BUF];
    // Client → NBD: decrypted bytes not yet taken by the NBD side.
    let mut to_nbd: Vec<u8> = Vec::with_capacity(RELAY_BUF);
    // NBD → client: bytes read from the NBD side not yet taken by rustls.
    let mut to_tls: Vec<u8> = Vec::with_capacity(RELAY_BUF);
    let mut tcp_closed = false; // the socket said end of stream
    let mut client_done = false; // every byte the client will send was decrypted
    let mut nbd_told = false; // the NBD side was told the client is done
    let mut nbd_deaf = false; // the NBD side stopped reading: what the client sends is dropped
    let mut nbd_done = false; // the NBD side finished writing
    let mut deadline: Option<Instant> = None;
    loop {
        // Take in what the client sent.
        if !tcp_closed && to_nbd.is_empty() && conn.wants_read() {
            match conn.read_tls(&mut tcp) {
                Ok(0) => tcp_closed = true,
                Ok(_) => {
                    if conn.process_new_packets().is_err() {
                        // A bad record: tell the client (an alert) and end.
                        let _ = conn.write_tls(&mut tcp);
                        return;
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(_) => return, // reset: the client is gone
            }
        }
        while !client_done && to_nbd.len() < RELAY_BUF {
            match conn.reader().read(&mut buf) {
                Ok(0) => client_done = true, // close_notify
                Ok(_) if nbd_deaf => {}
                Ok(n) => to_nbd.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => break,
                Err(_) => client_done = true, // closed without close_notify
            }
        }
        if !to_nbd.is_empty() {
            match (&nbd).write(&to_nbd) {
                Ok(n) => drop(to_nbd.drain(..n)),
                Err(e) if would_block(&e) => {}
                Err(_) => {
                    nbd_deaf = true;
                    to_nbd.clear();
                }
            }
        }
        if client_done && to_nbd.is_empty() && !nbd_told {
            let _ = nbd.shutdown(Shutdown::Write);
            nbd_told = true;
        }
        // Send what the NBD side wrote.
        if to_tls.is_empty() && !nbd_done && !conn.wants_write() {
            match (&nbd).read(&mut buf) {
                Ok(n) if n > 0 => to_tls.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => {}
                Ok(_) | Err(_) => {
                    nbd_done = true;
                    conn.send_close_notify();
                    deadline = Some(Instant::now() + FLUSH_TIMEOUT);
                }
            }
        }
        if !to_tls.is_empty() {
            match conn.writer().write(&to_tls) {
                Ok(n) => drop(to_tls.drain(..n)),
                Err(_) => return,
            }
        }
        while conn.wants_write() {
            match conn.write_tls(&mut tcp) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(_) => return, // the client is gone
            }
        }
        if nbd_done && to_tls.is_empty() && !conn.wants_write() {
            let _ = tcp.shutdown(Shutdown::Write);
            return;
        }
        let mut timeout = 1000;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            timeout = left.as_millis().min(1000) as libc::c_int;
        }
        // Wait for what the state above is waiting for; nothing else.
        let mut tcp_ev = 0;
        if !tcp_closed && to_nbd.is_empty() && conn.wants_read() {
            tcp_ev |= libc::POLLIN;
        }
        if conn.wants_write() {
            tcp_ev |= libc::POLLOUT;
        }
        let mut nbd_ev = 0;
        if !to_nbd.is_empty() {
            nbd_ev |= libc::POLLOUT;
        }
        if to_tls.is_empty() && !nbd_done && !conn.wants_write() {
            nbd_ev |= libc::POLLIN;
        }
        let pollfd = |fd: i32, events: libc::c_short| libc::pollfd {
            // A negative fd is skipped, so a hang-up nobody waits for does not spin the loop.
            fd: if events == 0 { -1 } else { fd },
            events,
            revents: 0,
        };
        let mut fds = [
            pollfd(tcp.as_raw_fd(), tcp_ev),
            pollfd(nbd.as_raw_fd(), nbd_ev),
        ];
        // SAFETY: a valid array of two pollfds. EINTR (a signal) just goes round again.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
    }
}
