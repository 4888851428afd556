//! Where the data path's time goes: wall-clock totals per phase of a batch, kept only when
//! `SNAPCTL_PROFILE` is set (otherwise each span costs one cached load), and printed by
//! `snapctl serve` when it stops. `scripts/bench.sh` turns it on for a profiled first-write
//! pass and prints the table beside its ratios.
//!
//! Phases nest: `batch` is one NBD batch under the store lock, and the copy-on-write phases
//! (`decide` .. `journal write`) fall inside `preserve`, which falls inside `batch`; inside it,
//! `copy write` runs on a thread beside `index` and `commit`, so the copy-on-write lines add up
//! to more than `preserve`. Staged writes (store/writeback.rs) are answered in a batch that only
//! stages them (`stage`); their `preserve` runs later inside a `settle staged`, on the server's
//! preserver thread, one settle for many batches. A `writeback round` runs beside both on the
//! queue's worker: its journal records, store flush and origin writes are not part of any
//! batch. Totals are sums over every thread, so with several connections
//! (or the worker) they can exceed the wall time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// A phase of the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the rest of a batch after its first request arrived.
    Gather,
    /// Waiting for the store lock.
    Lock,
    /// One batch, from taking the store lock to its replies being ready.
    Batch,
    /// Copy-on-write for a batch's writes: everything from `decide` to `commit`.
    Preserve,
    /// Which chunks need a copy: the index lookups.
    Decide,
    /// Allocating store chunks for the copies.
    Alloc,
    /// Reading the old contents from the origin (on a thread beside `decide` and `allocate`).
    OriginRead,
    /// Hashing the old contents, after their read, on the same thread.
    Hash,
    /// Writing the copies to the store (on a thread beside `index` and `commit`).
    CopyWrite,
    /// Inserting the records into the metadata tables.
    Index,
    /// The metadata commit: its page writes and flushes.
    Commit,
    /// Writing the batch's copy-journal record, after its commit.
    JournalWrite,
    /// The origin writes themselves.
    OriginWrite,
    /// FLUSH and FUA: making the origin durable.
    Flush,
    /// Reads, of any view.
    Read,
    /// Sending replies to the client.
    Reply,
    /// One round of the writeback worker (pipelined origin writes), outside any batch.
    Writeback,
    /// The journal records a writeback round writes and the store flush after them, before
    /// its origin writes.
    StoreFlush,
    /// A writeback round's origin writes.
    RoundWrite,
    /// A preserve of staged writes (answered before it), on the server's preserver thread or
    /// whatever settles them; its copy-on-write phases fall inside it.
    Settle,
    /// Waiting for room to stage a batch of writes.
    Stage,
}

const PHASES: [Phase; 21] = [
    Phase::Gather,
    Phase::Lock,
    Phase::Batch,
    Phase::Preserve,
    Phase::Decide,
    Phase::Alloc,
    Phase::OriginRead,
    Phase::Hash,
    Phase::CopyWrite,
    Phase::Index,
    Phase::Commit,
    Phase::JournalWrite,
    Phase::OriginWrite,
    Phase::Flush,
    Phase::Read,
    Phase::Reply,
    Phase::Writeback,
    Phase::StoreFlush,
    Phase::RoundWrite,
    Phase::Settle,
    Phase::Stage,
];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Gather => "gather",
            Phase::Lock => "lock wait",
            Phase::Batch => "batch",
            Phase::Preserve => "  preserve",
            Phase::Decide => "    decide",
            Phase::Alloc => "    allocate",
            Phase::OriginRead => "    origin read",
            Phase::Hash => "    hash",
            Phase::CopyWrite => "    copy write",
            Phase::Index => "    index",
            Phase::Commit => "    commit",
            Phase::JournalWrite => "    journal write",
            Phase::OriginWrite => "  origin write",
            Phase::Flush => "  flush",
            Phase::Read => "  read",
            Phase::Reply => "reply",
            Phase::Writeback => "writeback round",
            Phase::StoreFlush => "  records + flush",
            Phase::RoundWrite => "  origin write",
            Phase::Settle => "settle staged",
            Phase::Stage => "stage",
        }
    }
}

static NANOS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static CALLS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];

/// Whether `SNAPCTL_PROFILE` asks for a profile (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("SNAPCTL_PROFILE").is_some_and(|v| !v.is_empty() && v != "0")
    })
}

/// Times its phase until dropped.
#[must_use]
pub struct Span(Option<(Phase, Instant)>);

/// Starts timing `phase`.
pub fn span(phase: Phase) -> Span {
    Span(enabled().then(|| (phase, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((p, t)) = self.0 {
            let i = p as usize;
            NANOS[i].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            CALLS[i].fetch_add(1, Relaxed);
        }
    }
}

/// Counts the requests of a batch (for the requests per batch in the report).
pub fn requests(n: usize) {
    if enabled() {
        REQUESTS.fetch_add(n as u64, Relaxed);
    }
}

/// The table of every phase seen: calls, total, time per call and per request. Per request
/// compares runs whatever their batches: staged writes are preserved in settles of many
/// batches, so a phase inside `settle staged` is called once per settle, not per batch.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let batches = CALLS[Phase::Gather as usize].load(Relaxed).max(1);
    let requests = REQUESTS.load(Relaxed).max(1);
    let mut out = format!(
        "profile: {batches} batches, {requests} requests ({:.1} per batch)\n{:<18} {:>9} {:>11} {:>12} {:>10}\n",
        requests as f64 / batches as f64,
        "phase", "calls", "total ms", "µs/call", "µs/request"
    );
    for p in PHASES {
        let calls = CALLS[p as usize].load(Relaxed);
        if calls == 0 {
            continue;
        }
        let ns = NANOS[p as usize].load(Relaxed);
        out.push_str(&format!(
            "{:<18} {:>9} {:>11.1} {:>12.1} {:>10.2}\n",
            p.name(),
            calls,
            ns as f64 / 1e6,
            ns as f64 / 1e3 / calls as f64,
            ns as f64 / 1e3 / requests as f64,
        ));
    }
    Some(out)
}
