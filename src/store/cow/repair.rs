//! `check --repair`: applies what `check` found mendable. One class of fix per pass, in a fixed
//! order (superblocks, indexes, damaged rows, the free list, unreadable entries, counters), each
//! pass one metadata commit and the store checked again before the next, so every fix is
//! computed from a state in which what it depends on is already sound. A crash between passes
//! leaves a store that is consistent as far as the passes went; running `--repair` again goes on.

use super::*;

/// At most this many passes; each applies at least one fix, and there are six classes.
const MAX_PASSES: usize = 12;

impl Store {
    /// Checks, repairs, and checks again until nothing mendable is left. Damaged rows that some
    /// snapshot reads are only dropped (those snapshots marked invalid) with `drop_damaged`.
    /// Returns the last check's report with `repaired` listing what was done.
    pub(crate) fn repair_inner(
        &mut self,
        data: bool,
        drop_damaged: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        let mut done: Vec<String> = Vec::new();
        for _ in 0..MAX_PASSES {
            let mut rep = self.check_inner(data, progress)?;
            let fixes = next_class(&rep.fixes, drop_damaged);
            if fixes.is_empty() {
                rep.repaired = done;
                return Ok(rep);
            }
            self.apply(&fixes, &mut done)?;
        }
        let mut rep = self.check_inner(data, progress)?;
        rep.repaired = done;
        rep.notes.push(format!(
            "repair stopped after {MAX_PASSES} passes; run `check --repair` again"
        ));
        Ok(rep)
    }

    fn apply(&mut self, fixes: &[Fix], done: &mut Vec<String>) -> Result<()> {
        let sn = self.name.clone();
        let werr = |e| Error::io(format!("store {sn}: write superblock"), e);
        match fixes.first() {
            Some(Fix::WritePrimary) => {
                self.dev.write_at(&self.sb.encode(), 0).map_err(werr)?;
                self.dev.flush().map_err(werr)?;
                done.push("rewrote the superblock from its backup copy".into());
            }
            Some(Fix::WriteBackup) => {
                crate::store::write_superblocks(self.dev.as_ref(), &self.sb).map_err(werr)?;
                self.dev.flush().map_err(werr)?;
                done.push("wrote the backup superblock".into());
            }
            Some(Fix::Damaged { .. }) => self.drop_damaged(fixes, done)?,
            Some(Fix::Reindex) => self.reindex(done)?,
            Some(Fix::RebuildFreeList) => self.rebuild_free_list(done)?,
            Some(Fix::DropEntries(..) | Fix::DropOverlay(_)) => self.drop_unread(fixes, done)?,
            Some(_) => self.recount(fixes, done)?,
            None => {}
        }
        Ok(())
    }

