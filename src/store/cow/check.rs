//! `check`: every invariant of the exception store, and with `--data` every saved chunk
//! verified against its hash.

use super::*;

impl Store {
    /// Verifies the metadata engine's checksums and every invariant of the exception store.
    ///
    /// Long on purpose: one read transaction and one pass over each table, every check
    /// feeding the same ownership bitmap and counters; the passes are marked in order
    /// (config, records and chains, overlays, snapshots, free list, accounting).
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
        // Free space is the free list plus the chunks never handed out yet.
        rep.free_chunks += data_chunks.saturating_sub(hw);
        rep.high_water_chunks = hw;
        // Overlays: each chunk owned once, each overlay owned by one snapshot with the right count.
        // The row naming the newest unflushed copies must decode (it is read after a crash).
        match tx.open_table(PENDING) {
            Ok(t) => {
                if let Some(v) = t.get(0).map_err(|e| meta_err(&sn, e))? {
                    if decode_pending(v.value()).is_none() {
                        rep.corruption
                            .push("the pending_copies row fails its row check".to_string());
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(meta_err(&sn, e)),
        }
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
