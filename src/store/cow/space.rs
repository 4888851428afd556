//! When space runs out or a snapshot goes: the on-full policy, dropping a snapshot's point in
//! time, exclusive-space accounting, and unlinking records no view reads any more.

use super::*;

impl Store {
    /// The store is full: apply the policy in a commit of its own (never in the transaction
    /// that will reuse the freed chunks: a crash before that one commits must leave the
    /// snapshots that still own those chunks intact).
    ///
    /// The target of a restore and its backup are never the victim (`protect`, and the ones a
    /// committed restore intent names): dropping the target mid-restore would leave the origin
    /// half restored with nothing to finish it from.
    pub(super) fn apply_full_policy(&mut self, protect: &[u64]) -> Result<()> {
        let policy = self.sb.on_full;
        let mut protect = protect.to_vec();
        protect.extend(self.restore_intent()?.into_iter().flat_map(|(t, b)| [t, b]));
        let valid: Vec<(u64, u64, String)> = {
            let mut v: Vec<_> = self
                .snaps
                .values()
                .filter(|s| s.state == SnapState::Valid && !protect.contains(&s.id))
                .map(|s| (s.epoch, s.id, s.name.clone()))
                .collect();
            v.sort();
            v
        };
        let victim = match policy {
            OnFull::FailWrites => None,
            OnFull::DropOldest => valid.first().cloned(),
            // The newest snapshot always needs the copy: invalidate from the newest down.
            OnFull::Invalidate => valid.last().cloned(),
        };
        let Some((_, id, name)) = victim else {
            return Err(Error::NoSpace(format!(
                "store {} is full: an origin write needs a copy for the snapshots, and the on-full policy is {}; delete snapshots to make room",
                self.name,
                policy.name()
            )));
        };
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let (action, invalid) = match policy {
            OnFull::Invalidate => ("invalidated", Some("the store filled up".to_string())),
            _ => ("deleted", None),
        };
        self.drop_point(&tx, id, invalid)?;
        self.log_event(
            &tx,
            Event {
                time: chrono::Utc::now().timestamp(),
                action: action.into(),
                snapshot: name,
                reason: format!("store full (on-full policy {})", policy.name()),
            },
        )?;
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.preserved.clear();
        Ok(())
    }

    /// Removes snapshot `id` from its branch's live points and frees what only it held. With
    /// `invalid`, the snapshot stays listed as invalid (and refuses reads); else it is deleted.
    /// Returns the number of chunks freed. Cost: the records in its own window.
    pub(crate) fn drop_point(
        &mut self,
        tx: &redb::WriteTransaction,
        id: u64,
        invalid: Option<String>,
    ) -> Result<u64> {
        let sn = self.name.clone();
        let Some(snap) = self.snaps.get(&id).cloned() else {
            return Err(Error::NotFound(format!("snapshot id {id}")));
        };
        // A catalog read on demand holds what the window arithmetic below asks: the other
        // snapshots at this point and at the two live points on either side.
        self.fetch_live_around(tx, &snap)?;
        // Forget it in memory first, so live_epochs() below is "the others".
        let was_valid = snap.state == SnapState::Valid;
        match &invalid {
            Some(reason) => {
                let mut s = snap.clone();
                s.state = SnapState::Invalid;
                s.invalid_reason = Some(reason.clone());
                s.exclusive_chunks = 0;
                put_snap(tx, &s, &sn)?;
                self.snaps.insert(id, s);
            }
            None => {
                self.snaps.remove(&id);
                remove_snap(tx, &snap, &sn)?;
            }
        }
        if !was_valid {
            return Ok(0); // an invalid snapshot holds nothing
        }
        let overlay_freed = if snap.overlay != 0 {
            self.drop_overlay(tx, snap.overlay)?
        } else {
            0
        };
        if invalid.is_some() {
            if let Some(s) = self.snaps.update(&id, |s| s.overlay_chunks = 0) {
                put_snap(tx, &s, &sn)?;
            }
        }
        let e = snap.epoch;
        let live = self.live_epochs();
        if live.contains(&e) {
            // Another snapshot at the same point keeps everything; if it is now the only one
            // there, it holds the point's window alone.
            let k = live.partition_point(|&x| x < e);
            let prev = k.checked_sub(1).map(|i| live[i]);
            let next = live.get(k + 1).copied().unwrap_or(self.epoch);
            let n = self.window(tx, prev, e, next, false)?;
            self.set_exclusive(tx, e, n)?;
            return Ok(overlay_freed);
        }
        let k = live.partition_point(|&x| x < e);
        let e_prev = k.checked_sub(1).map(|i| live[i]);
        let e_next = live.get(k).copied();
        let hi = e_next.unwrap_or(self.epoch);
        let freed = self.window(tx, e_prev, e, hi, true)?;
        // The neighbours' windows changed: recompute what each holds alone.
        if let Some(p) = e_prev {
            let pp = k.checked_sub(2).map(|i| live[i]);
            let n = self.window(tx, pp, p, hi, false)?;
            self.set_exclusive(tx, p, n)?;
        }
        if let Some(nx) = e_next {
            let nn = live.get(k + 1).copied().unwrap_or(self.epoch);
            let n = self.window(tx, e_prev, nx, nn, false)?;
            self.set_exclusive(tx, nx, n)?;
        }
        Ok(freed + overlay_freed)
    }

