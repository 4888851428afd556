//! The metadata region: redb's file mapped onto a range of the store, its length block, the
//! tables and keys (docs/FORMAT.md), and the handles and transactions on it.

use super::*;

use std::sync::Mutex;

/// The metadata region's length record: 512 bytes at 4 KiB (docs/FORMAT.md).
pub const LENBLOCK_OFFSET: u64 = 4096;
pub(super) const LENBLOCK_MAGIC: &[u8; 8] = b"SNAPLEN\0";

pub(crate) const CONFIG: TableDefinition<&str, u64> = TableDefinition::new("config");
pub(crate) const SNAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
pub(crate) const NAMES: TableDefinition<&str, u64> = TableDefinition::new("names");
/// (epoch, id) -> (): the live points in time (valid snapshots of branch 0), so that `delete`
/// finds a snapshot's neighbours without reading the whole catalog. Kept by `put_snap` and
/// `remove_snap`; format version 6.
pub(crate) const LIVE: TableDefinition<(u64, u64), ()> = TableDefinition::new("live_points");
/// (branch, group, t) -> runs. See `cow/`.
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
/// there; a snapshot of one gets a copy). See `cow/`.
pub(crate) const OVERLAYS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("overlays");
/// 0 -> the copies of the newest origin-write commit, not flushed before it (see
/// `cow/write.rs`): checked, and made again from the origin, after an unclean shutdown.
pub(crate) const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending_copies");

pub(crate) const K_EPOCH: &str = "epoch";
pub(crate) const K_NEXT_ID: &str = "next_id";
pub(crate) const K_HIGH_WATER: &str = "alloc_high_water";
pub(crate) const K_USED: &str = "used_chunks";
pub(crate) const K_NEXT_EVENT: &str = "next_event";
pub(crate) const K_NEXT_OVERLAY: &str = "next_overlay";
/// Present while a restore is under way: the target snapshot's id (and its backup's, or 0).
pub(crate) const K_RESTORE_TARGET: &str = "restore_target";
pub(crate) const K_RESTORE_BACKUP: &str = "restore_backup";

/// redb's file, mapped onto the metadata region of the store. The logical length lives in the
/// length block, rewritten and flushed on every resize, so a crash leaves a length that redb's
/// recovery understands ("set by a single truncate or extend").
///
/// Page writes are held in memory until redb asks for durability (`sync_data`), then go to the
/// device in one submission followed by one flush: a commit costs two submissions instead of
/// one per page. Nothing is promised durable before `sync_data`, so holding writes until then
/// changes no crash outcome; reads see the held writes.
#[derive(Clone)]
pub(super) struct Region {
    pub(super) io: Arc<dyn BlockIo>,
    /// Where page reads go: the store again, through the page cache when the store is opened
    /// with O_DIRECT. redb reads a page at a time; through the page cache the kernel's
    /// readahead turns a pass over the catalog (every command loads it) into large reads.
    /// Coherent with the O_DIRECT writes: the kernel drops cached pages a direct write covers,
    /// and this handle never dirties one.
    pub(super) reader: Arc<dyn BlockIo>,
    pub(super) off: u64,
    pub(super) cap: u64,
    pub(super) len: Arc<AtomicU64>,
    pub(super) held: Arc<Mutex<Held>>,
}

impl Region {
    pub(super) fn new(io: Arc<dyn BlockIo>, off: u64, cap: u64, len: u64) -> Region {
        Region {
            reader: io.clone(),
            held: Arc::new(Mutex::new(Held {
                io: io.clone(),
                off,
                writes: BTreeMap::new(),
            })),
            io,
            off,
            cap,
            len: Arc::new(AtomicU64::new(len)),
        }
    }

    /// Drops every held write (the engine that made them is gone).
    pub(super) fn discard_held(&self) {
        if let Ok(mut h) = self.held.lock() {
            h.writes.clear();
        }
    }

    fn held(&self) -> io::Result<std::sync::MutexGuard<'_, Held>> {
        self.held
            .lock()
            .map_err(|_| io::Error::other("metadata write buffer poisoned"))
    }
}

/// Page writes not yet sent to the device, by region offset; they never overlap.
pub(super) struct Held {
    io: Arc<dyn BlockIo>,
    off: u64,
    writes: BTreeMap<u64, Vec<u8>>,
}

