//! Reading any view: the record (or overlay) that holds each chunk, saved chunks read whole and
//! verified against their hashes, the rest from the origin.

use super::*;

impl Store {
    /// Reads `buf.len()` bytes at `off` of snapshot `name`, or of the live origin for "origin".
    pub(crate) fn read_view_inner(&self, name: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        self.read_batch_inner(&mut [ReadReq {
            view: name,
            off,
            buf,
        }])
    }

    /// Proves that overlay `id` is whole before anything is read from it: every record
    /// decodes and together they hold the `count` chunks its snapshot's record says. Once per
    /// overlay and process (this process's own writes keep it whole).
    pub(super) fn verify_overlay(
        &self,
        tx: &redb::ReadTransaction,
        view: &str,
        id: u32,
        count: u64,
    ) -> Result<()> {
        let sn = &self.name;
        if self
            .verified_overlays
            .lock()
            .map(|v| v.contains(&id))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let t = tx.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
        let have = self.overlay_chunks(&t, id)?.len() as u64;
        if have != count {
            return Err(Error::Corrupt(format!(
                "{sn}: snapshot '{view}' should hold {count} chunks of its own but its records hold {have}; run `snapctl check`"
            )));
        }
        if let Ok(mut v) = self.verified_overlays.lock() {
            v.insert(id);
        }
        Ok(())
    }

