//! Writable snapshots: the overlay that holds what a writable snapshot wrote, copied for a
//! snapshot of it, written copy-on-write inside itself.

use super::*;

impl Store {
    /// Every (chunk, entry) an overlay holds.
    pub(super) fn overlay_chunks<T: ReadableTable<(u32, u64), &'static [u8]>>(
        &self,
        t: &T,
        id: u32,
    ) -> Result<Vec<(u64, Entry)>> {
        let sn = &self.name;
        let mut out = Vec::new();
        for row in t
            .range((id, 0u64)..=(id, u64::MAX))
            .map_err(|e| meta_err(sn, e))?
        {
            let (k, v) = row.map_err(|e| meta_err(sn, e))?;
            let (_, g) = k.value();
            let rec = overlay_of(sn, k.value(), v.value())?;
            out.extend(
                rec.entries
                    .iter()
                    .map(|en| (g * GROUP_CHUNKS + en.off as u64, *en)),
            );
        }
        Ok(out)
    }

    /// Adds (chunk, entry) pairs to an overlay, replacing the entries of chunks it already
    /// holds; returns the store chunks those replaced entries pointed at.
    pub(super) fn overlay_insert(
        &self,
        tx: &redb::WriteTransaction,
        id: u32,
        items: &[(u64, Entry)],
    ) -> Result<Vec<u64>> {
        let sn = &self.name;
        let mut t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
        let mut groups: BTreeMap<u64, Vec<Entry>> = BTreeMap::new();
        for &(c, en) in items {
            groups.entry(c / GROUP_CHUNKS).or_default().push(en);
        }
        let mut replaced = Vec::new();
        for (g, list) in groups {
            let key = (id, g);
            let mut rec = match t.get(key).map_err(|e| meta_err(sn, e))? {
                Some(v) => overlay_of(sn, key, v.value())?,
                None => Record::default(),
            };
            for en in list {
                if let Some(old) = rec.find(en.off as u64) {
                    replaced.push(old.loc);
                }
                rec.put(en);
            }
            put_overlay(&mut t, sn, key, &rec)?;
        }
        Ok(replaced)
    }
}

impl Store {
    /// Copies overlay `src` into the new overlay `dst` (data and map); returns the chunk count.
    /// Every chunk is verified as it is read; the copies are durable before the transaction
    /// that names them commits.
    pub(crate) fn copy_overlay(
        &self,
        tx: &redb::WriteTransaction,
        src: u32,
        dst: u32,
        src_name: &str,
    ) -> Result<u64> {
        let sn = self.name.clone();
        let items = {
            let t = tx.open_table(OVERLAYS).map_err(|e| meta_err(&sn, e))?;
            self.overlay_chunks(&t, src)?
        };
        if items.is_empty() {
            return Ok(0);
        }
        let Some(extents) = self.alloc(tx, items.len() as u64)? else {
            return Err(Error::NoSpace(format!(
                "store {sn} has no room to copy the {} chunks the snapshot's overlay holds",
                items.len()
            )));
        };
        let locs: Vec<u64> = extents.iter().flat_map(|(s, n)| *s..*s + *n).collect();
        let cs = self.sb.chunk_size as usize;
        let mut copies = Vec::with_capacity(items.len());
        for (part, lparts) in items.chunks(256).zip(locs.chunks(256)) {
            let bufs = self.read_saved(part, &format!("snapshot '{src_name}'"))?;
            let writes: Vec<(u64, &[u8])> = lparts
                .iter()
                .zip(&bufs)
                .map(|(p, b)| (self.sb.data_offset + p * cs as u64, b.as_slice()))
                .collect();
            self.write_durable(&writes)?;
            for ((c, en), p) in part.iter().zip(lparts) {
                copies.push((*c, Entry { loc: *p, ..*en }));
            }
        }
        self.overlay_insert(tx, dst, &copies)?;
        Ok(items.len() as u64)
    }

    /// Frees an overlay's chunks and entries; returns the count.
    pub(super) fn drop_overlay(&self, tx: &redb::WriteTransaction, id: u32) -> Result<u64> {
        let sn = &self.name;
        let items = {
            let t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
            self.overlay_chunks(&t, id)?
        };
        {
            let mut t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
            let groups: Vec<u64> = {
                let mut g: Vec<u64> = items.iter().map(|(c, _)| c / GROUP_CHUNKS).collect();
                g.dedup();
                g
            };
            for g in groups {
                t.remove((id, g)).map_err(|e| meta_err(sn, e))?;
            }
        }
        self.free_chunk_list(tx, items.iter().map(|(_, en)| en.loc).collect())?;
        Ok(items.len() as u64)
    }

