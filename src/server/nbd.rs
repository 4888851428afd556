//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md), fixed newstyle, simple replies.
//!
//! Exports: `origin` (and the default export `""`) is the live origin, read-write; every snapshot
//! is exported read-only under its name. Each connection reads requests pipelined and serves them
//! in batches: the copies that all the batch's writes need are made and committed together (one
//! flush and one commit for the batch), and its reads go to the devices together.
//!
//! TLS (doc/proto.md, "TLS support"): [`TlsMode`] says how NBD_OPT_STARTTLS is answered; on a
//! TLS listener, [`super::tls`] runs the handshake and hands the decrypted stream back to [`run`].

use std::io::{self, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::state::Shared;
use crate::error::Error;
use crate::io::AlignedBuf;
use crate::profile::{self, Phase};
use crate::store::cow::ReadReq;
use crate::store::{SnapState, Store, Writeback};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context served: base:allocation, with this id once selected.
const META_BASE_ALLOCATION: &str = "base:allocation";
const META_ALLOCATION_ID: u32 = 1;
const STATE_HOLE: u32 = 1 << 0;
const STATE_ZERO: u32 = 1 << 1;
/// Chunks one BLOCK_STATUS answer looks at; the client asks again from where it stopped.
const STATUS_MAX_CHUNKS: u64 = 1 << 16;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Largest request payload accepted: bigger writes close the connection, bigger reads get EINVAL.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload read during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Requests gathered into one batch.
const BATCH_REQUESTS: usize = 128;
const BATCH_BYTES: usize = 32 << 20;

/// An export, resolved at NBD_OPT_GO time.
#[derive(Clone)]
struct Export {
    name: String,
    size: u64,
    writable: bool,
    /// The origin of a pipelined store: where its writes are staged, and the chunk size
    /// (see `Writeback::stage`).
    stage: Option<(Arc<Writeback>, u64)>,
}

/// What the handshake negotiated beyond the export.
#[derive(Clone, Copy, Default)]
struct Negotiated {
    /// NBD_OPT_STRUCTURED_REPLY: reads (and block status) are answered in structured chunks.
    structured: bool,
    /// base:allocation was selected for the export that was entered: BLOCK_STATUS allowed.
    block_status: bool,
}

/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name and queries.
fn parse_meta_queries(data: &[u8]) -> Option<(String, Vec<String>)> {
    let nlen = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(nlen)?)?;
    let mut at = 4 + nlen;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let qlen = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        let q = data.get(at..at.checked_add(qlen)?)?;
        at += qlen;
        queries.push(String::from_utf8_lossy(q).to_string());
    }
    if at != data.len() {
        return None;
    }
    Some((String::from_utf8_lossy(name).to_string(), queries))
}

fn lookup(shared: &Shared, name: &str) -> Result<Export, String> {
    let store = shared.lock().map_err(|e| e.to_string())?;
    let size = store.sb.origin_size;
    if name.is_empty() || name == "origin" {
        return Ok(Export {
            name: "origin".into(),
            size,
            writable: true,
            stage: store.stage(),
        });
    }
    match store.snapshot(name) {
        Ok(s) if s.state == SnapState::Invalid => Err(format!("snapshot '{name}' is invalid")),
        Ok(s) => Ok(Export {
            name: name.to_string(),
            size,
            writable: s.writable,
            stage: None,
        }),
        Err(e) => Err(e.to_string()),
    }
}

fn export_names(shared: &Shared) -> Vec<String> {
    let mut v = vec!["origin".to_string()];
    if let Ok(store) = shared.lock() {
        v.extend(
            store
                .snapshots()
                .filter(|s| s.state == SnapState::Valid)
                .map(|s| s.name.clone()),
        );
    }
    v
}