    /// Several reads of any views: each is mapped onto pieces of the origin or of saved
    /// chunks. Origin pieces go out as one batch; saved chunks are read whole, each once, and
    /// verified against its hash before a byte of it is copied out: a chunk that fails fails
    /// the read, naming the view and the byte range.
    ///
    /// Long on purpose: the read path of every view in one place (map, gather, read, verify,
    /// copy out), so that what is verified before a byte leaves is visible in one reading.
    pub(crate) fn read_batch_inner(&self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        let sn = &self.name;
        let cs = self.sb.chunk_size;
        let mut tx = None;
        // Per request: pieces in order.
        let mut plans: Vec<Vec<Piece>> = Vec::with_capacity(reqs.len());
        // Saved chunks to fetch: loc -> (hash, bytes, request index, origin chunk).
        let mut fetch: BTreeMap<u64, (crate::store::codec::ChunkHash, usize, usize, u64)> =
            BTreeMap::new();
        for (ri, r) in reqs.iter().enumerate() {
            self.check_origin_range(r.off, r.buf.len())?;
            if r.view == "origin" {
                plans.push(vec![Piece::Origin(r.off, r.buf.len())]);
                continue;
            }
            let snap = self.snapshot(r.view)?;
            if snap.state == SnapState::Invalid {
                return Err(Error::InvalidSnapshot(format!(
                    "snapshot '{}' is invalid ({}) and cannot be read; delete it",
                    r.view,
                    snap.invalid_reason.as_deref().unwrap_or("store full")
                )));
            }
            let e = snap.epoch;
            let overlay = snap.overlay;
            if tx.is_none() {
                tx = Some(self.rtx()?);
            }
            let Some(t) = tx.as_ref() else { continue };
            if overlay != 0 {
                self.verify_overlay(t, r.view, overlay, snap.overlay_chunks)?;
            }
            let recs = t.open_table(RECORDS).map_err(|e| meta_err(sn, e))?;
            let heads = t.open_table(HEADS).map_err(|e| meta_err(sn, e))?;
            let ovl = t.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?;
            let mut ovl_groups: HashMap<u64, Slots> = HashMap::new();
            let mut groups: HashMap<u64, std::sync::Arc<Slots>> = HashMap::new();
            let mut segs: Vec<Piece> = Vec::new();
            let mut pos = 0usize;
            while pos < r.buf.len() {
                let abs = r.off + pos as u64;
                let c = abs / cs;
                let within = (abs % cs) as usize;
                let n = (cs as usize - within).min(r.buf.len() - pos);
                let g = c / GROUP_CHUNKS;
                // The snapshot's own overlay first, then its point in time.
                let own = if overlay == 0 {
                    None
                } else {
                    let slots = match ovl_groups.entry(g) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            let mut slots = [None; GROUP_CHUNKS as usize];
                            let key = (overlay, g);
                            if let Some(val) = ovl.get(key).map_err(|e| meta_err(sn, e))? {
                                for en in overlay_of(sn, key, val.value())?.entries {
                                    slots[en.off as usize] = Some(en);
                                }
                            }
                            v.insert(slots)
                        }
                    };
                    slots[(c % GROUP_CHUNKS) as usize]
                };
                let found = match own {
                    Some(en) => Some(en),
                    None => {
                        let resolved = match groups.entry(g) {
                            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                match self.resolved.get(g, e) {
                                    Some(slots) => v.insert(slots),
                                    None => {
                                        let slots = std::sync::Arc::new(resolve_group(
                                            &recs, &heads, sn, g, e,
                                        )?);
                                        self.resolved.put(g, e, slots.clone());
                                        v.insert(slots)
                                    }
                                }
                            }
                        };
                        resolved[(c % GROUP_CHUNKS) as usize]
                    }
                };
                match found {
                    Some(en) if en.loc >= self.sb.data_chunks => {
                        return Err(Error::Corrupt(format!(
                            "{sn}: a record points outside the store; run `snapctl check`"
                        )))
                    }
                    Some(en) => {
                        fetch
                            .entry(en.loc)
                            .or_insert((en.hash, self.chunk_len(c), ri, c));
                        segs.push(Piece::Saved(en.loc, within, n));
                    }
                    None => match segs.last_mut() {
                        Some(Piece::Origin(o, l)) if *o + *l as u64 == abs && *l < 8 << 20 => {
                            *l += n
                        }
                        _ => segs.push(Piece::Origin(abs, n)),
                    },
                }
                pos += n;
            }
            plans.push(segs);
        }
        // Saved chunks: adjacent ones in one read, all in flight together.
        let mut spans: Vec<(u64, usize)> = Vec::new(); // (first loc, count)
        for &loc in fetch.keys() {
            match spans.last_mut() {
                Some((f, n)) if *f + *n as u64 == loc && *n < 256 => *n += 1,
                _ => spans.push((loc, 1)),
            }
        }
        let mut bufs: Vec<AlignedBuf> = spans
            .iter()
            .map(|(_, n)| AlignedBuf::new(n * cs as usize))
            .collect();
        {
            let mut store_reqs: Vec<(u64, &mut [u8])> = spans
                .iter()
                .zip(bufs.iter_mut())
                .map(|((f, _), b)| (self.sb.data_offset + f * cs, b.as_mut_slice()))
                .collect();
            self.dev
                .read_many(&mut store_reqs)
                .map_err(|e| Error::io(format!("store {sn}: read"), e))?;
        }
        let mut at: HashMap<u64, (usize, usize)> = HashMap::with_capacity(fetch.len());
        for (bi, (f, n)) in spans.iter().enumerate() {
            for i in 0..*n {
                let loc = f + i as u64;
                let (hash, len, ri, c) = fetch[&loc];
                let start = i * cs as usize;
                if chunk_hash(&bufs[bi].as_slice()[start..start + len]) != hash {
                    return Err(Error::Corrupt(format!(
                        "snapshot '{}': bytes {}..{} of {sn} fail their checksum (store chunk {loc}); run `snapctl check --data`",
                        reqs[ri].view,
                        c * cs,
                        c * cs + len as u64
                    )));
                }
                at.insert(loc, (bi, start));
            }
        }
        let mut origin_reqs: Vec<(u64, &mut [u8])> = Vec::new();
        for (r, segs) in reqs.iter_mut().zip(plans) {
            let mut rest = &mut r.buf[..];
            for piece in segs {
                let n = match piece {
                    Piece::Origin(_, n) | Piece::Saved(_, _, n) => n,
                };
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                match piece {
                    Piece::Origin(off, _) => origin_reqs.push((off, head)),
                    Piece::Saved(loc, within, n) => {
                        let (bi, start) = at[&loc];
                        head.copy_from_slice(
                            &bufs[bi].as_slice()[start + within..start + within + n],
                        );
                    }
                }
            }
        }
        self.origin
            .read_many(&mut origin_reqs)
            .map_err(|e| Error::io(format!("origin {}: read", self.sb.origin_path), e))
    }
}

impl Store {
    /// Reads saved chunks whole and verifies each against its hash; `what` names whose they
    /// are in the error.
    pub(super) fn read_saved(&self, items: &[(u64, Entry)], what: &str) -> Result<Vec<AlignedBuf>> {
        let cs = self.sb.chunk_size;
        let mut bufs: Vec<AlignedBuf> =
            items.iter().map(|_| AlignedBuf::new(cs as usize)).collect();
        {
            let mut reads: Vec<(u64, &mut [u8])> = items
                .iter()
                .zip(bufs.iter_mut())
                .map(|((_, en), b)| (self.sb.data_offset + en.loc * cs, b.as_mut_slice()))
                .collect();
            self.dev
                .read_many(&mut reads)
                .map_err(|e| Error::io(format!("store {}: read", self.name), e))?;
        }
        for ((c, en), b) in items.iter().zip(&bufs) {
            let len = self.chunk_len(*c);
            if chunk_hash(&b.as_slice()[..len]) != en.hash {
                return Err(Error::Corrupt(format!(
                    "{what}: bytes {}..{} of {} fail their checksum (store chunk {}); run `snapctl check --data`",
                    c * cs,
                    c * cs + len as u64,
                    self.name,
                    en.loc
                )));
            }
        }
        Ok(bufs)
    }
}
