//! The copy journal (docs/FORMAT.md, "Copy journal"; docs/DESIGN.md, "One flush per batch").
//!
//! A first write after a snapshot must make the old contents and their records durable before
//! the origin write is issued. Committing the records to the metadata engine durably costs a
//! two-phase commit (two flushes and the page writes between). Instead, a batch's records go to
//! the metadata in a commit that is not made durable, and durably to this journal: one record
//! block (or a few), written in the same submission as the copies and made durable by the same
//! one flush. The next durable commit (any: a create, a delete, a batch that finds the journal
//! full, closing the store) carries them into the metadata, and the journal starts over.
//!
//! After an unclean shutdown, opening the store replays the records the metadata lacks: each
//! is applied as the batch applied it (same allocation, same rows), checked against what the
//! allocator hands out, and the last one's copies are checked against their hashes and made
//! again from the origin where they did not land (no origin write was issued before the flush
//! that would have made them durable). Then each record is applied in a durable commit of its
//! own that moves the position past it.

use super::*;
use crate::io::AlignedBuf;
use crate::store::codec::{chunk_hash, ChunkHash, Entry, HASH};
use crate::store::format::{GROUP_CHUNKS, JOURNAL_LEN, JOURNAL_OFFSET};

const MAGIC: &[u8; 8] = b"SNAPJRN\0";
const BLOCK: usize = 4096;
const HEADER: usize = 64;
const ENTRY: usize = 16 + HASH;

/// Journaled batches between durable commits, at most. Each commit that is not made durable
/// leaves the metadata pages it replaced unusable until the next durable one, so this bounds
/// how far the metadata grows meanwhile (and a batch that finds the region full folds first).
pub(crate) const MAX_RECORDS: u64 = 32;

pub(crate) const K_JOURNAL_SEQ: &str = "journal_seq";
pub(crate) const K_JOURNAL_OFFSET: &str = "journal_offset";

/// Where the journal stands in this process.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// Off for stores opened by `check` and `upgrade`.
    pub(crate) enabled: bool,
    /// The sequence number of the next record.
    pub(crate) seq: u64,
    /// Where the next record goes, in bytes from the start of the journal area.
    pub(crate) offset: u64,
    /// Records since the journal last started over.
    pub(crate) records: u64,
    /// Records appended since the last durable commit that set the journal's position.
    pub(crate) unfolded: bool,
    /// A journal write or flush failed after its batch's metadata commit: the metadata in this
    /// process names copies that may not be on disk, so nothing more may change (reopen; the
    /// replay settles them).
    pub(crate) failed: bool,
}

/// One batch's copies: origin chunk, store chunk and hash of each, in the order allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalRecord {
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
    /// How many records just before this one had not been made durable (their flush had not
    /// returned) when this one was written: pipelined writes flush behind the batches. A
    /// replay checks the copies of those records as well as this one's.
    pub(crate) unflushed_before: u32,
    pub(crate) copies: Vec<(u64, u64, ChunkHash)>,
}

fn record_sum(uuid: &[u8; 16], head: &[u8], body: &[u8]) -> ChunkHash {
    let mut h = blake3::Hasher::new();
    h.update(uuid);
    h.update(head);
    h.update(body);
    *h.finalize().as_bytes()
}

/// Bytes a record of `n` copies takes: whole blocks.
pub(crate) fn record_len(n: usize) -> u64 {
    (HEADER + n * ENTRY).div_ceil(BLOCK) as u64 * BLOCK as u64
}