fn tflags(e: &Export) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if e.writable {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    } else {
        f |= TF_READ_ONLY;
    }
    f
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply<W: Write>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// How a connection treats TLS (doc/proto.md, "TLS support").
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum TlsMode {
    /// NOTLS: the unix socket, or TCP with `--no-tls`. NBD_OPT_STARTTLS is refused by policy.
    Off,
    /// FORCEDTLS before the upgrade: only NBD_OPT_STARTTLS and NBD_OPT_ABORT are served; every
    /// other option is answered NBD_REP_ERR_TLS_REQD, NBD_OPT_EXPORT_NAME closes the connection.
    Required,
    /// FORCEDTLS after the upgrade: the stream is the decrypted one; a second
    /// NBD_OPT_STARTTLS is NBD_REP_ERR_INVALID.
    Active,
}

/// How [`run`] ended.
pub(crate) enum Ended {
    /// The client left (or was sent away); nothing more to do.
    Done,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake comes next on the same socket.
    /// `early` holds what the client sent after the option and was already read (normally
    /// nothing: the client waits for the acknowledgement); `no_zeroes` carries over.
    StartTls { early: Vec<u8>, no_zeroes: bool },
}

/// Serves one client connection to its end, without TLS (the unix socket, `--no-tls`).
/// Protocol violations close the connection.
pub fn serve_connection<S: AsRawFd + Sync>(shared: &Shared, stream: S) -> io::Result<()>
where
    for<'b> &'b S: Read + Write,
{
    run(shared, &stream, TlsMode::Off, None).map(|_| ())
}