impl Held {
    /// Sends every held write to the device in one submission (no flush).
    fn send(&mut self) -> io::Result<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let w = std::mem::take(&mut self.writes);
        let reqs: Vec<(u64, &[u8])> = w
            .iter()
            .map(|(o, d)| (self.off + o, d.as_slice()))
            .collect();
        self.io.write_many(&reqs)
    }

    /// Whether a held write other than exactly `[off, off + n)` overlaps it.
    fn overlaps_other(&self, off: u64, n: usize) -> bool {
        let end = off + n as u64;
        let before = self
            .writes
            .range(..off)
            .next_back()
            .is_some_and(|(o, d)| o + d.len() as u64 > off);
        let within = self
            .writes
            .range(off..end)
            .any(|(o, d)| *o != off || d.len() != n);
        before || within
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Not durable (nothing asked for that), but not lost either.
        let _ = self.send();
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({}+{})", self.off, self.cap)
    }
}

pub(crate) fn encode_lenblock(len: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..8].copy_from_slice(LENBLOCK_MAGIC);
    b[8..16].copy_from_slice(&len.to_le_bytes());
    let sum = blake3::hash(&b[..480]);
    b[480..].copy_from_slice(sum.as_bytes());
    b
}

pub(crate) fn decode_lenblock(b: &[u8]) -> Option<u64> {
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
        self.reader.read_at(out, self.off + offset)?;
        let held = self.held()?;
        let end = offset + out.len() as u64;
        let first = held
            .writes
            .range(..=offset)
            .next_back()
            .map(|(o, _)| *o)
            .unwrap_or(offset);
        for (o, d) in held.writes.range(first..end) {
            let (s, e) = ((*o).max(offset), (o + d.len() as u64).min(end));
            if s < e {
                out[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.cap {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.held()?.send()?;
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
        self.held()?.send()?;
        self.io.flush()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset + data.len() as u64 > self.len.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "write past the end of the metadata",
            ));
        }
        let mut held = self.held()?;
        if held.overlaps_other(offset, data.len()) {
            held.send()?;
        }
        held.writes.insert(offset, data.to_vec());
        Ok(())
    }
}

/// The metadata engine, its page cache bounded by `caches` whatever the number of exceptions.
pub(super) fn db_builder(caches: Caches) -> redb::Builder {
    let mut b = redb::Database::builder();
    b.set_cache_size(caches.meta_bytes);
    b
}

pub(super) fn get_u64(
    t: &impl ReadableTable<&'static str, u64>,
    k: &str,
    store: &str,
) -> Result<u64> {
    Ok(t.get(k)
        .map_err(|e| meta_err(store, e))?
        .ok_or_else(|| Error::Corrupt(format!("{store}: metadata lacks '{k}'")))?
        .value())
}

impl Store {
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
        // Whatever a writer changes, no verified read result may survive it.
        self.resolved.clear();
        if !matches!(self.db, Db::Rw(_)) {
            self.db = Db::Closed; // the read-only handle must be gone before a writer opens
            let db = db_builder(self.caches)
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
    ///
    /// Every commit records the metadata engine's allocator state (redb's "quick repair"), so
    /// the open after an unclean shutdown reads that state instead of walking every page of the
    /// metadata to rebuild it: recovery costs about a clean open whatever the store's size
    /// (scripts/bench-check.sh measures both). The price is a few more pages per commit.
    pub(crate) fn wtx(&mut self) -> Result<redb::WriteTransaction> {
        let name = self.name.clone();
        let mut tx = self.wdb()?.begin_write().map_err(|e| meta_err(&name, e))?;
        tx.set_quick_repair(true);
        Ok(tx)
    }
}

/// Writes an empty metadata region: length block, then redb's tables with their first values.
pub(super) fn format_metadata(io: &Arc<dyn BlockIo>, meta_len: u64, name: &str) -> Result<()> {
    let w = |r: io::Result<()>| r.map_err(|e| Error::io(format!("store {name}: write"), e));
    w(io.write_at(&encode_lenblock(0), LENBLOCK_OFFSET))?;
    w(io.flush())?;
    let region = Region::new(io.clone(), META_OFFSET, meta_len, 0);
    let me = |e: redb::Error| meta_err(name, e);
    let db = db_builder(Caches::of(DEFAULT_CACHE_BYTES))
        .create_with_backend(region)
        .map_err(|e| me(e.into()))?;
    let mut tx = db.begin_write().map_err(|e| me(e.into()))?;
    tx.set_quick_repair(true);
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
        tx.open_table(LIVE).map_err(|e| me(e.into()))?;
        tx.open_table(RECORDS).map_err(|e| me(e.into()))?;
        tx.open_table(BY_TIME).map_err(|e| me(e.into()))?;
        tx.open_table(HEADS).map_err(|e| me(e.into()))?;
        tx.open_table(FREE).map_err(|e| me(e.into()))?;
    }
    tx.commit().map_err(|e| me(e.into()))?;
    Ok(())
}
