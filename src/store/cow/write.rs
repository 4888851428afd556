//! The origin write path: copy what a live snapshot still needs, flush, commit, then write
//! (invariant 2), for one write or a batch.

use super::*;
use crate::profile::{self, Phase};

/// From this many copies on, they are hashed on a second thread while they are written.
const HASH_BESIDE: usize = 8;

impl Store {
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
                    self.apply_full_policy(&[])?;
                }
            }
        }
        let _origin_write = profile::span(Phase::OriginWrite);
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
        let _flush = profile::span(Phase::Flush);
        self.origin
            .flush()
            .map_err(|e| Error::io(format!("origin {}: flush", self.sb.origin_path), e))?;
        if self.snaps.any_writable() {
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
    pub(super) fn write_durable(&self, writes: &[(u64, &[u8])]) -> Result<()> {
        let sn = &self.name;
        self.dev
            .write_many(writes)
            .map_err(|e| Error::io(format!("store {sn}: write"), e))?;
        self.dev
            .flush()
            .map_err(|e| Error::io(format!("store {sn}: flush"), e))
    }

    /// Copies and commits the old contents of the `chunks` (sorted) that a live snapshot needs.
    ///
    /// Long on purpose: this is the copy-on-write step whose order is the crash argument
    /// (DESIGN.md invariant 2: decide, allocate, read, hash, write, commit with its one flush);
    /// it reads top to bottom in that order instead of across helpers.
    pub(super) fn preserve(&mut self, chunks: &[u64]) -> Result<Preserve> {
        // Repeat writes first: a set bit means "preserved since the newest snapshot" (the bitmap
        // is cleared whenever the snapshot set changes), so no index and no epoch list is needed.
        if chunks.iter().all(|&c| self.bit(c)) {
            return Ok(Preserve::Done);
        }
        let _preserve = profile::span(Phase::Preserve);
        let decide = profile::span(Phase::Decide);
        // Only the two newest live epochs matter here: one pass, nothing sorted, whatever the
        // number of snapshots.
        let (Some(e_max), e_prev) = self.newest_epochs() else {
            return Ok(Preserve::Done);
        };
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
        drop(decide);
        if need.is_empty() {
            return Ok(Preserve::Done);
        }
        let alloc = profile::span(Phase::Alloc);
        let Some(extents) = self.alloc(&tx, need.len() as u64)? else {
            return Ok(Preserve::Full);
        };
        drop(alloc);
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
            let _read = profile::span(Phase::OriginRead);
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
        // origin (the last chunk may be partial). Hashing reads the buffers the copy writes
        // read too, so it runs beside the write and its flush instead of before them.
        let hash_all = || {
            let mut hashes = Vec::with_capacity(need.len());
            for ((first, n), buf) in runs.iter().zip(&bufs) {
                for i in 0..*n {
                    let len = self.chunk_len(need[first + i]);
                    hashes.push(chunk_hash(&buf.as_slice()[i * cs..i * cs + len]));
                }
            }
            hashes
        };
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
        // The copies are written, not flushed: the commit's own flush makes them durable with
        // the records that point at them, before any origin write is issued. A crash before
        // that flush completes may keep the commit and lose copies; the `pending_copies` row
        // names them, and the next open after an unclean shutdown checks each against its
        // hash and makes it again from the origin, which no write has touched since (see
        // `settle_pending_copies`).
        let write_copies = || {
            self.dev
                .write_many(&writes)
                .map_err(|e| Error::io(format!("store {sn}: write"), e))
        };
        let copy_write = profile::span(Phase::CopyWrite);
        let hashes = if need.len() >= HASH_BESIDE {
            std::thread::scope(|s| {
                let hasher = s.spawn(hash_all);
                let written = write_copies();
                let hashes = hasher
                    .join()
                    .map_err(|_| Error::Internal("hashing the copies failed".into()));
                written.and(hashes)
            })?
        } else {
            let h = hash_all();
            write_copies()?;
            h
        };
        drop(copy_write);
        let index = profile::span(Phase::Index);
        let pending = Pending {
            epoch,
            runs: runs
                .iter()
                .map(|(first, n)| (need[*first], locs[*first], *n as u32))
                .collect(),
        };
        {
            let mut t = tx.open_table(PENDING).map_err(|e| meta_err(&sn, e))?;
            t.insert(0, encode_pending(&pending).as_slice())
                .map_err(|e| meta_err(&sn, e))?;
        }
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
        let newest: Vec<u64> = self.snaps.live_at(e_max).to_vec();
        // Several snapshots at one epoch share everything: none holds anything alone.
        if newest.len() == 1 && exclusive > 0 {
            if let Some(s) = self.snaps.get(&newest[0]) {
                let mut s = s.clone();
                s.exclusive_chunks += exclusive;
                put_snap(&tx, &s, &sn)?;
                self.snaps.insert(s.id, s);
            }
        }
        drop(index);
        let commit = profile::span(Phase::Commit);
        let committed = tx.commit();
        drop(commit);
        match committed {
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
}

impl Store {
    /// After an unclean shutdown: the copies of the newest origin-write commit were not flushed
    /// before it, so the commit may have reached the disk without some of them. Each is read and
    /// checked against the hash its record holds; one that fails is copied again from the
    /// origin. That is exact: a chunk is copied only when its origin content is durable (a
    /// snapshot's `create` flushes the origin first, and only the first write after it copies),
    /// and the origin write that overwrites it is issued only after the commit's flush returned,
    /// which did not happen if the copy is not on disk. Bounded by one batch (at most 32 MiB),
    /// whatever the size of the store; idempotent if it is itself interrupted.
    pub(crate) fn settle_pending_copies(&mut self) -> Result<u64> {
        let sn = self.name.clone();
        let cs = self.sb.chunk_size;
        let mut items: Vec<(u64, Entry)> = Vec::new();
        {
            let tx = self.rtx()?;
            let t = match tx.open_table(PENDING) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(e) => return Err(meta_err(&sn, e)),
            };
            let Some(v) = t.get(0).map_err(|e| meta_err(&sn, e))? else {
                return Ok(0);
            };
            // A damaged row cannot name the copies to check; every saved chunk is still checked
            // against its hash when read, and `check` reports the row.
            let Some(p) = decode_pending(v.value()) else {
                return Ok(0);
            };
            let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            let mut seen: HashMap<u64, Option<Record>> = HashMap::new();
            for (c0, loc0, n) in p.runs {
                for i in 0..n as u64 {
                    let (c, loc) = (c0.saturating_add(i), loc0.saturating_add(i));
                    if c.saturating_mul(cs) >= self.sb.origin_size || loc >= self.sb.data_chunks {
                        continue;
                    }
                    let g = c / GROUP_CHUNKS;
                    if let std::collections::hash_map::Entry::Vacant(e) = seen.entry(g) {
                        let key = (0u32, g, p.epoch);
                        let rec = match recs.get(key).map_err(|e| meta_err(&sn, e))? {
                            Some(v) => Some(record_of(&sn, key, v.value())?),
                            None => None,
                        };
                        e.insert(rec);
                    }
                    // Only copies still referenced where this commit put them: a later delete
                    // may have freed them.
                    if let Some(Some(rec)) = seen.get(&g) {
                        if let Some(en) = rec.find(c % GROUP_CHUNKS).filter(|en| en.loc == loc) {
                            items.push((c, *en));
                        }
                    }
                }
            }
        }
        let mut fixed = 0u64;
        for part in items.chunks(256) {
            let bufs = self.read_chunks_unverified(part)?;
            let mut again: Vec<(u64, AlignedBuf)> = Vec::new();
            for ((c, en), b) in part.iter().zip(&bufs) {
                let len = self.chunk_len(*c);
                if chunk_hash(&b.as_slice()[..len]) == en.hash {
                    continue;
                }
                let mut o = AlignedBuf::new(cs as usize);
                self.origin
                    .read_at(&mut o.as_mut_slice()[..len], c * cs)
                    .map_err(|e| Error::io(format!("origin {}: read", self.sb.origin_path), e))?;
                if chunk_hash(&o.as_slice()[..len]) != en.hash {
                    // Not what was copied: leave it to fail its checksum on read and in check,
                    // never to be served.
                    continue;
                }
                again.push((self.sb.data_offset + en.loc * cs, o));
            }
            if !again.is_empty() {
                let writes: Vec<(u64, &[u8])> =
                    again.iter().map(|(off, b)| (*off, b.as_slice())).collect();
                self.dev
                    .write_many(&writes)
                    .map_err(|e| Error::io(format!("store {sn}: write"), e))?;
                fixed += again.len() as u64;
            }
        }
        if fixed > 0 {
            self.dev
                .flush()
                .map_err(|e| Error::io(format!("store {sn}: flush"), e))?;
        }
        Ok(fixed)
    }
}