/// The handshake (greeting, option haggling) and then transmission, on `stream`. `resumed`:
/// this is the TLS session of a connection whose greeting was already exchanged in plaintext,
/// with the client's NBD_FLAG_C_NO_ZEROES; option haggling starts afresh (nothing negotiated
/// before NBD_OPT_STARTTLS is kept, as the spec requires).
pub(crate) fn run<S: AsRawFd + Sync>(
    shared: &Shared,
    stream: &S,
    mode: TlsMode,
    resumed: Option<bool>,
) -> io::Result<Ended>
where
    for<'b> &'b S: Read + Write,
{
    let fd = stream.as_raw_fd();
    let mut rd = BufReader::with_capacity(
        1 << 20,
        Patient {
            s: stream,
            fd,
            shutdown: &shared.shutdown,
        },
    );
    let mut wr = Stream(stream);
    let no_zeroes = match resumed {
        Some(no_zeroes) => no_zeroes,
        None => {
            let mut hello = Vec::with_capacity(18);
            hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            wr.write_all(&hello)?;
            let cflags = read_u32(&mut rd)?;
            if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                return Err(protocol("unknown client flags"));
            }
            if mode == TlsMode::Required && cflags & CLIENT_FIXED_NEWSTYLE == 0 {
                // Such a client cannot send NBD_OPT_STARTTLS, and TLS is required.
                return Err(protocol(
                    "client does not speak fixed newstyle, so cannot start TLS, which is required",
                ));
            }
            cflags & CLIENT_NO_ZEROES != 0
        }
    };
    let mut neg = Negotiated::default();
    // The export base:allocation was last selected for (NBD_OPT_SET_META_CONTEXT).
    let mut meta_for: Option<String> = None;
    let export = loop {
        if read_u64(&mut rd)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let opt = read_u32(&mut rd)?;
        let len = read_u32(&mut rd)?;
        if len > MAX_OPTION {
            return Err(protocol("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data)?;
        if shared.shutdown.load(Ordering::SeqCst) && opt != OPT_ABORT {
            opt_reply(&mut wr, opt, REP_ERR_SHUTDOWN, b"server is shutting down")?;
            continue;
        }
        if mode == TlsMode::Required && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                // It cannot be refused with a reply: the spec says to close.
                return Err(protocol(
                    "client asked for an export (NBD_OPT_EXPORT_NAME) without starting TLS, which is required",
                ));
            }
            opt_reply(
                &mut wr,
                opt,
                REP_ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS first",
            )?;
            continue;
        }
        match opt {
            OPT_STARTTLS => match mode {
                TlsMode::Off => opt_reply(
                    &mut wr,
                    opt,
                    REP_ERR_POLICY,
                    b"TLS is not offered here (a unix socket, or TCP served with --no-tls)",
                )?,
                TlsMode::Active => opt_reply(&mut wr, opt, REP_ERR_INVALID, b"TLS is already on")?,
                TlsMode::Required if len != 0 => opt_reply(
                    &mut wr,
                    opt,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STARTTLS takes no data",
                )?,
                TlsMode::Required => {
                    opt_reply(&mut wr, opt, REP_ACK, &[])?;
                    return Ok(Ended::StartTls {
                        early: rd.buffer().to_vec(),
                        no_zeroes,
                    });
                }
            },
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).to_string();
                // No way to say "no" to EXPORT_NAME but closing the connection.
                let e = lookup(shared, &name).map_err(|m| protocol(&m))?;
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&e.size.to_be_bytes());
                b.extend_from_slice(&tflags(&e).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&b)?;
                break e;
            }
            OPT_ABORT => {
                let _ = opt_reply(&mut wr, opt, REP_ACK, &[]);
                return Ok(Ended::Done);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(&mut wr, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for n in export_names(shared) {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    opt_reply(&mut wr, opt, REP_SERVER, &d)?;
                }
                opt_reply(&mut wr, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(
                        &mut wr,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                neg.structured = true;
                opt_reply(&mut wr, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT {
                    meta_for = None; // replaced, even when this one fails
                }
                if !neg.structured {
                    opt_reply(
                        &mut wr,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_queries(&data) else {
                    opt_reply(
                        &mut wr,
                        opt,
                        REP_ERR_INVALID,
                        b"malformed metadata context query",
                    )?;
                    continue;
                };
                let e = match lookup(shared, &name) {
                    Ok(e) => e,
                    Err(msg) => {
                        opt_reply(&mut wr, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    }
                };
                // Listing: no query, or "base:" (every context of the namespace), names it.
                let listing = opt == OPT_LIST_META_CONTEXT;
                let selected = queries
                    .iter()
                    .any(|q| q == META_BASE_ALLOCATION || (listing && q == "base:"))
                    || (listing && queries.is_empty());
                if selected {
                    let id = if listing { 0 } else { META_ALLOCATION_ID };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    opt_reply(&mut wr, opt, REP_META_CONTEXT, &d)?;
                    if !listing {
                        meta_for = Some(e.name);
                    }
                }
                opt_reply(&mut wr, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let nlen = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
                    let name = data.get(4..4 + nlen)?;
                    let rest = data.get(4 + nlen..)?;
                    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
                    let reqs = rest.get(2..)?;
                    if reqs.len() != 2 * n {
                        return None;
                    }
                    let infos: Vec<u16> = reqs
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    Some((String::from_utf8_lossy(name).to_string(), infos))
                })();
                let Some((name, infos)) = parsed else {
                    opt_reply(&mut wr, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                    continue;
                };
                let e = match lookup(shared, &name) {
                    Ok(e) => e,
                    Err(msg) => {
                        opt_reply(&mut wr, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    }
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&e.size.to_be_bytes());
                d.extend_from_slice(&tflags(&e).to_be_bytes());
                opt_reply(&mut wr, opt, REP_INFO, &d)?;
                // Any alignment works (unaligned requests are read-modify-written); the chunk
                // size is what avoids that work.
                let chunk = shared
                    .lock()
                    .map(|s| s.sb.chunk_size as u32)
                    .unwrap_or(4096);
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&chunk.min(MAX_REQUEST).to_be_bytes());
                d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                opt_reply(&mut wr, opt, REP_INFO, &d)?;
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    opt_reply(&mut wr, opt, REP_INFO, &d)?;
                }
                if infos.contains(&INFO_DESCRIPTION) {
                    let desc = if e.writable {
                        "live origin (writes are copy-on-write)".to_string()
                    } else {
                        format!("read-only snapshot {}", e.name)
                    };
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(desc.as_bytes());
                    opt_reply(&mut wr, opt, REP_INFO, &d)?;
                }
                opt_reply(&mut wr, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break e;
                }
            }
            _ => opt_reply(&mut wr, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    };
    if let Ok(mut m) = shared.open_exports.lock() {
        *m.entry(export.name.clone()).or_insert(0) += 1;
    }
    shared.log(&format!("client attached to export '{}'", export.name));
    neg.block_status = neg.structured && meta_for.as_deref() == Some(export.name.as_str());
    let r = transmission(shared, &export, neg, rd, wr);
    if let Ok(mut m) = shared.open_exports.lock() {
        if let Some(n) = m.get_mut(&export.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&export.name);
            }
        }
    }
    shared.log(&format!("client left export '{}'", export.name));
    r.map(|()| Ended::Done)
}

/// `&S` as Write, so one stream serves the writer beside its buffered reader ([`Patient`]).
struct Stream<'a, S>(&'a S);

impl<S> Write for Stream<'_, S>
where
    for<'b> &'b S: Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0;
        s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.0;
        s.flush()
    }
}

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    /// A write's payload, read from the socket straight into a buffer aligned for O_DIRECT, so
    /// the engine writes it without a bounce copy.
    data: Option<AlignedBuf>,
}

