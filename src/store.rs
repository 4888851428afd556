//! The exception store: superblock, metadata region (redb), snapshot catalog, chunk allocator.
//! The copy-on-write rules that use them live in `cow.rs`. Nothing here prints.

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
use crate::format::{
    OnFull, Superblock, FORMAT_VERSION, META_OFFSET, MIN_META_LEN, SUPERBLOCK_SIZE,
};
use crate::io::{engine_for, open_device, BlockIo, EngineChoice, OpenMode};

/// The metadata region's length record: 512 bytes at 4 KiB (docs/FORMAT.md).
pub const LENBLOCK_OFFSET: u64 = 4096;
const LENBLOCK_MAGIC: &[u8; 8] = b"SNAPLEN\0";

pub(crate) const CONFIG: TableDefinition<&str, u64> = TableDefinition::new("config");
pub(crate) const SNAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
pub(crate) const NAMES: TableDefinition<&str, u64> = TableDefinition::new("names");
/// (branch, group, t) -> runs. See cow.rs.
pub(crate) const RECORDS: TableDefinition<(u32, u64, u64), &[u8]> = TableDefinition::new("records");
/// (branch, t, group) -> (): the same records ordered by time, for delete's window scan.
pub(crate) const BY_TIME: TableDefinition<(u32, u64, u64), ()> =
    TableDefinition::new("records_by_time");
/// (branch, group) -> t of the group's newest record: the head of its `prev` chain.
pub(crate) const HEADS: TableDefinition<(u32, u64), u64> = TableDefinition::new("heads");
/// first free data chunk -> length of the free extent.
pub(crate) const FREE: TableDefinition<u64, u64> = TableDefinition::new("free");
pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// (overlay id, group) -> runs: the chunks a snapshot's overlay owns (writable snapshots write
/// there; a snapshot of one gets a copy). See cow.rs.
pub(crate) const OVERLAYS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("overlays");

pub(crate) const K_EPOCH: &str = "epoch";
pub(crate) const K_NEXT_ID: &str = "next_id";
pub(crate) const K_HIGH_WATER: &str = "alloc_high_water";
pub(crate) const K_USED: &str = "used_chunks";
pub(crate) const K_NEXT_EVENT: &str = "next_event";
pub(crate) const K_NEXT_OVERLAY: &str = "next_overlay";
/// Present while a restore is under way: the target snapshot's id (and its backup's, or 0).
pub(crate) const K_RESTORE_TARGET: &str = "restore_target";
pub(crate) const K_RESTORE_BACKUP: &str = "restore_backup";

/// The redb cache: bounded, whatever the number of exceptions.
const META_CACHE_BYTES: usize = 32 << 20;

/// redb's file, mapped onto the metadata region of the store. The logical length lives in the
/// length block, rewritten and flushed on every resize, so a crash leaves a length that redb's
/// recovery understands ("set by a single truncate or extend").
#[derive(Clone)]
struct Region {
    io: Arc<dyn BlockIo>,
    off: u64,
    cap: u64,
    len: Arc<AtomicU64>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({}+{})", self.off, self.cap)
    }
}

fn encode_lenblock(len: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..8].copy_from_slice(LENBLOCK_MAGIC);
    b[8..16].copy_from_slice(&len.to_le_bytes());
    let sum = blake3::hash(&b[..480]);
    b[480..].copy_from_slice(sum.as_bytes());
    b
}

fn decode_lenblock(b: &[u8]) -> Option<u64> {
    if b.len() < 512
        || &b[..8] != LENBLOCK_MAGIC
        || blake3::hash(&b[..480]).as_bytes() != &b[480..512]
    {
        return None;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[8..16]);
    Some(u64::from_le_bytes(a))
}

impl redb::StorageBackend for Region {
    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::SeqCst))
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if offset + out.len() as u64 > self.len.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the metadata",
            ));
        }
        self.io.read_at(out, self.off + offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.cap {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let old = self.len.load(Ordering::SeqCst);
        if len > old {
            // New positions must read as zero.
            let zeros = vec![0u8; 1 << 20];
            let mut pos = old;
            while pos < len {
                let n = (len - pos).min(zeros.len() as u64) as usize;
                self.io.write_at(&zeros[..n], self.off + pos)?;
                pos += n as u64;
            }
            self.io.flush()?;
        }
        self.io.write_at(&encode_lenblock(len), LENBLOCK_OFFSET)?;
        self.io.flush()?;
        self.len.store(len, Ordering::SeqCst);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.io.flush()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset + data.len() as u64 > self.len.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "write past the end of the metadata",
            ));
        }
        self.io.write_at(data, self.off + offset)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapState {
    Valid,
    Invalid,
}

