//! The bodies of the fuzz targets (`fuzz/`, cargo-fuzz), behind the `testing` feature. Each
//! `fuzz/fuzz_targets/<target>.rs` is one call into here, and `tests/fuzz_replay.rs` runs every
//! file of `tests/fixtures/fuzz/<target>/` through the same function, so an input the fuzzer
//! once found is replayed by `cargo test` through exactly the code it broke. Living inside the
//! crate, these reach the few crate-private entry points they need (the control connection
//! handler, the length block) without widening them to the public API.
//!
//! What each target is fed:
//!
//! - `superblock`: any bytes, decoded as a superblock and as a metadata length block; then the
//!   same bytes with magic and checksums made right (the fuzzer cannot forge blake3), so every
//!   field is decoded; a superblock that decodes is put on a small store and opened.
//! - `open_store`: a small store with read-only and writable snapshots, a snapshot of a
//!   writable one, records in two groups and a partial last chunk, whose metadata is replaced.
//!   Byte 0 bit 0 clear: the rest is the whole metadata region (the length block says that many
//!   bytes). Set: the rest is patches over the real region, each `offset: u32 LE` (from the
//!   length block at 4096, modulo the region's end), `n: u8`, `n` bytes; with bit 1 the length
//!   block's checksum is made right again afterwards. Then the store is opened and every
//!   operation is run on it: list, info, show, reads of every view, diff, check, writes,
//!   create, rename, delete, restore.
//! - `nbd`: the bytes an NBD client sends (handshake, options, requests), against the same
//!   store, on one end of a socket pair; the replies are read and dropped. Afterwards the store
//!   must open again and `check --data` must find it clean.
//! - `control`: byte 0 is flags (bit 0: a descriptor beside every frame after the first, a
//!   memfd of 8 KiB, or with bit 1 as large as the origin); the rest is what a control client
//!   sends; afterwards the store must open and check clean, as for `nbd`. The same bytes are
//!   then read as a server's answers by the client's decoder.
//! - `config`: a schedule configuration (TOML, lossy UTF-8), parsed and, when valid, carried
//!   out as `schedule run --dry-run`, `schedule status` and `prune --dry-run` against a store
//!   holding snapshots of every period, at the earliest, a present and the latest time
//!   `--now` accepts.
//!
//! The panic rule ([`prepare`]): any panic in snapctl's own code is a bug, even one a guard
//! catches and reports (the control server's, or `guard_panic`'s). The one exception is a panic
//! inside the metadata engine (redb) on a damaged region: redb documents that it may panic on
//! pages altered behind its back, and `guard_panic` turning that into a corruption error is the
//! designed answer (docs/DESIGN.md). Such panics are let through to their guard; an escaping
//! one still fails.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Once, OnceLock};

use crate::error::{Error, Result};
use crate::io::testing::MemIo;
use crate::io::BlockIo;
use crate::ops::protocol::{self, Envelope, Hello, Message, Welcome};
use crate::ops::schedule::{self, policy};
use crate::ops::{exec, Client, CreateSpec, Reply, Request, Response};
use crate::server::state::Shared;
use crate::store::format::{OnFull, Superblock, MAGIC, SUPERBLOCK_SIZE};
use crate::store::{Snapshot, Store, LENBLOCK_OFFSET};

/// A target's body: one input, no result (a panic is the only way to fail).
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and fixture directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("superblock", superblock),
    ("open_store", open_store),
    ("nbd", nbd),
    ("control", control),
    ("config", config),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

// ---------------------------------------------------------------------------------------------
// The panic rule.

