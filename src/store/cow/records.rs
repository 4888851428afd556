//! Exception and overlay records: decoding with their row checks, and the chains that let a
//! reader prove it found every record of a group (DESIGN.md, "Never a wrong byte").

use super::*;

pub(super) fn bad_record(store: &str, k: (u32, u64, u64)) -> Error {
    Error::Corrupt(format!(
        "{store}: exception record {k:?} is damaged; run `snapctl check`"
    ))
}

pub(super) fn bad_overlay(store: &str, k: (u32, u64)) -> Error {
    Error::Corrupt(format!(
        "{store}: overlay record {k:?} is damaged; run `snapctl check`"
    ))
}

type Verified = HashMap<(&'static str, Vec<u8>), (Vec<u8>, Record)>;

/// Record values this process verified (or wrote), by table and key. A value read again that
/// is byte for byte the one verified is the same record: a comparison instead of a hash. Any
/// change to its bytes (a flipped bit) makes it unequal, and it is verified afresh. One for the
/// process, so its memory does not grow with the number of connections.
static VERIFIED: std::sync::LazyLock<std::sync::Mutex<Verified>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(HashMap::new()));

/// At most this many values are remembered: set by the store opened last, from its share of
/// the cache ([`crate::store::Caches`]).
static VERIFIED_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1024);

/// What one remembered value costs at most: a full group's value (128 entries of 42 bytes)
/// and its decoded record (128 entries of 48 bytes), with the key and the map's own.
pub(crate) const VERIFIED_BYTES: usize = 128 * 42 + 128 * 48 + 256;

/// Bounds the values remembered to `max` (a smaller bound takes effect at the next insert).
pub(crate) fn set_verified_max(max: usize) {
    VERIFIED_MAX.store(max.max(16), std::sync::atomic::Ordering::Relaxed);
}

fn remember(table: &'static str, key: Vec<u8>, value: Vec<u8>, rec: Record) {
    if let Ok(mut c) = VERIFIED.lock() {
        if c.len() >= VERIFIED_MAX.load(std::sync::atomic::Ordering::Relaxed) {
            c.clear();
            give_back_freed_memory();
        }
        c.insert((table, key), (value, rec));
    }
}

/// Decodes a record value of `table`, verifying its checksum unless these very bytes were
/// verified before.
fn decode_verified(table: &'static str, key: Vec<u8>, v: &[u8]) -> Option<Record> {
    let known = VERIFIED.lock().ok().and_then(|c| {
        c.get(&(table, key.clone()))
            .and_then(|(bytes, rec)| (bytes.as_slice() == v).then(|| rec.clone()))
    });
    if known.is_some() {
        return known;
    }
    let rec = decode_record(table, &key, v)?;
    remember(table, key, v.to_vec(), rec.clone());
    Some(rec)
}

/// Decodes an exception record, refusing one whose checksum (over key and value) fails.
pub(crate) fn record_of(store: &str, k: (u32, u64, u64), v: &[u8]) -> Result<Record> {
    decode_verified("records", record_key(k), v).ok_or_else(|| bad_record(store, k))
}

/// Decodes an overlay record, refusing one whose checksum fails.
pub(crate) fn overlay_of(store: &str, k: (u32, u64), v: &[u8]) -> Result<Record> {
    decode_verified("overlays", overlay_key(k), v).ok_or_else(|| bad_overlay(store, k))
}

pub(crate) fn put_record(
    t: &mut redb::Table<(u32, u64, u64), &'static [u8]>,
    store: &str,
    k: (u32, u64, u64),
    r: &Record,
) -> Result<()> {
    let key = record_key(k);
    let v = encode_record("records", &key, r);
    t.insert(k, v.as_slice()).map_err(|e| meta_err(store, e))?;
    remember("records", key, v, r.clone());
    Ok(())
}

pub(crate) fn put_overlay(
    t: &mut redb::Table<(u32, u64), &'static [u8]>,
    store: &str,
    k: (u32, u64),
    r: &Record,
) -> Result<()> {
    let key = overlay_key(k);
    let v = encode_record("overlays", &key, r);
    t.insert(k, v.as_slice()).map_err(|e| meta_err(store, e))?;
    remember("overlays", key, v, r.clone());
    Ok(())
}

/// The first record for chunk `c` of `branch` with `lo <= t <= hi`: `(t, entry)`. Write paths
/// only (each record's checksum is verified; the chain is `check`'s and the readers' job).
pub(super) fn find_cover<T: ReadableTable<(u32, u64, u64), &'static [u8]>>(
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

pub(super) fn broken_chain(store: &str, g: u64) -> Error {
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
pub(super) fn resolve_group<T, H>(
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
