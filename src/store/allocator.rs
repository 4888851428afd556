//! The chunk allocator of the data area: lowest free first, as few extents as possible, with
//! a high-water mark and the used-chunk counter kept in the same commit.

use super::*;

impl Store {
    pub(super) fn used_chunks_inner(&self) -> Result<u64> {
        let tx = self.rtx()?;
        let c = tx.open_table(CONFIG).map_err(|e| meta_err(&self.name, e))?;
        get_u64(&c, K_USED, &self.name)
    }
}

impl Store {
    // ---- the chunk allocator (inside a write transaction)

    /// Allocates `n` data chunks, lowest free first, as few extents as possible. None: no room.
    pub(crate) fn alloc(
        &self,
        tx: &redb::WriteTransaction,
        n: u64,
    ) -> Result<Option<Vec<(u64, u64)>>> {
        let sn = &self.name;
        let mut free = tx.open_table(FREE).map_err(|e| meta_err(sn, e))?;
        let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let mut out = Vec::new();
        let mut need = n;
        let mut taken_free = Vec::new();
        {
            for row in free.iter().map_err(|e| meta_err(sn, e))? {
                if need == 0 {
                    break;
                }
                let (k, v) = row.map_err(|e| meta_err(sn, e))?;
                let (start, len) = (k.value(), v.value());
                let take = len.min(need);
                out.push((start, take));
                taken_free.push((start, len, take));
                need -= take;
            }
        }
        let hw = get_u64(&config, K_HIGH_WATER, sn)?;
        let fresh = need.min(self.sb.data_chunks - hw.min(self.sb.data_chunks));
        if fresh < need {
            return Ok(None);
        }
        for (start, len, take) in taken_free {
            free.remove(start).map_err(|e| meta_err(sn, e))?;
            if take < len {
                free.insert(start + take, len - take)
                    .map_err(|e| meta_err(sn, e))?;
            }
        }
        if fresh > 0 {
            out.push((hw, fresh));
            config
                .insert(K_HIGH_WATER, hw + fresh)
                .map_err(|e| meta_err(sn, e))?;
        }
        let used = get_u64(&config, K_USED, sn)?;
        config
            .insert(K_USED, used + n)
            .map_err(|e| meta_err(sn, e))?;
        Ok(Some(out))
    }

    /// Frees any set of chunks, in coalesced extents.
    pub(crate) fn free_chunk_list(
        &self,
        tx: &redb::WriteTransaction,
        mut locs: Vec<u64>,
    ) -> Result<()> {
        locs.sort_unstable();
        let mut i = 0;
        while i < locs.len() {
            let mut j = i + 1;
            while j < locs.len() && locs[j] == locs[j - 1] + 1 {
                j += 1;
            }
            self.free_chunks(tx, locs[i], (j - i) as u64)?;
            i = j;
        }
        Ok(())
    }

    /// Returns `n` chunks from `start` to the free list, merging with free neighbours.
    pub(crate) fn free_chunks(
        &self,
        tx: &redb::WriteTransaction,
        start: u64,
        n: u64,
    ) -> Result<()> {
        let sn = &self.name;
        let mut free = tx.open_table(FREE).map_err(|e| meta_err(sn, e))?;
        let (mut s, mut len) = (start, n);
        let prev = free
            .range(..start)
            .map_err(|e| meta_err(sn, e))?
            .next_back()
            .transpose()
            .map_err(|e| meta_err(sn, e))?
            .map(|(k, v)| (k.value(), v.value()));
        if let Some((ps, pl)) = prev {
            if ps + pl > start {
                return Err(Error::Corrupt(format!(
                    "{sn}: chunk {start} freed twice (the free list already holds it); run `snapctl check`"
                )));
            }
            if ps + pl == start {
                free.remove(ps).map_err(|e| meta_err(sn, e))?;
                s = ps;
                len += pl;
            }
        }
        let next = free
            .get(start + n)
            .map_err(|e| meta_err(sn, e))?
            .map(|v| v.value());
        if let Some(nl) = next {
            free.remove(start + n).map_err(|e| meta_err(sn, e))?;
            len += nl;
        }
        free.insert(s, len).map_err(|e| meta_err(sn, e))?;
        let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let used = get_u64(&config, K_USED, sn)?;
        config
            .insert(K_USED, used.saturating_sub(n))
            .map_err(|e| meta_err(sn, e))?;
        Ok(())
    }
}