thread_local! {
    /// Panics in snapctl's code on this thread since [`replay`] began, caught or not.
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// Panics inside redb on this thread, allowed if a guard catches them.
    static ENGINE_PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// "file:line: message" of a panic.
fn describe(info: &std::panic::PanicHookInfo<'_>) -> String {
    let at = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_default();
    format!("{at}: {msg}")
}

/// Where a panic inside the metadata engine comes from (its crate's sources).
fn in_metadata_engine(info: &std::panic::PanicHookInfo<'_>) -> bool {
    info.location()
        .is_some_and(|l| l.file().contains("/redb-") || l.file().starts_with("redb-"))
}

/// Puts the process in the state the targets assume, once: SIGPIPE ignored (as in any Rust
/// program's `main`; libFuzzer's `main` leaves it fatal), and the panic rule above installed
/// around the current hook. In a fuzzer that hook aborts, so any panic but redb's is a crash;
/// in a test it prints, and [`replay`] reports what was recorded.
pub fn prepare() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if in_metadata_engine(info) {
                // guard_panic turns it into a corruption error; remembered in case none does.
                let _ = ENGINE_PANICS.try_with(|p| p.borrow_mut().push(describe(info)));
                return;
            }
            let _ = PANICS.try_with(|p| p.borrow_mut().push(describe(info)));
            previous(info);
        }));
    });
}

/// Runs one input through target `name` under the panic rule: `Err` lists the panics in
/// snapctl's code, whether they escaped or a guard caught them.
pub fn replay(name: &str, data: &[u8]) -> std::result::Result<(), String> {
    let f = target(name).ok_or_else(|| format!("no fuzz target named {name}"))?;
    under_panic_rule(|| f(data)).map_err(|e| format!("{name}: {e}"))
}