    /// Removes damaged rows and marks every snapshot that might read them invalid.
    fn drop_damaged(&mut self, fixes: &[Fix], done: &mut Vec<String>) -> Result<()> {
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let mut victims: Vec<(u64, String)> = Vec::new();
        {
            let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            let mut ovl = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
            // Vanished records first: the record after each (or the head) is relinked to the
            // one before, and a time index entry left behind goes.
            for f in fixes {
                let Fix::Damaged {
                    row:
                        DamagedRow::Missing {
                            group: (b, g),
                            t,
                            next,
                            prev,
                        },
                    ..
                } = f
                else {
                    continue;
                };
                let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
                by_time.remove((*b, *t, *g)).map_err(|e| meta_err(&sn, e))?;
                drop(by_time);
                if let Some(next) = next {
                    let found = match recs.get(*next).map_err(|e| meta_err(&sn, e))? {
                        Some(v) => Some(record_of(&sn, *next, v.value())?),
                        None => None,
                    };
                    let Some(mut r) = found else { continue };
                    r.prev = *prev;
                    put_record(&mut recs, &sn, *next, &r)?;
                } else {
                    let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
                    if *prev == 0 {
                        heads.remove((*b, *g)).map_err(|e| meta_err(&sn, e))?;
                    } else {
                        heads
                            .insert((*b, *g), *prev)
                            .map_err(|e| meta_err(&sn, e))?;
                    }
                }
            }
            // Damaged records, newest first, so each unlink finds a sound record after it.
            let mut bad: Vec<((u32, u64, u64), u64)> = fixes
                .iter()
                .filter_map(|f| match f {
                    Fix::Damaged {
                        row: DamagedRow::Record { key, prev },
                        ..
                    } => Some((*key, *prev)),
                    _ => None,
                })
                .collect();
            bad.sort_unstable_by_key(|&(k, _)| std::cmp::Reverse(k));
            for ((b, g, t), prev) in bad {
                recs.remove((b, g, t)).map_err(|e| meta_err(&sn, e))?;
                let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
                by_time.remove((b, t, g)).map_err(|e| meta_err(&sn, e))?;
                drop(by_time);
                self.unlink_record(&mut recs, &tx, g, t, prev)?;
            }
            for f in fixes {
                let Fix::Damaged {
                    row,
                    snapshots,
                    reason,
                } = f
                else {
                    continue;
                };
                if let DamagedRow::Overlay(k) = row {
                    ovl.remove(*k).map_err(|e| meta_err(&sn, e))?;
                }
                if let DamagedRow::Snapshot(id) = row {
                    let mut snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
                    snaps.remove(*id).map_err(|e| meta_err(&sn, e))?;
                    let mut names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
                    let gone: Vec<String> = names
                        .iter()
                        .map_err(|e| meta_err(&sn, e))?
                        .filter_map(|r| r.ok())
                        .filter(|(_, v)| v.value() == *id)
                        .map(|(k, _)| k.value().to_string())
                        .collect();
                    for n in &gone {
                        names.remove(n.as_str()).map_err(|e| meta_err(&sn, e))?;
                    }
                    let mut live = tx.open_table(LIVE).map_err(|e| meta_err(&sn, e))?;
                    let points: Vec<(u64, u64)> = live
                        .iter()
                        .map_err(|e| meta_err(&sn, e))?
                        .filter_map(|r| r.ok())
                        .map(|(k, _)| k.value())
                        .filter(|&(_, i)| i == *id)
                        .collect();
                    for p in points {
                        live.remove(p).map_err(|e| meta_err(&sn, e))?;
                    }
                    done.push(format!("removed snapshot id {id}: {reason}"));
                }
                for id in snapshots {
                    if !victims.iter().any(|(v, _)| v == id) {
                        victims.push((*id, reason.clone()));
                    }
                }
            }
            for f in fixes {
                if let Fix::Damaged {
                    row: DamagedRow::Record { .. } | DamagedRow::Missing { .. },
                    reason,
                    ..
                } = f
                {
                    done.push(format!("removed {}", reason.replace(" is damaged", "")));
                }
            }
        }
        for (id, reason) in victims {
            let Some(name) = self.snaps.get(&id).map(|s| s.name.clone()) else {
                continue;
            };
            self.drop_point(&tx, id, Some(format!("damaged: {reason}")))?;
            self.log_event(
                &tx,
                Event {
                    time: chrono::Utc::now().timestamp(),
                    action: "invalidated".into(),
                    snapshot: name.clone(),
                    reason: format!("check --repair --drop-damaged: {reason}"),
                },
            )?;
            done.push(format!("marked snapshot '{name}' invalid: {reason}"));
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.preserved.clear();
        Ok(())
    }

    /// The time index and the record heads from the record keys; the name index from the
    /// snapshots. Keys alone suffice, so a damaged record's key still counts.
    fn reindex(&mut self, done: &mut Vec<String>) -> Result<()> {
        let sn = self.name.clone();
        let tx = self.wtx()?;
        {
            let mut keys = Vec::new();
            {
                let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
                for row in recs.iter().map_err(|e| meta_err(&sn, e))? {
                    let (k, _) = row.map_err(|e| meta_err(&sn, e))?;
                    keys.push(k.value());
                }
            }
            // A head past a group's last record is the evidence that a record vanished (the
            // readers of its copies must be refused, never sent to the origin): it is kept
            // for `--drop-damaged` to settle.
            let mut old_heads: HashMap<(u32, u64), u64> = HashMap::new();
            {
                let heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
                for row in heads.iter().map_err(|e| meta_err(&sn, e))? {
                    let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
                    old_heads.insert(k.value(), v.value());
                }
            }
            tx.delete_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
            tx.delete_table(HEADS).map_err(|e| meta_err(&sn, e))?;
            tx.delete_table(NAMES).map_err(|e| meta_err(&sn, e))?;
            tx.delete_table(LIVE).map_err(|e| meta_err(&sn, e))?;
            let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
            let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(&sn, e))?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
            let mut live = tx.open_table(LIVE).map_err(|e| meta_err(&sn, e))?;
            for (i, &(b, g, t)) in keys.iter().enumerate() {
                by_time
                    .insert((b, t, g), ())
                    .map_err(|e| meta_err(&sn, e))?;
                // Keys come sorted: the last of each group is its head.
                if keys
                    .get(i + 1)
                    .is_none_or(|&(nb, ng, _)| (nb, ng) != (b, g))
                {
                    let h = old_heads.remove(&(b, g)).unwrap_or(0).max(t);
                    heads.insert((b, g), h).map_err(|e| meta_err(&sn, e))?;
                }
            }
            // Heads of groups with no record left: every record of the group vanished.
            for (k, h) in old_heads {
                heads.insert(k, h).map_err(|e| meta_err(&sn, e))?;
            }
            for s in self.snaps.values() {
                names
                    .insert(s.name.as_str(), s.id)
                    .map_err(|e| meta_err(&sn, e))?;
                if s.state == SnapState::Valid && s.branch == 0 {
                    live.insert((s.epoch, s.id), ())
                        .map_err(|e| meta_err(&sn, e))?;
                }
            }
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        done.push(
            "rebuilt the time index, the record heads, the name index and the live-point index"
                .into(),
        );
        Ok(())
    }

    /// The free list as every chunk below the high-water mark that no record or overlay owns
    /// (the high-water mark brought inside the store). Only applied when no damaged row is
    /// left: a damaged record's chunks are unknown and must not be handed out.
    fn rebuild_free_list(&mut self, done: &mut Vec<String>) -> Result<()> {
        let sn = self.name.clone();
        let n = self.sb.data_chunks;
        let tx = self.wtx()?;
        let mut owned = vec![false; 0];
        let (was, now) = {
            let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
            let hw = crate::store::metadata::get_u64(&config, K_HIGH_WATER, &sn)?.min(n);
            config
                .insert(K_HIGH_WATER, hw)
                .map_err(|e| meta_err(&sn, e))?;
            owned.resize(hw as usize, false);
            let mut mark = |loc: u64| {
                if let Some(b) = owned.get_mut(loc as usize) {
                    *b = true;
                }
            };
            let recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            for row in recs.iter().map_err(|e| meta_err(&sn, e))? {
                let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
                record_of(&sn, k.value(), v.value())?
                    .entries
                    .iter()
                    .for_each(|en| mark(en.loc));
            }
            let ovl = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
            for row in ovl.iter().map_err(|e| meta_err(&sn, e))? {
                let (k, v) = row.map_err(|e| meta_err(&sn, e))?;
                overlay_of(&sn, k.value(), v.value())?
                    .entries
                    .iter()
                    .for_each(|en| mark(en.loc));
            }
            let mut was = 0u64;
            {
                let free = tx.open_table(FREE).map_err(|e| meta_err(&sn, e))?;
                for row in free.iter().map_err(|e| meta_err(&sn, e))? {
                    let (_, v) = row.map_err(|e| meta_err(&sn, e))?;
                    was = was.saturating_add(v.value());
                }
            }
            tx.delete_table(FREE).map_err(|e| meta_err(&sn, e))?;
            let mut free = tx.open_table(FREE).map_err(|e| meta_err(&sn, e))?;
            let mut now = 0u64;
            let mut p = 0usize;
            while p < owned.len() {
                if owned[p] {
                    p += 1;
                    continue;
                }
                let s = p;
                while p < owned.len() && !owned[p] {
                    p += 1;
                }
                free.insert(s as u64, (p - s) as u64)
                    .map_err(|e| meta_err(&sn, e))?;
                now += (p - s) as u64;
            }
            (was, now)
        };
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        done.push(format!(
            "rebuilt the free list from the records: {now} chunks free below the high-water mark (the list held {was})"
        ));
        Ok(())
    }

    /// Drops record entries and overlays no view reads, freeing their chunks.
    fn drop_unread(&mut self, fixes: &[Fix], done: &mut Vec<String>) -> Result<()> {
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let mut freed = Vec::new();
        let mut entries = 0u64;
        {
            let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(&sn, e))?;
            for f in fixes {
                let Fix::DropEntries(key, offs) = f else {
                    continue;
                };
                let found = match recs.get(*key).map_err(|e| meta_err(&sn, e))? {
                    Some(v) => Some(record_of(&sn, *key, v.value())?),
                    None => None,
                };
                let Some(rec) = found else { continue };
                let (gone, kept): (Vec<Entry>, Vec<Entry>) =
                    rec.entries.iter().partition(|en| offs.contains(&en.off));
                entries += gone.len() as u64;
                freed.extend(gone.iter().map(|en| en.loc));
                let (b, g, t) = *key;
                if kept.is_empty() {
                    recs.remove(*key).map_err(|e| meta_err(&sn, e))?;
                    let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(&sn, e))?;
                    by_time.remove((b, t, g)).map_err(|e| meta_err(&sn, e))?;
                    drop(by_time);
                    self.unlink_record(&mut recs, &tx, g, t, rec.prev)?;
                } else {
                    let r = Record {
                        prev: rec.prev,
                        entries: kept,
                    };
                    put_record(&mut recs, &sn, *key, &r)?;
                }
            }
        }
        self.free_chunk_list(&tx, freed)?;
        if entries > 0 {
            done.push(format!(
                "dropped {entries} record entr{} no snapshot reads and freed their chunks",
                if entries == 1 { "y" } else { "ies" }
            ));
        }
        for f in fixes {
            if let Fix::DropOverlay(id) = f {
                let n = self.drop_overlay(&tx, *id)?;
                done.push(format!(
                    "dropped overlay {id}, which no snapshot owned, and freed its {n} chunks"
                ));
            }
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        Ok(())
    }

