//! The snapshot catalog: snapshots and events, loaded at open (one row per snapshot, never the
//! exception index), created, renamed, made writable and deleted in single commits.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapState {
    Valid,
    Invalid,
}

/// One snapshot, as kept in the `snapshots` table (JSON, docs/FORMAT.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    /// Name of the view it was taken from ("origin").
    pub parent: String,
    pub branch: u32,
    pub epoch: u64,
    /// Unix seconds, UTC.
    pub created: i64,
    pub writable: bool,
    pub expires: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub state: SnapState,
    #[serde(default)]
    pub invalid_reason: Option<String>,
    /// Store chunks that deleting this snapshot alone would free, besides its overlay.
    pub exclusive_chunks: u64,
    /// The overlay holding the chunks this snapshot owns outright (0: none).
    #[serde(default)]
    pub overlay: u32,
    /// How many chunks the overlay holds.
    #[serde(default)]
    pub overlay_chunks: u64,
}

impl Snapshot {
    /// A new, valid, read-only snapshot at a point in time, holding nothing yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn point(
        id: u64,
        name: &str,
        parent: &str,
        branch: u32,
        epoch: u64,
        created: i64,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
    ) -> Snapshot {
        Snapshot {
            id,
            name: name.to_string(),
            parent: parent.to_string(),
            branch,
            epoch,
            created,
            writable: false,
            expires,
            labels,
            state: SnapState::Valid,
            invalid_reason: None,
            exclusive_chunks: 0,
            overlay: 0,
            overlay_chunks: 0,
        }
    }

    /// Chunks deleting this snapshot alone would free.
    pub fn owned_chunks(&self) -> u64 {
        self.exclusive_chunks + self.overlay_chunks
    }
}

/// The snapshots in memory, with the indexes the hot paths ask: by id (creation order), by
/// name, the live points in time (valid snapshots of branch 0, by epoch) and how many are
/// writable. Every change goes through `insert`/`remove`/`update`, which keep them in step, so
/// a lookup by name, the newest two epochs (every copy-on-write batch) and "is any writable"
/// (every flush) cost the same at one snapshot or ten thousand.
#[derive(Default)]
pub(crate) struct Catalog {
    by_id: BTreeMap<u64, Snapshot>,
    by_name: std::collections::HashMap<String, u64>,
    /// epoch -> the valid branch-0 snapshots at it (ids).
    live: BTreeMap<u64, Vec<u64>>,
    writable: usize,
    /// Read on demand (see [`Store::find`]): only the snapshots a create or delete touched are
    /// here, so none of the questions about all of them may be asked.
    pub(crate) partial: bool,
}

impl Catalog {
    fn index(&mut self, s: &Snapshot, add: bool) {
        if add {
            self.by_name.insert(s.name.clone(), s.id);
        } else if self.by_name.get(&s.name) == Some(&s.id) {
            self.by_name.remove(&s.name);
        }
        if s.writable {
            if add {
                self.writable += 1;
            } else {
                self.writable = self.writable.saturating_sub(1);
            }
        }
        if s.state == SnapState::Valid && s.branch == 0 {
            if add {
                self.live.entry(s.epoch).or_default().push(s.id);
            } else if let Some(ids) = self.live.get_mut(&s.epoch) {
                ids.retain(|&i| i != s.id);
                if ids.is_empty() {
                    self.live.remove(&s.epoch);
                }
            }
        }
    }

    /// The catalog of `rows`, in id order as the table holds them (built in one pass).
    fn of_rows(rows: Vec<(u64, Snapshot)>) -> Catalog {
        let mut c = Catalog {
            by_name: std::collections::HashMap::with_capacity(rows.len()),
            ..Default::default()
        };
        for (_, s) in &rows {
            c.index(s, true);
        }
        c.by_id = rows.into_iter().collect();
        c
    }

