//! Byte layouts of the metadata values (docs/FORMAT.md, "Values"): exception and overlay
//! records, snapshot records. Each is versioned and ends in a checksum over the table's name,
//! the row's key and the value, so a flipped byte anywhere in a row, key included, is refused
//! instead of read as a different fact. No layout depends on the spelling of a Rust name.

use std::collections::BTreeMap;

use crate::store::format::GROUP_CHUNKS;
use crate::store::{SnapState, Snapshot};

/// Bytes of the checksum that ends every value: the first 16 of a blake3 hash.
const CHECK: usize = 16;
/// Layout version of record values.
const RECORD_LAYOUT: u8 = 1;
/// Layout version of snapshot values.
const SNAP_LAYOUT: u8 = 1;
pub const HASH: usize = 32;
const RUN: usize = 12;
const RECORD_HEAD: usize = 12;

/// A chunk's content hash: blake3 of its bytes inside the origin.
pub type ChunkHash = [u8; 32];

#[cfg(not(feature = "bench-unhashed"))]
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    *blake3::hash(data).as_bytes()
}

/// The benchmark build's stand-in (`--features bench-unhashed`, scripts/bench-checksums.sh):
/// the same program with no hashing at all, to measure what checksums cost. Stores it writes
/// fail every check of a normal build, which is what they deserve.
#[cfg(feature = "bench-unhashed")]
pub fn chunk_hash(_data: &[u8]) -> ChunkHash {
    [0; HASH]
}

/// One saved chunk of a group: chunk `off` of the group lives at store chunk `loc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub off: u16,
    pub loc: u64,
    pub hash: ChunkHash,
}

/// An exception record (`records`) or overlay record (`overlays`): the chunks of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// `records` only: the `t` of the previous record of the same group (0: none). The chain
    /// lets a reader prove that no record between two it found has disappeared.
    pub prev: u64,
    /// Sorted by `off`, no duplicates.
    pub entries: Vec<Entry>,
}

impl Record {
    pub fn find(&self, off: u64) -> Option<&Entry> {
        self.entries
            .binary_search_by_key(&off, |e| e.off as u64)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Adds or replaces the entry for `e.off`, keeping the order.
    pub fn put(&mut self, e: Entry) {
        match self.entries.binary_search_by_key(&e.off, |x| x.off) {
            Ok(i) => self.entries[i] = e,
            Err(i) => self.entries.insert(i, e),
        }
    }

    pub fn chunks(&self) -> u64 {
        self.entries.len() as u64
    }
}

#[cfg(feature = "bench-unhashed")]
fn check_of(_table: &str, _key: &[u8], _body: &[u8]) -> [u8; CHECK] {
    [0; CHECK]
}

#[cfg(not(feature = "bench-unhashed"))]
fn check_of(table: &str, key: &[u8], body: &[u8]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    h.update(table.as_bytes());
    h.update(&[0]);
    h.update(key);
    h.update(body);
    let mut out = [0u8; CHECK];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK]);
    out
}

/// Key bytes of an exception record `(branch, group, t)`.
pub fn record_key(k: (u32, u64, u64)) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&k.0.to_le_bytes());
    v.extend_from_slice(&k.1.to_le_bytes());
    v.extend_from_slice(&k.2.to_le_bytes());
    v
}

/// Key bytes of an overlay record `(overlay, group)`.
pub fn overlay_key(k: (u32, u64)) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&k.0.to_le_bytes());
    v.extend_from_slice(&k.1.to_le_bytes());
    v
}

