//! `snapctl upgrade`: converts a store of format version 2, 3, 4 or 5 to version 6 in place
//! (docs/FORMAT.md, "Upgrading"). Version 5 -> 6 builds the live-point index from the snapshot
//! rows. Version 4 -> 5 rewrites the superblock alone (the journal is kept); version 3 -> 4 clears the copy journal's area and rewrites the superblock. Version 2 -> 3 (docs/FORMAT.md, "Upgrading from version 2"):
//! version 2 kept snapshot rows as JSON and records as bare runs; version 3 adds a checksum to every saved chunk and to every row, and
//! chains each group's records. The conversion reads every saved chunk once to hash it, writes
//! the new rows in one metadata commit, then the new superblock. A crash between the two leaves
//! a store whose metadata says it is converted (`format` in `config`) under an old superblock:
//! running `upgrade` again only rewrites the superblock.

use std::collections::BTreeMap;

use redb::ReadableTable;

use crate::error::{meta_err, Error, Result};
use crate::io::AlignedBuf;
use crate::store::codec::{chunk_hash, decode_snapshot, encode_snapshot, Entry, Record};
use crate::store::cow::{put_overlay, put_record};
use crate::store::format::{FORMAT_VERSION, GROUP_CHUNKS, UPGRADABLE_VERSION};
use crate::store::{SnapState, Snapshot, Store, CONFIG, HEADS, LIVE, OVERLAYS, RECORDS, SNAPS};

/// Set in `config` by the conversion's commit: the version of the rows' layout.
const K_FORMAT: &str = "format";
/// The version whose rows (checksummed, chained) are still the current ones.
const ROWS_VERSION: u32 = 3;

/// What an upgrade did.
#[derive(Debug, Default, serde::Serialize)]
pub struct UpgradeReport {
    pub from_version: u32,
    pub to_version: u32,
    pub snapshots: u64,
    pub records: u64,
    pub chunks_hashed: u64,
}

/// Version 2's run: 12 bytes, `(first chunk u16, length u16, first store chunk u64)`.
fn decode_runs_v2(b: &[u8]) -> Option<Vec<(u64, u64, u64)>> {
    if b.len() % 12 != 0 {
        return None;
    }
    let mut out = Vec::new();
    for c in b.chunks_exact(12) {
        let off = u16::from_le_bytes([c[0], c[1]]) as u64;
        let len = u16::from_le_bytes([c[2], c[3]]) as u64;
        let mut l = [0u8; 8];
        l.copy_from_slice(&c[4..12]);
        if len == 0 || off + len > GROUP_CHUNKS {
            return None;
        }
        out.push((off, len, u64::from_le_bytes(l)));
    }
    Some(out)
}

/// The (origin chunk, store chunk) pairs a version-2 value of group `g` names.
fn v2_items(store: &str, what: &str, g: u64, v: &[u8]) -> Result<Vec<(u64, u64)>> {
    let runs = decode_runs_v2(v)
        .ok_or_else(|| Error::Corrupt(format!("{store}: {what} cannot be decoded")))?;
    Ok(runs
        .iter()
        .flat_map(|(off, len, loc)| (0..*len).map(move |i| (g * GROUP_CHUNKS + off + i, loc + i)))
        .collect())
}

impl Store {
    /// Hashes the saved chunks `(origin chunk, store chunk)`: what each holds now.
    fn hash_saved(&self, items: &[(u64, u64)]) -> Result<Vec<Entry>> {
        let cs = self.sb.chunk_size;
        let mut out = Vec::with_capacity(items.len());
        for part in items.chunks(256) {
            let mut bufs: Vec<AlignedBuf> =
                part.iter().map(|_| AlignedBuf::new(cs as usize)).collect();
            {
                let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(part.len());
                for ((_, loc), b) in part.iter().zip(bufs.iter_mut()) {
                    if *loc >= self.sb.data_chunks {
                        return Err(Error::Corrupt(format!(
                            "{}: a record points outside the store; it cannot be upgraded",
                            self.name
                        )));
                    }
                    reads.push((self.sb.data_offset + loc * cs, b.as_mut_slice()));
                }
                self.dev
                    .read_many(&mut reads)
                    .map_err(|e| Error::io(format!("store {}: read", self.name), e))?;
            }
            for ((c, loc), b) in part.iter().zip(&bufs) {
                out.push(Entry {
                    off: (c % GROUP_CHUNKS) as u16,
                    loc: *loc,
                    hash: chunk_hash(&b.as_slice()[..self.chunk_len(*c)]),
                });
            }
        }
        Ok(out)
    }

