//! The copy-on-write engine: shared exceptions by epoch (DESIGN.md, appendix).
//!
//! A record `(branch, group, t) -> runs` says: for the chunks its runs cover, the content they had
//! *before the first write at epoch t* lives at the given store chunks. A record for chunk c
//! covers the epochs `[t_prev, t)`, t_prev being the previous record's t for the same chunk. A
//! snapshot at epoch e reads chunk c from the record with the smallest t > e, else the origin.
//! Within one interval (one value of t) a chunk is preserved at most once, so the runs of one
//! record never overlap, and an origin write costs at most one copy whatever the snapshot count.

mod check;
mod diff;
mod overlay;
mod read;
mod records;
mod repair;
mod restore;
mod space;
mod write;

pub(crate) use records::*;

use std::collections::{BTreeMap, HashMap};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::error::{meta_err, Error, Result};
use crate::io::AlignedBuf;
use crate::store::codec::{
    chunk_hash, decode_pending, decode_record, encode_pending, encode_record, overlay_key,
    record_key, Entry, Pending, Record,
};
use crate::store::format::{OnFull, GROUP_CHUNKS};
use crate::store::{
    put_snap, remove_snap, Event, SnapState, Store, BY_TIME, CONFIG, FREE, HEADS, K_EPOCH,
    K_HIGH_WATER, K_RESTORE_BACKUP, K_RESTORE_TARGET, K_USED, LIVE, NAMES, OVERLAYS, PENDING,
    RECORDS, SNAPS,
};

/// One read of a batch: `buf.len()` bytes at `off` of `view` (a snapshot name or "origin").
pub struct ReadReq<'a> {
    pub view: &'a str,
    pub off: u64,
    pub buf: &'a mut [u8],
}

/// Where a piece of a read comes from.
enum Piece {
    /// The origin: (offset, length).
    Origin(u64, usize),
    /// A saved chunk: (store chunk, offset within it, length).
    Saved(u64, usize, usize),
}

enum Preserve {
    /// Every chunk is preserved. Pipelined, a journal record may be left to the writeback queue
    /// to write and flush.
    Done(Option<crate::store::writeback::QueuedRecord>),
    Full,
}

/// Who reads a saved chunk: the snapshots at points in `[lo, hi)`, or an overlay's owner.
enum Reader {
    Points(u64, u64),
    Overlay(u32),
}

/// A damaged range found by `check --data`.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Damage {
    /// The snapshots that read it.
    pub snapshots: Vec<String>,
    pub offset: u64,
    pub length: u64,
    pub store_chunk: u64,
}

/// What `check` found.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    /// Whether every saved chunk was read and verified (`--data`).
    pub data_checked: bool,
    pub chunks_verified: u64,
    /// Ranges whose saved bytes fail their checksum (`--data`).
    pub damaged: Vec<Damage>,
    pub snapshots: u64,
    pub records: u64,
    pub used_chunks: u64,
    /// Chunks free for copies: the free list plus those never handed out.
    pub free_chunks: u64,
    /// Chunks handed out at least once (the allocator's high-water mark); those past it were
    /// never written.
    pub high_water_chunks: u64,
    /// Damage: a chunk owned twice, a record pointing outside the store, counters that disagree.
    pub corruption: Vec<String>,
    /// Space no view can reach: reclaimable, not dangerous.
    pub leaks: Vec<String>,
    /// Neither damage nor leaks: things `check --repair` improves (a missing backup superblock).
    #[serde(default)]
    pub notes: Vec<String>,
    /// What `check --repair` did, in order.
    #[serde(default)]
    pub repaired: Vec<String>,
    /// How `--repair` would mend what was found (repair.rs applies them); never sent anywhere.
    #[serde(skip)]
    pub(crate) fixes: Vec<Fix>,
}

/// A repair `check` found possible. Applied by `check --repair` (repair.rs), one class per
/// pass and the store checked again between passes, so each fix is computed from a state in
/// which everything it depends on is already sound.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fix {
    /// The superblock is damaged or gone and the store was opened with its backup copy.
    WritePrimary,
    /// The backup copy is missing, damaged or differs: rewrite it from the superblock.
    WriteBackup,
    /// Rows that fail their checksums, or a record that vanished: the snapshots that might
    /// read them (ids) are marked invalid and the rows removed. Only with `--drop-damaged`.
    Damaged {
        row: DamagedRow,
        snapshots: Vec<u64>,
        reason: String,
    },
    /// The time index, the chain heads or the name index disagree with the rows they index:
    /// rebuilt from those rows.
    Reindex,
    /// Record entries no view can read: dropped, their chunks freed. (record key, offsets)
    DropEntries((u32, u64, u64), Vec<u16>),
    /// An overlay no snapshot owns: dropped with its chunks.
    DropOverlay(u32),
    /// The free list disagrees with the records (leaked chunks, a chunk both free and in use,
    /// extents past the high-water mark): rebuilt as every chunk no record or overlay owns.
    RebuildFreeList,
    /// Counters that disagree with what they count: set to the counted values.
    SetUsed(u64),
    SetExclusive(u64, u64),
    SetOverlayChunks(u64, u64),
}

