//! The exception store: superblock, metadata region (redb), snapshot catalog, chunk allocator,
//! each in a module of its own; the copy-on-write rules that use them live in [`cow`]. This
//! module opens and formats stores and holds the public entry points. Nothing here prints.

mod allocator;
mod catalog;
pub mod codec;
pub mod cow;
pub mod format;
mod journal;
mod metadata;
pub mod upgrade;
mod writeback;
pub use writeback::Writeback;

pub use catalog::{Event, SnapState, Snapshot};
pub(crate) use metadata::*;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{meta_err, Error, Result};
use crate::io::{engine_for, open_device, AlignedBuf, BlockIo, EngineChoice, OpenMode};
use crate::profile::{self, Phase};
use crate::store::format::{
    OnFull, Superblock, BACKUP_OFFSET, FORMAT_VERSION, META_OFFSET, MIN_META_LEN, SUPERBLOCK_SIZE,
};

pub struct InitOptions {
    pub chunk_size: u64,
    pub on_full: OnFull,
    pub force: bool,
    pub metadata_size: Option<u64>,
}

/// How a command wants the store.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Open the origin for writing (only `write`/`serve` need it).
    pub write_origin: bool,
    /// Open a block-device origin with O_EXCL: commands that change snapshots refuse an origin
    /// mounted behind snapctl's back, whose writes would bypass copy-on-write.
    pub exclusive_origin: bool,
    pub engine: EngineChoice,
    /// How long to wait for another snapctl to finish.
    pub lock_timeout: Duration,
    /// Opened by `check`: a damaged superblock is read from its backup copy, and a damaged
    /// name index is left for the check to report (and `--repair` to rebuild) instead of
    /// refusing to open. The store is read through the page cache (one pass over all the
    /// metadata gains the kernel's readahead); `--repair`'s writes are flushed all the same.
    pub for_check: bool,
    /// Read the catalog on demand instead of whole at open: only the rows a `create` (of the
    /// origin) or a `delete` touches are read, so that they cost the same at one snapshot or a
    /// hundred thousand. Any other change reads the whole catalog first; reads and listings
    /// are for stores opened without it.
    pub catalog_on_demand: bool,
    /// What this process may keep of the store's metadata in memory, in bytes: half for the
    /// metadata engine's page cache, the rest for resolved and verified records (see `Caches`).
    pub cache_bytes: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            write_origin: false,
            exclusive_origin: false,
            engine: EngineChoice::from_env(),
            lock_timeout: lock_timeout_from_env(),
            for_check: false,
            catalog_on_demand: false,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// The default of [`OpenOptions::cache_bytes`] (`serve --cache`).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// The smallest `serve --cache`.
pub const MIN_CACHE_BYTES: usize = 4 << 20;

/// How a store's memory for metadata is split: half for the metadata engine's page cache, a
/// quarter for resolved groups (`cow::ResolvedCache`), a quarter for the record values
/// verified and decoded (`cow/records.rs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caches {
    pub(crate) meta_bytes: usize,
    pub(crate) resolved_groups: usize,
    pub(crate) verified_records: usize,
}

impl Caches {
    pub(crate) fn of(bytes: usize) -> Caches {
        let bytes = bytes.max(MIN_CACHE_BYTES);
        Caches {
            meta_bytes: bytes / 2,
            resolved_groups: (bytes / 4 / cow::ResolvedCache::GROUP_BYTES).max(16),
            verified_records: (bytes / 4 / cow::VERIFIED_BYTES).max(16),
        }
    }
}

/// How `open_on` opens a store on its devices.
struct Opening {
    /// The store's lock, held for the life of the `Store`.
    lock: Option<File>,
    /// Where the metadata's pages are read from (see `Region::reader`).
    meta_reader: Option<Arc<dyn BlockIo>>,
    caches: Caches,
}