    /// Converts this store (opened with `Store::open_for_upgrade`) to the current version.
    pub fn upgrade(&mut self) -> Result<UpgradeReport> {
        let sn = self.name.clone();
        let mut rep = UpgradeReport {
            from_version: self.version,
            to_version: FORMAT_VERSION,
            ..Default::default()
        };
        if self.version == FORMAT_VERSION {
            return Ok(rep);
        }
        if !(UPGRADABLE_VERSION..FORMAT_VERSION).contains(&self.version) {
            return Err(Error::Invalid(format!(
                "{sn}: format version {} cannot be upgraded",
                self.version
            )));
        }
        // Version 2 -> 3: the rows. Version 3's rows are still the current ones.
        let converted = self.version >= ROWS_VERSION || {
            let tx = self.rtx()?;
            let c = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
            c.get(K_FORMAT)
                .map_err(|e| meta_err(&sn, e))?
                .map(|v| v.value())
        } >= Some(ROWS_VERSION as u64);
        if !converted {
            let tx = self.wtx()?;
            {
                let mut snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
                let rows: Vec<(u64, Vec<u8>)> = snaps
                    .iter()
                    .map_err(|e| meta_err(&sn, e))?
                    .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| meta_err(&sn, e))?;
                for (id, json) in rows {
                    let s: Snapshot = serde_json::from_slice(&json).map_err(|e| {
                        Error::Corrupt(format!("{sn}: snapshot record {id} is damaged: {e}"))
                    })?;
                    snaps
                        .insert(id, encode_snapshot(&s).as_slice())
                        .map_err(|e| meta_err(&sn, e))?;
                    rep.snapshots += 1;
                }
            }
            {
                let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
                let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
                let rows: Vec<((u32, u64, u64), Vec<u8>)> = recs
                    .iter()
                    .map_err(|e| meta_err(&sn, e))?
                    .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| meta_err(&sn, e))?;
                let mut last: BTreeMap<(u32, u64), u64> = BTreeMap::new();
                for (k, v) in rows {
                    let (b, g, t) = k;
                    let items = v2_items(&sn, &format!("record {k:?}"), g, &v)?;
                    rep.chunks_hashed += items.len() as u64;
                    let rec = Record {
                        prev: last.get(&(b, g)).copied().unwrap_or(0),
                        entries: self.hash_saved(&items)?,
                    };
                    put_record(&mut recs, &sn, k, &rec)?;
                    last.insert((b, g), t);
                    rep.records += 1;
                }
                for ((b, g), t) in last {
                    heads.insert((b, g), t).map_err(|e| meta_err(&sn, e))?;
                }
            }
            {
                let mut ovl = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
                let rows: Vec<((u32, u64), Vec<u8>)> = ovl
                    .iter()
                    .map_err(|e| meta_err(&sn, e))?
                    .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| meta_err(&sn, e))?;
                for (k, v) in rows {
                    let g = k.1;
                    let items = v2_items(&sn, &format!("overlay record {k:?}"), g, &v)?;
                    rep.chunks_hashed += items.len() as u64;
                    let rec = Record {
                        prev: 0,
                        entries: self.hash_saved(&items)?,
                    };
                    put_overlay(&mut ovl, &sn, k, &rec)?;
                    rep.records += 1;
                }
            }
            {
                let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
                c.insert(K_FORMAT, ROWS_VERSION as u64)
                    .map_err(|e| meta_err(&sn, e))?;
            }
            tx.commit().map_err(|e| meta_err(&sn, e))?;
        }
        // Version 5 -> 6: the live-point index, built from the snapshot rows in one commit
        // (again from scratch by an upgrade run after a crash before the superblock says 6).
        // A damaged row is left out: opening the store refuses it until `check` mends it.
        {
            let tx = self.wtx()?;
            tx.delete_table(LIVE).map_err(|e| meta_err(&sn, e))?;
            {
                let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
                let mut live = tx.open_table(LIVE).map_err(|e| meta_err(&sn, e))?;
                for row in snaps.iter().map_err(|e| meta_err(&sn, e))? {
                    let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
                    let Some(s) = decode_snapshot(k.value(), v.value()) else {
                        continue;
                    };
                    if s.state == SnapState::Valid && s.branch == 0 {
                        live.insert((s.epoch, s.id), ())
                            .map_err(|e| meta_err(&sn, e))?;
                    }
                }
            }
            tx.commit().map_err(|e| meta_err(&sn, e))?;
        }
        // Version 3 -> 4: the copy journal, in space version 3 left unused (zero). Cleared all
        // the same, so that it holds no record; the metadata has no journal position yet, which
        // reads as "sequence 1 at the start".
        // Version 4 -> 5: a record's bytes 28..32, zero in version 4, count the records before
        // it whose flush had not returned; zero means what it meant, so a version-4 journal is
        // a version-5 one and is kept (it may hold records a crash left for replay).
        // The metadata is converted and durable: now the superblock says so.
        let journal = if self.version < 4 {
            crate::store::zero_journal(self.dev.as_ref()).and_then(|_| self.dev.flush())
        } else {
            Ok(())
        };
        journal
            .and_then(|_| crate::store::write_superblocks(self.dev.as_ref(), &self.sb))
            .and_then(|_| self.dev.flush())
            .map_err(|e| Error::io(format!("store {sn}: write superblock"), e))?;
        self.version = FORMAT_VERSION;
        self.load_catalog()?;
        Ok(rep)
    }
}