/// Encodes a record of `table` ("records" or "overlays") under `key` (its key bytes).
pub fn encode_record(table: &str, key: &[u8], r: &Record) -> Vec<u8> {
    // Runs: adjacent chunks in adjacent store chunks.
    let mut runs: Vec<(u16, u16, u64)> = Vec::new();
    for e in &r.entries {
        match runs.last_mut() {
            Some((o, l, p)) if *o + *l == e.off && *p + *l as u64 == e.loc => *l += 1,
            _ => runs.push((e.off, 1, e.loc)),
        }
    }
    let mut v = Vec::with_capacity(RECORD_HEAD + runs.len() * RUN + r.entries.len() * HASH + CHECK);
    v.push(RECORD_LAYOUT);
    v.push(0);
    v.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    v.extend_from_slice(&r.prev.to_le_bytes());
    for (o, l, p) in &runs {
        v.extend_from_slice(&o.to_le_bytes());
        v.extend_from_slice(&l.to_le_bytes());
        v.extend_from_slice(&p.to_le_bytes());
    }
    for e in &r.entries {
        v.extend_from_slice(&e.hash);
    }
    let c = check_of(table, key, &v);
    v.extend_from_slice(&c);
    v
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a record; `None` when any byte of it (or of its key) is not what was written.
pub fn decode_record(table: &str, key: &[u8], b: &[u8]) -> Option<Record> {
    if b.len() < RECORD_HEAD + CHECK {
        return None;
    }
    let (body, check) = b.split_at(b.len() - CHECK);
    if check != check_of(table, key, body) || body[0] != RECORD_LAYOUT || body[1] != 0 {
        return None;
    }
    let nruns = u16_at(body, 2) as usize;
    let prev = u64_at(body, 4);
    let runs_end = RECORD_HEAD + nruns * RUN;
    if body.len() < runs_end {
        return None;
    }
    let mut entries = Vec::new();
    let mut hashes = body[runs_end..].chunks_exact(HASH);
    if body[runs_end..].len() % HASH != 0 {
        return None;
    }
    let mut next_off = 0u64;
    for r in body[RECORD_HEAD..runs_end].chunks_exact(RUN) {
        let (off, len, loc) = (u16_at(r, 0) as u64, u16_at(r, 2) as u64, u64_at(r, 4));
        if len == 0 || off < next_off || off + len > GROUP_CHUNKS {
            return None;
        }
        next_off = off + len;
        for i in 0..len {
            let h = hashes.next()?;
            let mut hash = [0u8; HASH];
            hash.copy_from_slice(h);
            entries.push(Entry {
                off: (off + i) as u16,
                loc: loc.checked_add(i)?,
                hash,
            });
        }
    }
    if hashes.next().is_some() {
        return None;
    }
    Some(Record { prev, entries })
}

/// Layout version of the pending-copies value.
const PENDING_LAYOUT: u8 = 1;
const PENDING_HEAD: usize = 16;
const PENDING_RUN: usize = 20;

/// The copies one origin-write commit made without a flush of their own: the epoch of their
/// records, and runs of (first origin chunk, first store chunk, count).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pending {
    pub epoch: u64,
    pub runs: Vec<(u64, u64, u32)>,
}