fn read_request<R: Read>(rd: &mut R) -> io::Result<Request> {
    let mut h = [0u8; 28];
    rd.read_exact(&mut h)?;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if be32(0) != REQUEST_MAGIC {
        return Err(protocol("bad request magic"));
    }
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
    let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or([0; 8]));
    let length = be32(24);
    let mut data = None;
    if kind == CMD_WRITE {
        if length > MAX_REQUEST {
            // The payload cannot be skipped safely: the spec allows closing here.
            return Err(protocol("write larger than the maximum request size"));
        }
        let mut b = AlignedBuf::new(length as usize);
        rd.read_exact(b.as_mut_slice())?;
        data = Some(b);
    }
    Ok(Request {
        flags,
        kind,
        cookie,
        offset,
        length,
        data,
    })
}

fn errno_of(e: &Error) -> u32 {
    match e.errno() {
        libc::ENOSPC => ENOSPC,
        libc::EINVAL => EINVAL,
        libc::EPERM => EPERM,
        _ => EIO,
    }
}

/// Transmission: requests gathered into batches, each served and answered in turn by the
/// connection's own thread, which reads the requests and writes the replies itself. (A reader
/// thread, a writer thread and a thread for batches of reads overlapped more, but on two cores
/// their hand-overs cost more than the overlap gained: random 4 KiB reads ran 10-20 % faster
/// without them, first writes the same. Connections still run in parallel, one thread each.)
fn transmission<S>(
    shared: &Shared,
    export: &Export,
    neg: Negotiated,
    mut rd: BufReader<Patient<'_, S>>,
    mut wr: Stream<'_, S>,
) -> io::Result<()>
where
    for<'b> &'b S: Read + Write,
{
    use std::time::Duration;
    let fd = rd.get_ref().fd;
    let mut last_batch = 0usize;
    loop {
        // Waits for the next request (the reader gives up when the server stops).
        let first = match read_request(&mut rd) {
            Ok(r) => r,
            Err(e) if stopping(&e) => return Ok(()), // everything answered so far is done
            Err(e) => return Err(e),
        };
        let mut batch = vec![first];
        let gather = profile::span(Phase::Gather);
        let mut bytes = batch[0].length as usize;
        let mut disc = batch[0].kind == CMD_DISC;
        let mut failed = None;
        // A client keeping a deep queue sends its next requests as replies reach it: wait a
        // moment for them, so that writes share this batch's copies, flush and commit (never
        // at queue depth 1). Reads share nothing: a batch of reads only takes what has arrived,
        // and its replies go out the sooner.
        let linger = last_batch > 1;
        let mut writes = batch[0].kind == CMD_WRITE || batch[0].kind == CMD_WRITE_ZEROES;
        while !disc && batch.len() < BATCH_REQUESTS && bytes < BATCH_BYTES {
            let wait = if linger && writes && batch.len() < last_batch {
                Duration::from_micros(300)
            } else {
                Duration::ZERO
            };
            if rd.buffer().is_empty() && !readable(fd, wait)? {
                break;
            }
            match read_request(&mut rd) {
                Ok(r) => {
                    bytes += r.length as usize;
                    disc = r.kind == CMD_DISC;
                    writes |= r.kind == CMD_WRITE || r.kind == CMD_WRITE_ZEROES;
                    batch.push(r);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(gather);
        profile::requests(batch.len());
        last_batch = batch.len();
        let out = serve_batch(shared, export, neg, &mut batch)?;
        {
            let _reply = profile::span(Phase::Reply);
            wr.write_all(&out)?;
        }
        match failed {
            Some(e) if stopping(&e) => return Ok(()),
            Some(e) => return Err(e),
            None if disc => return Ok(()),
            None => {}
        }
    }
}

/// Whether `fd` has bytes to read within `wait` (or has hung up or failed: the read that
/// follows says which).
fn readable(fd: i32, wait: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd and a valid timespec, both alive for the call; no signal mask.
    let n = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        };
    }
    Ok(n > 0)
}

/// The error a [`Patient`] read ends with when the server stops.
pub(crate) fn stopping(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionAborted && e.to_string() == STOPPING
}

const STOPPING: &str = "the server is stopping";

/// `&S` read as [`Stream`] does, but waiting for bytes at most 200 ms at a time and giving up
/// once the server stops: a client idle (or stalled half-way through a request) never keeps a
/// stopping server waiting.
pub(crate) struct Patient<'a, S> {
    s: &'a S,
    fd: i32,
    shutdown: &'a std::sync::atomic::AtomicBool,
}