/// The record's bytes, block-aligned, zero-padded. The checksum covers the store's uuid, so
/// a record left by an earlier store on the same device never replays into this one.
pub(crate) fn encode_record(uuid: &[u8; 16], r: &JournalRecord) -> AlignedBuf {
    let n = r.copies.len();
    let mut b = AlignedBuf::new(record_len(n) as usize);
    let s = b.as_mut_slice();
    s[..8].copy_from_slice(MAGIC);
    s[8..16].copy_from_slice(&r.seq.to_le_bytes());
    s[16..24].copy_from_slice(&r.epoch.to_le_bytes());
    s[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    s[28..32].copy_from_slice(&r.unflushed_before.to_le_bytes());
    for (i, (c, loc, hash)) in r.copies.iter().enumerate() {
        let o = HEADER + i * ENTRY;
        s[o..o + 8].copy_from_slice(&c.to_le_bytes());
        s[o + 8..o + 16].copy_from_slice(&loc.to_le_bytes());
        s[o + 16..o + ENTRY].copy_from_slice(hash);
    }
    let sum = record_sum(uuid, &s[..32], &s[HEADER..HEADER + n * ENTRY]);
    s[32..64].copy_from_slice(&sum);
    b
}

/// The number of copies a record starting with `head` (its first block) claims, if its magic
/// and sequence number are the expected ones; its length is then `record_len(n)`.
pub(crate) fn record_copies(head: &[u8], seq: u64) -> Option<usize> {
    if head.len() < HEADER || &head[..8] != MAGIC || u64_at(head, 8) != seq {
        return None;
    }
    let n = u32::from_le_bytes(head[24..28].try_into().ok()?) as usize;
    (record_len(n) <= JOURNAL_LEN).then_some(n)
}

/// Decodes a whole record (`b` is `record_len(n)` bytes); None unless it is whole and is
/// record `seq` of this store.
pub(crate) fn decode_record(uuid: &[u8; 16], b: &[u8], seq: u64) -> Option<JournalRecord> {
    let n = record_copies(b, seq)?;
    if b.len() < HEADER + n * ENTRY {
        return None;
    }
    if record_sum(uuid, &b[..32], &b[HEADER..HEADER + n * ENTRY])[..] != b[32..64] {
        return None;
    }
    let copies = (0..n)
        .map(|i| {
            let o = HEADER + i * ENTRY;
            let mut hash = [0u8; HASH];
            hash.copy_from_slice(&b[o + 16..o + ENTRY]);
            (u64_at(b, o), u64_at(b, o + 8), hash)
        })
        .collect();
    Some(JournalRecord {
        seq,
        epoch: u64_at(b, 16),
        unflushed_before: u32::from_le_bytes(b[28..32].try_into().ok()?),
        copies,
    })
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Store {
    /// The journal's position as the metadata records it: (next sequence number, offset).
    pub(crate) fn journal_position(&self) -> Result<(u64, u64)> {
        let sn = &self.name;
        let tx = self.rtx()?;
        let c = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let get = |k: &str, default: u64| -> Result<u64> {
            Ok(c.get(k)
                .map_err(|e| meta_err(sn, e))?
                .map(|v| v.value())
                .unwrap_or(default))
        };
        Ok((get(K_JOURNAL_SEQ, 1)?, get(K_JOURNAL_OFFSET, 0)?))
    }

    /// The records after the metadata's position, in order, up to the first that is not whole
    /// (a record cut by a crash, or one left from before the journal last started over), each
    /// with the offset just past it.
    pub(crate) fn journal_records(
        &self,
        mut seq: u64,
        mut offset: u64,
    ) -> Result<Vec<(JournalRecord, u64)>> {
        let sn = &self.name;
        let mut out = Vec::new();
        let read = |off: u64, len: u64| -> Result<AlignedBuf> {
            let mut b = AlignedBuf::new(len as usize);
            self.dev
                .read_at(b.as_mut_slice(), JOURNAL_OFFSET + off)
                .map_err(|e| Error::io(format!("store {sn}: read journal"), e))?;
            Ok(b)
        };
        while offset + BLOCK as u64 <= JOURNAL_LEN {
            let head = read(offset, BLOCK as u64)?;
            let Some(n) = record_copies(head.as_slice(), seq) else {
                break;
            };
            let len = record_len(n);
            if offset + len > JOURNAL_LEN {
                break;
            }
            let whole = if len == BLOCK as u64 {
                head
            } else {
                read(offset, len)?
            };
            let Some(r) = decode_record(&self.sb.uuid, whole.as_slice(), seq) else {
                break;
            };
            offset += len;
            seq += 1;
            out.push((r, offset));
        }
        Ok(out)
    }

    /// Opening: loads the journal's position, and replays what the metadata lacks (after an
    /// unclean shutdown), one durable commit per record.
    pub(crate) fn open_journal(&mut self) -> Result<()> {
        let (seq, offset) = self.journal_position()?;
        let records = self.journal_records(seq, offset)?;
        self.journal = Journal {
            enabled: true,
            seq,
            offset,
            records: 0,
            unfolded: false,
            failed: false,
        };
        if records.is_empty() {
            return Ok(());
        }
        // The replay indexes the records as their batches did, which takes the live points
        // of every snapshot: a store opened with its catalog on demand (a `create` or a
        // `delete` run while no server holds the store) reads it whole first. Without it the
        // replay allocated the records' chunks and indexed nothing, and the snapshots that
        // needed the copies read the origin's new bytes instead.
        self.whole_catalog()?;
        let sn = self.name.clone();
        // The last record's copies may not have landed (its flush may not have returned), nor
        // those of the records it names as unflushed before it: no origin write was issued
        // after any of them, so the origin still holds what each copy must be.
        if let Some((last, _)) = records.last() {
            let from = records
                .len()
                .saturating_sub(last.unflushed_before as usize + 1);
            let copies: Vec<(u64, u64, ChunkHash)> = records[from..]
                .iter()
                .flat_map(|(r, _)| r.copies.iter().copied())
                .collect();
            self.settle_copies(&copies)?;
        }
        // One durable commit per record, each advancing the position past it (the last one to
        // the journal's start): a record applied alone needs no more metadata than its batch
        // did, and each commit frees what the one before replaced, so a replay fits wherever
        // the batches fitted. Interrupted, the next open resumes after the last commit.
        let n = records.len();
        for (i, (r, after)) in records.iter().enumerate() {
            if r.epoch != self.epoch {
                return Err(Error::Corrupt(format!(
                    "store {sn}: journal record {} belongs to write interval {}, not the current {}; run `snapctl check`",
                    r.seq, r.epoch, self.epoch
                )));
            }
            let tx = self.wtx()?;
            let extents = self.alloc(&tx, r.copies.len() as u64)?.ok_or_else(|| {
                Error::Corrupt(format!(
                    "store {sn}: journal record {} names more chunks than are free; run `snapctl check`",
                    r.seq
                ))
            })?;
            let locs: Vec<u64> = extents.iter().flat_map(|(s, n)| *s..*s + *n).collect();
            if locs.iter().ne(r.copies.iter().map(|(_, loc, _)| loc)) {
                return Err(Error::Corrupt(format!(
                    "store {sn}: journal record {} does not match the free chunks; run `snapctl check`",
                    r.seq
                )));
            }
            let need: Vec<u64> = r.copies.iter().map(|(c, _, _)| *c).collect();
            let hashes: Vec<ChunkHash> = r.copies.iter().map(|(_, _, h)| *h).collect();
            self.index_copies(&tx, &need, &locs, &hashes)?;
            let offset = if i + 1 == n { 0 } else { *after };
            set_journal_position(&tx, &sn, r.seq + 1, offset)?;
            tx.commit().map_err(|e| meta_err(&sn, e))?;
            self.journal.seq = r.seq + 1;
            self.journal.offset = offset;
        }
        self.journal.records = 0;
        Ok(())
    }

    /// Closes the metadata engine and opens it again, then replays the journal: what this
    /// process committed without durability is either made durable by the close, with the
    /// journal position it carries, or lost and replayed from the journal. For a metadata
    /// engine that met an I/O error (a full region), which refuses everything until reopened.
    pub(crate) fn reopen_metadata(&mut self) -> Result<()> {
        self.db = Db::Closed;
        // What a failed engine left unsent is of no transaction that will ever be durable.
        self.region.discard_held();
        self.resolved.clear();
        self.preserved.clear();
        self.wdb()?;
        self.load_catalog()?;
        self.open_journal()
    }

    /// Folds the journal: one durable commit that records its position at the start, so that
    /// nothing is left to replay. Done when the store is closed.
    pub(crate) fn fold_journal(&mut self) -> Result<()> {
        if !self.journal.unfolded || self.journal.failed {
            return Ok(());
        }
        let sn = self.name.clone();
        let tx = self.wtx()?;
        set_journal_position(&tx, &sn, self.journal.seq, 0)?;
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.journal.offset = 0;
        self.journal.records = 0;
        self.journal.unfolded = false;
        Ok(())
    }

    /// Checks copies `(origin chunk, store chunk, hash)` against their hashes, and makes each
    /// that fails again from the origin (which must still hold what was copied); flushed.
    pub(crate) fn settle_copies(&mut self, items: &[(u64, u64, ChunkHash)]) -> Result<u64> {
        let sn = self.name.clone();
        let cs = self.sb.chunk_size;
        let mut fixed = 0u64;
        let items: Vec<(u64, Entry)> = items
            .iter()
            .filter(|(c, loc, _)| {
                c.saturating_mul(cs) < self.sb.origin_size && *loc < self.sb.data_chunks
            })
            .map(|(c, loc, hash)| {
                (
                    *c,
                    Entry {
                        off: (c % GROUP_CHUNKS) as u16,
                        loc: *loc,
                        hash: *hash,
                    },
                )
            })
            .collect();
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

pub(crate) fn set_journal_position(
    tx: &redb::WriteTransaction,
    sn: &str,
    seq: u64,
    offset: u64,
) -> Result<()> {
    let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
    c.insert(K_JOURNAL_SEQ, seq).map_err(|e| meta_err(sn, e))?;
    c.insert(K_JOURNAL_OFFSET, offset)
        .map_err(|e| meta_err(sn, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_refuses_any_other_store_sequence_or_damage() {
        let uuid = [7u8; 16];
        let r = JournalRecord {
            seq: 42,
            epoch: 3,
            unflushed_before: 5,
            copies: (0..100)
                .map(|i| (i * 3, 1000 + i, [i as u8; HASH]))
                .collect(),
        };
        let b = encode_record(&uuid, &r);
        assert_eq!(b.as_slice().len() as u64, record_len(100));
        assert_eq!(b.as_slice().len() % BLOCK, 0);
        assert_eq!(decode_record(&uuid, b.as_slice(), 42), Some(r.clone()));
        assert_eq!(decode_record(&[8u8; 16], b.as_slice(), 42), None);
        assert_eq!(decode_record(&uuid, b.as_slice(), 43), None);
        for i in [0, 9, 17, 25, 29, 40, 64, 100, 64 + 100 * ENTRY - 1] {
            let mut d = b.as_slice().to_vec();
            d[i] ^= 1;
            assert_eq!(decode_record(&uuid, &d, 42), None, "byte {i}");
        }
        // Cut short: the first block alone does not decode.
        assert_eq!(decode_record(&uuid, &b.as_slice()[..BLOCK], 42), None);
        // Zeros (a journal never written) are no record.
        assert_eq!(record_copies(&[0u8; BLOCK], 1), None);
    }
}
