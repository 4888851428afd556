//! The copy-on-write engine: shared exceptions by epoch (DESIGN.md, appendix).
//!
//! A record `(branch, group, t) -> runs` says: for the chunks its runs cover, the content they had
//! *before the first write at epoch t* lives at the given store chunks. A record for chunk c
//! covers the epochs `[t_prev, t)`, t_prev being the previous record's t for the same chunk. A
//! snapshot at epoch e reads chunk c from the record with the smallest t > e, else the origin.
//! Within one interval (one value of t) a chunk is preserved at most once, so the runs of one
//! record never overlap, and an origin write costs at most one copy whatever the snapshot count.

use std::collections::{BTreeMap, HashMap};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::codec::{
    chunk_hash, decode_record, encode_record, overlay_key, record_key, Entry, Record,
};
use crate::error::{meta_err, Error, Result};
use crate::format::{OnFull, GROUP_CHUNKS};
use crate::io::AlignedBuf;
use crate::store::{
    put_snap, Event, SnapState, Store, BY_TIME, CONFIG, FREE, HEADS, K_EPOCH, K_HIGH_WATER,
    K_RESTORE_BACKUP, K_RESTORE_TARGET, K_USED, NAMES, OVERLAYS, RECORDS, SNAPS,
};

fn bad_record(store: &str, k: (u32, u64, u64)) -> Error {
    Error::Corrupt(format!(
        "{store}: exception record {k:?} is damaged; run `snapctl check`"
    ))
}

fn bad_overlay(store: &str, k: (u32, u64)) -> Error {
    Error::Corrupt(format!(
        "{store}: overlay record {k:?} is damaged; run `snapctl check`"
    ))
}

/// Decodes an exception record, refusing one whose checksum (over key and value) fails.
pub(crate) fn record_of(store: &str, k: (u32, u64, u64), v: &[u8]) -> Result<Record> {
    decode_record("records", &record_key(k), v).ok_or_else(|| bad_record(store, k))
}

/// Decodes an overlay record, refusing one whose checksum fails.
pub(crate) fn overlay_of(store: &str, k: (u32, u64), v: &[u8]) -> Result<Record> {
    decode_record("overlays", &overlay_key(k), v).ok_or_else(|| bad_overlay(store, k))
}

pub(crate) fn put_record(
    t: &mut redb::Table<(u32, u64, u64), &'static [u8]>,
    store: &str,
    k: (u32, u64, u64),
    r: &Record,
) -> Result<()> {
    t.insert(k, encode_record("records", &record_key(k), r).as_slice())
        .map_err(|e| meta_err(store, e))?;
    Ok(())
}

pub(crate) fn put_overlay(
    t: &mut redb::Table<(u32, u64), &'static [u8]>,
    store: &str,
    k: (u32, u64),
    r: &Record,
) -> Result<()> {
    t.insert(k, encode_record("overlays", &overlay_key(k), r).as_slice())
        .map_err(|e| meta_err(store, e))?;
    Ok(())
}

/// The first record for chunk `c` of `branch` with `lo <= t <= hi`: `(t, entry)`. Write paths
/// only (each record's checksum is verified; the chain is `check`'s and the readers' job).
fn find_cover<T: ReadableTable<(u32, u64, u64), &'static [u8]>>(
    t: &T,
    store: &str,
    branch: u32,
    c: u64,
    lo: u64,
    hi: u64,
) -> Result<Option<(u64, Entry)>> {
    if lo > hi {
        return Ok(None);
    }
    let g = c / GROUP_CHUNKS;
    for row in t
        .range((branch, g, lo)..=(branch, g, hi))
        .map_err(|e| meta_err(store, e))?
    {
        let (k, v) = row.map_err(|e| meta_err(store, e))?;
        let rec = record_of(store, k.value(), v.value())?;
        if let Some(e) = rec.find(c % GROUP_CHUNKS) {
            return Ok(Some((k.value().2, *e)));
        }
    }
    Ok(None)
}

fn broken_chain(store: &str, g: u64) -> Error {
    Error::Corrupt(format!(
        "{store}: the exception records of chunks {}..{} are incomplete (a record has disappeared); run `snapctl check`",
        g * GROUP_CHUNKS,
        (g + 1) * GROUP_CHUNKS
    ))
}

/// For each chunk of group `g`, where a view at epoch `e` reads it: `Some(entry)` (a saved
/// copy) or the current content (`None`). The records read are proven complete: each names
/// the one before it (`prev`) and the newest is in `heads`, so a record that vanished (a
/// damaged page, a key that no longer sorts where it should) fails the read instead of
/// silently sending it to the origin.
fn resolve_group<T, H>(
    t: &T,
    heads: &H,
    store: &str,
    g: u64,
    e: u64,
) -> Result<[Option<Entry>; GROUP_CHUNKS as usize]>
where
    T: ReadableTable<(u32, u64, u64), &'static [u8]>,
    H: ReadableTable<(u32, u64), u64>,
{
    let mut out = [None; GROUP_CHUNKS as usize];
    let mut unresolved = GROUP_CHUNKS as usize;
    let mut last: Option<u64> = None;
    for row in t
        .range((0u32, g, e + 1)..=(0u32, g, u64::MAX))
        .map_err(|e| meta_err(store, e))?
    {
        let (k, v) = row.map_err(|e| meta_err(store, e))?;
        let key = k.value();
        let rec = record_of(store, key, v.value())?;
        let linked = match last {
            None => rec.prev <= e,
            Some(l) => rec.prev == l,
        };
        if !linked {
            return Err(broken_chain(store, g));
        }
        last = Some(key.2);
        for en in &rec.entries {
            let slot = &mut out[en.off as usize];
            if slot.is_none() {
                *slot = Some(*en);
                unresolved -= 1;
            }
        }
        if unresolved == 0 {
            return Ok(out);
        }
    }
    let head = heads
        .get((0u32, g))
        .map_err(|e| meta_err(store, e))?
        .map(|v| v.value());
    let complete = match (last, head) {
        (Some(l), Some(h)) => l == h,
        (None, Some(h)) => h <= e,
        (None, None) => true,
        (Some(_), None) => false,
    };
    if !complete {
        return Err(broken_chain(store, g));
    }
    Ok(out)
}

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
    Done,
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
    pub free_chunks: u64,
    /// Damage: a chunk owned twice, a record pointing outside the store, counters that disagree.
    pub corruption: Vec<String>,
    /// Space no view can reach: reclaimable, not dangerous.
    pub leaks: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruption.is_empty() && self.leaks.is_empty()
    }
}

impl Store {
    fn bit(&self, c: u64) -> bool {
        self.preserved[(c / 64) as usize] & (1 << (c % 64)) != 0
    }
    fn set_bit(&mut self, c: u64) {
        self.preserved[(c / 64) as usize] |= 1 << (c % 64);
    }

    /// Bytes of origin chunk `c` inside the origin: the chunk size, or less for a partial last
    /// chunk. A chunk's hash covers exactly these bytes.
    pub(crate) fn chunk_len(&self, c: u64) -> usize {
        let cs = self.sb.chunk_size;
        cs.min(self.sb.origin_size.saturating_sub(c * cs)) as usize
    }

