//! `check`: every invariant of the exception store, and with `--data` every saved chunk
//! verified against its hash. Each finding that `check --repair` can mend carries its [`Fix`]
//! (repair.rs applies them); what cannot be mended is named precisely.

use super::*;
use crate::store::format::{Superblock, SUPERBLOCK_SIZE};

/// A well-mixed digest of a record key (splitmix64 of its fields), summed over a table to
/// compare two tables' key sets in one pass each.
fn key_digest(b: u32, t: u64, g: u64) -> u64 {
    let mix = |mut x: u64| {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    };
    mix(mix(mix(t) ^ g) ^ b as u64)
}

/// One bit per data chunk.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Self {
        Bits(vec![0u64; n.div_ceil(64) as usize])
    }
    /// Sets bit `p`; whether it was set already.
    fn set(&mut self, p: u64) -> bool {
        let (w, b) = ((p / 64) as usize, p % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }
    fn get(&self, p: u64) -> bool {
        self.0[(p / 64) as usize] & (1 << (p % 64)) != 0
    }
}

/// The records of one group seen so far, in key order.
struct GroupWalk {
    key: (u32, u64),
    /// `t` of the last row (decodable or not): the `prev` the next record must name.
    last: u64,
    /// Per offset in the group, the `t` of the newest decodable record covering it (0: none).
    cover: [u64; GROUP_CHUNKS as usize],
    /// The decodable records: (t, offsets covered).
    recs: Vec<(u64, u128)>,
}

impl GroupWalk {
    fn new(key: (u32, u64)) -> Self {
        GroupWalk {
            key,
            last: 0,
            cover: [0; GROUP_CHUNKS as usize],
            recs: Vec::new(),
        }
    }

    /// The live points that may read chunks of a record at `t` whose contents are unknown
    /// (it fails its checksum, or it vanished): every point below `t` down to the first whose
    /// chunks the records between it and `t` cover completely. `full` has a bit for each
    /// offset of the group inside the origin.
    fn readers(&self, live: &[u64], t: u64, full: u128) -> Vec<u64> {
        let mut acc = 0u128;
        let mut i = self.recs.partition_point(|&(rt, _)| rt < t);
        let mut out = Vec::new();
        for &e in live[..live.partition_point(|&x| x < t)].iter().rev() {
            while i > 0 && self.recs[i - 1].0 > e {
                acc |= self.recs[i - 1].1;
                i -= 1;
            }
            if acc & full == full {
                break;
            }
            out.push(e);
        }
        out
    }
}