impl<S> Read for Patient<'_, S>
where
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if readable(self.fd, std::time::Duration::from_millis(200))? {
                let mut s = self.s;
                return s.read(buf);
            }
            if self.shutdown.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, STOPPING));
            }
        }
    }
}

/// What a batch asks, once its requests are checked: the reads and block-status queries, and
/// the writes and flushes in their order.
#[derive(Default)]
struct Plan {
    reads: Vec<usize>,
    status: Vec<usize>,
    /// Writes and flushes in order, each as (request, whether it is a flush); empty for a
    /// batch that only reads.
    changes: Vec<(usize, bool)>,
}

/// Checks every request of `batch` (flags, ranges, what the export allows), setting `errors`
/// for the refused ones, and sorts the rest into a [`Plan`].
fn plan(batch: &[Request], export: &Export, neg: Negotiated, errors: &mut [u32]) -> Plan {
    let size = export.size;
    let in_range = |r: &Request| {
        r.offset
            .checked_add(r.length as u64)
            .is_some_and(|e| e <= size)
    };
    let mut p = Plan::default();
    for (i, r) in batch.iter().enumerate() {
        let known_flags = CMD_FLAG_FUA
            | match r.kind {
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if r.flags & !known_flags != 0 {
            errors[i] = EINVAL;
            continue;
        }
        match r.kind {
            CMD_READ => {
                if r.length > MAX_REQUEST || !in_range(r) {
                    errors[i] = EINVAL;
                } else {
                    p.reads.push(i);
                }
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
                if !export.writable {
                    errors[i] = EPERM;
                } else if !in_range(r) {
                    errors[i] = ENOSPC;
                } else if r.kind == CMD_TRIM {
                    // A hint: discarding nothing is allowed, and keeps every snapshot exact.
                } else if r.kind == CMD_WRITE_ZEROES && r.length > MAX_REQUEST {
                    errors[i] = EINVAL;
                } else {
                    p.changes.push((i, false));
                }
            }
            // Everything before the flush first, then make it durable.
            CMD_FLUSH => p.changes.push((i, true)),
            CMD_BLOCK_STATUS => {
                if !neg.block_status || r.length == 0 || !in_range(r) {
                    errors[i] = EINVAL;
                } else {
                    p.status.push(i);
                }
            }
            CMD_DISC => {}
            _ => errors[i] = EINVAL,
        }
    }
    p
}

/// Serves one batch; returns the replies, in one buffer. A batch that changes nothing shares
/// the store with other such batches (of this connection and others), their reads in flight
/// together; one that writes or flushes holds it alone.
fn serve_batch(
    shared: &Shared,
    export: &Export,
    neg: Negotiated,
    batch: &mut [Request],
) -> io::Result<Vec<u8>> {
    let mut errors = vec![0u32; batch.len()];
    let mut read_bufs: Vec<Option<AlignedBuf>> = (0..batch.len()).map(|_| None).collect();
    let mut statuses: Vec<Option<Vec<(u64, bool)>>> = (0..batch.len()).map(|_| None).collect();
    let plan = plan(batch, export, neg, &mut errors);
    let poisoned = |e: Error| io::Error::other(e.to_string());
    let mut answers = Answers {
        errors: &mut errors,
        read_bufs: &mut read_bufs,
        statuses: &mut statuses,
    };
    let staged = !plan.changes.is_empty() && stage_writes(export, batch, &plan, answers.errors);
    if plan.changes.is_empty() || staged {
        if !plan.reads.is_empty() || !plan.status.is_empty() {
            let lock = profile::span(Phase::Lock);
            let store = shared.read().map_err(poisoned)?;
            drop(lock);
            let _batch = profile::span(Phase::Batch);
            answers.reads(&store, shared, export, batch, &plan);
        }
    } else {
        let lock = profile::span(Phase::Lock);
        let mut store = shared.lock().map_err(poisoned)?;
        drop(lock);
        let _batch = profile::span(Phase::Batch);
        let mut writes: Vec<usize> = Vec::new();
        for &(i, flush) in &plan.changes {
            if !flush {
                writes.push(i);
                continue;
            }
            flush_writes(&mut store, &export.name, batch, &writes, answers.errors);
            writes.clear();
            if let Err(e) = store.flush() {
                answers.errors[i] = errno_of(&e);
            }
        }
        flush_writes(&mut store, &export.name, batch, &writes, answers.errors);
        answers.reads(&store, shared, export, batch, &plan);
    }
    let mut out = Vec::with_capacity(batch.len() * 16);
    for (i, r) in batch.iter().enumerate() {
        if r.kind == CMD_DISC {
            continue;
        }
        // Structured replies, once negotiated, for reads (required) and block status (the
        // only form it has); simple replies for the rest.
        if neg.structured && matches!(r.kind, CMD_READ | CMD_BLOCK_STATUS) {
            structured_reply(&mut out, r, errors[i], &read_bufs[i], &statuses[i]);
            continue;
        }
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&errors[i].to_be_bytes());
        out.extend_from_slice(&r.cookie.to_be_bytes());
        if let Some(b) = &read_bufs[i] {
            out.extend_from_slice(b.as_slice());
        }
    }
    Ok(out)
}

