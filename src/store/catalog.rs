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

/// Something the store did on its own (the on-full policy); kept in the `events` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub time: i64,
    pub action: String,
    pub snapshot: String,
    pub reason: String,
}

impl Store {
    /// Loads the config and the snapshot table: one row per snapshot, never the exception index.
    pub(crate) fn load_catalog(&mut self) -> Result<()> {
        let name = self.name.clone();
        let tx = self.rtx()?;
        let config = tx.open_table(CONFIG).map_err(|e| meta_err(&name, e))?;
        self.epoch = get_u64(&config, K_EPOCH, &name)?;
        let snaps = tx.open_table(SNAPS).map_err(|e| meta_err(&name, e))?;
        self.snaps.clear();
        for row in snaps.iter().map_err(|e| meta_err(&name, e))? {
            let (k, v) = row.map_err(|e| meta_err(&name, e))?;
            let s =
                crate::store::codec::decode_snapshot(k.value(), v.value()).ok_or_else(|| {
                    Error::Corrupt(format!(
                        "{name}: snapshot record {} is damaged; run `snapctl check`",
                        k.value()
                    ))
                })?;
            self.snaps.insert(k.value(), s);
        }
        // Nothing read from the catalog may silently lie: a snapshot row that disappeared
        // leaves its name behind, and the counters must lie beyond every snapshot.
        let damaged = |what: String| Error::Corrupt(format!("{name}: {what}; run `snapctl check`"));
        let names = tx.open_table(NAMES).map_err(|e| meta_err(&name, e))?;
        let mut nnames = 0usize;
        for row in names.iter().map_err(|e| meta_err(&name, e))? {
            let (k, v) = row.map_err(|e| meta_err(&name, e))?;
            nnames += 1;
            if self.snaps.get(&v.value()).map(|s| s.name.as_str()) != Some(k.value()) {
                return Err(damaged(format!(
                    "the name '{}' names no matching snapshot",
                    k.value()
                )));
            }
        }
        if nnames != self.snaps.len() {
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
        Ok(())
    }
}

impl Store {
    /// Snapshots in creation order.
    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> {
        self.snaps.values()
    }

    pub fn snapshot(&self, name: &str) -> Result<&Snapshot> {
        self.snaps.values().find(|s| s.name == name).ok_or_else(|| {
            Error::NotFound(format!(
                "no snapshot named '{name}' in {} (see `snapctl list`)",
                self.name
            ))
        })
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
        if self.snaps.values().any(|s| s.name == name) {
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
        if self.snaps.values().any(|s| s.name == name) {
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
        if self.snaps.values().any(|s| s.name == new) {
            return Err(Error::Exists(format!(
                "a snapshot named '{new}' already exists in {}",
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
            let id = self.snapshot(n)?.id;
            if ids.contains(&id) {
                return Err(Error::Invalid(format!("snapshot '{n}' is named twice")));
            }
            ids.push(id);
        }
        let sn = self.name.clone();
        let tx = self.wtx()?;
        let mut freed = 0;
        for id in &ids {
            freed += self.drop_point(&tx, *id, None)?;
        }
        tx.commit().map_err(|e| meta_err(&sn, e))?;
        self.load_catalog()?;
        self.preserved.clear();
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

    /// Valid snapshots of branch 0, by epoch.
    /// The newest live epoch and the one before it (distinct), without building the list.
    pub(crate) fn newest_epochs(&self) -> (Option<u64>, Option<u64>) {
        let mut top: (Option<u64>, Option<u64>) = (None, None);
        for s in self.snaps.values() {
            if s.state != SnapState::Valid || s.branch != 0 {
                continue;
            }
            let e = s.epoch;
            match top {
                (Some(a), _) if e == a => {}
                (Some(a), b) if e > a => top = (Some(e), Some(a).max(b)),
                (Some(_), Some(b)) if e <= b => {}
                (Some(a), _) => top = (Some(a), Some(e)),
                (None, _) => top = (Some(e), None),
            }
        }
        top
    }

    pub(crate) fn live_epochs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .snaps
            .values()
            .filter(|s| s.state == SnapState::Valid && s.branch == 0)
            .map(|s| s.epoch)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}