    /// Adds or replaces snapshot `id`.
    pub(crate) fn insert(&mut self, id: u64, s: Snapshot) {
        self.remove(&id);
        self.index(&s, true);
        self.by_id.insert(id, s);
    }

    pub(crate) fn remove(&mut self, id: &u64) -> Option<Snapshot> {
        let old = self.by_id.remove(id)?;
        self.index(&old, false);
        Some(old)
    }

    /// Changes snapshot `id` in place (its name included); returns it as changed.
    pub(crate) fn update(&mut self, id: &u64, f: impl FnOnce(&mut Snapshot)) -> Option<Snapshot> {
        let mut s = self.remove(id)?;
        f(&mut s);
        self.insert(*id, s.clone());
        Some(s)
    }

    pub(crate) fn get(&self, id: &u64) -> Option<&Snapshot> {
        self.by_id.get(id)
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<&Snapshot> {
        self.by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    pub(crate) fn values(&self) -> impl DoubleEndedIterator<Item = &Snapshot> {
        self.by_id.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn clear(&mut self) {
        *self = Catalog::default();
    }

    pub(crate) fn any_writable(&self) -> bool {
        self.writable > 0
    }

    /// The newest live epoch and the one before it (distinct).
    pub(crate) fn newest_epochs(&self) -> (Option<u64>, Option<u64>) {
        let mut it = self.live.keys().rev();
        let a = it.next().copied();
        (a, it.next().copied())
    }

    /// Every live epoch, ascending.
    pub(crate) fn live_epochs(&self) -> Vec<u64> {
        self.live.keys().copied().collect()
    }

    /// How many valid snapshots of branch 0 there are.
    pub(crate) fn live_count(&self) -> usize {
        self.live.values().map(Vec::len).sum()
    }

    /// The valid snapshots of branch 0 at `epoch` (ids), without a pass over the catalog.
    pub(crate) fn live_at(&self, epoch: u64) -> &[u64] {
        self.live.get(&epoch).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Something the store did on its own (the on-full policy); kept in the `events` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub time: i64,
    pub action: String,
    pub snapshot: String,
    pub reason: String,
}

/// The catalog counters every snapshot lies below: (epoch, next id, next overlay).
fn counters(config: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<(u64, u64, u64)> {
    let next_overlay = config
        .get(K_NEXT_OVERLAY)
        .map_err(|e| meta_err(name, e))?
        .map_or(1, |v| v.value());
    Ok((
        get_u64(config, K_EPOCH, name)?,
        get_u64(config, K_NEXT_ID, name)?,
        next_overlay,
    ))
}

/// Snapshot `id`'s row, checked as a full load checks every row: its checksum, and that it
/// lies below the counters.
fn read_row(
    snaps: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
    (epoch, next_id, next_overlay): (u64, u64, u64),
    name: &str,
) -> Result<Option<Snapshot>> {
    let Some(v) = snaps.get(id).map_err(|e| meta_err(name, e))? else {
        return Ok(None);
    };
    let s = crate::store::codec::decode_snapshot(id, v.value()).ok_or_else(|| {
        Error::Corrupt(format!(
            "{name}: the catalog row of snapshot id {id} is damaged; run `snapctl check`"
        ))
    })?;
    if s.epoch >= epoch || s.id >= next_id || s.overlay as u64 >= next_overlay {
        return Err(Error::Corrupt(format!(
            "{name}: snapshot '{}' lies beyond the store's counters; run `snapctl check`",
            s.name
        )));
    }
    Ok(Some(s))
}

/// The live-point index's entries from `rows` (in order away from a point) while they are at
/// most `n` distinct epochs.
fn first_epochs<'a>(
    rows: impl Iterator<
        Item = std::result::Result<
            (redb::AccessGuard<'a, (u64, u64)>, redb::AccessGuard<'a, ()>),
            redb::StorageError,
        >,
    >,
    n: usize,
    keys: &mut Vec<(u64, u64)>,
    name: &str,
) -> Result<()> {
    let mut epochs = 0;
    let mut last = None;
    for row in rows {
        let (ep, id) = row.map_err(|e| meta_err(name, e))?.0.value();
        if last != Some(ep) {
            epochs += 1;
            if epochs > n {
                break;
            }
            last = Some(ep);
        }
        keys.push((ep, id));
    }
    Ok(())
}

impl Store {
    /// Loads the config and the snapshot table: one row per snapshot, never the exception index.
    /// A store opened with [`OpenOptions::catalog_on_demand`] loads the counters alone.
    pub(crate) fn load_catalog(&mut self) -> Result<()> {
        let name = self.name.clone();
        let tx = self.rtx()?;
        let config = tx.open_table(CONFIG).map_err(|e| meta_err(&name, e))?;
        self.epoch = get_u64(&config, K_EPOCH, &name)?;
        self.snaps.clear();
        self.damaged_snapshots.clear();
        if self.catalog_on_demand {
            self.snaps.partial = true;
            return Ok(());
        }
        let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&name, e))?;
        let mut rows =
            Vec::with_capacity(redb::ReadableTableMetadata::len(&snaps).unwrap_or(0) as usize);
        for row in snaps.iter().map_err(|e| meta_err(&name, e))? {
            let (k, v) = row.map_err(|e| meta_err(&name, e))?;
            let Some(s) = crate::store::codec::decode_snapshot(k.value(), v.value()) else {
                // `check` names it (and `--repair --drop-damaged` removes it); anything else
                // refuses the store.
                if self.for_check {
                    self.damaged_snapshots.push(k.value());
                    continue;
                }
                return Err(Error::Corrupt(format!(
                    "{name}: the catalog row of snapshot id {} is damaged; run `snapctl check`",
                    k.value()
                )));
            };
            rows.push((k.value(), s));
        }
        self.snaps = Catalog::of_rows(rows);
        // Nothing read from the catalog may silently lie: a snapshot row that disappeared
        // leaves its name behind, and the counters must lie beyond every snapshot.
        let damaged = |what: String| Error::Corrupt(format!("{name}: {what}; run `snapctl check`"));
        let names = tx.open_table(NAMES).map_err(|e| meta_err(&name, e))?;
        let mut nnames = 0usize;
        // `check` reports a damaged name index itself (and `--repair` rebuilds it).
        for row in names.iter().map_err(|e| meta_err(&name, e))? {
            if self.for_check {
                break;
            }
            let (k, v) = row.map_err(|e| meta_err(&name, e))?;
            nnames += 1;
            if self.snaps.get(&v.value()).map(|s| s.name.as_str()) != Some(k.value()) {
                return Err(damaged(format!(
                    "the name '{}' names no matching snapshot",
                    k.value()
                )));
            }
        }
        if nnames != self.snaps.len() && !self.for_check {
            return Err(damaged(format!(
                "the catalog lists {nnames} names for {} snapshots",
                self.snaps.len()
            )));
        }
        let next_id = get_u64(&config, K_NEXT_ID, &name)?;
        let next_overlay = config
            .get(K_NEXT_OVERLAY)
            .map_err(|e| meta_err(&name, e))?
            .map_or(1, |v| v.value());
        for s in self.snaps.values() {
            if s.epoch >= self.epoch || s.id >= next_id || s.overlay as u64 >= next_overlay {
                return Err(damaged(format!(
                    "snapshot '{}' lies beyond the store's counters",
                    s.name
                )));
            }
        }
        // The live-point index, which a delete on demand trusts, names exactly the live
        // points (`check` reports a damaged one itself, and `--repair` rebuilds it).
        if !self.for_check {
            if let Some(what) =
                self.live_index_disagrees(&tx.open_table(LIVE).map_err(|e| meta_err(&name, e))?)?
            {
                return Err(damaged(what));
            }
        }
        Ok(())
    }

    /// Where the live-point index and the catalog in memory disagree (a full catalog), if they
    /// do; entries of the damaged rows `check` found are passed over.
    pub(crate) fn live_index_disagrees(
        &self,
        live: &impl ReadableTable<(u64, u64), ()>,
    ) -> Result<Option<String>> {
        let mut n = 0usize;
        for row in live.iter().map_err(|e| meta_err(&self.name, e))? {
            let (k, _) = row.map_err(|e| meta_err(&self.name, e))?;
            let (epoch, id) = k.value();
            // A snapshot whose row is damaged is `check`'s to report.
            if self.damaged_snapshots.contains(&id) {
                continue;
            }
            if !self.snaps.live_at(epoch).contains(&id) {
                return Ok(Some(format!(
                    "the live-point index names snapshot id {id} at epoch {epoch}, which is no valid snapshot of the origin there"
                )));
            }
            n += 1;
        }
        let want = self.snaps.live_count();
        Ok((n != want)
            .then(|| format!("the live-point index holds {n} entries for {want} live points")))
    }

    /// The snapshot named `name`. A catalog on demand reads it (and keeps it) on first use,
    /// checked as a full load checks it: the row's checksum, its counters, and that the name
    /// index and the row agree.
    pub(crate) fn find(&mut self, name: &str) -> Result<Option<Snapshot>> {
        if let Some(s) = self.snaps.by_name(name) {
            return Ok(Some(s.clone()));
        }
        if !self.snaps.partial {
            return Ok(None);
        }
        let sn = self.name.clone();
        let tx = self.rtx()?;
        let names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
        let Some(id) = names
            .get(name)
            .map_err(|e| meta_err(&sn, e))?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let c = counters(&tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?, &sn)?;
        let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
        match read_row(&snaps, id, c, &sn)? {
            Some(s) if s.name == name => {
                self.snaps.insert(id, s.clone());
                Ok(Some(s))
            }
            _ => Err(Error::Corrupt(format!(
                "{sn}: the name '{name}' names no matching snapshot; run `snapctl check`"
            ))),
        }
    }

    /// With a catalog on demand, before a delete's write transaction: the snapshots `ids` will
    /// need, read and checked while a refusal still changes nothing (see `live_near`). Each
    /// deleted one can take one of the others' neighbours, so `ids.len() + 1` points on each
    /// side are read; past a few ids, the whole catalog.
    pub(crate) fn fetch_for_delete(&mut self, ids: &[u64]) -> Result<()> {
        if !self.snaps.partial {
            return Ok(());
        }
        if ids.len() > 16 {
            return self.whole_catalog();
        }
        let sn = self.name.clone();
        let tx = self.rtx()?;
        let config = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
        let live = tx.open_table(LIVE).map_err(|e| meta_err(&sn, e))?;
        let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
        for id in ids {
            if let Some(s) = self.snaps.get(id).cloned() {
                self.live_near(&config, &live, &snaps, &s, ids.len() + 1)?;
            }
        }
        Ok(())
    }

    /// With a catalog on demand, inside a delete's transaction: the snapshots at `snap`'s live
    /// point and at the two live points on either side of it, as the transaction sees them
    /// (after the deletes before it in the same commit). Usually all in memory already.
    pub(crate) fn fetch_live_around(
        &mut self,
        tx: &redb::WriteTransaction,
        snap: &Snapshot,
    ) -> Result<()> {
        if !self.snaps.partial {
            return Ok(());
        }
        let sn = self.name.clone();
        let config = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
        let live = tx.open_table(LIVE).map_err(|e| meta_err(&sn, e))?;
        let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&sn, e))?;
        self.live_near(&config, &live, &snaps, snap, 2)
    }