/// One snapshot, as kept in the `snapshots` table (JSON, docs/FORMAT.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    /// Name of the view it was taken from ("origin").
    pub parent: String,
    pub branch: u32,
    pub epoch: u64,
    /// Unix seconds, UTC.
    pub created: i64,
    pub writable: bool,
    pub expires: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub state: SnapState,
    #[serde(default)]
    pub invalid_reason: Option<String>,
    /// Store chunks that deleting this snapshot alone would free, besides its overlay.
    pub exclusive_chunks: u64,
    /// The overlay holding the chunks this snapshot owns outright (0: none).
    #[serde(default)]
    pub overlay: u32,
    /// How many chunks the overlay holds.
    #[serde(default)]
    pub overlay_chunks: u64,
}

impl Snapshot {
    /// A new, valid, read-only snapshot at a point in time, holding nothing yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn point(
        id: u64,
        name: &str,
        parent: &str,
        branch: u32,
        epoch: u64,
        created: i64,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
    ) -> Snapshot {
        Snapshot {
            id,
            name: name.to_string(),
            parent: parent.to_string(),
            branch,
            epoch,
            created,
            writable: false,
            expires,
            labels,
            state: SnapState::Valid,
            invalid_reason: None,
            exclusive_chunks: 0,
            overlay: 0,
            overlay_chunks: 0,
        }
    }

    /// Chunks deleting this snapshot alone would free.
    pub fn owned_chunks(&self) -> u64 {
        self.exclusive_chunks + self.overlay_chunks
    }
}