/// Stages a batch's writes when every change in it is a write to a pipelined origin without
/// FUA (see `Writeback::stage`): they are answered now and preserved behind the answer, by the
/// server's preserver. True when done (staged, or refused with the queue's failure); false
/// when the batch must take the store alone (a flush, FUA, a snapshot's writes, a full stage
/// or a store short of room), with every payload still in its request.
fn stage_writes(export: &Export, batch: &mut [Request], plan: &Plan, errors: &mut [u32]) -> bool {
    let Some((wb, chunk_size)) = &export.stage else {
        return false;
    };
    if plan
        .changes
        .iter()
        .any(|&(i, flush)| flush || batch[i].flags & CMD_FLAG_FUA != 0)
    {
        return false;
    }
    let writes: Vec<usize> = plan.changes.iter().map(|&(i, _)| i).collect();
    let list = take_payloads(batch, &writes);
    let _stage = profile::span(Phase::Stage);
    match wb.stage(list, *chunk_size) {
        Ok(None) => true,
        Ok(Some(back)) => {
            give_back(batch, &writes, back);
            false
        }
        Err(e) => {
            for &i in &writes {
                errors[i] = errno_of(&e);
            }
            true
        }
    }
}

/// The payloads of writes `writes` of `batch`, taken from their requests (a WRITE_ZEROES: a
/// zeroed buffer of its length).
fn take_payloads(batch: &mut [Request], writes: &[usize]) -> Vec<(u64, AlignedBuf)> {
    writes
        .iter()
        .map(|&i| {
            let r = &mut batch[i];
            let data = match r.kind {
                CMD_WRITE => r.data.take(),
                _ => None,
            };
            (
                r.offset,
                data.unwrap_or_else(|| AlignedBuf::new(r.length as usize)),
            )
        })
        .collect()
}