    /// Reads into the catalog every snapshot at `snap`'s live point and at the `n` live points
    /// on either side of it, each row checked as a full load checks it and against its index
    /// entry. Any live point the catalog in memory holds is a real one, so the nearest `n` on
    /// each side in memory are then the nearest `n` in the store.
    ///
    /// The index is trusted where it is silent (a full load checks it whole, as `check` does),
    /// but not blindly: `snap`, the snapshot about to go, must be in it if it is a live point.
    fn live_near(
        &mut self,
        config: &impl ReadableTable<&'static str, u64>,
        live: &impl ReadableTable<(u64, u64), ()>,
        snaps: &impl ReadableTable<u64, &'static [u8]>,
        snap: &Snapshot,
        n: usize,
    ) -> Result<()> {
        let e = snap.epoch;
        let sn = self.name.clone();
        let c = counters(config, &sn)?;
        let mut keys: Vec<(u64, u64)> = Vec::new();
        let rows = |r: std::result::Result<_, redb::StorageError>| r.map_err(|e| meta_err(&sn, e));
        first_epochs(rows(live.range((e, 0)..=(e, u64::MAX)))?, 1, &mut keys, &sn)?;
        first_epochs(rows(live.range((e + 1, 0)..))?, n, &mut keys, &sn)?;
        first_epochs(rows(live.range(..(e, 0)))?.rev(), n, &mut keys, &sn)?;
        if snap.state == SnapState::Valid && snap.branch == 0 && !keys.contains(&(e, snap.id)) {
            return Err(Error::Corrupt(format!(
                "{sn}: the live-point index does not name snapshot '{}'; run `snapctl check`",
                snap.name
            )));
        }
        for (ep, id) in keys {
            if self.snaps.get(&id).is_some() {
                continue;
            }
            match read_row(snaps, id, c, &sn)? {
                Some(s) if s.epoch == ep && s.branch == 0 && s.state == SnapState::Valid => {
                    self.snaps.insert(id, s);
                }
                _ => {
                    return Err(Error::Corrupt(format!(
                        "{sn}: the live-point index names snapshot id {id} at epoch {ep}, which is no valid snapshot of the origin there; run `snapctl check`"
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Store {
    /// Snapshots in creation order.
    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> {
        self.snaps.values()
    }

    pub fn snapshot(&self, name: &str) -> Result<&Snapshot> {
        self.snaps.by_name(name).ok_or_else(|| self.no_such(name))
    }

    fn no_such(&self, name: &str) -> Error {
        Error::NotFound(format!(
            "no snapshot named '{name}' in {} (see `snapctl list`)",
            self.name
        ))
    }
}

impl Store {
    pub(super) fn recent_events_inner(&self, n: usize) -> Result<Vec<Event>> {
        let tx = self.rtx()?;
        let t = tx.open_table(EVENTS).map_err(|e| meta_err(&self.name, e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| meta_err(&self.name, e))?.rev().take(n) {
            let (_, v) = row.map_err(|e| meta_err(&self.name, e))?;
            if let Ok(ev) = serde_json::from_slice::<Event>(v.value()) {
                out.push(ev);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Creates a read-only snapshot of the origin. O(1): touches neither device nor the index.
    pub(super) fn create_inner(
        &mut self,
        name: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        created: Option<i64>,
    ) -> Result<Snapshot> {
        crate::names::validate(name)?;
        if self.find(name)?.is_some() {
            return Err(Error::Exists(format!(
                "a snapshot named '{name}' already exists in {}; pick another name or delete it first",
                self.name
            )));
        }
        // Writes acknowledged before the snapshot are part of it: make them durable first, so a
        // crash can never leave a snapshot that lost part of its point in time.
        self.origin
            .flush()
            .map_err(|e| Error::io(format!("origin {}: flush", self.sb.origin_path), e))?;
        let tx = self.wtx()?;
        let sn = &self.name;
        let snap;
        {
            let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
            let id = get_u64(&config, K_NEXT_ID, sn)?;
            let epoch = get_u64(&config, K_EPOCH, sn)?;
            config
                .insert(K_NEXT_ID, id + 1)
                .map_err(|e| meta_err(sn, e))?;
            config
                .insert(K_EPOCH, epoch + 1)
                .map_err(|e| meta_err(sn, e))?;
            snap = Snapshot::point(
                id,
                name,
                "origin",
                0,
                epoch,
                created.unwrap_or_else(now),
                expires,
                labels,
            );
            put_snap(&tx, &snap, sn)?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(sn, e))?;
            names.insert(name, id).map_err(|e| meta_err(sn, e))?;
        }
        tx.commit().map_err(|e| meta_err(sn, e))?;
        self.epoch = snap.epoch + 1;
        self.snaps.insert(snap.id, snap.clone());
        // A new interval: every chunk must be checked against the new snapshot.
        self.preserved.clear();
        Ok(snap)
    }

    pub(super) fn create_from_inner(
        &mut self,
        name: &str,
        from: &str,
        expires: Option<i64>,
        labels: BTreeMap<String, String>,
        writable: bool,
    ) -> Result<Snapshot> {
        crate::names::validate(name)?;
        let src = self.snapshot(from)?.clone();
        if src.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{from}' is invalid; it cannot be snapshotted"
            )));
        }
        if self.snaps.by_name(name).is_some() {
            return Err(Error::Exists(format!(
                "a snapshot named '{name}' already exists in {}; pick another name or delete it first",
                self.name
            )));
        }
        let tx = self.wtx()?;
        let sn = self.name.clone();
        let snap;
        {
            let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(&sn, e))?;
            let id = get_u64(&config, K_NEXT_ID, &sn)?;
            config
                .insert(K_NEXT_ID, id + 1)
                .map_err(|e| meta_err(&sn, e))?;
            snap = Snapshot::point(
                id,
                name,
                &src.name,
                src.branch,
                src.epoch,
                now(),
                expires,
                labels,
            );
            put_snap(&tx, &snap, &sn)?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(&sn, e))?;
            names.insert(name, id).map_err(|e| meta_err(&sn, e))?;
        }
        self.snaps.insert(snap.id, snap.clone());
        // Two snapshots at one point share everything: neither holds anything alone.
        self.set_exclusive(&tx, snap.epoch, 0)?;
        // A snapshot of a snapshot with an overlay freezes the overlay too: by copying it (its
        // source may be writable and change in place). Then writable if asked.
        if src.overlay != 0 || writable {
            let mut s2 = snap.clone();
            s2.overlay = self.new_overlay(&tx)?;
            s2.writable = writable;
            if src.overlay != 0 {
                s2.overlay_chunks = self.copy_overlay(&tx, src.overlay, s2.overlay, &src.name)?;
            }
            put_snap(&tx, &s2, &sn)?;
            self.snaps.insert(s2.id, s2);
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.snapshot(name).cloned()
    }

    /// A new, empty overlay id.
    pub(crate) fn new_overlay(&self, tx: &redb::WriteTransaction) -> Result<u32> {
        let sn = &self.name;
        let mut c = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let id = c
            .get(K_NEXT_OVERLAY)
            .map_err(|e| meta_err(sn, e))?
            .map(|v| v.value())
            .unwrap_or(1);
        c.insert(K_NEXT_OVERLAY, id + 1)
            .map_err(|e| meta_err(sn, e))?;
        u32::try_from(id).map_err(|_| Error::NoSpace(format!("{sn}: out of overlay ids")))
    }

    pub(super) fn set_writable_inner(&mut self, name: &str) -> Result<Snapshot> {
        let mut snap = self.snapshot(name)?.clone();
        if snap.state == SnapState::Invalid {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot '{name}' is invalid; it cannot be made writable"
            )));
        }
        if snap.writable {
            return Ok(snap); // one-way, and already there
        }
        let tx = self.wtx()?;
        snap.writable = true;
        if snap.overlay == 0 {
            snap.overlay = self.new_overlay(&tx)?;
        }
        put_snap(&tx, &snap, &self.name)?;
        tx.commit().map_err(|e| meta_err(&self.name, e))?;
        self.snaps.insert(snap.id, snap.clone());
        Ok(snap)
    }

    pub(super) fn rename_inner(&mut self, old: &str, new: &str) -> Result<Snapshot> {
        crate::names::validate(new)?;
        let mut snap = self.snapshot(old)?.clone();
        if old == new {
            return Ok(snap);
        }
        if self.snaps.by_name(new).is_some() {
            return Err(Error::Exists(format!(
                "a snapshot named '{new}' already exists in {}; pick another name or delete it first",
                self.name
            )));
        }
        snap.name = new.to_string();
        let tx = self.wtx()?;
        let sn = &self.name;
        {
            put_snap(&tx, &snap, sn)?;
            let mut names = tx.open_table(NAMES).map_err(|e| meta_err(sn, e))?;
            names.remove(old).map_err(|e| meta_err(sn, e))?;
            names.insert(new, snap.id).map_err(|e| meta_err(sn, e))?;
        }
        tx.commit().map_err(|e| meta_err(sn, e))?;
        self.snaps.insert(snap.id, snap.clone());
        Ok(snap)
    }

    /// Deletes snapshots; returns the bytes freed. All names are checked before anything changes,
    /// and the whole delete is one commit.
    pub(super) fn delete_inner(&mut self, names: &[String]) -> Result<u64> {
        let mut ids = Vec::new();
        for n in names {
            let id = self.find(n)?.ok_or_else(|| self.no_such(n))?.id;
            if ids.contains(&id) {
                return Err(Error::Invalid(format!(
                    "snapshot '{n}' is named twice; name each snapshot once"
                )));
            }
            ids.push(id);
        }
        self.fetch_for_delete(&ids)?;
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let mut freed = 0;
        let mut done = Ok(());
        for id in &ids {
            match self.drop_point(&tx, *id, None) {
                Ok(n) => freed += n,
                Err(e) => {
                    done = Err(e);
                    break;
                }
            }
        }
        let done = done.and_then(|()| tx.commit().map_err(|e| meta_err(&sn, e)));
        self.preserved.clear();
        if let Err(e) = done {
            // drop_point changes the catalog in memory as it goes; nothing was committed, so
            // read it back from the disk.
            self.load_catalog()?;
            return Err(e);
        }
        // Committed: the catalog in memory is in step with it (no reload, whatever the count).
        Ok(freed * self.sb.chunk_size)
    }

    /// Appends an event (inside a write transaction).
    pub(crate) fn log_event(&mut self, tx: &redb::WriteTransaction, ev: Event) -> Result<()> {
        let sn = &self.name;
        let mut config = tx.open_table(CONFIG).map_err(|e| meta_err(sn, e))?;
        let seq = get_u64(&config, K_NEXT_EVENT, sn)?;
        config
            .insert(K_NEXT_EVENT, seq + 1)
            .map_err(|e| meta_err(sn, e))?;
        let mut t = tx.open_table(EVENTS).map_err(|e| meta_err(sn, e))?;
        let v = serde_json::to_vec(&ev).map_err(|e| Error::Corrupt(e.to_string()))?;
        t.insert(seq, v.as_slice()).map_err(|e| meta_err(sn, e))?;
        self.events.push(ev);
        Ok(())
    }

    /// The newest live epoch and the one before it (distinct), without building the list.
    pub(crate) fn newest_epochs(&self) -> (Option<u64>, Option<u64>) {
        self.snaps.newest_epochs()
    }

    /// Valid snapshots of branch 0: their epochs, ascending, each once.
    pub(crate) fn live_epochs(&self) -> Vec<u64> {
        self.snaps.live_epochs()
    }
}
