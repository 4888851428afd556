//! The superblock: the fixed first 4 KiB of a store. Layout in docs/FORMAT.md; the offsets below
//! are the same table. All integers are little-endian, written with explicit `to_le_bytes`.

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"SNAPCTL\0";
/// 6: the live-point index (`live_points`), so that a delete reads a few catalog rows, not all;
/// upgraded from 5 by building it from the snapshot rows.
/// 5: each copy-journal record names the records before it that were written before a flush
/// had returned for them (pipelined origin writes); upgraded from 4 by rewriting the superblock.
/// 4: the copy journal (records of an origin write's copies, flushed with them, folded into the
/// metadata by the next durable commit); upgraded from 3 by `snapctl upgrade`.
/// 3: a checksum for every saved chunk and every metadata value; record chains.
/// 2: snapshot overlays (writable snapshots and snapshots of them); upgraded by `snapctl upgrade`.
/// See docs/FORMAT.md.
pub const FORMAT_VERSION: u32 = 6;
/// The oldest version `snapctl upgrade` converts.
pub const UPGRADABLE_VERSION: u32 = 2;
pub const SUPERBLOCK_SIZE: usize = 4096;
/// The copy journal: from 8 KiB up to the backup superblock (space zero and unused before
/// version 4). See `store/journal.rs`.
pub const JOURNAL_OFFSET: u64 = 8 << 10;
pub const JOURNAL_LEN: u64 = BACKUP_OFFSET - JOURNAL_OFFSET;
/// Where the backup copy of the superblock lives: in the reserved space before the metadata,
/// far enough from offset 0 that what damages the first sectors (a partition table, another
/// tool's signature, a stray `dd` of a few KiB) leaves it whole. Written with the superblock
/// and never changed after (the superblock is immutable once `init` or `upgrade` wrote it).
pub const BACKUP_OFFSET: u64 = 512 << 10;

/// Where the metadata region starts: 1 MiB, so the data area can be aligned to any chunk size.
pub const META_OFFSET: u64 = 1 << 20;
/// Smallest metadata region `init` accepts.
pub const MIN_META_LEN: u64 = 4 << 20;
/// Chunks per exception group: records cover runs inside one aligned group of this many chunks.
pub const GROUP_CHUNKS: u64 = 128;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_UUID: usize = 16;
const OFF_CHUNK_SIZE: usize = 32;
const OFF_ORIGIN_SIZE: usize = 40;
const OFF_FINGERPRINT: usize = 48;
const OFF_META_OFFSET: usize = 80;
const OFF_META_LEN: usize = 88;
const OFF_DATA_OFFSET: usize = 96;
const OFF_DATA_CHUNKS: usize = 104;
const OFF_ON_FULL: usize = 112;
const OFF_CREATED: usize = 120;
const OFF_PATH_LEN: usize = 128;
const OFF_PATH: usize = 256;
pub const MAX_PATH: usize = 2048;
const OFF_CHECKSUM: usize = SUPERBLOCK_SIZE - 32;

/// What to do when the store has no room for a copy an origin write needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    /// Delete the oldest snapshots until the copy fits.
    DropOldest,
    /// Mark the snapshots that need the copy invalid.
    Invalidate,
    /// Fail the origin write with ENOSPC.
    FailWrites,
}