fn lock_timeout_from_env() -> Duration {
    std::env::var("SNAPCTL_LOCK_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(5))
}

/// The metadata database: opened read-only, so that commands which end up changing nothing
/// (and every failed command) leave the store's bytes alone; upgraded to writable by the first
/// write transaction.
pub(crate) enum Db {
    Ro(redb::ReadOnlyDatabase),
    Rw(redb::Database),
    Closed,
}

pub struct Store {
    pub sb: Superblock,
    /// The store's path as given (for messages).
    pub name: String,
    pub(crate) dev: Arc<dyn BlockIo>,
    pub(crate) origin: Arc<dyn BlockIo>,
    pub(crate) db: Db,
    region: Region,
    /// Every snapshot, by id: one entry per snapshot, never per exception.
    pub(crate) snaps: catalog::Catalog,
    /// Epoch of the next write interval (E in DESIGN.md).
    pub(crate) epoch: u64,
    /// Chunks known to be preserved since the newest live snapshot: repeat writes skip the index.
    pub(crate) preserved: cow::Preserved,
    /// What the on-full policy did during this process, for the caller to log.
    pub events: Vec<Event>,
    /// The format version on disk (older only while `snapctl upgrade` converts it).
    pub version: u32,
    /// Overlays proven whole in this process (see `verify_overlay`).
    pub(crate) verified_overlays: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Groups resolved (record chains read and verified) since the last write transaction:
    /// `(group, epoch) -> where each chunk is`. Cleared whenever a writer opens, so it never
    /// outlives the metadata it was read from.
    pub(crate) resolved: cow::ResolvedCache,
    /// The memory for metadata this process may keep ([`OpenOptions::cache_bytes`]).
    pub(crate) caches: Caches,
    /// A restore interrupted by a crash that opening the store finished: its target's name.
    pub resumed_restore: Option<String>,
    /// Opened by `check` (see [`OpenOptions::for_check`]).
    pub(crate) for_check: bool,
    /// The catalog is read on demand (see [`OpenOptions::catalog_on_demand`]).
    pub(crate) catalog_on_demand: bool,
    /// Snapshot ids whose catalog row fails its check (only when opened by `check`).
    pub(crate) damaged_snapshots: Vec<u64>,
    /// The copy journal's position (see `journal.rs`).
    pub(crate) journal: journal::Journal,
    /// Pipelined origin writes, once a server turns them on (see `writeback.rs`).
    pub(crate) writeback: Option<Arc<writeback::Writeback>>,
    writeback_worker: Option<std::thread::JoinHandle<()>>,
    _lock: Option<File>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Staged and queued origin writes first (a failed queue has said so to every later
        // flush).
        let _ = self.settle_staged();
        if let Some(wb) = self.writeback.take() {
            let _ = wb.drain();
            wb.stop();
            if let Some(t) = self.writeback_worker.take() {
                let _ = t.join();
            }
        }
        // Closing folds the journal, so that the next open has nothing to replay. Should this
        // fail (or the process die first), that open replays it.
        let n = self.name.clone();
        let _ = guard_panic(&n, || self.fold_journal());
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn open_err(what: &str, path: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) => Error::NotFound(format!(
            "{what} {}: no such file or device",
            path.display()
        )),
        Some(libc::EBUSY) => Error::Busy(format!(
            "{what} {} is in use (mounted, or held by another program); unmount it or stop that program",
            path.display()
        )),
        // The system's words would only repeat "permission denied".
        Some(libc::EACCES) | Some(libc::EPERM) => Error::Io {
            message: format!(
                "{what} {}: permission denied; run as root, or as a user who may read and write it",
                path.display()
            ),
            source: e,
        },
        _ if e.kind() == io::ErrorKind::InvalidInput => Error::Invalid(format!(
            "{what} {} is not a block device or a regular file; give the {what}'s device or file",
            path.display()
        )),
        _ => Error::io(format!("{what} {}", path.display()), e),
    }
}

/// Opens with retries while the device is held exclusively by someone else, up to `timeout`.
fn open_retrying(
    what: &str,
    path: &Path,
    mode: OpenMode,
    timeout: Duration,
) -> Result<crate::io::Device> {
    let start = Instant::now();
    loop {
        match open_device(path, mode) {
            Ok(d) => return Ok(d),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(open_err(what, path, e)),
        }
    }
}

/// Takes the store's exclusive lock, waiting up to `timeout` for another snapctl to finish.
fn lock(file: &File, name: &str, timeout: Duration) -> Result<File> {
    let f = file
        .try_clone()
        .map_err(|e| Error::io(format!("{name}: lock"), e))?;
    let start = Instant::now();
    loop {
        // SAFETY: flock on a valid fd owned by `f`.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(f);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io(format!("{name}: lock"), e));
        }
        if start.elapsed() >= timeout {
            return Err(Error::Busy(format!(
                "store {name} is busy: another snapctl (a command, or a `snapctl serve`) is using it; try again when it has finished"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stable identity for the origin: which file or device it is, not what it holds (the data
/// changes; `init` must not write to it). See docs/FORMAT.md.
/// Gives a store file all its blocks now: a copy-on-write must never find the file system
/// full, and copies into allocated blocks skip the file system's allocation on the write path.
/// A file system that cannot preallocate (EOPNOTSUPP) is left to allocate as it writes.
fn preallocate(file: &File, size: u64, name: &str) -> Result<()> {
    // SAFETY: fallocate on a descriptor we own; mode 0 allocates without changing any byte.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        Some(libc::ENOSPC) => Err(Error::NoSpace(format!(
            "the file system holding {name} has no room for its {size} bytes (a store file is allocated whole at init); free space or use a smaller file"
        ))),
        _ => Err(Error::io(format!("store {name}: allocate"), e)),
    }
}

pub fn origin_fingerprint(path: &Path) -> Result<[u8; 32]> {
    let meta = std::fs::metadata(path).map_err(|e| open_err("origin", path, e))?;
    let mut h = blake3::Hasher::new();
    if meta.file_type().is_file() {
        h.update(b"file");
        h.update(&meta.dev().to_le_bytes());
        h.update(&meta.ino().to_le_bytes());
        return Ok(*h.finalize().as_bytes());
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if let Ok(backing) = std::fs::read_to_string(sys.join("loop/backing_file")) {
        // A loop device: its identity is the file behind it (loop numbers are reused).
        if let Ok(bm) = std::fs::metadata(backing.trim()) {
            h.update(b"loop");
            h.update(&bm.dev().to_le_bytes());
            h.update(&bm.ino().to_le_bytes());
            let off = std::fs::read_to_string(sys.join("loop/offset")).unwrap_or_default();
            h.update(off.trim().as_bytes());
            return Ok(*h.finalize().as_bytes());
        }
    }
    // A disk or partition: the hardware's id where the kernel shows one, else the device number.
    for f in [
        "wwid",
        "device/wwid",
        "device/serial",
        "../device/wwid",
        "../device/serial",
    ] {
        if let Ok(s) = std::fs::read_to_string(sys.join(f)) {
            if !s.trim().is_empty() {
                h.update(b"disk");
                h.update(s.trim().as_bytes());
                let part = std::fs::read_to_string(sys.join("partition")).unwrap_or_default();
                h.update(part.trim().as_bytes());
                return Ok(*h.finalize().as_bytes());
            }
        }
    }
    h.update(b"devno");
    h.update(&rdev.to_le_bytes());
    Ok(*h.finalize().as_bytes())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            (x.dev() == y.dev() && x.ino() == y.ino()) || (x.rdev() != 0 && x.rdev() == y.rdev())
        }
        _ => false,
    }
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    // SAFETY: getrandom writes at most u.len() bytes into u.
    let n = unsafe { libc::getrandom(u.as_mut_ptr().cast(), u.len(), 0) };
    if n != 16 {
        // No entropy source: fall back to time and pid, still unique enough for a label.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        u.copy_from_slice(
            &blake3::hash(&[t.to_le_bytes(), (std::process::id() as u128).to_le_bytes()].concat())
                .as_bytes()[..16],
        );
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Default metadata region: 256 bytes per data chunk (the worst case of one record per chunk,
/// written twice by redb's copy-on-write), at least 8 MiB, rounded to MiB.
pub fn default_metadata_size(store_size: u64, chunk_size: u64) -> u64 {
    let per_chunk = (store_size / chunk_size).saturating_mul(256);
    per_chunk.max(8 << 20).next_multiple_of(1 << 20)
}

impl Store {
    /// Formats `store` as the exception store of `origin`. Never writes to the origin.
    pub fn init(store: &Path, origin: &Path, opts: &InitOptions) -> Result<Superblock> {
        let name = store.display().to_string();
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(Error::Invalid(format!(
                "--chunk-size {cs} is not a power of two between 4 KiB and 1 MiB; use 4K, 8K, 16K, ... 1M"
            )));
        }
        let origin_abs =
            std::fs::canonicalize(origin).map_err(|e| open_err("origin", origin, e))?;
        let store_abs = std::fs::canonicalize(store).map_err(|e| open_err("store", store, e))?;
        if same_file(&origin_abs, &store_abs) {
            return Err(Error::Invalid(format!(
                "store and origin are the same device ({}); the store must be a second device or file",
                origin_abs.display()
            )));
        }
        let origin_str = origin_abs.to_string_lossy().to_string();
        if origin_str.len() > crate::store::format::MAX_PATH {
            return Err(Error::Invalid(
                "origin path is longer than 2048 bytes".into(),
            ));
        }
        let timeout = lock_timeout_from_env();
        // The origin is opened read-only: O_EXCL refuses a mounted device, and init writes nothing.
        let odev = open_retrying(
            "origin",
            &origin_abs,
            OpenMode {
                write: false,
                exclusive: true,
                buffered: false,
            },
            timeout,
        )?;
        if odev.size == 0 {
            return Err(Error::Invalid(format!(
                "origin {} is empty (0 bytes); give the device or file to take snapshots of",
                origin.display()
            )));
        }
        // `init ORIGIN --origin STORE`, the two swapped: going ahead would format the data.
        let mut magic = [0u8; 8];
        let origin_is_store = File::open(&origin_abs)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|_| &magic == crate::store::format::MAGIC);
        if origin_is_store {
            return Err(Error::Invalid(format!(
                "origin {} is itself a snapctl store; were STORE and --origin swapped? (snapctl init STORE --origin ORIGIN)",
                origin.display()
            )));
        }
        let sdev = open_retrying(
            "store",
            &store_abs,
            OpenMode {
                write: true,
                exclusive: true,
                buffered: false,
            },
            timeout,
        )?;
        let lock_file = lock(&sdev.file, &name, timeout)?;
        let store_size = sdev.size;
        let store_is_file = !sdev.is_block;
        let store_file = sdev
            .file
            .try_clone()
            .map_err(|e| Error::io(format!("store {name}"), e))?;
        let io = engine_for(sdev, EngineChoice::from_env())
            .map_err(|e| Error::io(format!("store {name}: I/O engine"), e))?;
        let mut first = vec![0u8; SUPERBLOCK_SIZE];
        if store_size >= SUPERBLOCK_SIZE as u64 {
            io.read_at(&mut first, 0)
                .map_err(|e| Error::io(format!("store {name}: read"), e))?;
            if &first[..8] == crate::store::format::MAGIC && !opts.force {
                return Err(Error::Exists(format!(
                    "{name} already holds a snapctl store; use --force to overwrite it (its snapshots are lost)"
                )));
            }
        }
        let meta_len = match opts.metadata_size {
            Some(m) => m.next_multiple_of(1 << 20),
            None => default_metadata_size(store_size, cs),
        };
        if meta_len < MIN_META_LEN {
            return Err(Error::Invalid(format!(
                "--metadata-size {meta_len} is below the minimum of 4 MiB; give 4M or more, or leave it out for the default"
            )));
        }
        let data_offset = (META_OFFSET + meta_len).next_multiple_of(cs.max(1 << 20));
        let min_size = data_offset + 16 * cs;
        if store_size < min_size {
            return Err(Error::Invalid(format!(
                "store {name} is too small: {} bytes, but its metadata and 16 chunks need at least {} bytes",
                store_size, min_size
            )));
        }
        let sb = Superblock {
            uuid: random_uuid(),
            chunk_size: cs,
            origin_size: odev.size,
            fingerprint: origin_fingerprint(&origin_abs)?,
            meta_offset: META_OFFSET,
            meta_len,
            data_offset,
            data_chunks: (store_size - data_offset) / cs,
            on_full: opts.on_full,
            created: now(),
            origin_path: origin_str,
        };
        if store_is_file {
            preallocate(&store_file, store_size, &name)?;
        }
        drop(store_file);
        let w = |r: io::Result<()>| {
            r.map_err(|e| crate::error::write_err(format!("store {name}: write"), e))
        };
        // Crash argument: the superblock is written last. Until it is durable the store reads as
        // "not a snapctl store", so a crash mid-init leaves nothing that could be mistaken for one.
        // The backup is cleared too: an old store's backup must never describe the new one.
        w(io.write_at(&[0u8; SUPERBLOCK_SIZE], 0))?;
        w(io.write_at(&[0u8; SUPERBLOCK_SIZE], BACKUP_OFFSET))?;
        w(zero_journal(io.as_ref()))?;
        format_metadata(&io, meta_len, &name)?;
        w(write_superblocks(io.as_ref(), &sb))?;
        w(io.flush())?;
        drop(lock_file);
        Ok(sb)
    }

    /// Opens a store from its path, with its origin.
    pub fn open(store: &Path, opts: OpenOptions) -> Result<Store> {
        Self::open_impl(store, opts, false)
    }

    /// Opens a store of this format version or of the one before it, for `snapctl upgrade`:
    /// the catalog is not loaded (an older one is in the older layout).
    pub fn open_for_upgrade(store: &Path) -> Result<Store> {
        Self::open_impl(store, OpenOptions::default(), true)
    }

    fn open_impl(store: &Path, opts: OpenOptions, upgrade: bool) -> Result<Store> {
        let name = store.display().to_string();
        let sdev = open_retrying(
            "store",
            store,
            OpenMode {
                write: true,
                exclusive: true,
                buffered: opts.for_check,
            },
            opts.lock_timeout,
        )?;
        let lock_file = lock(&sdev.file, &name, opts.lock_timeout)?;
        let io = engine_for(sdev, opts.engine)
            .map_err(|e| Error::io(format!("store {name}: I/O engine"), e))?;
        let (sb, version) = if upgrade {
            read_superblock_any(io.as_ref(), &name)?
        } else {
            let sb = read_superblock_or_backup(io.as_ref(), &name, opts.for_check)?;
            (sb, FORMAT_VERSION)
        };
        let opath = PathBuf::from(&sb.origin_path);
        let odev = open_retrying(
            "origin",
            &opath,
            OpenMode {
                write: opts.write_origin,
                exclusive: opts.write_origin || opts.exclusive_origin,
                buffered: false,
            },
            opts.lock_timeout,
        )
        .map_err(|e| match e {
            // The user did not name it: say whose origin it is and what to do.
            Error::NotFound(_) => Error::NotFound(format!(
                "origin {} of store {name}: no such file or device; attach the origin at that path",
                sb.origin_path
            )),
            e => e,
        })?;
        if odev.size != sb.origin_size {
            return Err(Error::Mismatch(format!(
                "origin {} is {} bytes but store {name} was made for {} bytes; attach the device it was made for, or give this one back its size",
                sb.origin_path, odev.size, sb.origin_size
            )));
        }
        if origin_fingerprint(&opath)? != sb.fingerprint {
            return Err(Error::Mismatch(format!(
                "origin {} is not the device store {name} was made for (its identity changed); attach the right device at that path",
                sb.origin_path
            )));
        }
        let origin = engine_for(odev, opts.engine)
            .map_err(|e| Error::io(format!("origin {}: I/O engine", sb.origin_path), e))?;
        // The metadata's page reads through the page cache (see `Region::reader`).
        let reader = if opts.for_check {
            None
        } else {
            open_device(
                store,
                OpenMode {
                    write: false,
                    exclusive: false,
                    buffered: true,
                },
            )
            .and_then(|d| engine_for(d, EngineChoice::Sync))
            .ok()
        };
        let how = Opening {
            lock: Some(lock_file),
            meta_reader: reader,
            caches: Caches::of(opts.cache_bytes),
        };
        let mut store = Self::open_on(io, origin, sb, name, how)?;
        if upgrade {
            store.version = version;
            return Ok(store);
        }
        store.for_check = opts.for_check;
        store.catalog_on_demand = opts.catalog_on_demand && !opts.for_check;
        guard_panic(&store.name.clone(), || store.load_catalog())?;
        // Before anything reads a view or writes the origin: the journal's records are part of
        // what the store holds.
        guard_panic(&store.name.clone(), || store.open_journal())?;
        if store.restore_pending()? {
            // A restore was cut short: finish it before anything reads the origin, with the
            // origin opened for writing (and exclusively) for that, and the whole catalog.
            store.whole_catalog()?;
            if !opts.write_origin {
                let odev = open_retrying(
                    "origin",
                    &opath,
                    OpenMode {
                        write: true,
                        exclusive: true,
                        buffered: false,
                    },
                    opts.lock_timeout,
                )?;
                store.origin = engine_for(odev, opts.engine).map_err(|e| {
                    Error::io(format!("origin {}: I/O engine", store.sb.origin_path), e)
                })?;
            }
            store.resume_restore()?;
        }
        Ok(store)
    }

    /// Opens a store on already-opened devices (tests use the in-memory and crash engines).
    pub fn open_io(dev: Arc<dyn BlockIo>, origin: Arc<dyn BlockIo>, name: &str) -> Result<Store> {
        Self::open_io_with(dev, origin, name, false)
    }

    /// `open_io` reading the catalog on demand, as a `create` or a `delete` run from the
    /// command line opens a store (tests: what an open recovers must not depend on that).
    pub fn open_io_on_demand(
        dev: Arc<dyn BlockIo>,
        origin: Arc<dyn BlockIo>,
        name: &str,
    ) -> Result<Store> {
        Self::open_io_with(dev, origin, name, true)
    }

    fn open_io_with(
        dev: Arc<dyn BlockIo>,
        origin: Arc<dyn BlockIo>,
        name: &str,
        on_demand: bool,
    ) -> Result<Store> {
        let sb = read_superblock(dev.as_ref(), name)?;
        if origin.len() != sb.origin_size {
            return Err(Error::Mismatch(format!("{name}: origin size changed")));
        }
        let how = Opening {
            lock: None,
            meta_reader: None,
            caches: Caches::of(DEFAULT_CACHE_BYTES),
        };
        let mut store = Self::open_on(dev, origin, sb, name.to_string(), how)?;
        store.catalog_on_demand = on_demand;
        guard_panic(name, || store.load_catalog())?;
        guard_panic(name, || store.open_journal())?;
        if store.restore_pending()? {
            store.whole_catalog()?;
            store.resume_restore()?;
        }
        Ok(store)
    }

    /// Formats a store on already-opened devices (tests).
    pub fn init_io(
        dev: Arc<dyn BlockIo>,
        origin_size: u64,
        chunk_size: u64,
        meta_len: u64,
        on_full: OnFull,
    ) -> Result<Superblock> {
        let data_offset = (META_OFFSET + meta_len).next_multiple_of(chunk_size.max(1 << 20));
        if dev.len() < data_offset + 16 * chunk_size {
            return Err(Error::Invalid("store too small".into()));
        }
        let sb = Superblock {
            uuid: random_uuid(),
            chunk_size,
            origin_size,
            fingerprint: [0; 32],
            meta_offset: META_OFFSET,
            meta_len,
            data_offset,
            data_chunks: (dev.len() - data_offset) / chunk_size,
            on_full,
            created: now(),
            origin_path: "(memory)".into(),
        };
        let e = |r: io::Result<()>| r.map_err(|e| Error::io("init", e));
        e(dev.write_at(&[0u8; SUPERBLOCK_SIZE], BACKUP_OFFSET))?;
        e(zero_journal(dev.as_ref()))?;
        format_metadata(&dev, meta_len, "init")?;
        e(write_superblocks(dev.as_ref(), &sb))?;
        e(dev.flush())?;
        Ok(sb)
    }

    fn open_on(
        io: Arc<dyn BlockIo>,
        origin: Arc<dyn BlockIo>,
        sb: Superblock,
        name: String,
        how: Opening,
    ) -> Result<Store> {
        let want = sb.data_offset + sb.data_chunks * sb.chunk_size;
        if want > io.len() {
            return Err(Error::Corrupt(format!(
                "store {name} is {} bytes but its superblock says {want}: was the device or file truncated? give it back its full size (or attach the right device)",
                io.len()
            )));
        }
        let mut lb = vec![0u8; 512];
        io.read_at(&mut lb, LENBLOCK_OFFSET)
            .map_err(|e| Error::io(format!("store {name}: read"), e))?;
        let len = decode_lenblock(&lb)
            .filter(|l| *l <= sb.meta_len)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "store {name}: the metadata length block is damaged; run `snapctl check`"
                ))
            })?;
        let mut region = Region::new(io.clone(), sb.meta_offset, sb.meta_len, len);
        if let Some(r) = how.meta_reader {
            region.reader = r;
        }
        cow::set_verified_max(how.caches.verified_records);
        let mut unclean = false;
        let db = guard_panic(&name, || {
            match db_builder(how.caches).open_read_only_with_backend(region.clone()) {
                Ok(db) => Ok(Db::Ro(db)),
                // The last writer did not close cleanly: recovery writes, so open writable.
                Err(redb::DatabaseError::RepairAborted) => {
                    unclean = true;
                    db_builder(how.caches)
                        .create_with_backend(region.clone())
                        .map(Db::Rw)
                        .map_err(|e| meta_err(&name, e))
                }
                Err(e) => Err(meta_err(&name, e)),
            }
        })?;
        let mut store = Store {
            preserved: Default::default(),
            sb,
            name,
            dev: io,
            origin,
            db,
            region,
            snaps: Default::default(),
            epoch: 0,
            events: Vec::new(),
            verified_overlays: Default::default(),
            resolved: cow::ResolvedCache::new(how.caches.resolved_groups),
            caches: how.caches,
            version: FORMAT_VERSION,
            resumed_restore: None,
            for_check: false,
            catalog_on_demand: false,
            damaged_snapshots: Vec::new(),
            journal: Default::default(),
            writeback: None,
            writeback_worker: None,
            _lock: how.lock,
        };
        let n = store.name.clone();
        if unclean {
            // Before anything reads a saved chunk or writes the origin.
            guard_panic(&n, || store.settle_pending_copies())?;
        }
        Ok(store)
    }
}

