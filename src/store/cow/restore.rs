//! Restore: the origin made identical to a snapshot, resumable after a crash.

use super::*;

impl Store {
    pub(crate) fn restore_pending(&self) -> Result<bool> {
        Ok(self.restore_intent()?.is_some())
    }

    /// The committed restore intent: (target id, backup id or 0).
    pub(crate) fn restore_intent(&self) -> Result<Option<(u64, u64)>> {
        let tx = self.rtx()?;
        let c = tx.open_table(CONFIG).map_err(|e| meta_err(&self.name, e))?;
        let get = |k: &str| -> Result<Option<u64>> {
            Ok(c.get(k)
                .map_err(|e| meta_err(&self.name, e))?
                .map(|v| v.value()))
        };
        Ok(match get(K_RESTORE_TARGET)? {
            Some(t) => Some((t, get(K_RESTORE_BACKUP)?.unwrap_or(0))),
            None => None,
        })
    }

    /// How many copies restoring `target_id` will make: every chunk that differs, when a backup
    /// snapshot of the origin is taken first; else those not already saved since the newest
    /// live snapshot.
    fn restore_copies(&self, target_id: u64, backup: bool) -> Result<u64> {
        let target = match self.snaps.get(&target_id) {
            Some(s) => s.name.clone(),
            None => return Err(Error::NotFound(format!("snapshot id {target_id}"))),
        };
        let chunks = self.diff_chunks_inner(&target, "origin")?;
        if backup {
            return Ok(chunks.len() as u64);
        }
        let Some(newest) = self.newest_epochs().0 else {
            return Ok(0);
        };
        let tx = self.rtx()?;
        let recs = tx
            .open_table(RECORDS)
            .map_err(|e| meta_err(&self.name, e))?;
        let mut n = 0;
        for c in chunks {
            if find_cover(&recs, &self.name, 0, c, newest + 1, u64::MAX)?.is_none() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Makes room for every copy a restore will make, before anything changes: the on-full
    /// policy is applied now (never to the target), or, under fail-writes or with no victim
    /// left, the restore is refused. Without this a full store failed the restore half way,
    /// its intent committed, and every later open resumed it and failed again.
    fn make_room_for_restore(&mut self, target_id: u64, backup: bool) -> Result<()> {
        loop {
            let need = self.restore_copies(target_id, backup)?;
            let free = self
                .sb
                .data_chunks
                .saturating_sub(self.used_chunks_inner()?);
            if need <= free {
                return Ok(());
            }
            let short = |policy: &str| {
                Error::NoSpace(format!(
                    "store {} has room for {free} chunk copies but this restore needs {need} (the on-full policy is {policy}); delete snapshots to make room, or restore without --backup if one was asked",
                    self.name
                ))
            };
            if self.sb.on_full == OnFull::FailWrites {
                return Err(short("fail-writes"));
            }
            let victims = self
                .snaps
                .values()
                .filter(|s| s.state == SnapState::Valid && s.id != target_id)
                .count();
            if victims == 0 {
                return Err(short(self.sb.on_full.name()));
            }
            self.apply_full_policy(&[target_id])?;
        }
    }

    /// Makes the origin identical to snapshot `target`, writing only the chunks that differ,
    /// through the copy-on-write path, so every other snapshot stays exact. With `backup`, a
    /// snapshot of the current origin is taken first under that name, so the restore can be
    /// undone. The intent is committed before the first write and cleared after the last: after
    /// a crash, opening the store finishes the restore (rewriting a chunk with the bytes it
    /// should hold is harmless). Returns the bytes written.
    pub(crate) fn restore_inner(
        &mut self,
        target: &str,
        backup: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        self.view_epoch(target)?;
        let target_id = self.snapshot(target)?.id;
        if let Some(b) = backup {
            crate::names::validate(b)?;
            if self.snaps.by_name(b).is_some() {
                return Err(Error::Exists(format!(
                    "a snapshot named '{b}' already exists"
                )));
            }
        }
        self.make_room_for_restore(target_id, backup.is_some())?;
        let backup_id = match backup {
            Some(b) => {
                let mut labels = std::collections::BTreeMap::new();
                labels.insert("restore-of".to_string(), target.to_string());
                self.create(b, None, labels, None)?.id
            }
            None => 0,
        };
        // The origin as it stands is what a crash before the intent leaves: make it durable.
        self.flush()?;
        self.set_restore_intent(Some((target_id, backup_id)))?;
        let written = self.run_restore(target_id, progress)?;
        self.set_restore_intent(None)?;
        Ok(written)
    }

    pub(super) fn set_restore_intent(&mut self, intent: Option<(u64, u64)>) -> Result<()> {
        let tx = self.wtx()?;
        let sn = self.name.clone();
        {
            let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
            match intent {
                Some((t, b)) => {
                    c.insert(K_RESTORE_TARGET, t)
                        .map_err(|e| meta_err(&sn, e))?;
                    c.insert(K_RESTORE_BACKUP, b)
                        .map_err(|e| meta_err(&sn, e))?;
                }
                None => {
                    c.remove(K_RESTORE_TARGET).map_err(|e| meta_err(&sn, e))?;
                    c.remove(K_RESTORE_BACKUP).map_err(|e| meta_err(&sn, e))?;
                }
            }
        }
        tx.commit().map_err(|e| meta_err(&sn, e))
    }

    /// Finishes a restore that a crash interrupted.
    pub(crate) fn resume_restore(&mut self) -> Result<()> {
        let target = {
            let tx = self.rtx()?;
            let c = tx.open_table(CONFIG).map_err(|e| meta_err(&self.name, e))?;
            c.get(K_RESTORE_TARGET)
                .map_err(|e| meta_err(&self.name, e))?
                .map(|v| v.value())
        };
        let Some(id) = target else { return Ok(()) };
        let name = self.snaps.get(&id).map(|s| s.name.clone());
        if let Some(n) = &name {
            self.run_restore(id, &mut |_, _| {})?;
            self.log_restore_resumed(n)?;
        }
        self.set_restore_intent(None)?;
        self.resumed_restore = name;
        Ok(())
    }

    pub(super) fn log_restore_resumed(&mut self, target: &str) -> Result<()> {
        let tx = self.wtx()?;
        self.log_event(
            &tx,
            Event {
                time: chrono::Utc::now().timestamp(),
                action: "restored".into(),
                snapshot: target.to_string(),
                reason: "finished a restore that was interrupted".into(),
            },
        )?;
        tx.commit().map_err(|e| meta_err(&self.name, e))
    }

    /// The restore loop: copy the target's content of every chunk that differs into the origin,
    /// in batches, through the copy-on-write write path; then flush.
    pub(super) fn run_restore(
        &mut self,
        target_id: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let target = self
            .snaps
            .get(&target_id)
            .map(|s| s.name.clone())
            .ok_or_else(|| Error::NotFound(format!("snapshot id {target_id}")))?;
        let chunks = self.diff_chunks_inner(&target, "origin")?;
        let cs = self.sb.chunk_size;
        let size = self.sb.origin_size;
        let total = chunks.len() as u64 * cs;
        let mut done = 0u64;
        let mut written = 0u64;
        for batch in chunks.chunks((4 << 20) / cs as usize + 1) {
            // merge adjacent chunks into ranges
            let mut ranges: Vec<(u64, usize)> = Vec::new();
            for &c in batch {
                let off = c * cs;
                let len = cs.min(size - off) as usize;
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l as u64 == off => *l += len,
                    _ => ranges.push((off, len)),
                }
            }
            let mut bufs: Vec<AlignedBuf> =
                ranges.iter().map(|(_, l)| AlignedBuf::new(*l)).collect();
            {
                let mut reqs: Vec<ReadReq> = ranges
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|((o, _), b)| ReadReq {
                        view: &target,
                        off: *o,
                        buf: b.as_mut_slice(),
                    })
                    .collect();
                self.read_batch_inner(&mut reqs)?;
            }
            let writes: Vec<(u64, &[u8])> = ranges
                .iter()
                .zip(&bufs)
                .map(|((o, _), b)| (*o, b.as_slice()))
                .collect();
            self.write_batch_inner(&writes, false)?;
            written += ranges.iter().map(|(_, l)| *l as u64).sum::<u64>();
            done += batch.len() as u64 * cs;
            progress(done.min(total), total);
        }
        self.flush()?;
        Ok(written)
    }
}