/// A damaged piece of metadata or data, by what has to go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DamagedRow {
    /// A record whose checksum fails; `prev` is the `t` of the record before it (0: none).
    Record { key: (u32, u64, u64), prev: u64 },
    /// The record of `group` at `t` vanished (a record after it names it as `prev`, or the
    /// group's head does): the record after it (`next`), or the head, is relinked to `prev`.
    Missing {
        group: (u32, u64),
        t: u64,
        next: Option<(u32, u64, u64)>,
        prev: u64,
    },
    /// An overlay record whose checksum fails.
    Overlay((u32, u64)),
    /// Saved bytes that fail their hash (`--data`): only the readers go.
    Data,
    /// A snapshot whose catalog row fails its check: its point in time is unknown, so the
    /// snapshot itself goes (row and name), and what only it held becomes a leak freed after.
    Snapshot(u64),
}

/// Where each chunk of a group is for a view at an epoch: a saved copy, or the origin (`None`).
pub(crate) type Slots = [Option<Entry>; GROUP_CHUNKS as usize];

/// Returns the memory a cache just freed to the system. The entries were allocated by
/// whichever threads resolved them, each from its own malloc arena; refilled by other threads,
/// a cache would otherwise leave its old entries' memory idle in their arenas and hold up to
/// one budget per arena (at 1,000,000 saved chunks: 91 MiB over the start with a 64 MiB
/// budget, against 71 MiB with one arena). Caches are cleared whole and rarely, so the trim is
/// rare too.
pub(crate) fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own; no pointer is
    // passed or invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resolved groups, bounded (`max` groups, from the store's [`crate::store::Caches`]): cleared
/// whole when full (a cache of verified metadata, never a source of truth), and whenever a
/// writer opens.
pub(crate) struct ResolvedCache {
    map: std::sync::Mutex<HashMap<(u64, u64), std::sync::Arc<Slots>>>,
    max: usize,
}

impl ResolvedCache {
    /// What one group costs in memory: its slots, and its map entry and `Arc` counts.
    pub(crate) const GROUP_BYTES: usize = std::mem::size_of::<Slots>() + 64;

    pub(crate) fn new(max: usize) -> ResolvedCache {
        ResolvedCache {
            map: Default::default(),
            max,
        }
    }

    pub(crate) fn get(&self, g: u64, e: u64) -> Option<std::sync::Arc<Slots>> {
        self.map.lock().ok()?.get(&(g, e)).cloned()
    }

    pub(crate) fn put(&self, g: u64, e: u64, slots: std::sync::Arc<Slots>) {
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= self.max {
                m.clear();
                give_back_freed_memory();
            }
            m.insert((g, e), slots);
        }
    }

    pub(crate) fn clear(&self) {
        if let Ok(mut m) = self.map.lock() {
            m.clear();
        }
    }
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruption.is_empty() && self.leaks.is_empty()
    }
}

/// Chunks known to be preserved since the newest live snapshot, one bit each, in pages of
/// [`Preserved::PAGE`] chunks allocated on first use: nothing for a command that never writes,
/// memory in proportion to what was written, and clearing (at every create and delete) costs
/// the pages in use, not the size of the origin.
#[derive(Default)]
pub(crate) struct Preserved {
    pages: HashMap<u64, Box<[u64; 64]>>,
}

impl Preserved {
    const PAGE: u64 = 64 * 64;

    pub(crate) fn get(&self, c: u64) -> bool {
        self.pages
            .get(&(c / Self::PAGE))
            .is_some_and(|p| p[((c % Self::PAGE) / 64) as usize] & (1 << (c % 64)) != 0)
    }

    pub(crate) fn set(&mut self, c: u64) {
        let p = self
            .pages
            .entry(c / Self::PAGE)
            .or_insert_with(|| Box::new([0; 64]));
        p[((c % Self::PAGE) / 64) as usize] |= 1 << (c % 64);
    }

    pub(crate) fn clear(&mut self) {
        self.pages.clear();
    }
}

impl Store {
    pub(super) fn bit(&self, c: u64) -> bool {
        self.preserved.get(c)
    }
    pub(super) fn set_bit(&mut self, c: u64) {
        self.preserved.set(c);
    }

    /// Bytes of origin chunk `c` inside the origin: the chunk size, or less for a partial last
    /// chunk. A chunk's hash covers exactly these bytes.
    pub(crate) fn chunk_len(&self, c: u64) -> usize {
        let cs = self.sb.chunk_size;
        cs.min(self.sb.origin_size.saturating_sub(c * cs)) as usize
    }

    pub(super) fn check_origin_range(&self, off: u64, len: usize) -> Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.sb.origin_size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {off}+{len} is beyond the end of the origin ({} bytes)",
                self.sb.origin_size
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Caches;

    /// The budget is split as documented, each share holds at least some groups, and the
    /// resolved cache never holds more groups than its share.
    #[test]
    fn the_cache_budget_is_split_and_the_resolved_groups_keep_to_their_share() {
        let c = Caches::of(64 << 20);
        assert_eq!(c.meta_bytes, 32 << 20);
        assert!(c.resolved_groups * ResolvedCache::GROUP_BYTES <= 16 << 20);
        assert!(c.verified_records * VERIFIED_BYTES <= 16 << 20);
        assert!(
            c.resolved_groups >= 1000 && c.verified_records >= 1000,
            "{c:?}"
        );
        // Below the least, the least.
        assert_eq!(Caches::of(0).meta_bytes, crate::store::MIN_CACHE_BYTES / 2);
        let r = ResolvedCache::new(16);
        let slots: std::sync::Arc<Slots> = std::sync::Arc::new([None; GROUP_CHUNKS as usize]);
        for g in 0..100 {
            r.put(g, 1, slots.clone());
            assert!(r.map.lock().map(|m| m.len()).unwrap_or(0) <= 16);
        }
        assert!(r.get(99, 1).is_some());
    }
}
