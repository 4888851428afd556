//! The origin write path: copy what a live snapshot still needs, flush, commit, then write
//! (invariant 2), for one write or a batch.

use super::*;
use crate::profile::{self, Phase};
use crate::store::codec::ChunkHash;
use crate::store::format::{JOURNAL_LEN, JOURNAL_OFFSET};
use crate::store::journal::{self, set_journal_position, JournalRecord};
use crate::store::writeback::{Job, QueuedRecord};

/// From this many bytes of copies on, they are hashed on two threads: below it, starting a
/// thread costs more than it saves (32 copies of 4 KiB hash in 53 µs on one thread here, and
/// took 150 µs split on two, measured by SNAPCTL_PROFILE while serving).
const HASH_BESIDE: usize = 1 << 20;

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
        self.preserve_for(writes, false)?;
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

    /// Pipelined origin writes (see `store/writeback.rs`): the copies as `write_batch_inner`
    /// makes them, but when they were journaled their flush is left to the queue, which makes
    /// it before these writes go out. `writes` is taken only once the copies are done.
    pub(crate) fn write_queued_inner(&mut self, writes: &mut Vec<(u64, AlignedBuf)>) -> Result<()> {
        let mut record = {
            let list: Vec<(u64, &[u8])> = writes.iter().map(|(o, b)| (*o, b.as_slice())).collect();
            self.preserve_for(&list, true)?
        };
        let Some(wb) = self.writeback.clone() else {
            return Err(Error::Internal("queued writes without a queue".into()));
        };
        // Jobs of writes that do not overlap, in order: a write that overlaps one already in
        // the job starts the next.
        let mut job: Vec<(u64, AlignedBuf)> = Vec::new();
        for (off, buf) in std::mem::take(writes) {
            let len = buf.as_slice().len() as u64;
            if len == 0 {
                continue;
            }
            let clash = job
                .iter()
                .any(|(o, b)| *o < off + len && off < o + b.as_slice().len() as u64);
            if clash {
                wb.push(Job {
                    writes: std::mem::take(&mut job),
                    record: record.take(),
                })?;
            }
            job.push((off, buf));
        }
        if !job.is_empty() || record.is_some() {
            wb.push(Job {
                writes: job,
                record,
            })?;
        }
        Ok(())
    }

    /// Checks the writes' ranges and preserves every chunk they touch (invariant 2), making
    /// room by the on-full policy when the store is full. `queued`: the writes go to the
    /// writeback queue, which writes the batch's journal record and flushes it with the copies
    /// before it writes them; returns that record, if any.
    fn preserve_for(
        &mut self,
        writes: &[(u64, &[u8])],
        queued: bool,
    ) -> Result<Option<QueuedRecord>> {
        let cs = self.sb.chunk_size;
        let mut chunks = Vec::new();
        for (off, data) in writes {
            self.check_origin_range(*off, data.len())?;
            if !data.is_empty() {
                chunks.extend(off / cs..=(off + data.len() as u64 - 1) / cs);
            }
        }
        if chunks.is_empty() {
            return Ok(None);
        }
        chunks.sort_unstable();
        chunks.dedup();
        let mut attempts = 0u64;
        loop {
            match self.preserve(&chunks, queued)? {
                Preserve::Done(record) => return Ok(record),
                Preserve::Full if self.journal.unfolded => {
                    // Metadata pages the journaled commits replaced are reused only after a
                    // durable commit, and a metadata engine that met a full region must be
                    // opened again: reopen, replay the journal and fold it, then try again
                    // before any snapshot pays for room.
                    self.drain_writes()?;
                    self.reopen_metadata()?;
                }
                Preserve::Full => {
                    attempts += 1;
                    if attempts > self.snaps.len() as u64 + 1 {
                        return Err(Error::NoSpace(format!(
                            "store {} is full and the on-full policy could not make room",
                            self.name
                        )));
                    }
                    // The policy changes the snapshot set: after the queued writes, as every
                    // such change.
                    self.drain_writes()?;
                    self.apply_full_policy(&[])?;
                }
            }
        }
    }

    /// Makes every completed write durable: the origin's, and those into writable snapshots'
    /// overlays (metadata commits already are).
    pub fn flush(&mut self) -> Result<()> {
        let _flush = profile::span(Phase::Flush);
        self.settle_writes()?;
        self.origin
            .flush()
            .map_err(|e| Error::io(format!("origin {}: flush", self.sb.origin_path), e))?;
        // A catalog read on demand cannot say whether a writable snapshot exists: flush.
        if self.snaps.partial || self.snaps.any_writable() {
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
    /// (DESIGN.md invariant 2: decide, allocate, read, hash, then write the copies beside the
    /// index and commit, then the one flush); it reads top to bottom in that order.
    pub(super) fn preserve(&mut self, chunks: &[u64], queued: bool) -> Result<Preserve> {
        // Repeat writes first: a set bit means "preserved since the newest snapshot" (the bitmap
        // is cleared whenever the snapshot set changes), so no index and no epoch list is needed.
        if chunks.iter().all(|&c| self.bit(c)) {
            return Ok(Preserve::Done(None));
        }
        let _preserve = profile::span(Phase::Preserve);
        // Only the two newest live epochs matter here: one pass, nothing sorted, whatever the
        // number of snapshots. A catalog read on demand may lack them: read it whole.
        self.whole_catalog()?;
        let (Some(e_max), _) = self.newest_epochs() else {
            return Ok(Preserve::Done(None));
        };
        let epoch = self.epoch;
        let sn = self.name.clone();
        let cs = self.sb.chunk_size as usize;
        let cands: Vec<u64> = chunks.iter().copied().filter(|&c| !self.bit(c)).collect();
        let (tx, need, extents) = match self.decide_and_alloc(&cands, e_max, epoch)? {
            (_, Decided::Nothing) => return Ok(Preserve::Done(None)),
            (_, Decided::Full) => return Ok(Preserve::Full),
            (tx, Decided::Copy(need, extents)) => (tx, need, extents),
        };
        let mut data = AlignedBuf::new(need.len() * cs);
        let hashes = self
            .read_and_hash(&need, &mut data)
            .map_err(|e| Error::io(format!("origin {}: read", self.sb.origin_path), e))?;
        // Map needed chunks onto the allocated store chunks, in order; one write per run of
        // adjacent store chunks, however scattered the origin chunks are.
        let mut locs = Vec::with_capacity(need.len());
        for (start, n) in &extents {
            locs.extend(*start..*start + *n);
        }
        let writes: Vec<(u64, &[u8])> = store_runs(&locs)
            .iter()
            .map(|(first, n)| {
                (
                    self.sb.data_offset + locs[*first] * cs as u64,
                    &data.as_slice()[first * cs..(first + n) * cs],
                )
            })
            .collect();
        // One flush per batch. The records go to the copy journal (store/journal.rs), written
        // after the copies and made durable with them by one flush, and to the metadata in a
        // commit that is not made durable; the next durable commit folds them. When the record
        // does not fit in what is left of the journal, the batch commits durably instead (which
        // folds what the journal held and starts it over): the copies are written first,
        // unflushed, and the commit's own flush makes them durable with the records that point
        // at them. A crash before that flush completes may keep the commit and lose copies; the
        // `pending_copies` row names them, and the next open after an unclean shutdown checks
        // each against its hash and makes it again from the origin, which no write has touched
        // since (see `settle_pending_copies`).
        let seq = self.journal.seq;
        let rec_len = journal::record_len(need.len());
        // Journaled only while the metadata region has room to grow once more (redb grows its
        // file by doubling): the pages journaled commits replace stay in use until the next
        // durable commit, and a replay must find room where the batches did. Short of that,
        // every batch commits durably, as a full region needs.
        let journaled = self.journal.enabled
            && self.journal.records < journal::MAX_RECORDS
            && self.journal.offset + rec_len <= JOURNAL_LEN
            && self.region.len.load(std::sync::atomic::Ordering::SeqCst) * 2 <= self.region.cap;
        // The copies go out on a thread of their own while the records are indexed (and, when
        // journaled, committed): written early or late, nothing points at them until the flush
        // after which the origin is written. A durable commit waits for them, so that its flush
        // covers them.
        let dev = self.dev.clone();
        let (committed, written) = std::thread::scope(|sc| {
            let mut copier = Some(sc.spawn(|| {
                let _write = profile::span(Phase::CopyWrite);
                dev.write_many(&writes)
            }));
            let mut join = || {
                copier.take().map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("the copy writer failed")))
                })
            };
            let mut tx = tx;
            let indexed = self
                .index_batch(&tx, journaled, &need, &locs, &hashes, (epoch, seq, rec_len))
                .and_then(|()| match journaled {
                    true => tx
                        .set_durability(redb::Durability::None)
                        .map_err(|e| Error::Internal(format!("{sn}: {e}"))),
                    false => Ok(()),
                });
            if let Err(e) = indexed {
                return (Err(e), join());
            }
            let written = if journaled { None } else { join() };
            if let Some(Err(e)) = written {
                return (Ok(None), Some(Err(e)));
            }
            let commit = profile::span(Phase::Commit);
            let committed = tx.commit();
            drop(commit);
            (Ok(Some(committed)), written.or_else(join))
        });
        // Indexing changed this process's view of the snapshots (their exclusive counts): when
        // nothing was committed, it is read again from the metadata.
        let committed = match committed {
            Err(e) => {
                self.load_catalog()?;
                return Err(e);
            }
            // The copies failed before the durable commit that needed them.
            Ok(None) => {
                self.load_catalog()?;
                false
            }
            Ok(Some(Err(e))) => {
                let err = meta_err(&sn, e);
                self.load_catalog()?;
                return match err {
                    Error::NoSpace(_) => Ok(Preserve::Full),
                    other => Err(other),
                };
            }
            Ok(Some(Ok(()))) => true,
        };
        if let Some(Err(e)) = written {
            if committed {
                // The metadata in this process names copies that may not be on disk: refuse
                // every further change (the replay at the next open settles them).
                self.journal.failed = true;
            }
            return Err(Error::io(format!("store {sn}: write"), e));
        }
        let mut queued_record = None;
        if journaled {
            // Pipelined, the record is written by the queue's round, with its flush, before this
            // batch's origin writes; and the records before this one whose flush has not
            // returned yet are named, so that a replay checks their copies too.
            let queued = self.writeback.clone().filter(|_| queued);
            let unflushed_before = match &queued {
                Some(wb) => (seq - 1)
                    .saturating_sub(wb.durable_record())
                    .min(self.journal.records)
                    .min(u32::MAX as u64) as u32,
                None => 0,
            };
            let record = JournalRecord {
                seq,
                epoch,
                unflushed_before,
                copies: need
                    .iter()
                    .zip(&locs)
                    .zip(&hashes)
                    .map(|((c, loc), h)| (*c, *loc, *h))
                    .collect(),
            };
            let bytes = journal::encode_record(&self.sb.uuid, &record);
            let at = JOURNAL_OFFSET + self.journal.offset;
            if queued.is_some() {
                queued_record = Some(QueuedRecord { seq, at, bytes });
            } else {
                let _write = profile::span(Phase::JournalWrite);
                let landed = self
                    .dev
                    .write_at(bytes.as_slice(), at)
                    .and_then(|()| self.dev.flush());
                if let Err(e) = landed {
                    // As above: the metadata names copies whose record may not be on disk.
                    self.journal.failed = true;
                    return Err(Error::io(format!("store {sn}: write journal"), e));
                }
            }
            self.journal.seq = seq + 1;
            self.journal.offset += rec_len;
            self.journal.records += 1;
            self.journal.unfolded = true;
        } else {
            self.journal.offset = 0;
            self.journal.records = 0;
            self.journal.unfolded = false;
        }
        for c in need {
            self.set_bit(c);
        }
        Ok(Preserve::Done(queued_record))
    }

    /// Reads origin chunks `need` (sorted) into `buf`, chunk `need[i]` at `i * chunk_size`, one
    /// read per run of adjacent chunks, all in flight together; then hashes each (its bytes
    /// inside the origin: the last chunk may be partial), a large batch on two threads.
    fn read_and_hash(&self, need: &[u64], buf: &mut AlignedBuf) -> std::io::Result<Vec<ChunkHash>> {
        let cs = self.sb.chunk_size as usize;
        {
            let _read = profile::span(Phase::OriginRead);
            let mut reads: Vec<(u64, &mut [u8])> = Vec::new();
            let mut rest = buf.as_mut_slice();
            let mut i = 0;
            while i < need.len() {
                let mut j = i + 1;
                while j < need.len() && need[j] == need[j - 1] + 1 && j - i < 256 {
                    j += 1;
                }
                let (piece, tail) = rest.split_at_mut((j - i) * cs);
                rest = tail;
                let len = (j - 1 - i) * cs + self.chunk_len(need[j - 1]);
                reads.push((need[i] * cs as u64, &mut piece[..len]));
                i = j;
            }
            self.origin.read_many(&mut reads)?;
        }
        let _hash = profile::span(Phase::Hash);
        let data = buf.as_slice();
        let items: Vec<&[u8]> = need
            .iter()
            .enumerate()
            .map(|(i, &c)| &data[i * cs..i * cs + self.chunk_len(c)])
            .collect();
        let hash =
            |part: &[&[u8]]| -> Vec<ChunkHash> { part.iter().map(|b| chunk_hash(b)).collect() };
        if data.len() < HASH_BESIDE {
            return Ok(hash(&items));
        }
        let (a, b) = items.split_at(items.len() / 2);
        Ok(std::thread::scope(|s| {
            let other = s.spawn(|| hash(b));
            let mut out = hash(a);
            match other.join() {
                Ok(rest) => out.extend(rest),
                Err(_) => out.extend(hash(b)),
            }
            out
        }))
    }

    /// Which of the chunks `cands` need a copy (no record since the newest snapshot, epoch
    /// `e_max`), and room for them, on the write transaction the batch goes on in. Chunks a
    /// record covers are marked preserved.
    fn decide_and_alloc(
        &mut self,
        cands: &[u64],
        e_max: u64,
        epoch: u64,
    ) -> Result<(redb::WriteTransaction, Decided)> {
        let decide = profile::span(Phase::Decide);
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let mut need = Vec::with_capacity(cands.len());
        {
            let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            for &c in cands {
                if find_cover(&recs, &sn, 0, c, e_max + 1, epoch)?.is_some() {
                    self.set_bit(c);
                } else {
                    need.push(c);
                }
            }
        }
        drop(decide);
        if need.is_empty() {
            return Ok((tx, Decided::Nothing));
        }
        let _alloc = profile::span(Phase::Alloc);
        let decided = match self.alloc(&tx, need.len() as u64)? {
            Some(extents) => Decided::Copy(need, extents),
            None => Decided::Full,
        };
        Ok((tx, decided))
    }

    /// A batch's metadata before its commit: the `pending_copies` row (when not journaled),
    /// the records, and the journal position. `at`: the batch's epoch, its journal record's
    /// sequence number and length.
    fn index_batch(
        &mut self,
        tx: &redb::WriteTransaction,
        journaled: bool,
        need: &[u64],
        locs: &[u64],
        hashes: &[ChunkHash],
        at: (u64, u64, u64),
    ) -> Result<()> {
        let (epoch, seq, rec_len) = at;
        let sn = self.name.clone();
        if !journaled {
            let pending = Pending {
                epoch,
                runs: copy_runs(need, locs),
            };
            let mut t = tx.open_table(PENDING).map_err(|e| meta_err(&sn, e))?;
            t.insert(0, encode_pending(&pending).as_slice())
                .map_err(|e| meta_err(&sn, e))?;
        }
        let _index = profile::span(Phase::Index);
        self.index_copies(tx, need, locs, hashes)?;
        if journaled {
            set_journal_position(tx, &sn, seq + 1, self.journal.offset + rec_len)?;
        } else {
            set_journal_position(tx, &sn, seq, 0)?;
        }
        Ok(())
    }

    /// Inserts the records of copies `need[i] -> locs[i]` (hashes `hashes[i]`) at the current
    /// epoch, chaining each group's new record to its previous one, and counts what only the
    /// newest snapshot holds. Shared by the write path and the journal's replay, which must
    /// apply a batch exactly as it was applied.
    pub(crate) fn index_copies(
        &mut self,
        tx: &redb::WriteTransaction,
        need: &[u64],
        locs: &[u64],
        hashes: &[ChunkHash],
    ) -> Result<()> {
        let sn = self.name.clone();
        let epoch = self.epoch;
        // The newest live points decide what is shared; a catalog read on demand may not hold
        // them (callers read it whole first).
        if self.snaps.partial {
            return Err(Error::Internal(format!(
                "{sn}: copies indexed with the catalog read on demand"
            )));
        }
        let (Some(e_max), e_prev) = self.newest_epochs() else {
            return Ok(());
        };
        let mut exclusive = 0u64;
        {
            let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
            let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
            let mut groups: BTreeMap<u64, Vec<Entry>> = BTreeMap::new();
            for ((c, p), hash) in need.iter().zip(locs).zip(hashes) {
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
                let (mut rec, fresh) = match recs.get(key).map_err(|e| meta_err(&sn, e))? {
                    Some(v) => (record_of(&sn, key, v.value())?, false),
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
                        (
                            Record {
                                prev,
                                entries: Vec::new(),
                            },
                            true,
                        )
                    }
                };
                for en in items {
                    rec.put(en);
                }
                put_record(&mut recs, &sn, key, &rec)?;
                // A group's record at this epoch already has its row in time order.
                if fresh {
                    by_time
                        .insert((0u32, epoch, g), ())
                        .map_err(|e| meta_err(&sn, e))?;
                }
            }
        }
        let newest: Vec<u64> = self.snaps.live_at(e_max).to_vec();
        // Several snapshots at one epoch share everything: none holds anything alone.
        if newest.len() == 1 && exclusive > 0 {
            if let Some(s) = self.snaps.get(&newest[0]) {
                let mut s = s.clone();
                s.exclusive_chunks += exclusive;
                put_snap(tx, &s, &sn)?;
                self.snaps.insert(s.id, s);
            }
        }
        Ok(())
    }
}

/// The outcome of deciding a batch: nothing to copy, no room, or these chunks to copy into
/// these extents.
enum Decided {
    Nothing,
    Full,
    Copy(Vec<u64>, Vec<(u64, u64)>),
}

/// Runs of adjacent store chunks: (first index, count), at most 256 chunks each.
fn store_runs(locs: &[u64]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < locs.len() {
        let mut j = i + 1;
        while j < locs.len() && locs[j] == locs[j - 1] + 1 && j - i < 256 {
            j += 1;
        }
        runs.push((i, j - i));
        i = j;
    }
    runs
}

/// The `pending_copies` runs: adjacent origin chunks going to adjacent store chunks.
fn copy_runs(need: &[u64], locs: &[u64]) -> Vec<(u64, u64, u32)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < need.len() {
        let mut j = i + 1;
        while j < need.len() && need[j] == need[j - 1] + 1 && locs[j] == locs[j - 1] + 1 {
            j += 1;
        }
        runs.push((need[i], locs[i], (j - i) as u32));
        i = j;
    }
    runs
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
        let items: Vec<(u64, u64, ChunkHash)> =
            items.iter().map(|(c, en)| (*c, en.loc, en.hash)).collect();
        self.settle_copies(&items)
    }
}