/// Puts payloads [`take_payloads`] took back into their requests.
fn give_back(batch: &mut [Request], writes: &[usize], list: Vec<(u64, AlignedBuf)>) {
    for (&i, (_, b)) in writes.iter().zip(list) {
        if batch[i].kind == CMD_WRITE {
            batch[i].data = Some(b);
        }
    }
}

/// What a batch answers, request by request.
struct Answers<'a> {
    errors: &'a mut [u32],
    read_bufs: &'a mut [Option<AlignedBuf>],
    statuses: &'a mut [Option<Vec<(u64, bool)>>],
}

impl Answers<'_> {
    /// Answers the block-status queries and the reads of `plan` (after its writes).
    fn reads(
        &mut self,
        store: &Store,
        shared: &Shared,
        export: &Export,
        batch: &[Request],
        plan: &Plan,
    ) {
        for &i in &plan.status {
            let r = &batch[i];
            match store.extents(&export.name, r.offset, r.length as u64, STATUS_MAX_CHUNKS) {
                Ok(mut ext) => {
                    if r.flags & CMD_FLAG_REQ_ONE != 0 {
                        ext.truncate(1);
                    }
                    self.statuses[i] = Some(ext);
                }
                Err(e) => {
                    shared.log(&format!("block status error on '{}': {e}", export.name));
                    self.errors[i] = errno_of(&e);
                }
            }
        }
        // Aligned, so origin pieces are read straight into them with O_DIRECT.
        let mut bufs: Vec<AlignedBuf> = plan
            .reads
            .iter()
            .map(|&i| AlignedBuf::new(batch[i].length as usize))
            .collect();
        let ok = {
            let mut reqs: Vec<ReadReq> = plan
                .reads
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&i, b)| ReadReq {
                    view: &export.name,
                    off: batch[i].offset,
                    buf: b.as_mut_slice(),
                })
                .collect();
            store.read_batch(&mut reqs)
        };
        if let Err(e) = ok {
            // Find out which read failed.
            for (&i, b) in plan.reads.iter().zip(bufs.iter_mut()) {
                if let Err(e2) = store.read_view(&export.name, batch[i].offset, b.as_mut_slice()) {
                    self.errors[i] = errno_of(&e2);
                }
            }
            shared.log(&format!("read error on '{}': {e}", export.name));
        }
        for (&i, b) in plan.reads.iter().zip(bufs) {
            if self.errors[i] == 0 {
                self.read_bufs[i] = Some(b);
            }
        }
    }
}