    fn check_origin_range(&self, off: u64, len: usize) -> Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.sb.origin_size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {off}+{len} is beyond the end of the origin ({} bytes)",
                self.sb.origin_size
            ))),
        }
    }

    /// Writes to the origin through copy-on-write. Before the write is issued, every chunk it
    /// touches whose old content a live snapshot still needs is copied to the store, the copy
    /// flushed, and its record committed (invariant 2). `fua`: durable on return.
    pub(crate) fn write_origin_inner(&mut self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        self.write_batch_inner(&[(off, data)], fua)
    }

    /// Several origin writes: the copies all of them need are made and committed together (one
    /// flush and one commit for the batch, however deep the client's queue), then the writes go
    /// out together. Overlapping writes are applied in order.
    pub(crate) fn write_batch_inner(&mut self, writes: &[(u64, &[u8])], fua: bool) -> Result<()> {
        let cs = self.sb.chunk_size;
        let mut chunks = Vec::new();
        for (off, data) in writes {
            self.check_origin_range(*off, data.len())?;
            if !data.is_empty() {
                chunks.extend(off / cs..=(off + data.len() as u64 - 1) / cs);
            }
        }
        if chunks.is_empty() {
            return Ok(());
        }
        chunks.sort_unstable();
        chunks.dedup();
        let mut attempts = 0u64;
        loop {
            match self.preserve(&chunks)? {
                Preserve::Done => break,
                Preserve::Full => {
                    attempts += 1;
                    if attempts > self.snaps.len() as u64 + 1 {
                        return Err(Error::NoSpace(format!(
                            "store {} is full and the on-full policy could not make room",
                            self.name
                        )));
                    }
                    self.apply_full_policy()?;
                }
            }
        }
        let werr = |e| Error::io(format!("origin {}: write", self.sb.origin_path), e);
        let mut sorted: Vec<(u64, u64)> =
            writes.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
        sorted.sort_unstable();
        let overlap = sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0);
        if overlap {
            for (off, data) in writes {
                self.origin.write_at(data, *off).map_err(werr)?;
            }
        } else {
            self.origin.write_many(writes).map_err(werr)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every completed origin write durable (metadata commits already are).
    /// Makes every completed write durable: the origin's, and those into writable snapshots'
    /// overlays (metadata commits already are).
    pub fn flush(&self) -> Result<()> {
        self.origin
            .flush()
            .map_err(|e| Error::io(format!("origin {}: flush", self.sb.origin_path), e))?;
        if self.snaps.values().any(|s| s.writable) {
            self.dev
                .flush()
                .map_err(|e| Error::io(format!("store {}: flush", self.name), e))?;
        }
        Ok(())
    }

    /// Writes store data at device offsets and makes it durable. Everything a commit is about to
    /// point at goes through here first. The flush is ours, not left to the metadata engine's
    /// commit protocol: the crash tests show a recovery can adopt a commit whose own pages all
    /// landed while data written just before it did not.
    fn write_durable(&self, writes: &[(u64, &[u8])]) -> Result<()> {
        let sn = &self.name;
        self.dev
            .write_many(writes)
            .map_err(|e| Error::io(format!("store {sn}: write"), e))?;
        self.dev
            .flush()
            .map_err(|e| Error::io(format!("store {sn}: flush"), e))
    }

    /// Copies and commits the old contents of the `chunks` (sorted) that a live snapshot needs.
    fn preserve(&mut self, chunks: &[u64]) -> Result<Preserve> {
        // Repeat writes first: a set bit means "preserved since the newest snapshot" (the bitmap
        // is cleared whenever the snapshot set changes), so no index and no epoch list is needed.
        if chunks.iter().all(|&c| self.bit(c)) {
            return Ok(Preserve::Done);
        }
        let live = self.live_epochs();
        let Some(&e_max) = live.last() else {
            return Ok(Preserve::Done);
        };
        let e_prev = live.len().checked_sub(2).map(|i| live[i]);
        let epoch = self.epoch;
        let sn = self.name.clone();
        let tx = self.wtx()?;
        // Which chunks need a copy: no record since the newest snapshot.
        let mut need = Vec::new();
        {
            let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            for &c in chunks {
                if self.bit(c) {
                    continue;
                }
                if find_cover(&recs, &sn, 0, c, e_max + 1, epoch)?.is_some() {
                    self.set_bit(c);
                } else {
                    need.push(c);
                }
            }
        }
        if need.is_empty() {
            return Ok(Preserve::Done);
        }
        let Some(extents) = self.alloc(&tx, need.len() as u64)? else {
            return Ok(Preserve::Full);
        };
        // Map needed chunks onto the allocated store chunks, in order.
        let mut locs = Vec::with_capacity(need.len());
        for (start, n) in &extents {
            locs.extend(*start..*start + *n);
        }
        // Copy: runs of adjacent origin chunks going to adjacent store chunks, all read in one
        // batch and all written in one batch, so the engine keeps them in flight together.
        let cs = self.sb.chunk_size as usize;
        let mut runs: Vec<(usize, usize)> = Vec::new(); // (first index into need, count)
        let mut i = 0;
        while i < need.len() {
            let mut j = i + 1;
            while j < need.len()
                && need[j] == need[j - 1] + 1
                && locs[j] == locs[j - 1] + 1
                && j - i < 256
            {
                j += 1;
            }
            runs.push((i, j - i));
            i = j;
        }
        let mut bufs: Vec<AlignedBuf> = runs.iter().map(|(_, n)| AlignedBuf::new(n * cs)).collect();
        {
            let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(runs.len());
            for ((first, n), buf) in runs.iter().zip(bufs.iter_mut()) {
                let ooff = need[*first] * cs as u64;
                let olen = (n * cs).min((self.sb.origin_size - ooff) as usize);
                reads.push((ooff, &mut buf.as_mut_slice()[..olen]));
            }
            self.origin
                .read_many(&mut reads)
                .map_err(|e| Error::io(format!("origin {}: read", self.sb.origin_path), e))?;
        }
        // The hash of each copy, from the buffer already in memory: a chunk's bytes inside the
        // origin (the last chunk may be partial).
        let mut hashes = Vec::with_capacity(need.len());
        for ((first, n), buf) in runs.iter().zip(&bufs) {
            for i in 0..*n {
                let len = self.chunk_len(need[first + i]);
                hashes.push(chunk_hash(&buf.as_slice()[i * cs..i * cs + len]));
            }
        }
        let writes: Vec<(u64, &[u8])> = runs
            .iter()
            .zip(&bufs)
            .map(|((first, _), buf)| {
                (
                    self.sb.data_offset + locs[*first] * cs as u64,
                    buf.as_slice(),
                )
            })
            .collect();
        self.write_durable(&writes)?;
        let mut exclusive = 0u64;
        {
            let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
            let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
            let mut groups: BTreeMap<u64, Vec<Entry>> = BTreeMap::new();
            for ((c, p), hash) in need.iter().zip(&locs).zip(&hashes) {
                groups.entry(c / GROUP_CHUNKS).or_default().push(Entry {
                    off: (c % GROUP_CHUNKS) as u16,
                    loc: *p,
                    hash: *hash,
                });
                // Exclusive to the newest snapshot unless the one before it shares the record:
                // it does when no record for c lies between the two.
                let shared = match e_prev {
                    None => false,
                    Some(ep) => find_cover(&recs, &sn, 0, *c, ep + 1, e_max)?.is_none(),
                };
                if !shared {
                    exclusive += 1;
                }
            }
            for (g, items) in groups {
                let key = (0u32, g, epoch);
                let mut rec = match recs.get(key).map_err(|e| meta_err(&sn, e))? {
                    Some(v) => record_of(&sn, key, v.value())?,
                    None => {
                        // The group's newest record from now on: chain it to the previous one.
                        let prev = heads
                            .get((0u32, g))
                            .map_err(|e| meta_err(&sn, e))?
                            .map(|v| v.value())
                            .unwrap_or(0);
                        heads
                            .insert((0u32, g), epoch)
                            .map_err(|e| meta_err(&sn, e))?;
                        Record {
                            prev,
                            entries: Vec::new(),
                        }
                    }
                };
                for en in items {
                    rec.put(en);
                }
                put_record(&mut recs, &sn, key, &rec)?;
                by_time
                    .insert((0u32, epoch, g), ())
                    .map_err(|e| meta_err(&sn, e))?;
            }
        }
        let newest: Vec<u64> = self
            .snaps
            .values()
            .filter(|s| s.state == SnapState::Valid && s.branch == 0 && s.epoch == e_max)
            .map(|s| s.id)
            .collect();
        // Several snapshots at one epoch share everything: none holds anything alone.
        if newest.len() == 1 && exclusive > 0 {
            if let Some(s) = self.snaps.get(&newest[0]) {
                let mut s = s.clone();
                s.exclusive_chunks += exclusive;
                put_snap(&tx, &s, &sn)?;
                self.snaps.insert(s.id, s);
            }
        }
        match tx.commit() {
            Ok(()) => {}
            Err(e) => {
                let err = meta_err(&sn, e);
                self.load_catalog()?;
                return match err {
                    Error::NoSpace(_) => Ok(Preserve::Full),
                    other => Err(other),
                };
            }
        }
        for c in need {
            self.set_bit(c);
        }
        Ok(Preserve::Done)
    }

    /// The store is full: apply the policy in a commit of its own (never in the transaction
    /// that will reuse the freed chunks: a crash before that one commits must leave the
    /// snapshots that still own those chunks intact).
    fn apply_full_policy(&mut self) -> Result<()> {
        let policy = self.sb.on_full;
        let valid: Vec<(u64, u64, String)> = {
            let mut v: Vec<_> = self
                .snaps
                .values()
                .filter(|s| s.state == SnapState::Valid)
                .map(|s| (s.epoch, s.id, s.name.clone()))
                .collect();
            v.sort();
            v
        };
        let victim = match policy {
            OnFull::FailWrites => None,
            OnFull::DropOldest => valid.first().cloned(),
            // The newest snapshot always needs the copy: invalidate from the newest down.
            OnFull::Invalidate => valid.last().cloned(),
        };
        let Some((_, id, name)) = victim else {
            return Err(Error::NoSpace(format!(
                "store {} is full: an origin write needs a copy for the snapshots, and the on-full policy is {}; delete snapshots to make room",
                self.name,
                policy.name()
            )));
        };
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let (action, invalid) = match policy {
            OnFull::Invalidate => ("invalidated", Some("the store filled up".to_string())),
            _ => ("deleted", None),
        };
        self.drop_point(&tx, id, invalid)?;
        self.log_event(
            &tx,
            Event {
                time: chrono::Utc::now().timestamp(),
                action: action.into(),
                snapshot: name,
                reason: format!("store full (on-full policy {})", policy.name()),
            },
        )?;
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.preserved.fill(0);
        Ok(())
    }

    /// Removes snapshot `id` from its branch's live points and frees what only it held. With
    /// `invalid`, the snapshot stays listed as invalid (and refuses reads); else it is deleted.
    /// Returns the number of chunks freed. Cost: the records in its own window.
    pub(crate) fn drop_point(
        &mut self,
        tx: &redb::WriteTransaction,
        id: u64,
        invalid: Option<String>,
    ) -> Result<u64> {
        let sn = self.name.clone();
        let Some(snap) = self.snaps.get(&id).cloned() else {
            return Err(Error::NotFound(format!("snapshot id {id}")));
        };
        // Forget it in memory first, so live_epochs() below is "the others".
        let was_valid = snap.state == SnapState::Valid;
        match &invalid {
            Some(reason) => {
                let mut s = snap.clone();
                s.state = SnapState::Invalid;
                s.invalid_reason = Some(reason.clone());
                s.exclusive_chunks = 0;
                put_snap(tx, &s, &sn)?;
                self.snaps.insert(id, s);
            }
            None => {
                self.snaps.remove(&id);
                let mut snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
                snaps.remove(id).map_err(|e| meta_err(&sn, e))?;
                let mut names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
                names
                    .remove(snap.name.as_str())
                    .map_err(|e| meta_err(&sn, e))?;
            }
        }
        if !was_valid {
            return Ok(0); // an invalid snapshot holds nothing
        }
        let overlay_freed = if snap.overlay != 0 {
            self.drop_overlay(tx, snap.overlay)?
        } else {
            0
        };
        if let (Some(_), Some(s)) = (&invalid, self.snaps.get_mut(&id)) {
            s.overlay_chunks = 0;
            let s = s.clone();
            put_snap(tx, &s, &sn)?;
        }
        let e = snap.epoch;
        let live = self.live_epochs();
        if live.contains(&e) {
            // Another snapshot at the same point keeps everything; if it is now the only one
            // there, it holds the point's window alone.
            let k = live.partition_point(|&x| x < e);
            let prev = k.checked_sub(1).map(|i| live[i]);
            let next = live.get(k + 1).copied().unwrap_or(self.epoch);
            let n = self.window(tx, prev, e, next, false)?;
            self.set_exclusive(tx, e, n)?;
            return Ok(overlay_freed);
        }
        let k = live.partition_point(|&x| x < e);
        let e_prev = k.checked_sub(1).map(|i| live[i]);
        let e_next = live.get(k).copied();
        let hi = e_next.unwrap_or(self.epoch);
        let freed = self.window(tx, e_prev, e, hi, true)?;
        // The neighbours' windows changed: recompute what each holds alone.
        if let Some(p) = e_prev {
            let pp = k.checked_sub(2).map(|i| live[i]);
            let n = self.window(tx, pp, p, hi, false)?;
            self.set_exclusive(tx, p, n)?;
        }
        if let Some(nx) = e_next {
            let nn = live.get(k + 1).copied().unwrap_or(self.epoch);
            let n = self.window(tx, e_prev, nx, nn, false)?;
            self.set_exclusive(tx, nx, n)?;
        }
        Ok(freed + overlay_freed)
    }

    pub(crate) fn set_exclusive(
        &mut self,
        tx: &redb::WriteTransaction,
        epoch: u64,
        n: u64,
    ) -> Result<()> {
        let ids: Vec<u64> = self
            .snaps
            .values()
            .filter(|s| s.state == SnapState::Valid && s.branch == 0 && s.epoch == epoch)
            .map(|s| s.id)
            .collect();
        let n = if ids.len() == 1 { n } else { 0 };
        for id in ids {
            if let Some(s) = self.snaps.get_mut(&id) {
                if s.exclusive_chunks != n {
                    s.exclusive_chunks = n;
                    let s = s.clone();
                    put_snap(tx, &s, &self.name)?;
                }
            }
        }
        Ok(())
    }

    /// The chunks held by the snapshot at `e` alone: records with t in (e, hi] whose previous
    /// record for the same chunk is newer than `e_prev` (or with no earlier snapshot at all).
    /// With `free`, they are removed and their store chunks freed. Returns their count.
    fn window(
        &self,
        tx: &redb::WriteTransaction,
        e_prev: Option<u64>,
        e: u64,
        hi: u64,
        free: bool,
    ) -> Result<u64> {
        let sn = &self.name;
        let keys: Vec<(u64, u64)> = {
            let by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(sn, e))?;
            let mut v = Vec::new();
            for row in by_time
                .range((0u32, e + 1, 0u64)..=(0u32, hi, u64::MAX))
                .map_err(|e| meta_err(sn, e))?
            {
                let (k, _) = row.map_err(|e| meta_err(sn, e))?;
                let (_, t, g) = k.value();
                v.push((t, g));
            }
            v
        };
        let mut count = 0;
        let mut to_free = Vec::new();
        for (t, g) in keys {
            let key = (0u32, g, t);
            let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(sn, e))?;
            let rec = match recs.get(key).map_err(|e| meta_err(sn, e))? {
                Some(v) => record_of(sn, key, v.value())?,
                None => {
                    return Err(Error::Corrupt(format!(
                        "{sn}: time index names a missing record {key:?}; run `snapctl check`"
                    )))
                }
            };
            let mut kept = Record {
                prev: rec.prev,
                entries: Vec::new(),
            };
            for en in &rec.entries {
                let c = g * GROUP_CHUNKS + en.off as u64;
                let alone = match e_prev {
                    None => true,
                    Some(ep) => find_cover(&recs, sn, 0, c, ep + 1, t - 1)?.is_some(),
                };
                if alone {
                    count += 1;
                    if free {
                        to_free.push(en.loc);
                        continue;
                    }
                }
                if free {
                    kept.entries.push(*en);
                }
            }
            if free && kept != rec {
                if kept.entries.is_empty() {
                    recs.remove(key).map_err(|e| meta_err(sn, e))?;
                    let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(sn, e))?;
                    by_time.remove((0u32, t, g)).map_err(|e| meta_err(sn, e))?;
                    self.unlink_record(&mut recs, tx, g, t, rec.prev)?;
                } else {
                    put_record(&mut recs, sn, key, &kept)?;
                }
            }
        }
        self.free_chunk_list(tx, to_free)?;
        Ok(count)
    }

    /// Keeps group `g`'s record chain whole after its record at `t` (whose `prev` was `prev`)
    /// was removed: the next record takes over `prev`, or the head moves back.
    fn unlink_record(
        &self,
        recs: &mut redb::Table<(u32, u64, u64), &'static [u8]>,
        tx: &redb::WriteTransaction,
        g: u64,
        t: u64,
        prev: u64,
    ) -> Result<()> {
        let sn = &self.name;
        let next = match recs
            .range((0u32, g, t + 1)..=(0u32, g, u64::MAX))
            .map_err(|e| meta_err(sn, e))?
            .next()
        {
            Some(row) => {
                let (k, v) = row.map_err(|e| meta_err(sn, e))?;
                Some((k.value(), record_of(sn, k.value(), v.value())?))
            }
            None => None,
        };
        match next {
            Some((k, mut r)) => {
                r.prev = prev;
                put_record(recs, sn, k, &r)?;
            }
            None => {
                let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(sn, e))?;
                if prev == 0 {
                    heads.remove((0u32, g)).map_err(|e| meta_err(sn, e))?;
                } else {
                    heads.insert((0u32, g), prev).map_err(|e| meta_err(sn, e))?;
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off` of snapshot `name`, or of the live origin for "origin".
    pub(crate) fn read_view_inner(&self, name: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        self.read_batch_inner(&mut [ReadReq {
            view: name,
            off,
            buf,
        }])
    }

    /// Proves that overlay `id` is whole before anything is read from it: every record
    /// decodes and together they hold the `count` chunks its snapshot's record says. Once per
    /// overlay and process (this process's own writes keep it whole).
    fn verify_overlay(
        &self,
        tx: &redb::ReadTransaction,
        view: &str,
        id: u32,
        count: u64,
    ) -> Result<()> {
        let sn = &self.name;
        if self
            .verified_overlays
            .lock()
            .map(|v| v.contains(&id))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
        let have = self.overlay_chunks(&t, id)?.len() as u64;
        if have != count {
            return Err(Error::Corrupt(format!(
                "{sn}: snapshot '{view}' should hold {count} chunks of its own but its records hold {have}; run `snapctl check`"
            )));
        }
        if let Ok(mut v) = self.verified_overlays.lock() {
            v.insert(id);
        }
        Ok(())
    }

    /// Several reads of any views: each is mapped onto pieces of the origin or of saved
    /// chunks. Origin pieces go out as one batch; saved chunks are read whole, each once, and
    /// verified against its hash before a byte of it is copied out: a chunk that fails fails
    /// the read, naming the view and the byte range.
    pub(crate) fn read_batch_inner(&self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        let sn = &self.name;
        let cs = self.sb.chunk_size;
        let mut tx = None;
        // Per request: pieces in order.
        let mut plans: Vec<Vec<Piece>> = Vec::with_capacity(reqs.len());
        // Saved chunks to fetch: loc -> (hash, bytes, request index, origin chunk).
        let mut fetch: BTreeMap<u64, (crate::codec::ChunkHash, usize, usize, u64)> =
            BTreeMap::new();
        for (ri, r) in reqs.iter().enumerate() {
            self.check_origin_range(r.off, r.buf.len())?;
            if r.view == "origin" {
                plans.push(vec![Piece::Origin(r.off, r.buf.len())]);
                continue;
            }
            let snap = self.snapshot(r.view)?;
            if snap.state == SnapState::Invalid {
                return Err(Error::InvalidSnapshot(format!(
                    "snapshot '{}' is invalid ({}) and cannot be read; delete it",
                    r.view,
                    snap.invalid_reason.as_deref().unwrap_or("store full")
                )));
            }
            let e = snap.epoch;
            let overlay = snap.overlay;
            if tx.is_none() {
                tx = Some(self.rtx()?);
            }
            let Some(t) = tx.as_ref() else { continue };
            if overlay != 0 {
                self.verify_overlay(t, r.view, overlay, snap.overlay_chunks)?;
            }
            let recs = t.open_table(RECORDS).map_err(|e| meta_err(sn, e))?;
            let heads = t.open_table(HEADS).map_err(|e| meta_err(sn, e))?;
            let ovl = t.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
            type Slots = [Option<Entry>; GROUP_CHUNKS as usize];
            let mut ovl_groups: HashMap<u64, Slots> = HashMap::new();
            let mut groups: HashMap<u64, Slots> = HashMap::new();
            let mut segs: Vec<Piece> = Vec::new();
            let mut pos = 0usize;
            while pos < r.buf.len() {
                let abs = r.off + pos as u64;
                let c = abs / cs;
                let within = (abs % cs) as usize;
                let n = (cs as usize - within).min(r.buf.len() - pos);
                let g = c / GROUP_CHUNKS;
                // The snapshot's own overlay first, then its point in time.
                let own = if overlay == 0 {
                    None
                } else {
                    let slots = match ovl_groups.entry(g) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            let mut slots = [None; GROUP_CHUNKS as usize];
                            let key = (overlay, g);
                            if let Some(val) = ovl.get(key).map_err(|e| meta_err(sn, e))? {
                                for en in overlay_of(sn, key, val.value())?.entries {
                                    slots[en.off as usize] = Some(en);
                                }
                            }
                            v.insert(slots)
                        }
                    };
                    slots[(c % GROUP_CHUNKS) as usize]
                };
                let found = match own {
                    Some(en) => Some(en),
                    None => {
                        let resolved = match groups.entry(g) {
                            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(resolve_group(&recs, &heads, sn, g, e)?)
                            }
                        };
                        resolved[(c % GROUP_CHUNKS) as usize]
                    }
                };
                match found {
                    Some(en) if en.loc >= self.sb.data_chunks => {
                        return Err(Error::Corrupt(format!(
                            "{sn}: a record points outside the store; run `snapctl check`"
                        )))
                    }
                    Some(en) => {
                        fetch
                            .entry(en.loc)
                            .or_insert((en.hash, self.chunk_len(c), ri, c));
                        segs.push(Piece::Saved(en.loc, within, n));
                    }
                    None => match segs.last_mut() {
                        Some(Piece::Origin(o, l)) if *o + *l as u64 == abs && *l < 8 << 20 => {
                            *l += n
                        }
                        _ => segs.push(Piece::Origin(abs, n)),
                    },
                }
                pos += n;
            }
            plans.push(segs);
        }
        // Saved chunks: adjacent ones in one read, all in flight together.
        let mut spans: Vec<(u64, usize)> = Vec::new(); // (first loc, count)
        for &loc in fetch.keys() {
            match spans.last_mut() {
                Some((f, n)) if *f + *n as u64 == loc && *n < 256 => *n += 1,
                _ => spans.push((loc, 1)),
            }
        }
        let mut bufs: Vec<AlignedBuf> = spans
            .iter()
            .map(|(_, n)| AlignedBuf::new(n * cs as usize))
            .collect();
        {
            let mut store_reqs: Vec<(u64, &mut [u8])> = spans
                .iter()
                .zip(bufs.iter_mut())
                .map(|((f, _), b)| (self.sb.data_offset + f * cs, b.as_mut_slice()))
                .collect();
            self.dev
                .read_many(&mut store_reqs)
                .map_err(|e| Error::io(format!("store {sn}: read"), e))?;
        }
        let mut at: HashMap<u64, (usize, usize)> = HashMap::with_capacity(fetch.len());
        for (bi, (f, n)) in spans.iter().enumerate() {
            for i in 0..*n {
                let loc = f + i as u64;
                let (hash, len, ri, c) = fetch[&loc];
                let start = i * cs as usize;
                if chunk_hash(&bufs[bi].as_slice()[start..start + len]) != hash {
                    return Err(Error::Corrupt(format!(
                        "snapshot '{}': bytes {}..{} of {sn} fail their checksum (store chunk {loc}); run `snapctl check --data`",
                        reqs[ri].view,
                        c * cs,
                        c * cs + len as u64
                    )));
                }
                at.insert(loc, (bi, start));
            }
        }
        let mut origin_reqs: Vec<(u64, &mut [u8])> = Vec::new();
        for (r, segs) in reqs.iter_mut().zip(plans) {
            let mut rest = &mut r.buf[..];
            for piece in segs {
                let n = match piece {
                    Piece::Origin(_, n) | Piece::Saved(_, _, n) => n,
                };
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                match piece {
                    Piece::Origin(off, _) => origin_reqs.push((off, head)),
                    Piece::Saved(loc, within, n) => {
                        let (bi, start) = at[&loc];
                        head.copy_from_slice(
                            &bufs[bi].as_slice()[start + within..start + within + n],
                        );
                    }
                }
            }
        }
        self.origin
            .read_many(&mut origin_reqs)
            .map_err(|e| Error::io(format!("origin {}: read", self.sb.origin_path), e))
    }

    /// Every (chunk, entry) an overlay holds.
    fn overlay_chunks<T: ReadableTable<(u32, u64), &'static [u8]>>(
        &self,
        t: &T,
        id: u32,
    ) -> Result<Vec<(u64, Entry)>> {
        let sn = &self.name;
        let mut out = Vec::new();
        for row in t
            .range((id, 0u64)..=(id, u64::MAX))
            .map_err(|e| meta_err(sn, e))?
        {
            let (k, v) = row.map_err(|e| meta_err(sn, e))?;
            let (_, g) = k.value();
            let rec = overlay_of(sn, k.value(), v.value())?;
            out.extend(
                rec.entries
                    .iter()
                    .map(|en| (g * GROUP_CHUNKS + en.off as u64, *en)),
            );
        }
        Ok(out)
    }

    /// Adds (chunk, entry) pairs to an overlay, replacing the entries of chunks it already
    /// holds; returns the store chunks those replaced entries pointed at.
    fn overlay_insert(
        &self,
        tx: &redb::WriteTransaction,
        id: u32,
        items: &[(u64, Entry)],
    ) -> Result<Vec<u64>> {
        let sn = &self.name;
        let mut t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
        let mut groups: BTreeMap<u64, Vec<Entry>> = BTreeMap::new();
        for &(c, en) in items {
            groups.entry(c / GROUP_CHUNKS).or_default().push(en);
        }
        let mut replaced = Vec::new();
        for (g, list) in groups {
            let key = (id, g);
            let mut rec = match t.get(key).map_err(|e| meta_err(sn, e))? {
                Some(v) => overlay_of(sn, key, v.value())?,
                None => Record::default(),
            };
            for en in list {
                if let Some(old) = rec.find(en.off as u64) {
                    replaced.push(old.loc);
                }
                rec.put(en);
            }
            put_overlay(&mut t, sn, key, &rec)?;
        }
        Ok(replaced)
    }

    /// Reads saved chunks whole and verifies each against its hash; `what` names whose they
    /// are in the error.
    fn read_saved(&self, items: &[(u64, Entry)], what: &str) -> Result<Vec<AlignedBuf>> {
        let cs = self.sb.chunk_size;
        let mut bufs: Vec<AlignedBuf> =
            items.iter().map(|_| AlignedBuf::new(cs as usize)).collect();
        {
            let mut reads: Vec<(u64, &mut [u8])> = items
                .iter()
                .zip(bufs.iter_mut())
                .map(|((_, en), b)| (self.sb.data_offset + en.loc * cs, b.as_mut_slice()))
                .collect();
            self.dev
                .read_many(&mut reads)
                .map_err(|e| Error::io(format!("store {}: read", self.name), e))?;
        }
        for ((c, en), b) in items.iter().zip(&bufs) {
            let len = self.chunk_len(*c);
            if chunk_hash(&b.as_slice()[..len]) != en.hash {
                return Err(Error::Corrupt(format!(
                    "{what}: bytes {}..{} of {} fail their checksum (store chunk {}); run `snapctl check --data`",
                    c * cs,
                    c * cs + len as u64,
                    self.name,
                    en.loc
                )));
            }
        }
        Ok(bufs)
    }

    /// Copies overlay `src` into the new overlay `dst` (data and map); returns the chunk count.
    /// Every chunk is verified as it is read; the copies are durable before the transaction
    /// that names them commits.
    pub(crate) fn copy_overlay(
        &self,
        tx: &redb::WriteTransaction,
        src: u32,
        dst: u32,
        src_name: &str,
    ) -> Result<u64> {
        let sn = self.name.clone();
        let items = {
            let t = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
            self.overlay_chunks(&t, src)?
        };
        if items.is_empty() {
            return Ok(0);
        }
        let Some(extents) = self.alloc(tx, items.len() as u64)? else {
            return Err(Error::NoSpace(format!(
                "store {sn} has no room to copy the {} chunks the snapshot's overlay holds",
                items.len()
            )));
        };
        let locs: Vec<u64> = extents.iter().flat_map(|(s, n)| *s..*s + *n).collect();
        let cs = self.sb.chunk_size as usize;
        let mut copies = Vec::with_capacity(items.len());
        for (part, lparts) in items.chunks(256).zip(locs.chunks(256)) {
            let bufs = self.read_saved(part, &format!("snapshot '{src_name}'"))?;
            let writes: Vec<(u64, &[u8])> = lparts
                .iter()
                .zip(&bufs)
                .map(|(p, b)| (self.sb.data_offset + p * cs as u64, b.as_slice()))
                .collect();
            self.write_durable(&writes)?;
            for ((c, en), p) in part.iter().zip(lparts) {
                copies.push((*c, Entry { loc: *p, ..*en }));
            }
        }
        self.overlay_insert(tx, dst, &copies)?;
        Ok(items.len() as u64)
    }

    /// Frees an overlay's chunks and entries; returns the count.
    fn drop_overlay(&self, tx: &redb::WriteTransaction, id: u32) -> Result<u64> {
        let sn = &self.name;
        let items = {
            let t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
            self.overlay_chunks(&t, id)?
        };
        {
            let mut t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
            let groups: Vec<u64> = {
                let mut g: Vec<u64> = items.iter().map(|(c, _)| c / GROUP_CHUNKS).collect();
                g.dedup();
                g
            };
            for g in groups {
                t.remove((id, g)).map_err(|e| meta_err(sn, e))?;
            }
        }
        self.free_chunk_list(tx, items.iter().map(|(_, en)| en.loc).collect())?;
        Ok(items.len() as u64)
    }

    /// Writes into a writable snapshot, copy-on-write inside its overlay: each chunk the writes
    /// touch is read as the snapshot sees it now (verified), the writes are applied, and the
    /// result goes to a fresh store chunk with its hash; one commit then points the overlay at
    /// the new chunks and frees the ones they replace. A crash leaves every chunk either as it
    /// was or as written, and every chunk always matches its hash. Durable on return.
    pub(crate) fn write_overlay_inner(
        &mut self,
        name: &str,
        writes: &[(u64, &[u8])],
        _fua: bool,
    ) -> Result<()> {
        let snap = self.snapshot(name)?.clone();
        if !snap.writable || snap.overlay == 0 {
            return Err(Error::Invalid(format!(
                "snapshot '{name}' is read-only; `snapctl set-writable {name}` makes it writable"
            )));
        }
        if snap.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{name}' is invalid"
            )));
        }
        let cs = self.sb.chunk_size;
        let sn = self.name.clone();
        let mut chunks = Vec::new();
        for (off, data) in writes {
            self.check_origin_range(*off, data.len())?;
            if !data.is_empty() {
                chunks.extend(off / cs..=(off + data.len() as u64 - 1) / cs);
            }
        }
        chunks.sort_unstable();
        chunks.dedup();
        if chunks.is_empty() {
            return Ok(());
        }
        // What the snapshot reads in those chunks now, verified.
        let mut bufs: Vec<AlignedBuf> = chunks
            .iter()
            .map(|_| AlignedBuf::new(cs as usize))
            .collect();
        {
            let mut reqs: Vec<ReadReq> = chunks
                .iter()
                .zip(bufs.iter_mut())
                .map(|(c, b)| ReadReq {
                    view: name,
                    off: c * cs,
                    buf: &mut b.as_mut_slice()[..self.chunk_len(*c)],
                })
                .collect();
            self.read_batch_inner(&mut reqs)?;
        }
        // Apply the writes in order.
        for (off, data) in writes {
            let mut pos = 0usize;
            while pos < data.len() {
                let abs = off + pos as u64;
                let (c, within) = (abs / cs, (abs % cs) as usize);
                let n = (cs as usize - within).min(data.len() - pos);
                let i = chunks.binary_search(&c).map_err(|_| {
                    Error::Corrupt(format!("{sn}: lost track of chunk {c} of a write"))
                })?;
                bufs[i].as_mut_slice()[within..within + n].copy_from_slice(&data[pos..pos + n]);
                pos += n;
            }
        }
        let tx = self.wtx()?;
        let Some(extents) = self.alloc(&tx, chunks.len() as u64)? else {
            return Err(Error::NoSpace(format!(
                "store {sn} is full: no room for what writable snapshot '{name}' writes"
            )));
        };
        let locs: Vec<u64> = extents.iter().flat_map(|(s, n)| *s..*s + *n).collect();
        let fills: Vec<(u64, &[u8])> = locs
            .iter()
            .zip(&bufs)
            .map(|(p, b)| (self.sb.data_offset + p * cs, b.as_slice()))
            .collect();
        self.write_durable(&fills)?;
        let items: Vec<(u64, Entry)> = chunks
            .iter()
            .zip(&locs)
            .zip(&bufs)
            .map(|((c, p), b)| {
                (
                    *c,
                    Entry {
                        off: (c % GROUP_CHUNKS) as u16,
                        loc: *p,
                        hash: chunk_hash(&b.as_slice()[..self.chunk_len(*c)]),
                    },
                )
            })
            .collect();
        let replaced = self.overlay_insert(&tx, snap.overlay, &items)?;
        let added = chunks.len() as u64 - replaced.len() as u64;
        self.free_chunk_list(&tx, replaced)?;
        let mut s2 = snap.clone();
        s2.overlay_chunks += added;
        put_snap(&tx, &s2, &sn)?;
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.snaps.insert(s2.id, s2);
        Ok(())
    }

    /// The epoch a view reads at: a valid snapshot's, or None for the live origin.
    fn view_epoch(&self, name: &str) -> Result<Option<u64>> {
        if name == "origin" {
            return Ok(None);
        }
        let s = self.snapshot(name)?;
        if s.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{name}' is invalid and has no content to compare; delete it"
            )));
        }
        Ok(Some(s.epoch))
    }

    /// The chunks where views `from` and `to` may differ, from metadata alone: two points of
    /// the origin at epochs a < b read chunk c from different places exactly when c has a
    /// record with t in (a, b] (a write between them); the live origin counts as b = infinity.
    /// A chunk rewritten with the same bytes counts as changed. Cost: the records in that window.
    pub(crate) fn diff_chunks_inner(&self, from: &str, to: &str) -> Result<Vec<u64>> {
        let (a, b) = (self.view_epoch(from)?, self.view_epoch(to)?);
        // Chunks a snapshot's overlay holds may differ from anything: count them changed.
        let mut out = Vec::new();
        {
            let tx = self.rtx()?;
            let t = tx
                .open_table(OVERLAYS)
                .map_err(|e| meta_err(&self.name, e))?;
            for v in [from, to] {
                if v != "origin" {
                    let o = self.snapshot(v)?.overlay;
                    if o != 0 {
                        out.extend(self.overlay_chunks(&t, o)?.into_iter().map(|(c, _)| c));
                    }
                }
            }
        }
        let (lo, hi) = match (a, b) {
            (None, None) => return Ok(Vec::new()),
            (Some(x), None) | (None, Some(x)) => (x, u64::MAX),
            (Some(x), Some(y)) => (x.min(y), x.max(y)),
        };
        if lo == hi && out.is_empty() {
            return Ok(Vec::new());
        }
        let sn = &self.name;
        let tx = self.rtx()?;
        let by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(sn, e))?;
        let recs = tx.open_table(RECORDS).map_err(|e| meta_err(sn, e))?;
        let hi = if lo == hi { lo } else { hi };
        for row in by_time
            .range((0u32, lo + 1, 0u64)..=(0u32, hi, u64::MAX))
            .map_err(|e| meta_err(sn, e))?
        {
            let (k, _) = row.map_err(|e| meta_err(sn, e))?;
            let (_, t, g) = k.value();
            let key = (0u32, g, t);
            let v = recs
                .get(key)
                .map_err(|e| meta_err(sn, e))?
                .ok_or_else(|| bad_record(sn, key))?;
            let rec = record_of(sn, key, v.value())?;
            out.extend(
                rec.entries
                    .iter()
                    .map(|en| g * GROUP_CHUNKS + en.off as u64),
            );
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|&c| c < self.sb.origin_chunks());
        Ok(out)
    }

    pub(crate) fn restore_pending(&self) -> Result<bool> {
        let tx = self.rtx()?;
        let c = tx.open_table(CONFIG).map_err(|e| meta_err(&self.name, e))?;
        Ok(c.get(K_RESTORE_TARGET)
            .map_err(|e| meta_err(&self.name, e))?
            .is_some())
    }

    /// Makes the origin identical to snapshot `target`, writing only the chunks that differ,
    /// through the copy-on-write path, so every other snapshot stays exact. With `backup`, a
    /// snapshot of the current origin is taken first under that name, so the restore can be
    /// undone. The intent is committed before the first write and cleared after the last: after
    /// a crash, opening the store finishes the restore (rewriting a chunk with the bytes it
    /// should hold is harmless). Returns the bytes written.
    pub(crate) fn restore_inner(
        &mut self,
        target: &str,
        backup: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        self.view_epoch(target)?;
        let target_id = self.snapshot(target)?.id;
        if let Some(b) = backup {
            crate::names::validate(b)?;
            if self.snaps.values().any(|s| s.name == b) {
                return Err(Error::Exists(format!(
                    "a snapshot named '{b}' already exists"
                )));
            }
        }
        let backup_id = match backup {
            Some(b) => {
                let mut labels = std::collections::BTreeMap::new();
                labels.insert("restore-of".to_string(), target.to_string());
                self.create(b, None, labels, None)?.id
            }
            None => 0,
        };
        // The origin as it stands is what a crash before the intent leaves: make it durable.
        self.flush()?;
        self.set_restore_intent(Some((target_id, backup_id)))?;
        let written = self.run_restore(target_id, progress)?;
        self.set_restore_intent(None)?;
        Ok(written)
    }

    fn set_restore_intent(&mut self, intent: Option<(u64, u64)>) -> Result<()> {
        let tx = self.wtx()?;
        let sn = self.name.clone();
        {
            let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
            match intent {
                Some((t, b)) => {
                    c.insert(K_RESTORE_TARGET, t)
                        .map_err(|e| meta_err(&sn, e))?;
                    c.insert(K_RESTORE_BACKUP, b)
                        .map_err(|e| meta_err(&sn, e))?;
                }
                None => {
                    c.remove(K_RESTORE_TARGET).map_err(|e| meta_err(&sn, e))?;
                    c.remove(K_RESTORE_BACKUP).map_err(|e| meta_err(&sn, e))?;
                }
            }
        }
        tx.commit().map_err(|e| meta_err(&sn, e))
    }

    /// Finishes a restore that a crash interrupted.
    pub(crate) fn resume_restore(&mut self) -> Result<()> {
        let target = {
            let tx = self.rtx()?;
            let c = tx.open_table(CONFIG).map_err(|e| meta_err(&self.name, e))?;
            c.get(K_RESTORE_TARGET)
                .map_err(|e| meta_err(&self.name, e))?
                .map(|v| v.value())
        };
        let Some(id) = target else { return Ok(()) };
        let name = self.snaps.get(&id).map(|s| s.name.clone());
        if let Some(n) = &name {
            self.run_restore(id, &mut |_, _| {})?;
            self.log_restore_resumed(n)?;
        }
        self.set_restore_intent(None)?;
        self.resumed_restore = name;
        Ok(())
    }

    fn log_restore_resumed(&mut self, target: &str) -> Result<()> {
        let tx = self.wtx()?;
        self.log_event(
            &tx,
            Event {
                time: chrono::Utc::now().timestamp(),
                action: "restored".into(),
                snapshot: target.to_string(),
                reason: "finished a restore that was interrupted".into(),
            },
        )?;
        tx.commit().map_err(|e| meta_err(&self.name, e))
    }

    /// The restore loop: copy the target's content of every chunk that differs into the origin,
    /// in batches, through the copy-on-write write path; then flush.
    fn run_restore(&mut self, target_id: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        let target = self
            .snaps
            .get(&target_id)
            .map(|s| s.name.clone())
            .ok_or_else(|| Error::NotFound(format!("snapshot id {target_id}")))?;
        let chunks = self.diff_chunks_inner(&target, "origin")?;
        let cs = self.sb.chunk_size;
        let size = self.sb.origin_size;
        let total = chunks.len() as u64 * cs;
        let mut done = 0u64;
        let mut written = 0u64;
        for batch in chunks.chunks((4 << 20) / cs as usize + 1) {
            // merge adjacent chunks into ranges
            let mut ranges: Vec<(u64, usize)> = Vec::new();
            for &c in batch {
                let off = c * cs;
                let len = cs.min(size - off) as usize;
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l as u64 == off => *l += len,
                    _ => ranges.push((off, len)),
                }
            }
            let mut bufs: Vec<AlignedBuf> =
                ranges.iter().map(|(_, l)| AlignedBuf::new(*l)).collect();
            {
                let mut reqs: Vec<ReadReq> = ranges
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|((o, _), b)| ReadReq {
                        view: &target,
                        off: *o,
                        buf: b.as_mut_slice(),
                    })
                    .collect();
                self.read_batch_inner(&mut reqs)?;
            }
            let writes: Vec<(u64, &[u8])> = ranges
                .iter()
                .zip(&bufs)
                .map(|((o, _), b)| (*o, b.as_slice()))
                .collect();
            self.write_batch_inner(&writes, false)?;
            written += ranges.iter().map(|(_, l)| *l as u64).sum::<u64>();
            done += batch.len() as u64 * cs;
            progress(done.min(total), total);
        }
        self.flush()?;
        Ok(written)
    }

    /// Verifies the metadata engine's checksums and every invariant of the exception store.
    pub(crate) fn check_inner(
        &mut self,
        data: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        let sn = self.name.clone();
        let mut rep = CheckReport::default();
        let ok = crate::store::guard_panic(&sn, || {
            self.wdb()?.check_integrity().map_err(|e| meta_err(&sn, e))
        })?;
        if !ok {
            rep.corruption.push(
                "metadata pages failed their checksums (the engine repaired what it could)".into(),
            );
        }
        let data_chunks = self.sb.data_chunks;
        let tx = self.rtx()?;
        let config = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
        let get = |k: &str| -> Result<u64> {
            Ok(config
                .get(k)
                .map_err(|e| meta_err(&sn, e))?
                .map(|v| v.value())
                .unwrap_or(u64::MAX))
        };
        let (epoch, hw, used) = (get(K_EPOCH)?, get(K_HIGH_WATER)?, get(K_USED)?);
        if hw > data_chunks {
            rep.corruption.push(format!(
                "allocation high-water mark {hw} is beyond the store's {data_chunks} chunks"
            ));
        }
        // Ownership: one bit per data chunk (bounded by the store's size, not by the records).
        let mut owned = vec![0u64; data_chunks.div_ceil(64) as usize];
        let mut claim = |p: u64, what: &str, rep: &mut CheckReport| {
            if p >= data_chunks {
                rep.corruption.push(format!(
                    "{what} points at store chunk {p}, outside the store"
                ));
                return;
            }
            let (w, b) = ((p / 64) as usize, p % 64);
            if owned[w] & (1 << b) != 0 {
                rep.corruption
                    .push(format!("store chunk {p} is owned twice ({what})"));
            }
            owned[w] |= 1 << b;
        };
        let live = self.live_epochs();
        let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
        let by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
        let mut record_chunks = 0u64;
        // Every saved chunk, for --data: (origin chunk, entry, who reads it).
        let mut saved: Vec<(u64, Entry, Reader)> = Vec::new();
        let heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
        // The chain of the group being walked (records come in key order): (group, last t).
        let mut chain: Option<((u32, u64), u64)> = None;
        let end_chain = |chain: Option<((u32, u64), u64)>, rep: &mut CheckReport| -> Result<()> {
            if let Some(((b, g), last)) = chain {
                let head = heads
                    .get((b, g))
                    .map_err(|e| meta_err(&sn, e))?
                    .map(|v| v.value());
                if head != Some(last) {
                    rep.corruption.push(format!(
                        "the newest record of chunks {}..{} is at epoch {last} but the head says {head:?}",
                        g * GROUP_CHUNKS,
                        (g + 1) * GROUP_CHUNKS
                    ));
                }
            }
            Ok(())
        };
        for row in recs.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (b, g, t) = k.value();
            rep.records += 1;
            let Ok(rec) = record_of(&sn, k.value(), v.value()) else {
                rep.corruption
                    .push(format!("record {:?} fails its checksum", k.value()));
                continue;
            };
            let expect_prev = match chain {
                Some((bg, last)) if bg == (b, g) => last,
                other => {
                    end_chain(other, &mut rep)?;
                    0
                }
            };
            if rec.prev != expect_prev {
                rep.corruption.push(format!(
                    "record {:?} follows epoch {} but the record before it is at {expect_prev}",
                    k.value(),
                    rec.prev
                ));
            }
            chain = Some(((b, g), t));
            if t > epoch {
                rep.corruption.push(format!(
                    "record {:?} is from the future (epoch is {epoch})",
                    k.value()
                ));
            }
            if by_time
                .get((b, t, g))
                .map_err(|e| meta_err(&sn, e))?
                .is_none()
            {
                rep.corruption.push(format!(
                    "record {:?} is missing from the time index",
                    k.value()
                ));
            }
            for en in &rec.entries {
                record_chunks += 1;
                claim(en.loc, &format!("record {:?}", k.value()), &mut rep);
                // Reachable iff some live snapshot lies in [t_prev, t).
                let c = g * GROUP_CHUNKS + en.off as u64;
                let t_prev = prev_cover(&recs, &sn, b, c, t)?.unwrap_or(0);
                let j = live.partition_point(|&x| x < t_prev);
                if !(j < live.len() && live[j] < t) {
                    rep.leaks.push(format!(
                        "store chunk {} (chunk {c}, epoch {t}) is held by no snapshot",
                        en.loc
                    ));
                }
                if data {
                    saved.push((c, *en, Reader::Points(t_prev, t)));
                }
            }
        }
        end_chain(chain, &mut rep)?;
        for row in heads.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (b, g) = k.value();
            if recs
                .get((b, g, v.value()))
                .map_err(|e| meta_err(&sn, e))?
                .is_none()
            {
                rep.corruption.push(format!(
                    "the head of chunks {}..{} names epoch {}, which has no record",
                    g * GROUP_CHUNKS,
                    (g + 1) * GROUP_CHUNKS,
                    v.value()
                ));
            }
        }
        for row in by_time.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, _) = row.map_err(|e| meta_err(&sn, e))?;
            let (b, t, g) = k.value();
            if recs.get((b, g, t)).map_err(|e| meta_err(&sn, e))?.is_none() {
                rep.corruption
                    .push(format!("time index entry {:?} has no record", k.value()));
            }
        }
        let free = tx.open_table(FREE).map_err(|e| meta_err(&sn, e))?;
        for row in free.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (s, n) = (k.value(), v.value());
            if s.checked_add(n).is_none_or(|end| end > hw) {
                rep.corruption.push(format!(
                    "free extent {s}+{n} is beyond the high-water mark {hw}"
                ));
                continue;
            }
            rep.free_chunks += n;
            for p in s..s + n {
                claim(p, "the free list", &mut rep);
            }
        }
        // Overlays: each chunk owned once, each overlay owned by one snapshot with the right count.
        let ovl = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
        let mut owners: HashMap<u32, (&str, u64)> = HashMap::new();
        for s in self.snaps.values().filter(|s| s.overlay != 0) {
            if owners
                .insert(s.overlay, (s.name.as_str(), s.overlay_chunks))
                .is_some()
            {
                rep.corruption
                    .push(format!("overlay {} is claimed by two snapshots", s.overlay));
            }
        }
        let mut counts: HashMap<u32, u64> = HashMap::new();
        for row in ovl.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (id, g) = k.value();
            let Ok(rec) = overlay_of(&sn, k.value(), v.value()) else {
                rep.corruption
                    .push(format!("overlay record {:?} fails its checksum", k.value()));
                continue;
            };
            for en in &rec.entries {
                record_chunks += 1;
                *counts.entry(id).or_insert(0) += 1;
                claim(en.loc, &format!("overlay {id}"), &mut rep);
                if !owners.contains_key(&id) {
                    rep.leaks.push(format!(
                        "store chunk {} is held by overlay {id}, which no snapshot owns",
                        en.loc
                    ));
                }
                if data {
                    saved.push((g * GROUP_CHUNKS + en.off as u64, *en, Reader::Overlay(id)));
                }
            }
        }
        for (id, (name, n)) in &owners {
            let have = counts.get(id).copied().unwrap_or(0);
            if have != *n {
                rep.corruption.push(format!(
                    "snapshot '{name}' says its overlay holds {n} chunks, it holds {have}"
                ));
            }
        }
        rep.used_chunks = record_chunks;
        if used != record_chunks {
            rep.corruption.push(format!(
                "the used-chunk counter says {used} but the records hold {record_chunks}"
            ));
        }
        for p in 0..hw.min(data_chunks) {
            if owned[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                rep.leaks
                    .push(format!("store chunk {p} is neither in use nor free"));
            }
        }
        // Catalog: names and snapshots agree.
        let names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
        let mut nnames = 0u64;
        for row in names.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            nnames += 1;
            match self.snaps.get(&v.value()) {
                Some(s) if s.name == k.value() => {}
                _ => rep.corruption.push(format!(
                    "name '{}' points at no matching snapshot",
                    k.value()
                )),
            }
        }
        rep.snapshots = self.snaps.len() as u64;
        if nnames != rep.snapshots {
            rep.corruption
                .push(format!("{} names for {} snapshots", nnames, rep.snapshots));
        }
        drop((recs, by_time, free, names, config, ovl, tx));
        // Space accounting: recompute what each snapshot holds alone.
        let wtx = self.wtx()?;
        for (k, &e) in live.iter().enumerate() {
            let prev = k.checked_sub(1).map(|i| live[i]);
            let hi = live.get(k + 1).copied().unwrap_or(epoch);
            let n = self.window(&wtx, prev, e, hi, false)?;
            let at: Vec<&crate::store::Snapshot> = self
                .snaps
                .values()
                .filter(|s| s.state == SnapState::Valid && s.branch == 0 && s.epoch == e)
                .collect();
            let want = if at.len() == 1 { n } else { 0 };
            for s in at {
                if s.exclusive_chunks != want {
                    rep.corruption.push(format!(
                        "snapshot '{}' records {} exclusive chunks but holds {want}",
                        s.name, s.exclusive_chunks
                    ));
                }
            }
        }
        wtx.abort().map_err(|e| meta_err(&sn, e))?;
        if data {
            self.check_data(&saved, &mut rep, progress)?;
        }
        Ok(rep)
    }

    /// `check --data`: reads every saved chunk and verifies it against its hash; each chunk
    /// that fails is reported with the snapshots that read it and the byte range.
    fn check_data(
        &self,
        saved: &[(u64, Entry, Reader)],
        rep: &mut CheckReport,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let cs = self.sb.chunk_size;
        let total = saved.len() as u64 * cs;
        let mut done = 0u64;
        rep.data_checked = true;
        for part in saved.chunks(256) {
            let mut bufs: Vec<AlignedBuf> =
                part.iter().map(|_| AlignedBuf::new(cs as usize)).collect();
            {
                let mut reads: Vec<(u64, &mut [u8])> = part
                    .iter()
                    .zip(bufs.iter_mut())
                    .filter(|((_, en, _), _)| en.loc < self.sb.data_chunks)
                    .map(|((_, en, _), b)| (self.sb.data_offset + en.loc * cs, b.as_mut_slice()))
                    .collect();
                self.dev
                    .read_many(&mut reads)
                    .map_err(|e| Error::io(format!("store {}: read", self.name), e))?;
            }
            for ((c, en, who), b) in part.iter().zip(&bufs) {
                rep.chunks_verified += 1;
                let len = self.chunk_len(*c);
                if en.loc < self.sb.data_chunks && chunk_hash(&b.as_slice()[..len]) == en.hash {
                    continue;
                }
                let snapshots: Vec<String> = match who {
                    Reader::Points(lo, hi) => self
                        .snaps
                        .values()
                        .filter(|s| {
                            s.state == SnapState::Valid
                                && s.branch == 0
                                && s.epoch >= *lo
                                && s.epoch < *hi
                        })
                        .map(|s| s.name.clone())
                        .collect(),
                    Reader::Overlay(id) => self
                        .snaps
                        .values()
                        .filter(|s| s.overlay == *id)
                        .map(|s| s.name.clone())
                        .collect(),
                };
                rep.damaged.push(Damage {
                    snapshots,
                    offset: c * cs,
                    length: len as u64,
                    store_chunk: en.loc,
                });
            }
            done += part.len() as u64 * cs;
            progress(done, total);
        }
        // One line per damaged range: neighbours with the same readers merge.
        rep.damaged
            .sort_by(|a, b| (&a.snapshots, a.offset).cmp(&(&b.snapshots, b.offset)));
        let mut merged: Vec<Damage> = Vec::new();
        for d in rep.damaged.drain(..) {
            match merged.last_mut() {
                Some(m) if m.snapshots == d.snapshots && m.offset + m.length == d.offset => {
                    m.length += d.length
                }
                _ => merged.push(d),
            }
        }
        rep.damaged = merged;
        for d in &rep.damaged {
            rep.corruption.push(format!(
                "{}: bytes {}..{} fail their checksum",
                if d.snapshots.is_empty() {
                    "no snapshot".to_string()
                } else {
                    format!("snapshot '{}'", d.snapshots.join("', '"))
                },
                d.offset,
                d.offset + d.length
            ));
        }
        Ok(())
    }
}

/// The newest record for chunk c of branch b with t' < t.
fn prev_cover<T: ReadableTable<(u32, u64, u64), &'static [u8]>>(
    t: &T,
    store: &str,
    b: u32,
    c: u64,
    before: u64,
) -> Result<Option<u64>> {
    if before == 0 {
        return Ok(None);
    }
    let g = c / GROUP_CHUNKS;
    for row in t
        .range((b, g, 0)..=(b, g, before - 1))
        .map_err(|e| meta_err(store, e))?
        .rev()
    {
        let (k, v) = row.map_err(|e| meta_err(store, e))?;
        if record_of(store, k.value(), v.value())?
            .find(c % GROUP_CHUNKS)
            .is_some()
        {
            return Ok(Some(k.value().2));
        }
    }
    Ok(None)
}