/// Runs `f` under the panic rule (see [`replay`]).
pub fn under_panic_rule(
    f: impl FnOnce() + std::panic::UnwindSafe,
) -> std::result::Result<(), String> {
    prepare();
    PANICS.with(|p| p.borrow_mut().clear());
    ENGINE_PANICS.with(|p| p.borrow_mut().clear());
    let escaped = std::panic::catch_unwind(f).is_err();
    let panics = PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let engine = ENGINE_PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if panics.is_empty() && !escaped {
        Ok(())
    } else if panics.is_empty() {
        Err(format!(
            "a panic inside redb escaped every guard: {}",
            engine.join("; ")
        ))
    } else {
        Err(format!(
            "{} panic(s) in snapctl{}: {}",
            panics.len(),
            if escaped { " (one escaped)" } else { "" },
            panics.join("; ")
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The small store every store target starts from.

/// The template store's geometry: chunk size, metadata region, origin (two exception groups
/// and a partial last chunk) and data area.
pub const CHUNK: u64 = 4096;
pub const META_LEN: u64 = 2 << 20;
pub const ORIGIN_SIZE: u64 = 160 * CHUNK + 1000;
pub const DATA_CHUNKS: u64 = 96;
/// What the control target's server believes it serves (docs/CONTROL.md's example).
pub const SERVED_ID: (u64, u64) = (2049, 131);
/// Creation times the template's snapshots are stamped with.
const T0: i64 = 1_800_000_000;

struct Template {
    store: Vec<u8>,
    origin: Vec<u8>,
}

/// Deterministic bytes (xorshift64*).
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn labels(period: &str) -> BTreeMap<String, String> {
    [("period".to_string(), period.to_string())]
        .into_iter()
        .collect()
}

/// The template store, built once per process; every input starts from a copy of it.
fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| build_template().expect("building the fuzz template store"))
}

fn build_template() -> Result<Template> {
    let store_size = crate::store::format::META_OFFSET + META_LEN + DATA_CHUNKS * CHUNK;
    let origin = Arc::new(MemIo::from_vec(pattern(1, ORIGIN_SIZE as usize)));
    let dev = Arc::new(MemIo::new(store_size));
    Store::init_io(
        dev.clone(),
        ORIGIN_SIZE,
        CHUNK,
        META_LEN,
        OnFull::DropOldest,
    )?;
    let mut s = Store::open_io(dev.clone(), origin.clone(), "fuzz")?;
    let w = |s: &mut Store, seed: u64, off: u64, n: usize| -> Result<()> {
        s.write_origin(off, &pattern(seed, n), false)
    };
    s.create("a", None, labels("hourly"), Some(T0))?;
    w(&mut s, 2, 0, 3 * CHUNK as usize)?;
    w(&mut s, 3, 130 * CHUNK + 100, 5000)?;
    s.create_writable("b", Some(T0 + 86400), BTreeMap::new())?;
    s.write_snapshot("b", &[(CHUNK, &pattern(4, 6000))], false)?;
    s.create("c", None, labels("daily"), Some(T0 + 3600))?;
    w(&mut s, 5, 2 * CHUNK, 2 * CHUNK as usize)?;
    w(&mut s, 6, ORIGIN_SIZE - 1500, 1500)?;
    s.create_from("d", "b", None, BTreeMap::new(), false)?;
    s.set_writable("c")?;
    s.write_snapshot("c", &[(159 * CHUNK, &pattern(7, 4096 + 1000))], false)?;
    s.create("e", Some(T0 - 60), labels("hourly"), Some(T0 + 7200))?;
    w(&mut s, 8, 64 * CHUNK + 7, 9000)?;
    s.flush()?;
    drop(s);
    Ok(Template {
        store: dev.snapshot(),
        origin: origin.snapshot(),
    })
}

/// `store` and the template's origin as devices.
fn devices(store: Vec<u8>) -> (Arc<dyn BlockIo>, Arc<dyn BlockIo>) {
    (
        Arc::new(MemIo::from_vec(store)),
        Arc::new(MemIo::from_vec(template().origin.clone())),
    )
}

/// A fresh copy of the template store, opened and shared as a server shares it, and its devices.
fn fresh_shared() -> Option<(Shared, Arc<MemIo>, Arc<MemIo>)> {
    let t = template();
    let dev = Arc::new(MemIo::from_vec(t.store.clone()));
    let origin = Arc::new(MemIo::from_vec(t.origin.clone()));
    let store = Store::open_io(dev.clone(), origin.clone(), "fuzz").ok()?;
    Some((Shared::new(store, false), dev, origin))
}

/// Whatever a client sent, it could change the store only through operations that keep it
/// whole: once closed, the store opens again and `check --data` finds it clean.
fn assert_whole(shared: Shared, dev: Arc<MemIo>, origin: Arc<MemIo>) {
    drop(shared);
    let mut store = match Store::open_io(dev, origin, "fuzz") {
        Ok(s) => s,
        Err(e) => panic!("the store no longer opens after a client's requests: {e}"),
    };
    match store.check_with(true, &mut |_, _| {}) {
        Ok(r) if r.is_clean() && r.damaged.is_empty() => {}
        Ok(r) => panic!("check finds the store damaged after a client's requests: {r:?}"),
        Err(e) => panic!("check fails after a client's requests: {e}"),
    }
}

/// A memfd holding `n` bytes of a pattern, at offset 0.
fn memfd(n: usize) -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is ours.
    let fd = unsafe { libc::memfd_create(c"snapctl-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(&pattern(9, n)).ok()?;
    f.rewind().ok()?;
    Some(f)
}

fn ask(host: &Shared, req: Request, data: Option<File>) -> Result<Reply> {
    exec(host, req, data, &mut |_, _| {})
}

/// Every operation on a store that opened, as a command or a control client would run it.
fn exercise(host: &Shared) {
    let names: Vec<String> = match ask(host, Request::List, None) {
        Ok(Reply {
            response: Response::List { snapshots, .. },
            ..
        }) => snapshots.into_iter().map(|s| s.name).collect(),
        _ => Vec::new(),
    };
    let _ = ask(host, Request::Info, None);
    let views: Vec<String> = std::iter::once("origin".to_string())
        .chain(names.iter().cloned())
        .collect();
    if let Ok(s) = host.lock() {
        let size = s.sb.origin_size.min(16 << 20) as usize;
        let mut whole = vec![0u8; size];
        let mut part = vec![0u8; 2 * CHUNK as usize + 3];
        for v in &views {
            let _ = s.read_view(v, 0, &mut whole);
            let _ = s.read_view(v, CHUNK - 1, &mut part);
        }
        let _ = s.used_chunks();
        let _ = s.recent_events(100);
    }
    for pair in views.windows(2) {
        let (from, to) = (pair[0].clone(), pair[1].clone());
        let _ = ask(host, Request::Diff { from, to }, None);
    }
    for n in &names {
        let _ = ask(host, Request::Show { name: n.clone() }, None);
    }
    let _ = ask(
        host,
        Request::Check {
            data: true,
            repair: false,
            drop_damaged: false,
        },
        None,
    );
    // Changes, each one commit on whatever the metadata says.
    if let Ok(mut s) = host.lock() {
        let _ = s.write_origin(CHUNK / 2, &pattern(10, 3 * CHUNK as usize), true);
        let _ = s.write_batch(
            &[
                (100 * CHUNK, &[1u8; 100][..]),
                (150 * CHUNK + 5, &[2u8; 5000][..]),
            ],
            false,
        );
        for n in &names {
            let _ = s.write_snapshot(n, &[(CHUNK * 3 + 1, &[3u8; 5000][..])], false);
        }
    }
    let _ = ask(
        host,
        Request::Create(CreateSpec {
            name: "fz".into(),
            labels: labels("hourly"),
            ..CreateSpec::default()
        }),
        None,
    );
    if let Some(first) = names.first() {
        let _ = ask(
            host,
            Request::Create(CreateSpec {
                name: "fz-from".into(),
                from: Some(first.clone()),
                writable: true,
                ..CreateSpec::default()
            }),
            None,
        );
        let _ = ask(
            host,
            Request::Write {
                offset: 7,
                snapshot: Some("fz-from".into()),
            },
            memfd(5000),
        );
        let _ = ask(
            host,
            Request::Rename {
                old: first.clone(),
                new: "fz-renamed".into(),
            },
            None,
        );
        let _ = ask(
            host,
            Request::SetWritable {
                name: "fz-renamed".into(),
            },
            None,
        );
    }
    if let Some(n) = names.get(1) {
        let _ = ask(
            host,
            Request::Restore {
                name: n.clone(),
                backup: true,
                force: false,
            },
            None,
        );
    }
    if let Some(n) = names.last() {
        let _ = ask(
            host,
            Request::Delete {
                names: vec![n.clone()],
                force: false,
            },
            None,
        );
    }
    let _ = ask(
        host,
        Request::Check {
            data: false,
            repair: false,
            drop_damaged: false,
        },
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// superblock

/// Makes `b` (at least 4096 bytes) a superblock whose magic and checksum are right.
fn seal_superblock(b: &mut [u8]) {
    b[..8].copy_from_slice(MAGIC);
    let sum = blake3::hash(&b[..SUPERBLOCK_SIZE - 32]);
    b[SUPERBLOCK_SIZE - 32..SUPERBLOCK_SIZE].copy_from_slice(sum.as_bytes());
}

/// Makes `b` (at least 512 bytes) a length block whose magic and checksum are right.
fn seal_lenblock(b: &mut [u8]) {
    b[..8].copy_from_slice(b"SNAPLEN\0");
    let sum = blake3::hash(&b[..480]);
    b[480..512].copy_from_slice(sum.as_bytes());
}

pub fn superblock(data: &[u8]) {
    prepare();
    let _ = Superblock::decode(data, "fuzz");
    let _ = crate::store::decode_lenblock(data);
    let _ = crate::store::read_superblock_any(&MemIo::from_vec(data.to_vec()), "fuzz");
    peek(data);

    let mut lb = data.to_vec();
    lb.resize(lb.len().max(512), 0);
    seal_lenblock(&mut lb);
    let _ = crate::store::decode_lenblock(&lb);

    let mut b = data.to_vec();
    b.resize(SUPERBLOCK_SIZE, 0);
    seal_superblock(&mut b);
    let Ok((sb, _version)) = Superblock::decode_any(&b, "fuzz") else {
        return;
    };
    let _ = Superblock::decode(&b, "fuzz");
    let again = Superblock::decode(&sb.encode(), "fuzz");
    assert_eq!(
        again.as_ref().ok(),
        Some(&sb),
        "a decoded superblock encodes to itself"
    );
    let _ = (sb.uuid_string(), sb.origin_chunks());

    // The store it describes, over the template's bytes.
    let mut img = template().store.clone();
    img[..SUPERBLOCK_SIZE].copy_from_slice(&b);
    let dev: Arc<dyn BlockIo> = Arc::new(MemIo::from_vec(img));
    let origin: Arc<dyn BlockIo> = if sb.origin_size == ORIGIN_SIZE {
        Arc::new(MemIo::from_vec(template().origin.clone()))
    } else if sb.origin_size <= 4 << 20 {
        Arc::new(MemIo::new(sb.origin_size))
    } else {
        return;
    };
    if let Ok(store) = Store::open_io(dev, origin, "fuzz") {
        exercise(&Shared::new(store, false));
    }
}

/// `peek_superblock` reads a path: give it the bytes as a memfd through /proc.
fn peek(data: &[u8]) {
    let Some(mut f) = memfd(0) else { return };
    if f.write_all(data).is_ok() {
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let _ = crate::store::peek_superblock(Path::new(&path));
    }
}

// ---------------------------------------------------------------------------------------------
// open_store

pub fn open_store(data: &[u8]) {
    prepare();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = template();
    let mut img = t.store.clone();
    let meta_off = crate::store::format::META_OFFSET as usize;
    let region = meta_off..meta_off + META_LEN as usize;
    if mode & 1 == 0 {
        let n = rest.len().min(META_LEN as usize);
        img[region.clone()].fill(0);
        img[meta_off..meta_off + n].copy_from_slice(&rest[..n]);
        let lb = crate::store::encode_lenblock(n as u64);
        img[LENBLOCK_OFFSET as usize..LENBLOCK_OFFSET as usize + 512].copy_from_slice(&lb);
    } else {
        let base = LENBLOCK_OFFSET as usize;
        let span = region.end - base;
        let mut p = rest;
        while p.len() >= 5 {
            let off = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize % span;
            let n = (p[4] as usize).min(p.len() - 5).min(span - off);
            img[base + off..base + off + n].copy_from_slice(&p[5..5 + n]);
            p = &p[5 + n..];
        }
        if mode & 2 != 0 {
            seal_lenblock(&mut img[base..base + 512]);
        }
    }
    let (dev, origin) = devices(img);
    if let Ok(store) = Store::open_io(dev, origin, "fuzz") {
        exercise(&Shared::new(store, false));
    }
}

// ---------------------------------------------------------------------------------------------
// nbd

/// The descriptor to pass beside frame `i`, if any.
type FdFor = dyn Fn(usize) -> Option<File> + Sync;

/// Runs `serve` on one end of a socket pair while `input` is written into the other end (then
/// shut for writing) and everything the server sends is read and dropped. Returns when the
/// server returned and both helpers ended.
fn over_socket<F>(input: &[u8], frames: Option<&FdFor>, serve: F)
where
    F: FnOnce(UnixStream),
{
    let Ok((client, server)) = UnixStream::pair() else {
        return;
    };
    let Ok(reader) = client.try_clone() else {
        return;
    };
    // Joined explicitly: a scope's own wait does not wait for the threads to exit, and a thread
    // still exiting when LeakSanitizer looks shows glibc's bookkeeping as a leak.
    std::thread::scope(|sc| {
        let feeder = sc.spawn(move || {
            match frames {
                None => {
                    let _ = (&client).write_all(input);
                }
                Some(fd_for) => send_frames(&client, input, fd_for),
            }
            let _ = client.shutdown(std::net::Shutdown::Write);
        });
        let drain = sc.spawn(move || {
            let mut r = reader;
            let mut buf = vec![0u8; 1 << 16];
            while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
        });
        serve(server); // drops the server's end, which ends the reader
        let _ = (feeder.join(), drain.join());
    });
}

pub fn nbd(data: &[u8]) {
    prepare();
    let Some((shared, dev, origin)) = fresh_shared() else {
        return;
    };
    over_socket(data, None, |s| {
        let _ = crate::server::nbd::serve_connection(&shared, s);
    });
    assert_whole(shared, dev, origin);
}

// ---------------------------------------------------------------------------------------------
// control

/// Sends `input` cut where its length prefixes say frames end, each frame with the descriptor
/// `fd_for(index)` on its first byte.
fn send_frames(sock: &UnixStream, input: &[u8], fd_for: &FdFor) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .unwrap_or(0);
        let n = len.saturating_add(4).min(rest.len());
        let (frame, tail) = rest.split_at(n);
        let fd = fd_for(i);
        let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cm: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let iov = [std::io::IoSlice::new(&frame[..1])];
        if sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::empty(), None).is_err() {
            return;
        }
        if (&*sock).write_all(&frame[1..]).is_err() {
            return;
        }
        rest = tail;
        i += 1;
    }
}

pub fn control(data: &[u8]) {
    prepare();
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let Some((shared, dev, origin)) = fresh_shared() else {
        return;
    };
    let fd_for = move |i: usize| -> Option<File> {
        if flags & 1 == 0 || i == 0 {
            return None;
        }
        memfd(if flags & 2 != 0 {
            ORIGIN_SIZE as usize
        } else {
            8192
        })
    };
    over_socket(stream, Some(&fd_for), |s| {
        let _ = crate::server::control::handle(&shared, s, Some(SERVED_ID), "fuzz");
    });
    assert_whole(shared, dev, origin);
    // The same bytes as a server's answers, through the client's decoder.
    let Ok((a, b)) = UnixStream::pair() else {
        return;
    };
    std::thread::scope(|sc| {
        let feeder = sc.spawn(move || {
            let _ = (&a).write_all(stream);
            let _ = a.shutdown(std::net::Shutdown::Write);
        });
        if protocol::recv::<Welcome>(&b, protocol::MAX_REPLY).is_ok() {
            while protocol::recv::<Message>(&b, protocol::MAX_REPLY).is_ok() {}
        }
        drop(b);
        let _ = feeder.join();
    });
    // And each frame body as every message of the protocol.
    let mut rest = stream;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let body = &rest[4..4 + len.min(rest.len() - 4)];
        let _ = serde_json::from_slice::<Hello>(body);
        let _ = serde_json::from_slice::<Envelope>(body);
        let _ = serde_json::from_slice::<Reply>(body);
        rest = &rest[4 + body.len()..];
    }
}

// ---------------------------------------------------------------------------------------------
// config

/// Answers `list` with a fixed set of snapshots (every period's, and extremes of time a control
/// client can stamp) and anything else with success.
struct FakeStore {
    snapshots: Vec<Snapshot>,
}

impl Client for FakeStore {
    fn call(
        &mut self,
        req: Request,
        _data: Option<File>,
        _progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Reply> {
        let response = match req {
            Request::List => Response::List {
                store: "fuzz".into(),
                chunk_size: CHUNK,
                snapshots: self.snapshots.clone(),
            },
            Request::Delete { names, .. } => Response::Deleted {
                names,
                freed_bytes: 0,
            },
            _ => return Err(Error::Invalid("not in this fake".into())),
        };
        Ok(Reply {
            response,
            events: Vec::new(),
        })
    }
    fn remote(&self) -> bool {
        false
    }
}

fn fake_snapshots(periods: &[String]) -> Vec<Snapshot> {
    let mut v = Vec::new();
    let times = [i64::MIN, -62_167_219_200, 0, T0, T0 + 3600, i64::MAX];
    for (i, &t) in times.iter().enumerate() {
        for p in periods.iter().chain(std::iter::once(&"manual".to_string())) {
            let id = v.len() as u64 + 1;
            let expires = [None, Some(t), Some(i64::MIN), Some(i64::MAX)][i % 4];
            v.push(Snapshot::point(
                id,
                &format!("{p}-{i}"),
                "origin",
                0,
                id,
                t,
                expires,
                labels(p),
            ));
        }
    }
    v
}

pub fn config(data: &[u8]) {
    prepare();
    let text = String::from_utf8_lossy(data);
    let check = |p: &Path| {
        if p.as_os_str() == "/not-a-store" {
            Err(Error::not_a_store(p.display()))
        } else {
            Ok(())
        }
    };
    let Ok(stores) = policy::parse(&text, Path::new("fuzz.toml"), &check) else {
        return;
    };
    let periods: Vec<String> = stores
        .iter()
        .flat_map(|s| s.periods.iter().map(|p| p.name.clone()))
        .collect();
    let snapshots = fake_snapshots(&periods);
    let connect = |_: &Path| -> Result<Box<dyn Client>> {
        Ok(Box::new(FakeStore {
            snapshots: snapshots.clone(),
        }))
    };
    let paths: Vec<std::path::PathBuf> = stores.iter().map(|s| s.path.clone()).collect();
    // What `--now` accepts: RFC 3339, years 0000 to 9999.
    for now in [-62_167_219_200, 0, T0 + 1800, 253_402_300_799] {
        let _ = schedule::run(&stores, &connect, now, true, true, true);
        let _ = schedule::status(&stores, &connect, now);
        let _ = schedule::prune(&paths, &connect, now, true);
        for st in &stores {
            for p in &st.periods {
                let b = policy::boundary(p.every, now);
                let _ = policy::snapshot_name(&p.name, b);
                let _ = policy::due(p, &snapshots, now);
                let _ = policy::retention(p, &snapshots, now);
                let _ = policy::grace(p.every);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds: valid inputs for each target, to start a corpus from (`fuzz/src/bin/seeds.rs`) and
// replayed by `tests/fuzz_replay.rs`.

pub mod seeds {
    use super::*;

    pub const NBDMAGIC_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;

    /// One NBD option: `IHAVEOPT`, option, length, data.
    pub fn nbd_option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = NBDMAGIC_IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// The data of NBD_OPT_INFO / NBD_OPT_GO.
    pub fn nbd_go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// One transmission request, with its payload.
    pub fn nbd_request(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        if kind == 1 {
            b.extend_from_slice(&pattern(cookie, length as usize));
        }
        b
    }

    /// A control frame: length and JSON.
    pub fn frame(json: &str) -> Vec<u8> {
        let mut b = (json.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b
    }

    fn hello() -> Vec<u8> {
        frame(&format!(
            r#"{{"hello": "snapctl-control", "version": 1, "store": "/dev/vdb", "store_id": [{}, {}]}}"#,
            SERVED_ID.0, SERVED_ID.1
        ))
    }

    /// The seeds of target `name`: (file name, bytes).
    pub fn of(name: &str) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        let mut add = |n: &str, b: Vec<u8>| out.push((n.to_string(), b));
        match name {
            "superblock" => {
                let t = template();
                add("template-superblock", t.store[..SUPERBLOCK_SIZE].to_vec());
                let lb = LENBLOCK_OFFSET as usize;
                add("template-lenblock", t.store[lb..lb + 512].to_vec());
            }
            "open_store" => {
                let t = template();
                let lb = LENBLOCK_OFFSET as usize;
                let len = crate::store::decode_lenblock(&t.store[lb..lb + 512]).unwrap_or(0);
                let m = crate::store::format::META_OFFSET as usize;
                let mut region = vec![0u8];
                region.extend_from_slice(&t.store[m..m + len as usize]);
                add("template-region", region);
                // Patches: one byte of the first pages, and of the length block (resealed).
                let mut p = vec![1u8];
                for (off, byte) in [(4096u32 * 2 + 7, 0xffu8), (4096 * 9 + 100, 0)] {
                    p.extend_from_slice(&(off + (m - lb) as u32).to_le_bytes());
                    p.extend_from_slice(&[1, byte]);
                }
                add("patch-pages", p);
                let mut p = vec![3u8];
                p.extend_from_slice(&8u32.to_le_bytes());
                p.extend_from_slice(&[8]);
                p.extend_from_slice(&(len / 2).to_le_bytes());
                add("patch-lenblock-half", p);
            }
            "nbd" => {
                let req = nbd_request;
                let mut s = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
                s.extend(nbd_option(7, &nbd_go_data("origin", &[1, 2, 3])));
                s.extend(req(0, 0, 1, 0, 4096));
                s.extend(req(0, 1, 2, 4096, 512));
                s.extend(req(0, 0, 3, 4000, 9000));
                s.extend(req(0, 3, 4, 0, 0));
                s.extend(req(3, 6, 5, 8192, 8192));
                s.extend(req(0, 4, 6, 0, 4096));
                s.extend(req(1, 1, 7, ORIGIN_SIZE - 100, 100));
                s.extend(req(0, 0, 8, ORIGIN_SIZE - 10, 20));
                s.extend(req(0, 2, 9, 0, 0));
                add("go-origin-io", s);

                let mut s = 3u32.to_be_bytes().to_vec();
                s.extend(nbd_option(3, &[]));
                s.extend(nbd_option(6, &nbd_go_data("a", &[])));
                s.extend(nbd_option(8, &[])); // structured replies: not supported
                s.extend(nbd_option(7, &nbd_go_data("a", &[2])));
                s.extend(req(0, 0, 1, 0, 8192));
                s.extend(req(0, 1, 2, 0, 16));
                s.extend(req(0, 2, 3, 0, 0));
                add("list-info-go-snapshot", s);

                let mut s = 1u32.to_be_bytes().to_vec(); // fixed newstyle, zeroes wanted
                s.extend(nbd_option(1, b"b"));
                s.extend(req(0, 1, 1, 3 * CHUNK - 5, 10));
                s.extend(req(0, 0, 2, 3 * CHUNK - 5, 10));
                add("export-name-writable", s);

                let mut s = 3u32.to_be_bytes().to_vec();
                s.extend(nbd_option(6, &nbd_go_data("nosuch", &[])));
                s.extend(nbd_option(2, &[]));
                add("info-unknown-abort", s);
            }
            "control" => {
                let mut s = vec![1u8];
                s.extend(hello());
                for json in [
                    r#"{"id": 1, "request": {"op": "list"}}"#,
                    r#"{"id": 2, "request": {"op": "info"}}"#,
                    r#"{"id": 3, "request": {"op": "create", "name": "nightly", "expires": 1796169600, "labels": {"period": "daily"}, "from": null, "writable": false, "created": null}}"#,
                    r#"{"id": 4, "request": {"op": "show", "name": "nightly"}}"#,
                    r#"{"id": 5, "request": {"op": "write", "offset": 4095, "snapshot": null}}"#,
                    r#"{"id": 6, "request": {"op": "diff", "from": "nightly", "to": "origin"}}"#,
                    r#"{"id": 7, "request": {"op": "export", "name": "a"}}"#,
                    r#"{"id": 8, "request": {"op": "rename", "old": "nightly", "new": "weekly"}}"#,
                    r#"{"id": 9, "request": {"op": "set-writable", "name": "weekly"}}"#,
                    r#"{"id": 10, "request": {"op": "delete", "names": ["weekly"], "force": false}}"#,
                    r#"{"id": 11, "request": {"op": "check", "data": true}}"#,
                ] {
                    s.extend(frame(json));
                }
                add("hello-requests", s);

                let mut s = vec![3u8];
                s.extend(hello());
                for json in [
                    r#"{"id": 1, "request": {"op": "restore-to", "name": "c", "target": "/dev/x"}}"#,
                    r#"{"id": 2, "request": {"op": "restore", "name": "a", "backup": true, "force": false}}"#,
                    r#"{"id": 3, "request": {"op": "resume-restore"}}"#,
                    r#"{"id": 4, "request": {"op": "create", "name": "w", "expires": null, "labels": {}, "from": "b", "writable": true, "created": 5}}"#,
                    r#"{"id": 5, "request": {"op": "write", "offset": 0, "snapshot": "w"}}"#,
                ] {
                    s.extend(frame(json));
                }
                add("hello-restore", s);

                let mut s = vec![0u8];
                s.extend(frame(
                    r#"{"hello": "snapctl-control", "version": 2, "store": "/dev/vdb", "store_id": null}"#,
                ));
                add("hello-other-version", s);

                // Server answers (read by the client's decoder).
                let mut s = vec![0u8];
                s.extend(frame(r#"{"welcome": {"version": 1, "server": "0.1.0"}}"#));
                s.extend(frame(
                    r#"{"progress": {"id": 3, "done": 4194304, "total": 8388608}}"#,
                ));
                s.extend(frame(r#"{"ok": {"id": 1, "reply": {"response": {"type": "deleted", "names": ["a"], "freed_bytes": 4096}, "events": []}}}"#));
                s.extend(frame(r#"{"err": {"id": 2, "error": {"kind": "io", "message": "x", "exit_code": 1, "errno": 5}}}"#));
                add("server-answers", s);
            }
            "config" => {
                add(
                    "example",
                    include_bytes!("../scripts/snapctl.toml.example").to_vec(),
                );
                add(
                    "two-stores",
                    br#"[store.db]
path = "/dev/a"
[[store.db.period]]
name = "hourly"
every = "1h"
keep = 24
retain = "2d"
freeze = ["/srv/db"]
pre_hook = "true"
post_hook = "true"
[[store.db.period]]
name = "weekly"
every = "1w"
retain = "4w"

[store.other]
path = "/dev/b"
[[store.other.period]]
name = "daily"
every = "1d"
keep = 7
"#
                    .to_vec(),
                );
            }
            _ => {}
        }
        out
    }
}