/// One structured reply, as a single chunk flagged done: the data of a read, the extents of a
/// block status (base:allocation), or an error.
fn structured_reply(
    out: &mut Vec<u8>,
    r: &Request,
    error: u32,
    data: &Option<AlignedBuf>,
    status: &Option<Vec<(u64, bool)>>,
) {
    let mut chunk = |kind: u16, payload: &[&[u8]]| {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&r.cookie.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        for p in payload {
            out.extend_from_slice(p);
        }
    };
    if error != 0 {
        // error, then a message length of 0
        chunk(
            REPLY_TYPE_ERROR,
            &[&error.to_be_bytes(), &0u16.to_be_bytes()],
        );
        return;
    }
    match (data, status) {
        (Some(b), _) if !b.as_slice().is_empty() => chunk(
            REPLY_TYPE_OFFSET_DATA,
            &[&r.offset.to_be_bytes(), b.as_slice()],
        ),
        (_, Some(ext)) if !ext.is_empty() => {
            let mut p = Vec::with_capacity(4 + 8 * ext.len());
            p.extend_from_slice(&META_ALLOCATION_ID.to_be_bytes());
            for &(len, zero) in ext {
                // Each extent lies inside the request, whose length is a u32.
                let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                p.extend_from_slice(&(len.min(u32::MAX as u64) as u32).to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            chunk(REPLY_TYPE_BLOCK_STATUS, &[&p]);
        }
        // A read of length 0 (no data chunk can describe it).
        _ => chunk(REPLY_TYPE_NONE, &[]),
    }
}

/// Applies the collected writes of a batch (one preservation commit), attributing errors.
/// Origin writes are queued when the store pipelines them: the batch takes the payloads.
fn flush_writes(
    store: &mut Store,
    view: &str,
    batch: &mut [Request],
    writes: &[usize],
    errors: &mut [u32],
) {
    if writes.is_empty() {
        return;
    }
    let fua = writes.iter().any(|&i| batch[i].flags & CMD_FLAG_FUA != 0);
    if view == "origin" && store.pipelined() {
        let mut list = take_payloads(batch, writes);
        match store.write_queued(&mut list, fua) {
            Ok(()) => return,
            Err(e) if list.len() != writes.len() => {
                // Some were queued before the queue failed: none can be told apart.
                for &i in writes {
                    errors[i] = errno_of(&e);
                }
                return;
            }
            // Nothing was queued: the payloads come back for the writes one by one.
            Err(_) => give_back(batch, writes, list),
        }
    }
    let zeroes: Vec<Vec<u8>> = writes
        .iter()
        .map(|&i| {
            if batch[i].kind == CMD_WRITE_ZEROES {
                vec![0u8; batch[i].length as usize]
            } else {
                Vec::new()
            }
        })
        .collect();
    let list: Vec<(u64, &[u8])> = writes
        .iter()
        .zip(&zeroes)
        .map(|(&i, z)| {
            let r = &batch[i];
            (
                r.offset,
                if r.kind == CMD_WRITE {
                    r.data.as_ref().map(|d| d.as_slice()).unwrap_or(&[])
                } else {
                    z.as_slice()
                },
            )
        })
        .collect();
    let write = |store: &mut Store, list: &[(u64, &[u8])], fua: bool| {
        if view == "origin" {
            store.write_batch(list, fua)
        } else {
            store.write_snapshot(view, list, fua)
        }
    };
    if write(store, &list, fua).is_err() {
        // Redo one by one to tell which failed (rewriting the same bytes is harmless).
        for (&i, w) in writes.iter().zip(&list) {
            if let Err(e) = write(
                store,
                std::slice::from_ref(w),
                batch[i].flags & CMD_FLAG_FUA != 0,
            ) {
                errors[i] = errno_of(&e);
            }
        }
    }
}