    /// Counters set to what they count.
    fn recount(&mut self, fixes: &[Fix], done: &mut Vec<String>) -> Result<()> {
        let sn = self.name.clone();
        let tx = self.wtx()?;
        for f in fixes {
            match f {
                Fix::SetUsed(n) => {
                    let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
                    c.insert(K_USED, *n).map_err(|e| meta_err(&sn, e))?;
                    done.push(format!("set the used-chunk counter to {n}"));
                }
                Fix::SetExclusive(e, n) => {
                    self.set_exclusive(&tx, *e, *n)?;
                    let names: Vec<String> = self
                        .snaps
                        .live_at(*e)
                        .iter()
                        .filter_map(|id| self.snaps.get(id).map(|s| s.name.clone()))
                        .collect();
                    done.push(format!(
                        "recounted the space held by snapshot '{}'",
                        names.join("', '")
                    ));
                }
                Fix::SetOverlayChunks(id, n) => {
                    if let Some(s) = self.snaps.update(id, |s| s.overlay_chunks = *n) {
                        put_snap(&tx, &s, &sn)?;
                        done.push(format!(
                            "recounted the overlay of snapshot '{}': {n} chunks",
                            s.name
                        ));
                    }
                }
                _ => {}
            }
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()
    }
}

/// The fixes of the first class that has any, in repair order. Damaged rows some snapshot
/// reads wait for `--drop-damaged`; while any damaged row is left, the free list is not
/// rebuilt (a damaged record's chunks are unknown and must not be handed out).
fn next_class(fixes: &[Fix], drop_damaged: bool) -> Vec<Fix> {
    let damaged_left = fixes.iter().any(|f| matches!(f, Fix::Damaged { .. }));
    // A snapshot whose row is damaged may still read what looks unread: nothing is freed.
    let snapshot_row_left = fixes.iter().any(|f| {
        matches!(
            f,
            Fix::Damaged {
                row: DamagedRow::Snapshot(_),
                ..
            }
        )
    }) && !drop_damaged;
    let pick =
        |p: &dyn Fn(&Fix) -> bool| -> Vec<Fix> { fixes.iter().filter(|f| p(f)).cloned().collect() };
    let classes: [Vec<Fix>; 6] = [
        pick(&|f| matches!(f, Fix::WritePrimary | Fix::WriteBackup)),
        pick(&|f| matches!(f, Fix::Reindex)),
        pick(&|f| match f {
            Fix::Damaged {
                row: DamagedRow::Snapshot(_),
                ..
            } => drop_damaged,
            Fix::Damaged { snapshots, .. } => drop_damaged || snapshots.is_empty(),
            _ => false,
        }),
        if damaged_left {
            Vec::new()
        } else {
            pick(&|f| matches!(f, Fix::RebuildFreeList))
        },
        if snapshot_row_left {
            Vec::new()
        } else {
            pick(&|f| matches!(f, Fix::DropEntries(..) | Fix::DropOverlay(_)))
        },
        pick(&|f| {
            matches!(
                f,
                Fix::SetUsed(_) | Fix::SetExclusive(..) | Fix::SetOverlayChunks(..)
            )
        }),
    ];
    let mut out = classes
        .into_iter()
        .find(|c| !c.is_empty())
        .unwrap_or_default();
    // One superblock write per pass.
    out.truncate(
        if matches!(out.first(), Some(Fix::WritePrimary | Fix::WriteBackup)) {
            1
        } else {
            out.len()
        },
    );
    out
}