impl Store {
    pub fn engine(&self) -> &'static str {
        self.dev.engine()
    }

    pub fn origin_engine(&self) -> &'static str {
        self.origin.engine()
    }
}

/// The public entry points: each runs under a panic guard, because the metadata engine may panic
/// on pages damaged behind its back (redb's documentation says so); that is a corruption error,
/// not a crash.
impl Store {
    /// Runs a change under the panic guard. A change that fails has its transaction aborted,
    /// but it may have updated the in-memory catalog first (a snapshot inserted before a copy
    /// found no room): the catalog is read again from what is committed, so a refused change
    /// leaves no trace in this process either (a server keeps serving what is on disk).
    fn change<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        self.whole_catalog()?;
        self.change_on_demand(f)
    }

    /// `change` for the two changes a catalog on demand serves (create of the origin, delete).
    fn change_on_demand<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        // Every change but a queued write starts after the staged and queued writes (see
        // writeback.rs).
        self.settle_writes()?;
        self.change_queued(f)
    }

    /// Reads the whole catalog if it was read on demand so far.
    pub(crate) fn whole_catalog(&mut self) -> Result<()> {
        if !self.snaps.partial {
            return Ok(());
        }
        self.catalog_on_demand = false;
        let n = self.name.clone();
        guard_panic(&n, || self.load_catalog())
    }

    /// `change` without waiting for the queued origin writes: for the write that queues more.
    fn change_queued<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
        let n = self.name.clone();
        if self.journal.failed {
            return Err(Error::Corrupt(format!(
                "store {n}: a write to its copy journal failed, so this process can change nothing more; stop it and open the store again (opening replays the journal)"
            )));
        }
        if let Some(wb) = &self.writeback {
            if let Some(why) = wb.failed() {
                return Err(wb.failure(&why));
            }
        }
        let r = guard_panic(&n, || f(self));
        if r.is_ok() {
            self.tell_room();
        }
        if r.is_err() {
            self.resolved.clear();
            self.preserved.clear();
            // A failure to reload is a damaged store: the next command says so.
            let _ = guard_panic(&n, || self.load_catalog());
        }
        r
    }

    /// Creates a read-only snapshot of the origin. O(1): no device reads, no exception index.
    pub fn create(
        &mut self,
        name: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        created: Option<i64>,
    ) -> Result<Snapshot> {
        self.change_on_demand(|s| s.create_inner(name, expires, labels, created))
    }

    /// A snapshot of a snapshot: its point in time, and a frozen copy of its overlay (what a
    /// writable snapshot wrote); writable if asked.
    pub fn create_from(
        &mut self,
        name: &str,
        from: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        writable: bool,
    ) -> Result<Snapshot> {
        self.change(|s| s.create_from_inner(name, from, expires, labels, writable))
    }

    /// A writable snapshot of the origin: a snapshot, then writable.
    pub fn create_writable(
        &mut self,
        name: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        self.change(|s| {
            s.create_inner(name, expires, labels, None)?;
            s.set_writable_inner(name)
        })
    }

    /// Makes a read-only snapshot writable. One-way: nothing makes it read-only again.
    pub fn set_writable(&mut self, name: &str) -> Result<Snapshot> {
        self.change(|s| s.set_writable_inner(name))
    }

    /// Writes into a writable snapshot (see `cow/`).
    pub fn write_snapshot(&mut self, name: &str, writes: &[(u64, &[u8])], fua: bool) -> Result<()> {
        self.change(|s| s.write_overlay_inner(name, writes, fua))
    }

    /// Byte ranges where two views differ (see `cow/`), as sorted chunk numbers.
    pub fn diff_chunks(&mut self, from: &str, to: &str) -> Result<Vec<u64>> {
        self.settle_writes()?;
        guard_panic(&self.name, || self.diff_chunks_inner(from, to))
    }

    /// Makes the origin identical to snapshot `target` (see `cow/`).
    pub fn restore(
        &mut self,
        target: &str,
        backup: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        self.change(|s| s.restore_inner(target, backup, progress))
    }

    pub fn rename(&mut self, old: &str, new: &str) -> Result<Snapshot> {
        self.change(|s| s.rename_inner(old, new))
    }

    /// Deletes snapshots in one commit; returns the bytes freed.
    pub fn delete(&mut self, names: &[String]) -> Result<u64> {
        self.change_on_demand(|s| s.delete_inner(names))
    }

    pub fn used_chunks(&self) -> Result<u64> {
        guard_panic(&self.name, || self.used_chunks_inner())
    }

    pub fn recent_events(&self, count: usize) -> Result<Vec<Event>> {
        guard_panic(&self.name, || self.recent_events_inner(count))
    }

    /// Writes to the origin through copy-on-write (see `cow/`).
    pub fn write_origin(&mut self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        self.change(|s| s.write_origin_inner(off, data, fua))
    }

    /// Several origin writes with one preservation commit (see `cow/`).
    pub fn write_batch(&mut self, writes: &[(u64, &[u8])], fua: bool) -> Result<()> {
        self.change(|s| s.write_batch_inner(writes, fua))
    }

    /// Turns on pipelined origin writes (see `writeback.rs`): from now on [`Store::write_queued`]
    /// returns once a batch's copies are written, and its journal record and origin writes
    /// are queued: the record goes out, then a store flush that covers it and the copies, then
    /// the origin writes. With `worker`, a thread of the store's own writes the queue; without,
    /// nothing does until [`Store::pump_writes`] or anything that waits for the queue.
    pub fn pipeline_writes(&mut self, worker: bool) -> Result<()> {
        if self.writeback.is_some() {
            return Ok(());
        }
        let wb = Arc::new(writeback::Writeback::new(
            self.dev.clone(),
            self.origin.clone(),
            &self.name,
            &self.sb.origin_path,
        ));
        if worker {
            let w = wb.clone();
            let t = std::thread::Builder::new()
                .name("snapctl-writeback".into())
                .spawn(move || w.run())
                .map_err(|e| Error::io("writeback thread: start".to_string(), e))?;
            self.writeback_worker = Some(t);
        }
        self.writeback = Some(wb);
        self.tell_room();
        Ok(())
    }

    /// Where a server stages origin writes it answers before their preserve, and the store's
    /// chunk size they are counted in (see `writeback.rs`, [`Writeback::stage`]); None unless
    /// pipelined. Whoever stages must run [`Store::settle_staged`] while anything is staged.
    pub fn stage(&self) -> Option<(Arc<Writeback>, u64)> {
        self.writeback.clone().map(|wb| (wb, self.sb.chunk_size))
    }

    /// Preserves the staged origin writes, oldest first, and queues them behind their copies'
    /// flush, until none is staged. They were answered already: a failure loses them, and the
    /// queue stops and says so to every later flush, write and read of their ranges.
    pub fn settle_staged(&mut self) -> Result<()> {
        let Some(wb) = self.writeback.clone() else {
            return Ok(());
        };
        loop {
            let mut writes = wb.take_staged(self.sb.chunk_size);
            if writes.is_empty() {
                return Ok(());
            }
            let _settle = profile::span(Phase::Settle);
            let ranges: Vec<(u64, u64)> = writes
                .iter()
                .map(|(o, b)| (*o, b.as_slice().len() as u64))
                .collect();
            let done = self
                .whole_catalog()
                .and_then(|()| self.change_queued(|s| s.write_queued_inner(&mut writes)));
            if let Err(e) = done {
                wb.fail_staged(e.to_string(), &ranges);
                return Err(e);
            }
        }
    }

    /// Tells the writeback queue how many store chunks are free, which bounds what it stages.
    fn tell_room(&self) {
        let Some(wb) = &self.writeback else { return };
        // Unknown room stages nothing.
        let free = self
            .used_chunks_inner()
            .map(|u| self.sb.data_chunks.saturating_sub(u))
            .unwrap_or(0);
        wb.set_room(free);
    }

    /// Whether origin writes are pipelined ([`Store::pipeline_writes`]).
    pub fn pipelined(&self) -> bool {
        self.writeback.is_some()
    }

    /// Origin writes, pipelined: copy-on-write as [`Store::write_batch`], but the writes
    /// themselves are queued behind the flush of their copies, and reads wait for them. On
    /// success `writes` is emptied (the queue owns the buffers). A failure before anything was
    /// queued (a range, a full store, the copies) leaves it whole, so that the caller can tell
    /// the writes apart; one while queuing (the queue stopped under it) leaves it short. Without
    /// [`Store::pipeline_writes`], the same as `write_batch`.
    pub fn write_queued(&mut self, writes: &mut Vec<(u64, AlignedBuf)>, fua: bool) -> Result<()> {
        if self.writeback.is_none() {
            let list: Vec<(u64, &[u8])> = writes.iter().map(|(o, b)| (*o, b.as_slice())).collect();
            self.write_batch(&list, fua)?;
            writes.clear();
            return Ok(());
        }
        self.whole_catalog()?;
        // After everything staged before these (see writeback.rs).
        self.settle_staged()?;
        self.change_queued(|s| s.write_queued_inner(writes))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is queued now, in this thread (for stores pipelined without a worker).
    pub fn pump_writes(&self) {
        if let Some(wb) = &self.writeback {
            wb.write_queued();
        }
    }

    /// Settles the staged origin writes, then waits for every queued one; fails if one failed.
    /// Everything that changes the snapshots or needs the origin's latest bytes on disk starts
    /// with this.
    pub(crate) fn settle_writes(&mut self) -> Result<()> {
        self.settle_staged()?;
        self.drain_writes()
    }

    /// Waits for every queued origin write (not the staged ones: a preserve, which is what
    /// settles those, waits with this for the queue before changing the snapshots); fails if
    /// one failed.
    pub(crate) fn drain_writes(&self) -> Result<()> {
        match &self.writeback {
            Some(wb) => wb.drain(),
            None => Ok(()),
        }
    }

    /// Waits for the queued origin writes over `off..off+len` of `view`. Only the origin's
    /// reads wait: a snapshot never reads the origin where a write is queued, because every
    /// queued write's chunks were preserved since the newest snapshot before it was queued
    /// (and a snapshot taken since waited for the whole queue). Staged writes are not waited
    /// for (their preserve needs the store alone, and the reader holds it): the origin's reads
    /// lay them over what they read ([`Store::overlay_staged`]), and a snapshot's read of the
    /// origin finds its old bytes there, since no staged write reaches the origin before its
    /// preserve.
    fn wait_writes(&self, view: &str, off: u64, len: u64) -> Result<()> {
        match &self.writeback {
            Some(wb) if view == "origin" => wb.wait_for(off, len),
            _ => Ok(()),
        }
    }

    /// What a read of `view` at `off` sees of the staged writes (see `wait_writes`).
    fn overlay_staged(&self, view: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.writeback {
            Some(wb) if view == "origin" => wb.overlay_staged(off, buf),
            _ => Ok(()),
        }
    }

    /// Several reads of any views, in flight together.
    pub fn read_batch(&self, reqs: &mut [crate::store::cow::ReadReq<'_>]) -> Result<()> {
        for r in reqs.iter() {
            self.wait_writes(r.view, r.off, r.buf.len() as u64)?;
        }
        guard_panic(&self.name, || self.read_batch_inner(reqs))?;
        for r in reqs.iter_mut() {
            self.overlay_staged(r.view, r.off, r.buf)?;
        }
        Ok(())
    }

    /// What `off..off+len` of a view holds: consecutive (length, reads as zeros) extents, at
    /// most `max_chunks` chunks' worth (see `extents_inner`).
    pub fn extents(
        &self,
        view: &str,
        off: u64,
        len: u64,
        max_chunks: u64,
    ) -> Result<Vec<(u64, bool)>> {
        self.wait_writes(view, off, len)?;
        // A staged write is data wherever it lands: the whole range is said to be data, which
        // is always true enough (block status may call zeros data, never data zeros).
        if view == "origin"
            && self
                .writeback
                .as_ref()
                .is_some_and(|wb| wb.staged_meets(off, len))
        {
            return Ok(vec![(len, false)]);
        }
        guard_panic(&self.name, || {
            self.extents_inner(view, off, len, max_chunks)
        })
    }

    /// Reads a snapshot, or the live origin for "origin".
    pub fn read_view(&self, view: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        self.wait_writes(view, off, buf.len() as u64)?;
        guard_panic(&self.name, || self.read_view_inner(view, off, buf))?;
        self.overlay_staged(view, off, buf)
    }

    /// Verifies checksums, single ownership of every chunk and the space accounting.
    pub fn check(&mut self) -> Result<crate::store::cow::CheckReport> {
        self.check_with(false, &mut |_, _| {})
    }

    /// `check`, and with `data` every saved chunk read and verified against its hash
    /// (`progress(done, total)` in bytes).
    pub fn check_with(
        &mut self,
        data: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<crate::store::cow::CheckReport> {
        self.settle_writes()?;
        let n = self.name.clone();
        guard_panic(&n, || self.check_inner(data, progress))
    }

    /// `check --repair`: mends what `check` finds mendable (see cow/repair.rs) and returns the
    /// final check's report, its `repaired` saying what was done. With `drop_damaged`, damaged
    /// rows are removed and the snapshots that read them marked invalid.
    pub fn repair(
        &mut self,
        data: bool,
        drop_damaged: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<crate::store::cow::CheckReport> {
        self.change(|s| s.repair_inner(data, drop_damaged, progress))
    }
}

/// Writes snapshot `s`'s row, and its entry in the live-point index (there while it is a
/// valid snapshot of branch 0; a snapshot's epoch and branch never change).
pub(crate) fn put_snap(tx: &redb::WriteTransaction, s: &Snapshot, store: &str) -> Result<()> {
    let mut t = tx.open_table(SNAPS).map_err(|e| meta_err(store, e))?;
    let v = crate::store::codec::encode_snapshot(s);
    t.insert(s.id, v.as_slice())
        .map_err(|e| meta_err(store, e))?;
    let mut live = tx.open_table(LIVE).map_err(|e| meta_err(store, e))?;
    if s.state == SnapState::Valid && s.branch == 0 {
        live.insert((s.epoch, s.id), ())
    } else {
        live.remove((s.epoch, s.id)).map(|_| None)
    }
    .map_err(|e| meta_err(store, e))?;
    Ok(())
}

/// Removes snapshot `s`'s row, its name and its live-point entry.
pub(crate) fn remove_snap(tx: &redb::WriteTransaction, s: &Snapshot, store: &str) -> Result<()> {
    let mut snaps = tx.open_table(SNAPS).map_err(|e| meta_err(store, e))?;
    snaps.remove(s.id).map_err(|e| meta_err(store, e))?;
    let mut names = tx.open_table(NAMES).map_err(|e| meta_err(store, e))?;
    names
        .remove(s.name.as_str())
        .map_err(|e| meta_err(store, e))?;
    let mut live = tx.open_table(LIVE).map_err(|e| meta_err(store, e))?;
    live.remove((s.epoch, s.id))
        .map_err(|e| meta_err(store, e))?;
    Ok(())
}

/// Reads a store's superblock without opening or locking the store (a server may hold it).
pub fn peek_superblock(store: &Path) -> Option<Superblock> {
    use std::io::Read;
    let mut f = std::fs::File::open(store).ok()?;
    let mut b = vec![0u8; SUPERBLOCK_SIZE];
    f.read_exact(&mut b).ok()?;
    Superblock::decode(&b, &store.display().to_string()).ok()
}

pub(crate) fn read_superblock_any(io: &dyn BlockIo, name: &str) -> Result<(Superblock, u32)> {
    if io.len() < SUPERBLOCK_SIZE as u64 {
        return Err(Error::not_a_store(name));
    }
    let mut b = vec![0u8; SUPERBLOCK_SIZE];
    io.read_at(&mut b, 0)
        .map_err(|e| Error::io(format!("store {name}: read"), e))?;
    Superblock::decode_any(&b, name)
}

/// The backup copy of the superblock: `Ok(None)` when there is none (all zero: a store made
/// before snapctl wrote one), an error when it is there but fails its checks.
pub(crate) fn read_backup_superblock(io: &dyn BlockIo, name: &str) -> Result<Option<Superblock>> {
    if io.len() < BACKUP_OFFSET + SUPERBLOCK_SIZE as u64 {
        return Ok(None);
    }
    let mut b = vec![0u8; SUPERBLOCK_SIZE];
    io.read_at(&mut b, BACKUP_OFFSET)
        .map_err(|e| Error::io(format!("store {name}: read"), e))?;
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    Superblock::decode(&b, &format!("{name} (backup superblock)")).map(Some)
}

/// Writes the superblock and its backup copy (no flush: the caller's flush covers both).
/// Clears the copy journal's area: whatever an earlier store or format left there is no record.
pub(crate) fn zero_journal(io: &dyn BlockIo) -> io::Result<()> {
    let zeros = crate::io::AlignedBuf::new(format::JOURNAL_LEN as usize);
    io.write_at(zeros.as_slice(), format::JOURNAL_OFFSET)
}

pub(crate) fn write_superblocks(io: &dyn BlockIo, sb: &Superblock) -> io::Result<()> {
    let b = sb.encode();
    io.write_at(&b, BACKUP_OFFSET)?;
    io.write_at(&b, 0)
}

/// The superblock; when it is damaged or gone but its backup copy is whole, `check` opens the
/// store with the backup (`fallback`) and every other command says how to repair it.
pub(crate) fn read_superblock_or_backup(
    io: &dyn BlockIo,
    name: &str,
    fallback: bool,
) -> Result<Superblock> {
    let e = match read_superblock(io, name) {
        Ok(sb) => return Ok(sb),
        Err(e @ (Error::Corrupt(_) | Error::NotAStore(_))) => e,
        Err(e) => return Err(e),
    };
    match read_backup_superblock(io, name) {
        Ok(Some(b)) if fallback => Ok(b),
        Ok(Some(_)) => Err(Error::Corrupt(format!(
            "store {name}: its superblock (the first 4 KiB) is damaged but the backup copy is whole; run `snapctl -s {name} check --repair` to rewrite it from the backup"
        ))),
        _ => Err(e),
    }
}

pub(crate) fn read_superblock(io: &dyn BlockIo, name: &str) -> Result<Superblock> {
    let (sb, version) = read_superblock_any(io, name)?;
    if version != FORMAT_VERSION {
        // decode_any accepted an older version: decode says what to do about it.
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        io.read_at(&mut b, 0)
            .map_err(|e| Error::io(format!("store {name}: read"), e))?;
        Superblock::decode(&b, name)?;
    }
    Ok(sb)
}

/// redb may panic on metadata that was altered behind its back (its docs say so); turn that into
/// a corruption error instead of a crash.
pub(crate) fn guard_panic<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(Error::Corrupt(format!(
            "{name}: metadata is damaged (the metadata engine failed on it); run `snapctl check`"
        ))),
    }
}

/// Damage on purpose, so tests can prove that `check` tells leaks from corruption.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// Moves the allocation mark past `n` chunks that no record owns and no free extent holds:
    /// leaked space.
    pub fn leak_chunks(s: &mut Store, n: u64) -> Result<()> {
        let tx = s.wtx()?;
        {
            let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(&s.name, e))?;
            let hw = get_u64(&c, K_HIGH_WATER, &s.name)?;
            c.insert(K_HIGH_WATER, hw + n)
                .map_err(|e| meta_err(&s.name, e))?;
        }
        tx.commit().map_err(|e| meta_err(&s.name, e))
    }

    /// Kinds of damage `check --repair` must mend or name (tests/repair.rs).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Harm {
        /// The `n`th exception record's value fails its row check.
        DamageRecord(usize),
        /// The `n`th exception record vanishes (its time index entry stays).
        RemoveRecord(usize),
        /// The `n`th overlay record's value fails its row check.
        DamageOverlay(usize),
        /// The time index is emptied.
        DropTimeIndex,
        /// Every record head is set back to 1 (behind the newest record).
        StaleHeads,
        /// The name index is emptied.
        DropNames,
        /// The live-point index is emptied.
        DropLiveIndex,
        /// The first chunk in use is also put in the free list.
        FreeAChunkInUse,
        /// Every snapshot's exclusive count is set to 7.
        WrongExclusive,
        /// The `n`th snapshot's catalog row fails its row check.
        DamageSnapshotRow(usize),
    }

    type RecordRow = ((u32, u64, u64), Vec<u8>);

    /// Damages the metadata as `harm` says, in one commit (redb's own checksums stay right:
    /// this is damage only snapctl's row checks and invariants can see). Whether the thing
    /// to damage existed.
    pub fn harm(s: &mut Store, harm: Harm) -> Result<bool> {
        let sn = s.name.clone();
        let me = |e: redb::Error| meta_err(&sn, e);
        let tx = s.wtx()?;
        // The `n`th row of a table of checksummed values, its last byte flipped: whether any.
        macro_rules! flip_nth {
            ($table:expr, $n:expr) => {{
                let mut t = tx.open_table($table).map_err(|e| me(e.into()))?;
                let row = match t.iter().map_err(|e| me(e.into()))?.nth($n) {
                    Some(r) => {
                        let (k, v) = r.map_err(|e| me(e.into()))?;
                        Some((k.value(), v.value().to_vec()))
                    }
                    None => None,
                };
                match row {
                    Some((k, mut v)) => {
                        let last = v.len() - 1;
                        v[last] ^= 0x55;
                        t.insert(k, v.as_slice()).map_err(|e| me(e.into()))?;
                        true
                    }
                    None => false,
                }
            }};
        }
        let did = {
            let nth_record = |n: usize| -> Result<Option<RecordRow>> {
                let t = tx.open_table(RECORDS).map_err(|e| me(e.into()))?;
                let row = t.iter().map_err(|e| me(e.into()))?.nth(n);
                Ok(match row {
                    Some(r) => {
                        let (k, v) = r.map_err(|e| me(e.into()))?;
                        Some((k.value(), v.value().to_vec()))
                    }
                    None => None,
                })
            };
            match harm {
                Harm::DamageRecord(n) => flip_nth!(RECORDS, n),
                Harm::RemoveRecord(n) => match nth_record(n)? {
                    Some((k, _)) => {
                        let mut t = tx.open_table(RECORDS).map_err(|e| me(e.into()))?;
                        t.remove(k).map_err(|e| me(e.into()))?;
                        true
                    }
                    None => false,
                },
                Harm::DamageOverlay(n) => flip_nth!(OVERLAYS, n),
                Harm::DropTimeIndex => {
                    tx.delete_table(BY_TIME).map_err(|e| me(e.into()))?;
                    tx.open_table(BY_TIME).map_err(|e| me(e.into()))?;
                    true
                }
                Harm::StaleHeads => {
                    let mut t = tx.open_table(HEADS).map_err(|e| me(e.into()))?;
                    let keys: Vec<(u32, u64)> = t
                        .iter()
                        .map_err(|e| me(e.into()))?
                        .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                        .collect();
                    for k in &keys {
                        t.insert(*k, 1).map_err(|e| me(e.into()))?;
                    }
                    !keys.is_empty()
                }
                Harm::DropNames => {
                    tx.delete_table(NAMES).map_err(|e| me(e.into()))?;
                    tx.open_table(NAMES).map_err(|e| me(e.into()))?;
                    true
                }
                Harm::DropLiveIndex => {
                    tx.delete_table(LIVE).map_err(|e| me(e.into()))?;
                    tx.open_table(LIVE).map_err(|e| me(e.into()))?;
                    true
                }
                Harm::FreeAChunkInUse => match nth_record(0)? {
                    Some((k, v)) => {
                        let rec = crate::store::cow::record_of(&sn, k, &v)?;
                        let loc = rec.entries.first().map(|e| e.loc).unwrap_or(0);
                        let mut t = tx.open_table(FREE).map_err(|e| me(e.into()))?;
                        t.insert(loc, 1).map_err(|e| me(e.into()))?;
                        true
                    }
                    None => false,
                },
                Harm::DamageSnapshotRow(n) => flip_nth!(SNAPS, n),
                Harm::WrongExclusive => {
                    let snaps: Vec<Snapshot> = s.snaps.values().cloned().collect();
                    for mut sn2 in snaps {
                        sn2.exclusive_chunks = 7;
                        put_snap(&tx, &sn2, &sn)?;
                    }
                    true
                }
            }
        };
        tx.commit().map_err(|e| me(e.into()))?;
        Ok(did)
    }

    /// Sets the used-chunk counter to a wrong value: corruption.
    pub fn corrupt_used_counter(s: &mut Store) -> Result<()> {
        let tx = s.wtx()?;
        {
            let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(&s.name, e))?;
            c.insert(K_USED, 12345).map_err(|e| meta_err(&s.name, e))?;
        }
        tx.commit().map_err(|e| meta_err(&s.name, e))
    }
}