impl OnFull {
    pub fn code(self) -> u8 {
        match self {
            OnFull::DropOldest => 0,
            OnFull::Invalidate => 1,
            OnFull::FailWrites => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(OnFull::DropOldest),
            1 => Some(OnFull::Invalidate),
            2 => Some(OnFull::FailWrites),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OnFull::DropOldest => "drop-oldest",
            OnFull::Invalidate => "invalidate",
            OnFull::FailWrites => "fail-writes",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub chunk_size: u64,
    pub origin_size: u64,
    pub fingerprint: [u8; 32],
    pub meta_offset: u64,
    pub meta_len: u64,
    pub data_offset: u64,
    pub data_chunks: u64,
    pub on_full: OnFull,
    pub created: i64,
    pub origin_path: String,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(MAGIC);
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        b[OFF_CHUNK_SIZE..OFF_CHUNK_SIZE + 8].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[OFF_ORIGIN_SIZE..OFF_ORIGIN_SIZE + 8].copy_from_slice(&self.origin_size.to_le_bytes());
        b[OFF_FINGERPRINT..OFF_FINGERPRINT + 32].copy_from_slice(&self.fingerprint);
        b[OFF_META_OFFSET..OFF_META_OFFSET + 8].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[OFF_META_LEN..OFF_META_LEN + 8].copy_from_slice(&self.meta_len.to_le_bytes());
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_le_bytes());
        b[OFF_DATA_CHUNKS..OFF_DATA_CHUNKS + 8].copy_from_slice(&self.data_chunks.to_le_bytes());
        b[OFF_ON_FULL] = self.on_full.code();
        b[OFF_CREATED..OFF_CREATED + 8].copy_from_slice(&self.created.to_le_bytes());
        let path = self.origin_path.as_bytes();
        let n = path.len().min(MAX_PATH);
        b[OFF_PATH_LEN..OFF_PATH_LEN + 2].copy_from_slice(&(n as u16).to_le_bytes());
        b[OFF_PATH..OFF_PATH + n].copy_from_slice(&path[..n]);
        let sum = blake3::hash(&b[..OFF_CHECKSUM]);
        b[OFF_CHECKSUM..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decodes and verifies a superblock. `what` names the store in errors.
    pub fn decode(b: &[u8], what: &str) -> Result<Self> {
        match Self::decode_any(b, what)? {
            (sb, FORMAT_VERSION) => Ok(sb),
            (_, v) if (UPGRADABLE_VERSION..FORMAT_VERSION).contains(&v) => {
                Err(Error::Invalid(format!(
                    "{what} uses store format version {v}, written by an older snapctl; run `snapctl -s {what} upgrade` once to convert it to version {FORMAT_VERSION}"
                )))
            }
            (_, v) => Err(Error::Corrupt(format!(
                "{what}: store format version {v} is not supported by this snapctl (it reads version {FORMAT_VERSION})"
            ))),
        }
    }

    /// Decodes a superblock of this version or of one `upgrade` converts: (superblock, version).
    pub fn decode_any(b: &[u8], what: &str) -> Result<(Self, u32)> {
        if b.len() < SUPERBLOCK_SIZE || &b[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Err(Error::not_a_store(what));
        }
        let sum = blake3::hash(&b[..OFF_CHECKSUM]);
        if sum.as_bytes() != &b[OFF_CHECKSUM..SUPERBLOCK_SIZE] {
            return Err(Error::Corrupt(format!(
                "{what}: superblock checksum mismatch (the first 4 KiB were damaged); the store cannot be read: restore it from a backup, or format it again with `snapctl init --force`"
            )));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&b[OFF_VERSION..OFF_VERSION + 4]);
        let version = u32::from_le_bytes(v);
        if version > FORMAT_VERSION {
            // Not damage: a newer snapctl wrote it. Nothing here can read it safely.
            return Err(Error::Invalid(format!(
                "{what} uses store format version {version}, written by a newer snapctl (this one reads version {FORMAT_VERSION}); use the snapctl that made it, or a newer one"
            )));
        }
        if version < UPGRADABLE_VERSION {
            return Err(Error::Corrupt(format!(
                "{what}: store format version {version} is not supported by this snapctl (it reads version {FORMAT_VERSION})"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[OFF_UUID..OFF_UUID + 16]);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&b[OFF_FINGERPRINT..OFF_FINGERPRINT + 32]);
        let on_full = OnFull::from_code(b[OFF_ON_FULL]).ok_or_else(|| {
            Error::Corrupt(format!("{what}: superblock has an unknown on-full policy"))
        })?;
        let plen = u16::from_le_bytes([b[OFF_PATH_LEN], b[OFF_PATH_LEN + 1]]) as usize;
        if plen > MAX_PATH {
            return Err(Error::Corrupt(format!(
                "{what}: superblock origin path too long"
            )));
        }
        let origin_path = String::from_utf8(b[OFF_PATH..OFF_PATH + plen].to_vec())
            .map_err(|_| Error::Corrupt(format!("{what}: superblock origin path is not UTF-8")))?;
        let sb = Superblock {
            uuid,
            chunk_size: u64_at(b, OFF_CHUNK_SIZE),
            origin_size: u64_at(b, OFF_ORIGIN_SIZE),
            fingerprint,
            meta_offset: u64_at(b, OFF_META_OFFSET),
            meta_len: u64_at(b, OFF_META_LEN),
            data_offset: u64_at(b, OFF_DATA_OFFSET),
            data_chunks: u64_at(b, OFF_DATA_CHUNKS),
            on_full,
            created: i64::from_le_bytes(
                b[OFF_CREATED..OFF_CREATED + 8].try_into().unwrap_or([0; 8]),
            ),
            origin_path,
        };
        // A checksummed superblock with impossible geometry was written by a bug: refuse it.
        let geometry_ok = sb.chunk_size.is_power_of_two()
            && (4096..=1 << 20).contains(&sb.chunk_size)
            && sb.meta_offset >= SUPERBLOCK_SIZE as u64
            && sb.data_offset >= sb.meta_offset.saturating_add(sb.meta_len)
            && sb.data_offset % sb.chunk_size == 0
            // The data area must end inside 2^64 bytes: every size computed from it fits.
            && sb
                .data_chunks
                .checked_mul(sb.chunk_size)
                .and_then(|n| n.checked_add(sb.data_offset))
                .is_some();
        if !geometry_ok {
            return Err(Error::Corrupt(format!(
                "{what}: superblock geometry is invalid"
            )));
        }
        Ok((sb, version))
    }

    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    pub fn origin_chunks(&self) -> u64 {
        self.origin_size.div_ceil(self.chunk_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: [7; 16],
            chunk_size: 4096,
            origin_size: 1 << 30,
            fingerprint: [3; 32],
            meta_offset: META_OFFSET,
            meta_len: MIN_META_LEN,
            data_offset: META_OFFSET + MIN_META_LEN,
            data_chunks: 1000,
            on_full: OnFull::Invalidate,
            created: 1_700_000_000,
            origin_path: "/dev/loop0".into(),
        }
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode(), "s").unwrap(), sb);
    }

    /// Found by the `superblock` fuzz target: such a superblock opened (the size check wrapped)
    /// and `check` then tried to allocate a bit for each of 2^63 chunks.
    #[test]
    fn a_data_area_ending_past_two_to_the_64_is_refused() {
        for (offset, chunks) in [
            (META_OFFSET + MIN_META_LEN, u64::MAX / 2),
            (u64::MAX - 4095, 1),
        ] {
            let sb = Superblock {
                data_offset: offset,
                data_chunks: chunks,
                ..sample()
            };
            let e = Superblock::decode(&sb.encode(), "s").unwrap_err();
            assert!(e.to_string().contains("geometry"), "{e}");
        }
    }

    #[test]
    fn every_flipped_byte_of_the_superblock_is_refused() {
        let good = sample().encode();
        for i in 0..SUPERBLOCK_SIZE {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert!(Superblock::decode(&b, "s").is_err(), "flip at {i} accepted");
        }
    }
}
