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
        let _read = crate::profile::span(crate::profile::Phase::Read);
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
            if tx.is_none() {
                tx = Some(self.rtx()?);
            }
            let Some(t) = tx.as_ref() else { continue };
            let mut loc = Locator::new(self, t, r.view, snap)?;
            let mut segs: Vec<Piece> = Vec::new();
            let mut pos = 0usize;
            while pos < r.buf.len() {
                let abs = r.off + pos as u64;
                let c = abs / cs;
                let within = (abs % cs) as usize;
                let n = (cs as usize - within).min(r.buf.len() - pos);
                let found = loc.entry(c)?;
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
    /// Reads saved chunks whole, as they are on disk (not verified: callers check the hash).
    pub(crate) fn read_chunks_unverified(&self, items: &[(u64, Entry)]) -> Result<Vec<AlignedBuf>> {
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
        Ok(bufs)
    }

    /// Reads saved chunks whole and verifies each against its hash; `what` names whose they
    /// are in the error.
    pub(super) fn read_saved(&self, items: &[(u64, Entry)], what: &str) -> Result<Vec<AlignedBuf>> {
        let cs = self.sb.chunk_size;
        let bufs = self.read_chunks_unverified(items)?;
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

/// Where each chunk of one snapshot lives: its own overlay first (a writable snapshot's
/// writes), then the record that saved it for its point in time; `None` is the origin. Groups
/// are looked up once per locator and resolved groups shared through the store's cache.
pub(super) struct Locator<'s> {
    store: &'s Store,
    epoch: u64,
    overlay: u32,
    recs: redb::ReadOnlyTable<(u32, u64, u64), &'static [u8]>,
    heads: redb::ReadOnlyTable<(u32, u64), u64>,
    ovl: redb::ReadOnlyTable<(u32, u64), &'static [u8]>,
    ovl_groups: HashMap<u64, Slots>,
    groups: HashMap<u64, std::sync::Arc<Slots>>,
}

impl<'s> Locator<'s> {
    pub(super) fn new(
        store: &'s Store,
        t: &redb::ReadTransaction,
        view: &str,
        snap: &crate::store::Snapshot,
    ) -> Result<Self> {
        let sn = &store.name;
        if snap.overlay != 0 {
            store.verify_overlay(t, view, snap.overlay, snap.overlay_chunks)?;
        }
        Ok(Locator {
            store,
            epoch: snap.epoch,
            overlay: snap.overlay,
            recs: t.open_table(RECORDS).map_err(|e| meta_err(sn, e))?,
            heads: t.open_table(HEADS).map_err(|e| meta_err(sn, e))?,
            ovl: t.open_table(OVERLAYS).map_err(|e| meta_err(sn, e))?,
            ovl_groups: HashMap::new(),
            groups: HashMap::new(),
        })
    }

    /// The saved copy that holds origin chunk `c` for this view, or `None` for the origin.
    pub(super) fn entry(&mut self, c: u64) -> Result<Option<Entry>> {
        let sn = &self.store.name;
        let g = c / GROUP_CHUNKS;
        let i = (c % GROUP_CHUNKS) as usize;
        if self.overlay != 0 {
            let slots = match self.ovl_groups.entry(g) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let mut slots = [None; GROUP_CHUNKS as usize];
                    let key = (self.overlay, g);
                    if let Some(val) = self.ovl.get(key).map_err(|e| meta_err(sn, e))? {
                        for en in overlay_of(sn, key, val.value())?.entries {
                            slots[en.off as usize] = Some(en);
                        }
                    }
                    v.insert(slots)
                }
            };
            if let Some(en) = slots[i] {
                return Ok(Some(en));
            }
        }
        let resolved = match self.groups.entry(g) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match self.store.resolved.get(g, self.epoch) {
                    Some(slots) => v.insert(slots),
                    None => {
                        let slots = std::sync::Arc::new(resolve_group(
                            &self.recs,
                            &self.heads,
                            sn,
                            g,
                            self.epoch,
                        )?);
                        self.store.resolved.put(g, self.epoch, slots.clone());
                        v.insert(slots)
                    }
                }
            }
        };
        Ok(resolved[i])
    }
}

impl Store {
    /// What `off..off+len` of a view holds, for NBD block status: consecutive extents of
    /// (length, reads as zeros). Zeros are claimed only where that is certain: a hole of a
    /// sparse origin file in a chunk that the view reads from the origin. A saved chunk is
    /// data even when its bytes are zeros. Answers at most `max_chunks` chunks' worth (a
    /// client asks again from where the answer stopped).
    pub(crate) fn extents_inner(
        &self,
        view: &str,
        off: u64,
        len: u64,
        max_chunks: u64,
    ) -> Result<Vec<(u64, bool)>> {
        self.check_origin_range(off, len as usize)?;
        let cs = self.sb.chunk_size;
        let end = off + len.min(max_chunks.saturating_mul(cs).max(cs));
        let end = end.min(off + len);
        let holes = self
            .origin
            .holes(off, end - off)
            .map_err(|e| Error::io(format!("origin {}: seek", self.sb.origin_path), e))?;
        // Ranges that read from the origin (all of it for the origin view).
        let mut from_origin: Vec<(u64, u64)> = Vec::new();
        if view == "origin" {
            from_origin.push((off, end));
        } else {
            let snap = self.snapshot(view)?;
            if snap.state == SnapState::Invalid {
                return Err(Error::InvalidSnapshot(format!(
                    "snapshot '{view}' is invalid and cannot be read; delete it"
                )));
            }
            if !holes.is_empty() {
                let tx = self.rtx()?;
                let mut loc = Locator::new(self, &tx, view, snap)?;
                let mut c = off / cs;
                while c * cs < end {
                    let (a, b) = ((c * cs).max(off), ((c + 1) * cs).min(end));
                    if loc.entry(c)?.is_none() {
                        match from_origin.last_mut() {
                            Some((_, e)) if *e == a => *e = b,
                            _ => from_origin.push((a, b)),
                        }
                    }
                    c += 1;
                }
            }
        }
        // Zero where a hole and an origin range overlap; data everywhere else.
        let mut zero: Vec<(u64, u64)> = Vec::new();
        for &(ho, hl) in &holes {
            let (h0, h1) = (ho, ho + hl);
            for &(a, b) in &from_origin {
                let (z0, z1) = (a.max(h0), b.min(h1));
                if z0 < z1 {
                    zero.push((z0, z1));
                }
            }
        }
        zero.sort_unstable();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |len: u64, z: bool| {
            if len == 0 {
                return;
            }
            match out.last_mut() {
                Some((l, zz)) if *zz == z => *l += len,
                _ => out.push((len, z)),
            }
        };
        let mut pos = off;
        for (z0, z1) in zero {
            push(z0.saturating_sub(pos), false);
            push(z1 - z0.max(pos), true);
            pos = pos.max(z1);
        }
        push(end - pos, false);
        Ok(out)
    }
}