    /// Writes into a writable snapshot, copy-on-write inside its overlay: each chunk the writes
    /// touch is read as the snapshot sees it now (verified), the writes are applied, and the
    /// result goes to a fresh store chunk with its hash; one commit then points the overlay at
    /// the new chunks and frees the ones they replace. A crash leaves every chunk either as it
    /// was or as written, and every chunk always matches its hash. Durable on return.
    pub(crate) fn write_overlay_inner(
        &mut self,
        name: &str,
        writes: &[(u64, &[u8])],
        _fua: bool,
    ) -> Result<()> {
        let snap = self.snapshot(name)?.clone();
        if !snap.writable || snap.overlay == 0 {
            return Err(Error::Invalid(format!(
                "snapshot '{name}' is read-only; `snapctl set-writable {name}` makes it writable"
            )));
        }
        if snap.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{name}' is invalid"
            )));
        }
        let cs = self.sb.chunk_size;
        let sn = self.name.clone();
        let mut chunks = Vec::new();
        for (off, data) in writes {
            self.check_origin_range(*off, data.len())?;
            if !data.is_empty() {
                chunks.extend(off / cs..=(off + data.len() as u64 - 1) / cs);
            }
        }
        chunks.sort_unstable();
        chunks.dedup();
        if chunks.is_empty() {
            return Ok(());
        }
        // What the snapshot reads in those chunks now, verified.
        let mut bufs: Vec<AlignedBuf> = chunks
            .iter()
            .map(|_| AlignedBuf::new(cs as usize))
            .collect();
        {
            let mut reqs: Vec<ReadReq> = chunks
                .iter()
                .zip(bufs.iter_mut())
                .map(|(c, b)| ReadReq {
                    view: name,
                    off: c * cs,
                    buf: &mut b.as_mut_slice()[..self.chunk_len(*c)],
                })
                .collect();
            self.read_batch_inner(&mut reqs)?;
        }
        // Apply the writes in order.
        for (off, data) in writes {
            let mut pos = 0usize;
            while pos < data.len() {
                let abs = off + pos as u64;
                let (c, within) = (abs / cs, (abs % cs) as usize);
                let n = (cs as usize - within).min(data.len() - pos);
                let i = chunks.binary_search(&c).map_err(|_| {
                    Error::Corrupt(format!("{sn}: lost track of chunk {c} of a write"))
                })?;
                bufs[i].as_mut_slice()[within..within + n].copy_from_slice(&data[pos..pos + n]);
                pos += n;
            }
        }
        let tx = self.wtx()?;
        let Some(extents) = self.alloc(&tx, chunks.len() as u64)? else {
            return Err(Error::NoSpace(format!(
                "store {sn} is full: no room for what writable snapshot '{name}' writes; delete snapshots to make room"
            )));
        };
        let locs: Vec<u64> = extents.iter().flat_map(|(s, n)| *s..*s + *n).collect();
        let fills: Vec<(u64, &[u8])> = locs
            .iter()
            .zip(&bufs)
            .map(|(p, b)| (self.sb.data_offset + p * cs, b.as_slice()))
            .collect();
        self.write_durable(&fills)?;
        let items: Vec<(u64, Entry)> = chunks
            .iter()
            .zip(&locs)
            .zip(&bufs)
            .map(|((c, p), b)| {
                (
                    *c,
                    Entry {
                        off: (c % GROUP_CHUNKS) as u16,
                        loc: *p,
                        hash: chunk_hash(&b.as_slice()[..self.chunk_len(*c)]),
                    },
                )
            })
            .collect();
        let replaced = self.overlay_insert(&tx, snap.overlay, &items)?;
        let added = chunks.len() as u64 - replaced.len() as u64;
        self.free_chunk_list(&tx, replaced)?;
        let mut s2 = snap.clone();
        s2.overlay_chunks += added;
        put_snap(&tx, &s2, &sn)?;
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.snaps.insert(s2.id, s2);
        Ok(())
    }
}
