//! Which chunks differ between two views, from metadata alone.

use super::*;

impl Store {
    /// The epoch a view reads at: a valid snapshot's, or None for the live origin.
    pub(super) fn view_epoch(&self, name: &str) -> Result<Option<u64>> {
        if name == "origin" {
            return Ok(None);
        }
        let s = self.snapshot(name)?;
        if s.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{name}' is invalid and has no content to compare; delete it"
            )));
        }
        Ok(Some(s.epoch))
    }

    /// The chunks where views `from` and `to` may differ, from metadata alone: two points of
    /// the origin at epochs a < b read chunk c from different places exactly when c has a
    /// record with t in (a, b] (a write between them); the live origin counts as b = infinity.
    /// A chunk rewritten with the same bytes counts as changed. Cost: the records in that window.
    pub(crate) fn diff_chunks_inner(&self, from: &str, to: &str) -> Result<Vec<u64>> {
        let (a, b) = (self.view_epoch(from)?, self.view_epoch(to)?);
        // Chunks a snapshot's overlay holds may differ from anything: count them changed.
        let mut out = Vec::new();
        {
            let tx = self.rtx()?;
            let t = tx
                .open_table(OVERLAYS)
                .map_err(|e| meta_err(&self.name, e))?;
            for v in [from, to] {
                if v != "origin" {
                    let o = self.snapshot(v)?.overlay;
                    if o != 0 {
                        out.extend(self.overlay_chunks(&t, o)?.into_iter().map(|(c, _)| c));
                    }
                }
            }
        }
        let (lo, hi) = match (a, b) {
            (None, None) => return Ok(Vec::new()),
            (Some(x), None) | (None, Some(x)) => (x, u64::MAX),
            (Some(x), Some(y)) => (x.min(y), x.max(y)),
        };
        if lo == hi && out.is_empty() {
            return Ok(Vec::new());
        }
        let sn = &self.name;
        let tx = self.rtx()?;
        let by_time = tx.open_table(BY_TIME).map_err(|e| meta_err(sn, e))?;
        let recs = tx.open_table(RECORDS).map_err(|e| meta_err(sn, e))?;
        let hi = if lo == hi { lo } else { hi };
        for row in by_time
            .range((0u32, lo + 1, 0u64)..=(0u32, hi, u64::MAX))
            .map_err(|e| meta_err(sn, e))?
        {
            let (k, _) = row.map_err(|e| meta_err(sn, e))?;
            let (_, t, g) = k.value();
            let key = (0u32, g, t);
            let v = recs
                .get(key)
                .map_err(|e| meta_err(sn, e))?
                .ok_or_else(|| bad_record(sn, key))?;
            let rec = record_of(sn, key, v.value())?;
            out.extend(
                rec.entries
                    .iter()
                    .map(|en| g * GROUP_CHUNKS + en.off as u64),
            );
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|&c| c < self.sb.origin_chunks());
        Ok(out)
    }
}