/// Something the store did on its own (the on-full policy); kept in the `events` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub time: i64,
    pub action: String,
    pub snapshot: String,
    pub reason: String,
}

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
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            write_origin: false,
            exclusive_origin: false,
            engine: EngineChoice::from_env(),
            lock_timeout: lock_timeout_from_env(),
        }
    }
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
    pub(crate) snaps: BTreeMap<u64, Snapshot>,
    /// Epoch of the next write interval (E in DESIGN.md).
    pub(crate) epoch: u64,
    /// Chunks known to be preserved since the newest live snapshot: repeat writes skip the index.
    pub(crate) preserved: Vec<u64>,
    /// What the on-full policy did during this process, for the caller to log.
    pub events: Vec<Event>,
    /// The format version on disk (older only while `snapctl upgrade` converts it).
    pub version: u32,
    /// Overlays proven whole in this process (see `verify_overlay`).
    pub(crate) verified_overlays: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// A restore interrupted by a crash that opening the store finished: its target's name.
    pub resumed_restore: Option<String>,
    _lock: Option<File>,
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
        Some(libc::EACCES) | Some(libc::EPERM) => Error::io(
            format!("{what} {}: permission denied (run as root?)", path.display()),
            e,
        ),
        _ if e.kind() == io::ErrorKind::InvalidInput => Error::Invalid(format!(
            "{what} {}: not a block device or a regular file",
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
                "store {name} is busy: another snapctl is using it; try again when it has finished"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stable identity for the origin: which file or device it is, not what it holds (the data
/// changes; `init` must not write to it). See docs/FORMAT.md.
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

fn db_builder() -> redb::Builder {
    let mut b = redb::Database::builder();
    b.set_cache_size(META_CACHE_BYTES);
    b
}

fn get_u64(t: &impl ReadableTable<&'static str, u64>, k: &str, store: &str) -> Result<u64> {
    Ok(t.get(k)
        .map_err(|e| meta_err(store, e))?
        .ok_or_else(|| Error::Corrupt(format!("{store}: metadata lacks '{k}'")))?
        .value())
}

impl Store {
    /// Formats `store` as the exception store of `origin`. Never writes to the origin.
    pub fn init(store: &Path, origin: &Path, opts: &InitOptions) -> Result<Superblock> {
        let name = store.display().to_string();
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(Error::Invalid(format!(
                "chunk size {cs} is not a power of two between 4 KiB and 1 MiB"
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
        if origin_str.len() > crate::format::MAX_PATH {
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
            },
            timeout,
        )?;
        if odev.size == 0 {
            return Err(Error::Invalid(format!(
                "origin {} is empty",
                origin.display()
            )));
        }
        let sdev = open_retrying(
            "store",
            &store_abs,
            OpenMode {
                write: true,
                exclusive: true,
            },
            timeout,
        )?;
        let lock_file = lock(&sdev.file, &name, timeout)?;
        let store_size = sdev.size;
        let io = engine_for(sdev, EngineChoice::from_env())
            .map_err(|e| Error::io(format!("store {name}: I/O engine"), e))?;
        let mut first = vec![0u8; SUPERBLOCK_SIZE];
        if store_size >= SUPERBLOCK_SIZE as u64 {
            io.read_at(&mut first, 0)
                .map_err(|e| Error::io(format!("store {name}: read"), e))?;
            if &first[..8] == crate::format::MAGIC && !opts.force {
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
                "metadata size {meta_len} is below the minimum of 4 MiB"
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
        let w = |r: io::Result<()>| r.map_err(|e| Error::io(format!("store {name}: write"), e));
        // Crash argument: the superblock is written last. Until it is durable the store reads as
        // "not a snapctl store", so a crash mid-init leaves nothing that could be mistaken for one.
        w(io.write_at(&[0u8; SUPERBLOCK_SIZE], 0))?;
        format_metadata(&io, meta_len, &name)?;
        w(io.write_at(&sb.encode(), 0))?;
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
            },
            opts.lock_timeout,
        )?;
        let lock_file = lock(&sdev.file, &name, opts.lock_timeout)?;
        let io = engine_for(sdev, opts.engine)
            .map_err(|e| Error::io(format!("store {name}: I/O engine"), e))?;
        let (sb, version) = if upgrade {
            read_superblock_any(io.as_ref(), &name)?
        } else {
            (read_superblock(io.as_ref(), &name)?, FORMAT_VERSION)
        };
        let opath = PathBuf::from(&sb.origin_path);
        let odev = open_retrying(
            "origin",
            &opath,
            OpenMode {
                write: opts.write_origin,
                exclusive: opts.write_origin || opts.exclusive_origin,
            },
            opts.lock_timeout,
        )?;
        if odev.size != sb.origin_size {
            return Err(Error::Mismatch(format!(
                "origin {} is {} bytes but store {name} was made for {} bytes; is this the right device?",
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
        if upgrade {
            let mut store = Self::open_on(io, origin, sb, name, Some(lock_file), false)?;
            store.version = version;
            return Ok(store);
        }
        let mut store = Self::open_on(io, origin, sb, name, Some(lock_file), true)?;
        if store.restore_pending()? {
            // A restore was cut short: finish it before anything reads the origin, with the
            // origin opened for writing (and exclusively) for that.
            if !opts.write_origin {
                let odev = open_retrying(
                    "origin",
                    &opath,
                    OpenMode {
                        write: true,
                        exclusive: true,
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
        let sb = read_superblock(dev.as_ref(), name)?;
        if origin.len() != sb.origin_size {
            return Err(Error::Mismatch(format!("{name}: origin size changed")));
        }
        let mut store = Self::open_on(dev, origin, sb, name.to_string(), None, true)?;
        if store.restore_pending()? {
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
        format_metadata(&dev, meta_len, "init")?;
        e(dev.write_at(&sb.encode(), 0))?;
        e(dev.flush())?;
        Ok(sb)
    }

    fn open_on(
        io: Arc<dyn BlockIo>,
        origin: Arc<dyn BlockIo>,
        sb: Superblock,
        name: String,
        lock_file: Option<File>,
        load: bool,
    ) -> Result<Store> {
        if sb.data_offset + sb.data_chunks * sb.chunk_size > io.len() {
            return Err(Error::Corrupt(format!(
                "store {name} is smaller than its superblock says ({} bytes); was the device or file truncated?",
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
        let region = Region {
            io: io.clone(),
            off: sb.meta_offset,
            cap: sb.meta_len,
            len: Arc::new(AtomicU64::new(len)),
        };
        let db = guard_panic(&name, || {
            match db_builder().open_read_only_with_backend(region.clone()) {
                Ok(db) => Ok(Db::Ro(db)),
                // The last writer did not close cleanly: recovery writes, so open writable.
                Err(redb::DatabaseError::RepairAborted) => db_builder()
                    .create_with_backend(region.clone())
                    .map(Db::Rw)
                    .map_err(|e| meta_err(&name, e)),
                Err(e) => Err(meta_err(&name, e)),
            }
        })?;
        let mut store = Store {
            preserved: vec![0; sb.origin_chunks().div_ceil(64) as usize],
            sb,
            name,
            dev: io,
            origin,
            db,
            region,
            snaps: BTreeMap::new(),
            epoch: 0,
            events: Vec::new(),
            verified_overlays: Default::default(),
            version: FORMAT_VERSION,
            resumed_restore: None,
            _lock: lock_file,
        };
        if load {
            let n = store.name.clone();
            guard_panic(&n, || store.load_catalog())?;
        }
        Ok(store)
    }

    /// Loads the config and the snapshot table: one row per snapshot, never the exception index.
    pub(crate) fn load_catalog(&mut self) -> Result<()> {
        let name = self.name.clone();
        let tx = self.rtx()?;
        let config = tx.open_table(CONFIG).map_err(|e| meta_err(&name, e))?;
        self.epoch = get_u64(&config, K_EPOCH, &name)?;
        let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&name, e))?;
        self.snaps.clear();
        for row in snaps.iter().map_err(|e| meta_err(&name, e))? {
            let (k, v) = row.map_err(|e| meta_err(&name, e))?;
            let s = crate::codec::decode_snapshot(k.value(), v.value()).ok_or_else(|| {
                Error::Corrupt(format!(
                    "{name}: snapshot record {} is damaged; run `snapctl check`",
                    k.value()
                ))
            })?;
            self.snaps.insert(k.value(), s);
        }
        // Nothing read from the catalog may silently lie: a snapshot row that disappeared
        // leaves its name behind, and the counters must lie beyond every snapshot.
        let damaged = |what: String| Error::Corrupt(format!("{name}: {what}; run `snapctl check`"));
        let names = tx.open_table(NAMES).map_err(|e| meta_err(&name, e))?;
        let mut nnames = 0usize;
        for row in names.iter().map_err(|e| meta_err(&name, e))? {
            let (k, v) = row.map_err(|e| meta_err(&name, e))?;
            nnames += 1;
            if self.snaps.get(&v.value()).map(|s| s.name.as_str()) != Some(k.value()) {
                return Err(damaged(format!(
                    "the name '{}' names no matching snapshot",
                    k.value()
                )));
            }
        }
        if nnames != self.snaps.len() {
            return Err(damaged(format!(
                "the catalog lists {nnames} names for {} snapshots",
                self.snaps.len()
            )));
        }
        let next_id = get_u64(&config, K_NEXT_ID, &name)?;
        let next_overlay = config
            .get(K_NEXT_OVERLAY)
            .map_err(|e| meta_err(&name, e))?
            .map_or(1, |v| v.value());
        for s in self.snaps.values() {
            if s.epoch >= self.epoch || s.id >= next_id || s.overlay as u64 >= next_overlay {
                return Err(damaged(format!(
                    "snapshot '{}' lies beyond the store's counters",
                    s.name
                )));
            }
        }
        Ok(())
    }

    /// A read transaction on whichever handle is open.
    pub(crate) fn rtx(&self) -> Result<redb::ReadTransaction> {
        let r = match &self.db {
            Db::Ro(d) => d.begin_read(),
            Db::Rw(d) => d.begin_read(),
            Db::Closed => return Err(Error::Corrupt(format!("{}: metadata is closed", self.name))),
        };
        r.map_err(|e| meta_err(&self.name, e))
    }

    /// The writable database, upgrading the read-only handle on first use.
    pub(crate) fn wdb(&mut self) -> Result<&mut redb::Database> {
        if !matches!(self.db, Db::Rw(_)) {
            self.db = Db::Closed; // the read-only handle must be gone before a writer opens
            let db = db_builder()
                .create_with_backend(self.region.clone())
                .map_err(|e| meta_err(&self.name, e))?;
            self.db = Db::Rw(db);
        }
        match &mut self.db {
            Db::Rw(d) => Ok(d),
            _ => Err(Error::Corrupt(format!("{}: metadata is closed", self.name))),
        }
    }

    /// A write transaction (upgrading to a writable handle if needed).
    pub(crate) fn wtx(&mut self) -> Result<redb::WriteTransaction> {
        let name = self.name.clone();
        self.wdb()?.begin_write().map_err(|e| meta_err(&name, e))
    }

    pub fn engine(&self) -> &'static str {
        self.dev.engine()
    }

    pub fn origin_engine(&self) -> &'static str {
        self.origin.engine()
    }

    /// Snapshots in creation order.
    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> {
        self.snaps.values()
    }

    pub fn snapshot(&self, name: &str) -> Result<&Snapshot> {
        self.snaps.values().find(|s| s.name == name).ok_or_else(|| {
            Error::NotFound(format!(
                "no snapshot named '{name}' in {} (see `snapctl list`)",
                self.name
            ))
        })
    }

    fn used_chunks_inner(&self) -> Result<u64> {
        let tx = self.rtx()?;
        let c = tx.open_table(CONFIG).map_err(|e| meta_err(&self.name, e))?;
        get_u64(&c, K_USED, &self.name)
    }

    fn recent_events_inner(&self, n: usize) -> Result<Vec<Event>> {
        let tx = self.rtx()?;
        let t = tx.open_table(EVENTS).map_err(|e| meta_err(&self.name, e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| meta_err(&self.name, e))?.rev().take(n) {
            let (_, v) = row.map_err(|e| meta_err(&self.name, e))?;
            if let Ok(ev) = serde_json::from_slice::<Event>(v.value()) {
                out.push(ev);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Creates a read-only snapshot of the origin. O(1): touches neither device nor the index.
    fn create_inner(
        &mut self,
        name: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        created: Option<i64>,
    ) -> Result<Snapshot> {
        crate::names::validate(name)?;
        if self.snaps.values().any(|s| s.name == name) {
            return Err(Error::Exists(format!(
                "a snapshot named '{name}' already exists in {}; pick another name or delete it first",
                self.name
            )));
        }
        // Writes acknowledged before the snapshot are part of it: make them durable first, so a
        // crash can never leave a snapshot that lost part of its point in time.
        self.origin
            .flush()
            .map_err(|e| Error::io(format!("origin {}: flush", self.sb.origin_path), e))?;
        let tx = self.wtx()?;
        let sn = &self.name;
        let snap;
        {
            let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
            let id = get_u64(&config, K_NEXT_ID, sn)?;
            let epoch = get_u64(&config, K_EPOCH, sn)?;
            config
                .insert(K_NEXT_ID, id + 1)
                .map_err(|e| meta_err(sn, e))?;
            config
                .insert(K_EPOCH, epoch + 1)
                .map_err(|e| meta_err(sn, e))?;
            snap = Snapshot::point(
                id,
                name,
                "origin",
                0,
                epoch,
                created.unwrap_or_else(now),
                expires,
                labels,
            );
            put_snap(&tx, &snap, sn)?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(sn, e))?;
            names.insert(name, id).map_err(|e| meta_err(sn, e))?;
        }
        tx.commit().map_err(|e| meta_err(sn, e))?;
        self.epoch = snap.epoch + 1;
        self.snaps.insert(snap.id, snap.clone());
        // A new interval: every chunk must be checked against the new snapshot.
        self.preserved.fill(0);
        Ok(snap)
    }

    fn create_from_inner(
        &mut self,
        name: &str,
        from: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        writable: bool,
    ) -> Result<Snapshot> {
        crate::names::validate(name)?;
        let src = self.snapshot(from)?.clone();
        if src.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{from}' is invalid; it cannot be snapshotted"
            )));
        }
        if self.snaps.values().any(|s| s.name == name) {
            return Err(Error::Exists(format!(
                "a snapshot named '{name}' already exists in {}; pick another name or delete it first",
                self.name
            )));
        }
        let tx = self.wtx()?;
        let sn = self.name.clone();
        let snap;
        {
            let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
            let id = get_u64(&config, K_NEXT_ID, &sn)?;
            config
                .insert(K_NEXT_ID, id + 1)
                .map_err(|e| meta_err(&sn, e))?;
            snap = Snapshot::point(
                id,
                name,
                &src.name,
                src.branch,
                src.epoch,
                now(),
                expires,
                labels,
            );
            put_snap(&tx, &snap, &sn)?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
            names.insert(name, id).map_err(|e| meta_err(&sn, e))?;
        }
        self.snaps.insert(snap.id, snap.clone());
        // Two snapshots at one point share everything: neither holds anything alone.
        self.set_exclusive(&tx, snap.epoch, 0)?;
        // A snapshot of a snapshot with an overlay freezes the overlay too: by copying it (its
        // source may be writable and change in place). Then writable if asked.
        if src.overlay != 0 || writable {
            let mut s2 = snap.clone();
            s2.overlay = self.new_overlay(&tx)?;
            s2.writable = writable;
            if src.overlay != 0 {
                s2.overlay_chunks = self.copy_overlay(&tx, src.overlay, s2.overlay, &src.name)?;
            }
            put_snap(&tx, &s2, &sn)?;
            self.snaps.insert(s2.id, s2);
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.snapshot(name).cloned()
    }

    /// A new, empty overlay id.
    pub(crate) fn new_overlay(&self, tx: &redb::WriteTransaction) -> Result<u32> {
        let sn = &self.name;
        let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let id = c
            .get(K_NEXT_OVERLAY)
            .map_err(|e| meta_err(sn, e))?
            .map(|v| v.value())
            .unwrap_or(1);
        c.insert(K_NEXT_OVERLAY, id + 1)
            .map_err(|e| meta_err(sn, e))?;
        u32::try_from(id).map_err(|_| Error::NoSpace(format!("{sn}: out of overlay ids")))
    }

    fn set_writable_inner(&mut self, name: &str) -> Result<Snapshot> {
        let mut snap = self.snapshot(name)?.clone();
        if snap.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{name}' is invalid; it cannot be made writable"
            )));
        }
        if snap.writable {
            return Ok(snap); // one-way, and already there
        }
        let tx = self.wtx()?;
        snap.writable = true;
        if snap.overlay == 0 {
            snap.overlay = self.new_overlay(&tx)?;
        }
        put_snap(&tx, &snap, &self.name)?;
        tx.commit().map_err(|e| meta_err(&self.name, e))?;
        self.snaps.insert(snap.id, snap.clone());
        Ok(snap)
    }

    fn rename_inner(&mut self, old: &str, new: &str) -> Result<Snapshot> {
        crate::names::validate(new)?;
        let mut snap = self.snapshot(old)?.clone();
        if old == new {
            return Ok(snap);
        }
        if self.snaps.values().any(|s| s.name == new) {
            return Err(Error::Exists(format!(
                "a snapshot named '{new}' already exists in {}",
                self.name
            )));
        }
        snap.name = new.to_string();
        let tx = self.wtx()?;
        let sn = &self.name;
        {
            put_snap(&tx, &snap, sn)?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(sn, e))?;
            names.remove(old).map_err(|e| meta_err(sn, e))?;
            names.insert(new, snap.id).map_err(|e| meta_err(sn, e))?;
        }
        tx.commit().map_err(|e| meta_err(sn, e))?;
        self.snaps.insert(snap.id, snap.clone());
        Ok(snap)
    }

    /// Deletes snapshots; returns the bytes freed. All names are checked before anything changes,
    /// and the whole delete is one commit.
    fn delete_inner(&mut self, names: &[String]) -> Result<u64> {
        let mut ids = Vec::new();
        for n in names {
            let id = self.snapshot(n)?.id;
            if ids.contains(&id) {
                return Err(Error::Invalid(format!("snapshot '{n}' is named twice")));
            }
            ids.push(id);
        }
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let mut freed = 0;
        for id in &ids {
            freed += self.drop_point(&tx, *id, None)?;
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.preserved.fill(0);
        Ok(freed * self.sb.chunk_size)
    }

    /// Appends an event (inside a write transaction).
    pub(crate) fn log_event(&mut self, tx: &redb::WriteTransaction, ev: Event) -> Result<()> {
        let sn = &self.name;
        let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let seq = get_u64(&config, K_NEXT_EVENT, sn)?;
        config
            .insert(K_NEXT_EVENT, seq + 1)
            .map_err(|e| meta_err(sn, e))?;
        let mut t = tx.open_table(EVENTS).map_err(|e| meta_err(sn, e))?;
        let v = serde_json::to_vec(&ev).map_err(|e| Error::Corrupt(e.to_string()))?;
        t.insert(seq, v.as_slice()).map_err(|e| meta_err(sn, e))?;
        self.events.push(ev);
        Ok(())
    }

    /// Valid snapshots of branch 0, by epoch.
    pub(crate) fn live_epochs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .snaps
            .values()
            .filter(|s| s.state == SnapState::Valid && s.branch == 0)
            .map(|s| s.epoch)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    // ---- the chunk allocator (inside a write transaction)

    /// Allocates `n` data chunks, lowest free first, as few extents as possible. None: no room.
    pub(crate) fn alloc(
        &self,
        tx: &redb::WriteTransaction,
        n: u64,
    ) -> Result<Option<Vec<(u64, u64)>>> {
        let sn = &self.name;
        let mut free = tx.open_table(FREE).map_err(|e| meta_err(sn, e))?;
        let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let mut out = Vec::new();
        let mut need = n;
        let mut taken_free = Vec::new();
        {
            for row in free.iter().map_err(|e| meta_err(sn, e))? {
                if need == 0 {
                    break;
                }
                let (k, v) = row.map_err(|e| meta_err(sn, e))?;
                let (start, len) = (k.value(), v.value());
                let take = len.min(need);
                out.push((start, take));
                taken_free.push((start, len, take));
                need -= take;
            }
        }
        let hw = get_u64(&config, K_HIGH_WATER, sn)?;
        let fresh = need.min(self.sb.data_chunks - hw.min(self.sb.data_chunks));
        if fresh < need {
            return Ok(None);
        }
        for (start, len, take) in taken_free {
            free.remove(start).map_err(|e| meta_err(sn, e))?;
            if take < len {
                free.insert(start + take, len - take)
                    .map_err(|e| meta_err(sn, e))?;
            }
        }
        if fresh > 0 {
            out.push((hw, fresh));
            config
                .insert(K_HIGH_WATER, hw + fresh)
                .map_err(|e| meta_err(sn, e))?;
        }
        let used = get_u64(&config, K_USED, sn)?;
        config
            .insert(K_USED, used + n)
            .map_err(|e| meta_err(sn, e))?;
        Ok(Some(out))
    }

    /// Frees any set of chunks, in coalesced extents.
    pub(crate) fn free_chunk_list(
        &self,
        tx: &redb::WriteTransaction,
        mut locs: Vec<u64>,
    ) -> Result<()> {
        locs.sort_unstable();
        let mut i = 0;
        while i < locs.len() {
            let mut j = i + 1;
            while j < locs.len() && locs[j] == locs[j - 1] + 1 {
                j += 1;
            }
            self.free_chunks(tx, locs[i], (j - i) as u64)?;
            i = j;
        }
        Ok(())
    }

    /// Returns `n` chunks from `start` to the free list, merging with free neighbours.
    pub(crate) fn free_chunks(
        &self,
        tx: &redb::WriteTransaction,
        start: u64,
        n: u64,
    ) -> Result<()> {
        let sn = &self.name;
        let mut free = tx.open_table(FREE).map_err(|e| meta_err(sn, e))?;
        let (mut s, mut len) = (start, n);
        let prev = free
            .range(..start)
            .map_err(|e| meta_err(sn, e))?
            .next_back()
            .transpose()
            .map_err(|e| meta_err(sn, e))?
            .map(|(k, v)| (k.value(), v.value()));
        if let Some((ps, pl)) = prev {
            if ps + pl > start {
                return Err(Error::Corrupt(format!(
                    "{sn}: chunk {start} freed twice (the free list already holds it); run `snapctl check`"
                )));
            }
            if ps + pl == start {
                free.remove(ps).map_err(|e| meta_err(sn, e))?;
                s = ps;
                len += pl;
            }
        }
        let next = free
            .get(start + n)
            .map_err(|e| meta_err(sn, e))?
            .map(|v| v.value());
        if let Some(nl) = next {
            free.remove(start + n).map_err(|e| meta_err(sn, e))?;
            len += nl;
        }
        free.insert(s, len).map_err(|e| meta_err(sn, e))?;
        let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let used = get_u64(&config, K_USED, sn)?;
        config
            .insert(K_USED, used.saturating_sub(n))
            .map_err(|e| meta_err(sn, e))?;
        Ok(())
    }
}

/// Writes an empty metadata region: length block, then redb's tables with their first values.
fn format_metadata(io: &Arc<dyn BlockIo>, meta_len: u64, name: &str) -> Result<()> {
    let w = |r: io::Result<()>| r.map_err(|e| Error::io(format!("store {name}: write"), e));
    w(io.write_at(&encode_lenblock(0), LENBLOCK_OFFSET))?;
    w(io.flush())?;
    let region = Region {
        io: io.clone(),
        off: META_OFFSET,
        cap: meta_len,
        len: Arc::new(AtomicU64::new(0)),
    };
    let me = |e: redb::Error| meta_err(name, e);
    let db = db_builder()
        .create_with_backend(region)
        .map_err(|e| me(e.into()))?;
    let tx = db.begin_write().map_err(|e| me(e.into()))?;
    {
        let mut c = tx.open_table(CONFIG).map_err(|e| me(e.into()))?;
        for (k, v) in [
            (K_EPOCH, 1u64),
            (K_NEXT_ID, 1),
            (K_HIGH_WATER, 0),
            (K_USED, 0),
            (K_NEXT_EVENT, 1),
            (K_NEXT_OVERLAY, 1),
        ] {
            c.insert(k, v).map_err(|e| me(e.into()))?;
        }
        tx.open_table(OVERLAYS).map_err(|e| me(e.into()))?;
        tx.open_table(SNAPS).map_err(|e| me(e.into()))?;
        tx.open_table(EVENTS).map_err(|e| me(e.into()))?;
        tx.open_table(NAMES).map_err(|e| me(e.into()))?;
        tx.open_table(RECORDS).map_err(|e| me(e.into()))?;
        tx.open_table(BY_TIME).map_err(|e| me(e.into()))?;
        tx.open_table(HEADS).map_err(|e| me(e.into()))?;
        tx.open_table(FREE).map_err(|e| me(e.into()))?;
    }
    tx.commit().map_err(|e| me(e.into()))?;
    Ok(())
}

/// The public entry points: each runs under a panic guard, because the metadata engine may panic
/// on pages damaged behind its back (redb's documentation says so); that is a corruption error,
/// not a crash.
impl Store {
    /// Creates a read-only snapshot of the origin. O(1): no device reads, no exception index.
    pub fn create(
        &mut self,
        name: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        created: Option<i64>,
    ) -> Result<Snapshot> {
        let n = self.name.clone();
        guard_panic(&n, || self.create_inner(name, expires, labels, created))
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
        let n = self.name.clone();
        guard_panic(&n, || {
            self.create_from_inner(name, from, expires, labels, writable)
        })
    }

    /// A writable snapshot of the origin: a snapshot, then writable.
    pub fn create_writable(
        &mut self,
        name: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let n = self.name.clone();
        guard_panic(&n, || {
            self.create_inner(name, expires, labels, None)?;
            self.set_writable_inner(name)
        })
    }

    /// Makes a read-only snapshot writable. One-way: nothing makes it read-only again.
    pub fn set_writable(&mut self, name: &str) -> Result<Snapshot> {
        let n = self.name.clone();
        guard_panic(&n, || self.set_writable_inner(name))
    }

    /// Writes into a writable snapshot (see `cow.rs`).
    pub fn write_snapshot(&mut self, name: &str, writes: &[(u64, &[u8])], fua: bool) -> Result<()> {
        let n = self.name.clone();
        guard_panic(&n, || self.write_overlay_inner(name, writes, fua))
    }

    /// Byte ranges where two views differ (see `cow.rs`), as sorted chunk numbers.
    pub fn diff_chunks(&self, from: &str, to: &str) -> Result<Vec<u64>> {
        guard_panic(&self.name, || self.diff_chunks_inner(from, to))
    }

    /// Makes the origin identical to snapshot `target` (see `cow.rs`).
    pub fn restore(
        &mut self,
        target: &str,
        backup: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let n = self.name.clone();
        guard_panic(&n, || self.restore_inner(target, backup, progress))
    }

    pub fn rename(&mut self, old: &str, new: &str) -> Result<Snapshot> {
        let n = self.name.clone();
        guard_panic(&n, || self.rename_inner(old, new))
    }

    /// Deletes snapshots in one commit; returns the bytes freed.
    pub fn delete(&mut self, names: &[String]) -> Result<u64> {
        let n = self.name.clone();
        guard_panic(&n, || self.delete_inner(names))
    }

    pub fn used_chunks(&self) -> Result<u64> {
        guard_panic(&self.name, || self.used_chunks_inner())
    }

    pub fn recent_events(&self, count: usize) -> Result<Vec<Event>> {
        guard_panic(&self.name, || self.recent_events_inner(count))
    }

    /// Writes to the origin through copy-on-write (see `cow.rs`).
    pub fn write_origin(&mut self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        let n = self.name.clone();
        guard_panic(&n, || self.write_origin_inner(off, data, fua))
    }

    /// Several origin writes with one preservation commit (see `cow.rs`).
    pub fn write_batch(&mut self, writes: &[(u64, &[u8])], fua: bool) -> Result<()> {
        let n = self.name.clone();
        guard_panic(&n, || self.write_batch_inner(writes, fua))
    }

    /// Several reads of any views, in flight together.
    pub fn read_batch(&self, reqs: &mut [crate::cow::ReadReq<'_>]) -> Result<()> {
        guard_panic(&self.name, || self.read_batch_inner(reqs))
    }

    /// Reads a snapshot, or the live origin for "origin".
    pub fn read_view(&self, view: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        guard_panic(&self.name, || self.read_view_inner(view, off, buf))
    }

    /// Verifies checksums, single ownership of every chunk and the space accounting.
    pub fn check(&mut self) -> Result<crate::cow::CheckReport> {
        self.check_with(false, &mut |_, _| {})
    }

    /// `check`, and with `data` every saved chunk read and verified against its hash
    /// (`progress(done, total)` in bytes).
    pub fn check_with(
        &mut self,
        data: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<crate::cow::CheckReport> {
        let n = self.name.clone();
        guard_panic(&n, || self.check_inner(data, progress))
    }
}

pub(crate) fn put_snap(tx: &redb::WriteTransaction, s: &Snapshot, store: &str) -> Result<()> {
    let mut t = tx.open_table(SNAPS).map_err(|e| meta_err(store, e))?;
    let v = crate::codec::encode_snapshot(s);
    t.insert(s.id, v.as_slice())
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