/// Encodes the `pending_copies` value (key 0).
pub fn encode_pending(p: &Pending) -> Vec<u8> {
    let mut v = Vec::with_capacity(PENDING_HEAD + p.runs.len() * PENDING_RUN + CHECK);
    v.extend_from_slice(&[PENDING_LAYOUT, 0, 0, 0]);
    v.extend_from_slice(&(p.runs.len() as u32).to_le_bytes());
    v.extend_from_slice(&p.epoch.to_le_bytes());
    for (c, loc, n) in &p.runs {
        v.extend_from_slice(&c.to_le_bytes());
        v.extend_from_slice(&loc.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    let c = check_of("pending_copies", &0u64.to_le_bytes(), &v);
    v.extend_from_slice(&c);
    v
}

/// Decodes the `pending_copies` value; `None` when any byte of it is not what was written.
pub fn decode_pending(b: &[u8]) -> Option<Pending> {
    if b.len() < PENDING_HEAD + CHECK {
        return None;
    }
    let (body, check) = b.split_at(b.len() - CHECK);
    if check != check_of("pending_copies", &0u64.to_le_bytes(), body)
        || body[..4] != [PENDING_LAYOUT, 0, 0, 0]
    {
        return None;
    }
    let n = u32_at(body, 4) as usize;
    if body.len() != PENDING_HEAD.checked_add(n.checked_mul(PENDING_RUN)?)? {
        return None;
    }
    let runs = body[PENDING_HEAD..]
        .chunks_exact(PENDING_RUN)
        .map(|r| (u64_at(r, 0), u64_at(r, 8), u32_at(r, 16)))
        .collect();
    Some(Pending {
        epoch: u64_at(body, 8),
        runs,
    })
}

const NO_EXPIRY: i64 = i64::MIN;
const NO_REASON: u16 = u16::MAX;

fn put_str(v: &mut Vec<u8>, s: &str) {
    // Names, labels and reasons are bounded far below 64 KiB by the command line's checks.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize - 1)];
    v.extend_from_slice(&(b.len() as u16).to_le_bytes());
    v.extend_from_slice(b);
}

/// Encodes a snapshot record (key: its id).
pub fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    let mut v = Vec::with_capacity(128);
    v.push(SNAP_LAYOUT);
    v.push(match s.state {
        SnapState::Valid => 0,
        SnapState::Invalid => 1,
    });
    v.push(s.writable as u8);
    v.push(0);
    v.extend_from_slice(&s.branch.to_le_bytes());
    v.extend_from_slice(&s.overlay.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&s.id.to_le_bytes());
    v.extend_from_slice(&s.epoch.to_le_bytes());
    v.extend_from_slice(&s.created.to_le_bytes());
    v.extend_from_slice(&s.expires.unwrap_or(NO_EXPIRY).to_le_bytes());
    v.extend_from_slice(&s.exclusive_chunks.to_le_bytes());
    v.extend_from_slice(&s.overlay_chunks.to_le_bytes());
    put_str(&mut v, &s.name);
    put_str(&mut v, &s.parent);
    match &s.invalid_reason {
        Some(r) => put_str(&mut v, r),
        None => v.extend_from_slice(&NO_REASON.to_le_bytes()),
    }
    v.extend_from_slice(&(s.labels.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for (k, val) in s.labels.iter().take(u16::MAX as usize) {
        put_str(&mut v, k);
        put_str(&mut v, val);
    }
    let c = check_of("snapshots", &s.id.to_le_bytes(), &v);
    v.extend_from_slice(&c);
    v
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16_at(b, 0))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// Decodes a snapshot record stored under `id`; `None` when it is not what was written.
pub fn decode_snapshot(id: u64, b: &[u8]) -> Option<Snapshot> {
    if b.len() < 64 + CHECK {
        return None;
    }
    let (body, check) = b.split_at(b.len() - CHECK);
    if check != check_of("snapshots", &id.to_le_bytes(), body) || body[0] != SNAP_LAYOUT {
        return None;
    }
    let state = match body[1] {
        0 => SnapState::Valid,
        1 => SnapState::Invalid,
        _ => return None,
    };
    let writable = match body[2] {
        0 => false,
        1 => true,
        _ => return None,
    };
    let expires = match u64_at(body, 40) as i64 {
        NO_EXPIRY => None,
        t => Some(t),
    };
    let mut r = Reader { b: body, at: 64 };
    let name = r.string()?;
    let parent = r.string()?;
    let invalid_reason = match u16_at(body, r.at) {
        NO_REASON => {
            r.at += 2;
            None
        }
        _ => Some(r.string()?),
    };
    let nlabels = r.u16()?;
    let mut labels = BTreeMap::new();
    for _ in 0..nlabels {
        let k = r.string()?;
        let v = r.string()?;
        labels.insert(k, v);
    }
    if r.at != body.len() || u64_at(body, 16) != id {
        return None;
    }
    Some(Snapshot {
        id,
        name,
        parent,
        branch: u32_at(body, 4),
        epoch: u64_at(body, 24),
        created: u64_at(body, 32) as i64,
        writable,
        expires,
        labels,
        state,
        invalid_reason,
        exclusive_chunks: u64_at(body, 48),
        overlay: u32_at(body, 8),
        overlay_chunks: u64_at(body, 56),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        let mut r = Record {
            prev: 7,
            entries: Vec::new(),
        };
        for (off, loc) in [(3u16, 10u64), (4, 11), (5, 12), (9, 40), (127, 41)] {
            r.put(Entry {
                off,
                loc,
                hash: chunk_hash(&[off as u8; 5]),
            });
        }
        r
    }

    #[test]
    fn pending_copies_round_trip_and_every_flipped_byte_is_refused() {
        let p = Pending {
            epoch: 7,
            runs: vec![(3, 100, 2), (90, 4, 1)],
        };
        let b = encode_pending(&p);
        assert_eq!(decode_pending(&b), Some(p));
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert_eq!(decode_pending(&x), None, "flip at {i}");
        }
        assert_eq!(decode_pending(&b[..b.len() - 1]), None);
        assert_eq!(decode_pending(&[]), None);
    }

    #[test]
    fn records_round_trip_and_every_flipped_byte_is_refused() {
        let key = record_key((0, 5, 9));
        let r = rec();
        let b = encode_record("records", &key, &r);
        assert_eq!(decode_record("records", &key, &b), Some(r));
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert_eq!(
                    decode_record("records", &key, &c),
                    None,
                    "byte {i} bit {bit}"
                );
            }
        }
        // The same bytes under another key, or in another table, are refused.
        assert_eq!(decode_record("records", &record_key((0, 5, 10)), &b), None);
        assert_eq!(decode_record("overlays", &key, &b), None);
        assert_eq!(decode_record("records", &key, &b[..b.len() - 1]), None);
    }

    #[test]
    fn snapshots_round_trip_and_every_flipped_byte_is_refused() {
        let mut labels = BTreeMap::new();
        labels.insert("k".to_string(), "v".to_string());
        let s = Snapshot {
            id: 4,
            name: "nightly".into(),
            parent: "origin".into(),
            branch: 0,
            epoch: 12,
            created: 1_700_000_000,
            writable: true,
            expires: Some(1_800_000_000),
            labels,
            state: SnapState::Invalid,
            invalid_reason: Some("store full".into()),
            exclusive_chunks: 3,
            overlay: 2,
            overlay_chunks: 5,
        };
        let b = encode_snapshot(&s);
        let d = decode_snapshot(4, &b).expect("decodes");
        assert_eq!(format!("{d:?}"), format!("{s:?}"));
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(decode_snapshot(4, &c).is_none(), "byte {i}");
        }
        assert!(decode_snapshot(5, &b).is_none());
    }
}