impl Store {
    /// Verifies the metadata engine's checksums and every invariant of the exception store.
    ///
    /// Long on purpose: one read transaction and one pass over each table, every check
    /// feeding the same ownership bitmap and counters; the passes are marked in order
    /// (superblocks, config, records and chains, overlays, free list, snapshots, accounting).
    pub(crate) fn check_inner(
        &mut self,
        data: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        let sn = self.name.clone();
        let mut rep = CheckReport::default();
        self.check_superblocks(&mut rep)?;
        // Every metadata page is about to be read, in tree order (random in the file): have the
        // kernel read the region ahead in large requests first.
        self.dev.will_need(self.sb.meta_offset, self.sb.meta_len);
        let ok = crate::store::guard_panic(&sn, || {
            self.wdb()?.check_integrity().map_err(|e| meta_err(&sn, e))
        })?;
        if !ok {
            rep.corruption.push(
                "metadata pages failed their checksums (the engine repaired what it could; what it could not is named below, or restore the store from a backup)".into(),
            );
        }
        // Whether the rows are sound enough to recompute the space accounting from them.
        let mut sound = true;
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
            rep.fixes.push(Fix::RebuildFreeList);
        }
        // Ownership by records and overlays: one bit per data chunk (bounded by the store's
        // size, not by the records). The free list is compared with it afterwards.
        let mut owned = Bits::new(data_chunks);
        let mut claim = |p: u64, what: &str, rep: &mut CheckReport| {
            if p >= data_chunks {
                rep.corruption.push(format!(
                    "{what} points at store chunk {p}, outside the store (cannot be repaired: restore the store from a backup)"
                ));
            } else if owned.set(p) {
                rep.corruption.push(format!(
                    "store chunk {p} is owned twice ({what}; cannot be repaired: restore the store from a backup)"
                ));
            }
        };
        let live = self.live_epochs();
        let origin_chunks = self.sb.origin_chunks();
        let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
        let by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
        let heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
        let mut record_chunks = 0u64;
        // Every saved chunk, for --data: (origin chunk, entry, who reads it).
        let mut saved: Vec<(u64, Entry, Reader)> = Vec::new();
        let mut reindex = false;
        let mut keys_in_records = 0u64;
        // Per live point, the record entries only it reads (its exclusive space).
        let mut alone = vec![0u64; live.len()];
        let mut walk: Option<GroupWalk> = None;
        // Bits of the offsets of group `g` inside the origin.
        let full_of = |g: u64| {
            let n = origin_chunks
                .saturating_sub(g * GROUP_CHUNKS)
                .min(GROUP_CHUNKS);
            if n >= 128 {
                u128::MAX
            } else {
                (1u128 << n) - 1
            }
        };
        let cs = self.sb.chunk_size;
        let range = |g: u64, t: u64| {
            format!(
                "bytes {}..{} (epoch {t})",
                g * GROUP_CHUNKS * cs,
                ((g + 1) * GROUP_CHUNKS * cs).min(self.sb.origin_size)
            )
        };
        // A group's chain ends at its head. A head past the last record names one that
        // vanished: its copies are lost, and whoever read them must not be sent to the origin.
        let end_group = |w: Option<GroupWalk>, rep: &mut CheckReport| -> Result<bool> {
            let Some(w) = w else { return Ok(true) };
            let head = heads
                .get(w.key)
                .map_err(|e| meta_err(&sn, e))?
                .map(|v| v.value());
            let (b, g) = w.key;
            match head {
                Some(h) if h == w.last => return Ok(true),
                Some(h) if h > w.last => {
                    let readers = w.readers(&live, h, full_of(g));
                    let reason = format!("the exception record of {} vanished", range(g, h));
                    self.report_damage(
                        rep,
                        DamagedRow::Missing {
                            group: (b, g),
                            t: h,
                            next: None,
                            prev: w.last,
                        },
                        reason,
                        &readers,
                    );
                    return Ok(true);
                }
                _ => {}
            }
            rep.corruption.push(format!(
                "the newest record of chunks {}..{} is at epoch {} but the head says {head:?}",
                g * GROUP_CHUNKS,
                (g + 1) * GROUP_CHUNKS,
                w.last
            ));
            Ok(false)
        };
        for row in recs.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let key = k.value();
            let (b, g, t) = key;
            rep.records += 1;
            if walk.as_ref().is_none_or(|w| w.key != (b, g)) {
                reindex |= !end_group(walk.take(), &mut rep)?;
                walk = Some(GroupWalk::new((b, g)));
            }
            let Some(w) = walk.as_mut() else { continue };
            let full = full_of(g);
            // The time index must hold exactly the record keys: compared as a sum of key
            // digests (order-free, one pass each); only a mismatch looks keys up one by one.
            keys_in_records = keys_in_records.wrapping_add(key_digest(b, t, g));
            if t > epoch {
                rep.corruption.push(format!(
                    "record {key:?} is from the future (epoch is {epoch}; cannot be repaired: restore the store from a backup)"
                ));
                sound = false;
            }
            let Ok(rec) = record_of(&sn, key, v.value()) else {
                sound = false;
                let readers = w.readers(&live, t, full);
                let reason = format!("the exception record of {} is damaged", range(g, t));
                self.report_damage(
                    &mut rep,
                    DamagedRow::Record { key, prev: w.last },
                    reason,
                    &readers,
                );
                w.last = t;
                continue;
            };
            if rec.prev != w.last {
                sound = false;
                if rec.prev > w.last && rec.prev < t {
                    // The record the chain names is gone: its copies are lost.
                    let readers = w.readers(&live, rec.prev, full);
                    let reason = format!("the exception record of {} vanished", range(g, rec.prev));
                    self.report_damage(
                        &mut rep,
                        DamagedRow::Missing {
                            group: (b, g),
                            t: rec.prev,
                            next: Some(key),
                            prev: w.last,
                        },
                        reason,
                        &readers,
                    );
                } else {
                    rep.corruption.push(format!(
                        "record {key:?} follows epoch {} but the record before it is at {} (cannot be repaired: restore the store from a backup)",
                        rec.prev, w.last
                    ));
                }
            }
            w.last = t;
            let mut mask = 0u128;
            let mut unread = Vec::new();
            for en in &rec.entries {
                record_chunks += 1;
                claim(en.loc, &format!("record {key:?}"), &mut rep);
                let off = en.off as usize % GROUP_CHUNKS as usize;
                mask |= 1u128 << off;
                // Reachable iff some live point lies in [t_prev, t). A damaged record counts as
                // covering nothing, which only widens the interval: never a false leak.
                let t_prev = w.cover[off];
                w.cover[off] = t;
                let j = live.partition_point(|&x| x < t_prev);
                if j < live.len() && live[j] < t && live.get(j + 1).is_none_or(|&x| x >= t) {
                    alone[j] += 1;
                }
                if !(j < live.len() && live[j] < t) {
                    rep.leaks.push(format!(
                        "store chunk {} (chunk {}, epoch {t}) is held by no snapshot",
                        en.loc,
                        g * GROUP_CHUNKS + en.off as u64
                    ));
                    unread.push(en.off);
                }
                if data {
                    saved.push((
                        g * GROUP_CHUNKS + en.off as u64,
                        *en,
                        Reader::Points(t_prev, t),
                    ));
                }
            }
            if !unread.is_empty() {
                rep.fixes.push(Fix::DropEntries(key, unread));
            }
            w.recs.push((t, mask));
        }
        reindex |= !end_group(walk.take(), &mut rep)?;
        for row in heads.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (b, g) = k.value();
            let h = v.value();
            let mut rows = recs
                .range((b, g, 0)..=(b, g, u64::MAX))
                .map_err(|e| meta_err(&sn, e))?;
            if rows.next().is_none() && h > 0 {
                // Every record of the group vanished (the walk above never saw it).
                let readers = GroupWalk::new((b, g)).readers(&live, h, full_of(g));
                let reason = format!("the exception records of {} vanished", range(g, h));
                self.report_damage(
                    &mut rep,
                    DamagedRow::Missing {
                        group: (b, g),
                        t: h,
                        next: None,
                        prev: 0,
                    },
                    reason,
                    &readers,
                );
                sound = false;
            }
        }
        let mut keys_in_index = 0u64;
        let mut index_rows = 0u64;
        for row in by_time.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, _) = row.map_err(|e| meta_err(&sn, e))?;
            let (b, t, g) = k.value();
            keys_in_index = keys_in_index.wrapping_add(key_digest(b, t, g));
            index_rows += 1;
        }
        if keys_in_index != keys_in_records || index_rows != rep.records {
            reindex = true;
            for row in recs.iter().map_err(|e| meta_err(&sn, e))? {
                let (k, _) = row.map_err(|e| meta_err(&sn, e))?;
                let (b, g, t) = k.value();
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
            }
            for row in by_time.iter().map_err(|e| meta_err(&sn, e))? {
                let (k, _) = row.map_err(|e| meta_err(&sn, e))?;
                let (b, t, g) = k.value();
                if recs.get((b, g, t)).map_err(|e| meta_err(&sn, e))?.is_none() {
                    rep.corruption
                        .push(format!("time index entry {:?} has no record", k.value()));
                }
            }
        }
        // Overlays: each chunk owned once, each overlay owned by one snapshot with the right count.
        // The row naming the newest unflushed copies must decode (it is read after a crash).
        match tx.open_table(PENDING) {
            Ok(t) => {
                if let Some(v) = t.get(0).map_err(|e| meta_err(&sn, e))? {
                    if decode_pending(v.value()).is_none() {
                        rep.corruption.push(
                            "the pending_copies row fails its row check (cannot be repaired: restore the store from a backup)"
                                .to_string(),
                        );
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(meta_err(&sn, e)),
        }
        let ovl = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
        let mut owners: HashMap<u32, (u64, &str, u64)> = HashMap::new();
        for s in self.snaps.values().filter(|s| s.overlay != 0) {
            if owners
                .insert(s.overlay, (s.id, s.name.as_str(), s.overlay_chunks))
                .is_some()
            {
                rep.corruption.push(format!(
                    "overlay {} is claimed by two snapshots (cannot be repaired: restore the store from a backup)",
                    s.overlay
                ));
                sound = false;
            }
        }
        let mut counts: HashMap<u32, u64> = HashMap::new();
        let mut damaged_overlays: Vec<u32> = Vec::new();
        let mut orphans: Vec<u32> = Vec::new();
        for row in ovl.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (id, g) = k.value();
            let owner = owners.get(&id).copied();
            let Ok(rec) = overlay_of(&sn, k.value(), v.value()) else {
                sound = false;
                damaged_overlays.push(id);
                let reason = format!(
                    "the overlay record of bytes {}..{} is damaged",
                    g * GROUP_CHUNKS * self.sb.chunk_size,
                    ((g + 1) * GROUP_CHUNKS * self.sb.chunk_size).min(self.sb.origin_size)
                );
                let readers: Vec<u64> = owner.map(|(sid, _, _)| sid).into_iter().collect();
                rep.corruption.push(match owner {
                    Some((_, name, _)) => format!(
                        "snapshot '{name}': {reason}; `check --repair --drop-damaged` marks it invalid"
                    ),
                    None => format!("{reason} (no snapshot owns it)"),
                });
                rep.fixes.push(Fix::Damaged {
                    row: DamagedRow::Overlay(k.value()),
                    snapshots: readers,
                    reason,
                });
                continue;
            };
            for en in &rec.entries {
                record_chunks += 1;
                *counts.entry(id).or_insert(0) += 1;
                claim(en.loc, &format!("overlay {id}"), &mut rep);
                if owner.is_none() {
                    rep.leaks.push(format!(
                        "store chunk {} is held by overlay {id}, which no snapshot owns",
                        en.loc
                    ));
                    if orphans.last() != Some(&id) {
                        orphans.push(id);
                    }
                }
                if data {
                    saved.push((g * GROUP_CHUNKS + en.off as u64, *en, Reader::Overlay(id)));
                }
            }
        }
        rep.fixes.extend(orphans.into_iter().map(Fix::DropOverlay));
        for (id, (sid, name, n)) in &owners {
            let have = counts.get(id).copied().unwrap_or(0);
            if have != *n && !damaged_overlays.contains(id) {
                rep.corruption.push(format!(
                    "snapshot '{name}' says its overlay holds {n} chunks, it holds {have}"
                ));
                rep.fixes.push(Fix::SetOverlayChunks(*sid, have));
            }
        }
        // The free list: inside the high-water mark, no extent twice, nothing in use.
        let free = tx.open_table(FREE).map_err(|e| meta_err(&sn, e))?;
        let mut is_free = Bits::new(data_chunks);
        let mut bad_free = false;
        for row in free.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            let (s, n) = (k.value(), v.value());
            if s.checked_add(n).is_none_or(|end| end > hw.min(data_chunks)) {
                rep.corruption.push(format!(
                    "free extent {s}+{n} is beyond the high-water mark {hw}"
                ));
                bad_free = true;
                continue;
            }
            rep.free_chunks += n;
            for p in s..s + n {
                if is_free.set(p) {
                    rep.corruption
                        .push(format!("store chunk {p} is in the free list twice"));
                    bad_free = true;
                } else if owned.get(p) {
                    rep.corruption.push(format!(
                        "store chunk {p} is in the free list but in use: the next copy would overwrite saved data"
                    ));
                    bad_free = true;
                }
            }
        }
        let mut orphan_chunks = false;
        for p in 0..hw.min(data_chunks) {
            if !owned.get(p) && !is_free.get(p) {
                rep.leaks
                    .push(format!("store chunk {p} is neither in use nor free"));
                orphan_chunks = true;
            }
        }
        if (bad_free || orphan_chunks) && !rep.fixes.contains(&Fix::RebuildFreeList) {
            rep.fixes.push(Fix::RebuildFreeList);
        }
        // Free space is the free list plus the chunks never handed out yet.
        rep.free_chunks += data_chunks.saturating_sub(hw);
        rep.high_water_chunks = hw;
        rep.used_chunks = record_chunks;
        if used != record_chunks {
            rep.corruption.push(format!(
                "the used-chunk counter says {used} but the records hold {record_chunks}"
            ));
            rep.fixes.push(Fix::SetUsed(record_chunks));
        }
        // Catalog: names and snapshots agree.
        let names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
        let mut nnames = 0u64;
        // The names of snapshots whose row is damaged: reported below, not as index damage.
        let mut damaged_names: HashMap<u64, String> = HashMap::new();
        for row in names.iter().map_err(|e| meta_err(&sn, e))? {
            let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
            nnames += 1;
            if self.damaged_snapshots.contains(&v.value()) {
                damaged_names.insert(v.value(), k.value().to_string());
                continue;
            }
            match self.snaps.get(&v.value()) {
                Some(s) if s.name == k.value() => {}
                _ => {
                    rep.corruption.push(format!(
                        "name '{}' points at no matching snapshot",
                        k.value()
                    ));
                    reindex = true;
                }
            }
        }
        rep.snapshots = self.snaps.len() as u64;
        for &id in &self.damaged_snapshots {
            let reason = match damaged_names.get(&id) {
                Some(n) => format!(
                    "the catalog row of snapshot '{n}' (id {id}) is damaged: its point in time is lost"
                ),
                None => format!("the catalog row of snapshot id {id} (no name names it) is damaged"),
            };
            rep.corruption.push(format!(
                "{reason}; `check --repair --drop-damaged` removes it (what only it held is freed after)"
            ));
            rep.fixes.push(Fix::Damaged {
                row: DamagedRow::Snapshot(id),
                snapshots: Vec::new(),
                reason,
            });
        }
        if !self.damaged_snapshots.is_empty() && !rep.leaks.is_empty() {
            rep.notes.push(
                "the leaks above are not certain while a snapshot's row is damaged (its point in time is unknown): they are freed only after `--drop-damaged` removes it".into(),
            );
        }
        if nnames != rep.snapshots + self.damaged_snapshots.len() as u64 {
            rep.corruption
                .push(format!("{} names for {} snapshots", nnames, rep.snapshots));
            reindex = true;
        }
        let live_index = tx.open_table(LIVE).map_err(|e| meta_err(&sn, e))?;
        if let Some(what) = self.live_index_disagrees(&live_index)? {
            rep.corruption.push(what);
            reindex = true;
        }
        drop(live_index);
        if reindex {
            rep.fixes.push(Fix::Reindex);
            sound = false;
        }
        sound &= !rep.fixes.iter().any(|f| matches!(f, Fix::Damaged { .. }));
        drop((recs, by_time, free, names, config, ovl, heads, tx));
        // Space accounting: what each snapshot holds alone, counted in the record pass above
        // (from sound rows only): the entries whose readers are exactly one live point. Two
        // snapshots at one point hold nothing alone.
        if sound {
            for (k, &e) in live.iter().enumerate() {
                let here: Vec<&crate::store::Snapshot> = self
                    .snaps
                    .live_at(e)
                    .iter()
                    .filter_map(|id| self.snaps.get(id))
                    .collect();
                let want = if here.len() == 1 { alone[k] } else { 0 };
                let wrong: Vec<&&crate::store::Snapshot> =
                    here.iter().filter(|s| s.exclusive_chunks != want).collect();
                for s in &wrong {
                    rep.corruption.push(format!(
                        "snapshot '{}' records {} exclusive chunks but holds {want}",
                        s.name, s.exclusive_chunks
                    ));
                }
                if !wrong.is_empty() {
                    rep.fixes.push(Fix::SetExclusive(e, alone[k]));
                }
            }
        } else {
            rep.notes.push(
                "space accounting was not verified: the damage above must be repaired first".into(),
            );
        }
        if data {
            self.check_data(&saved, &mut rep, progress)?;
        }
        Ok(rep)
    }

    /// The superblock and its backup copy: the store may have been opened with the backup.
    fn check_superblocks(&self, rep: &mut CheckReport) -> Result<()> {
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        self.dev
            .read_at(&mut b, 0)
            .map_err(|e| Error::io(format!("store {}: read", self.name), e))?;
        let primary = Superblock::decode(&b, &self.name);
        let backup = crate::store::read_backup_superblock(self.dev.as_ref(), &self.name);
        match (primary, backup) {
            (Err(_), _) => {
                rep.corruption.push(
                    "the superblock (the first 4 KiB) is damaged; the store was opened with its backup copy"
                        .into(),
                );
                rep.fixes.push(Fix::WritePrimary);
            }
            (Ok(_), Ok(None)) => {
                rep.notes.push(
                    "the store has no backup superblock (it was made before snapctl wrote one); `check --repair` writes it".into(),
                );
                rep.fixes.push(Fix::WriteBackup);
            }
            (Ok(p), Ok(Some(bk))) if p == bk => {}
            (Ok(_), Ok(Some(_))) => {
                rep.corruption
                    .push("the backup superblock differs from the superblock".into());
                rep.fixes.push(Fix::WriteBackup);
            }
            (Ok(_), Err(_)) => {
                rep.corruption
                    .push("the backup superblock (at 512 KiB) is damaged".into());
                rep.fixes.push(Fix::WriteBackup);
            }
        }
        Ok(())
    }

    /// Lost copies: named with the snapshots that may read them, and the fix that drops the
    /// row with those snapshots (`--drop-damaged`).
    fn report_damage(
        &self,
        rep: &mut CheckReport,
        row: DamagedRow,
        reason: String,
        points: &[u64],
    ) {
        rep.corruption.push(self.damage_line(&reason, points));
        rep.fixes.push(Fix::Damaged {
            row,
            snapshots: self.ids_at(points),
            reason,
        });
    }

    /// The valid snapshots of the origin's branch at these points.
    fn ids_at(&self, points: &[u64]) -> Vec<u64> {
        let mut ids: Vec<u64> = points
            .iter()
            .flat_map(|&e| self.snaps.live_at(e).iter().copied())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// "snapshots 'a', 'b': REASON; ..." naming who is affected and what repairs it.
    fn damage_line(&self, reason: &str, points: &[u64]) -> String {
        let names: Vec<&str> = self
            .ids_at(points)
            .iter()
            .filter_map(|id| self.snaps.get(id).map(|s| s.name.as_str()))
            .collect();
        if names.is_empty() {
            format!("{reason} (no snapshot reads it)")
        } else {
            format!(
                "{} '{}': {reason}; `check --repair --drop-damaged` marks {} invalid",
                if names.len() == 1 {
                    "snapshot"
                } else {
                    "snapshots"
                },
                names.join("', '"),
                if names.len() == 1 { "it" } else { "them" }
            )
        }
    }

    /// `check --data`: reads every saved chunk and verifies it against its hash; each chunk
    /// that fails is reported with the snapshots that read it and the byte range.
    pub(super) fn check_data(
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
            let reason = format!(
                "saved bytes {}..{} fail their checksum",
                d.offset,
                d.offset + d.length
            );
            if d.snapshots.is_empty() {
                // No view reads it: its record entry is a leak, dropped as one.
                rep.corruption
                    .push(format!("{reason} (no snapshot reads them)"));
                continue;
            }
            let s = if d.snapshots.len() == 1 { "" } else { "s" };
            rep.corruption.push(format!(
                "snapshot{s} '{}': {reason}; `check --repair --drop-damaged` marks {} invalid",
                d.snapshots.join("', '"),
                if d.snapshots.len() == 1 { "it" } else { "them" }
            ));
            rep.fixes.push(Fix::Damaged {
                row: DamagedRow::Data,
                snapshots: d
                    .snapshots
                    .iter()
                    .filter_map(|n| self.snaps.by_name(n).map(|s| s.id))
                    .collect(),
                reason,
            });
        }
        Ok(())
    }
}