    pub(crate) fn set_exclusive(
        &mut self,
        tx: &redb::WriteTransaction,
        epoch: u64,
        n: u64,
    ) -> Result<()> {
        let ids: Vec<u64> = self.snaps.live_at(epoch).to_vec();
        let n = if ids.len() == 1 { n } else { 0 };
        for id in ids {
            if self.snaps.get(&id).is_some_and(|s| s.exclusive_chunks != n) {
                if let Some(s) = self.snaps.update(&id, |s| s.exclusive_chunks = n) {
                    put_snap(tx, &s, &self.name)?;
                }
            }
        }
        Ok(())
    }

    /// The chunks held by the snapshot at `e` alone: records with t in (e, hi] whose previous
    /// record for the same chunk is newer than `e_prev` (or with no earlier snapshot at all).
    /// With `free`, they are removed and their store chunks freed. Returns their count.
    pub(super) fn window(
        &self,
        tx: &redb::WriteTransaction,
        e_prev: Option<u64>,
        e: u64,
        hi: u64,
        free: bool,
    ) -> Result<u64> {
        let sn = &self.name;
        let keys: Vec<(u64, u64)> = {
            let by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(sn, e))?;
            let mut v = Vec::new();
            for row in by_time
                .range((0u32, e + 1, 0u64)..=(0u32, hi, u64::MAX))
                .map_err(|e| meta_err(sn, e))?
            {
                let (k, _) = row.map_err(|e| meta_err(sn, e))?;
                let (_, t, g) = k.value();
                v.push((t, g));
            }
            v
        };
        let mut count = 0;
        let mut to_free = Vec::new();
        for (t, g) in keys {
            let key = (0u32, g, t);
            let mut recs = tx.open_table(RECORDS).map_err(|e| meta_err(sn, e))?;
            let rec = match recs.get(key).map_err(|e| meta_err(sn, e))? {
                Some(v) => record_of(sn, key, v.value())?,
                None => {
                    return Err(Error::Corrupt(format!(
                        "{sn}: time index names a missing record {key:?}; run `snapctl check`"
                    )))
                }
            };
            let mut kept = Record {
                prev: rec.prev,
                entries: Vec::new(),
            };
            for en in &rec.entries {
                let c = g * GROUP_CHUNKS + en.off as u64;
                let alone = match e_prev {
                    None => true,
                    Some(ep) => find_cover(&recs, sn, 0, c, ep + 1, t - 1)?.is_some(),
                };
                if alone {
                    count += 1;
                    if free {
                        to_free.push(en.loc);
                        continue;
                    }
                }
                if free {
                    kept.entries.push(*en);
                }
            }
            if free && kept != rec {
                if kept.entries.is_empty() {
                    recs.remove(key).map_err(|e| meta_err(sn, e))?;
                    let mut by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(sn, e))?;
                    by_time.remove((0u32, t, g)).map_err(|e| meta_err(sn, e))?;
                    self.unlink_record(&mut recs, tx, g, t, rec.prev)?;
                } else {
                    put_record(&mut recs, sn, key, &kept)?;
                }
            }
        }
        self.free_chunk_list(tx, to_free)?;
        Ok(count)
    }

    /// Keeps group `g`'s record chain whole after its record at `t` (whose `prev` was `prev`)
    /// was removed: the next record takes over `prev`, or the head moves back.
    pub(super) fn unlink_record(
        &self,
        recs: &mut redb::Table<(u32, u64, u64), &'static [u8]>,
        tx: &redb::WriteTransaction,
        g: u64,
        t: u64,
        prev: u64,
    ) -> Result<()> {
        let sn = &self.name;
        let next = match recs
            .range((0u32, g, t + 1)..=(0u32, g, u64::MAX))
            .map_err(|e| meta_err(sn, e))?
            .next()
        {
            Some(row) => {
                let (k, v) = row.map_err(|e| meta_err(sn, e))?;
                Some((k.value(), record_of(sn, k.value(), v.value())?))
            }
            None => None,
        };
        match next {
            Some((k, mut r)) => {
                r.prev = prev;
                put_record(recs, sn, k, &r)?;
            }
            None => {
                let mut heads = tx.open_table(HEADS).map_err(|e| meta_err(sn, e))?;
                if prev == 0 {
                    heads.remove((0u32, g)).map_err(|e| meta_err(sn, e))?;
                } else {
                    heads.insert((0u32, g), prev).map_err(|e| meta_err(sn, e))?;
                }
            }
        }
        Ok(())
    }
}
