//! Pipelined origin writes (docs/DESIGN.md, "Pipelined origin writes").
//!
//! A first write after a snapshot costs a chain: read the old contents, write the copies and
//! their journal record, flush, and only then write the origin. Done in line, the client's reply
//! waits for all of it, and the next batch cannot start before the flush returns. With this
//! queue, a batch ends once its copies are written (not yet flushed): its journal record and
//! origin writes are queued here, the client is answered (an NBD write without FUA promises
//! nothing durable), and the next batch starts. One worker takes every queued job at once,
//! writes their journal records and flushes the store once for all of them if any has copies
//! waiting, then writes their origin data in queue order.
//!
//! What keeps this exact:
//! - **Order.** Jobs are written in the order they were queued, each after a store flush issued
//!   once every earlier job's copies and journal record had completed: no origin write precedes
//!   the durability of the copies that preserve what it overwrites (invariant 2).
//! - **Reads see acknowledged writes.** A read of the origin waits for every queued job that
//!   overlaps it ([`Writeback::wait_for`]); a snapshot never reads the origin where a write is
//!   queued (its chunks were preserved before it was queued); everything else (a snapshot
//!   created or deleted, a restore, a check, FLUSH, closing) waits for the whole queue first
//!   ([`Writeback::drain`]).
//! - **Failure is final.** A store flush or an origin write that fails stops the queue: the
//!   jobs not written are dropped and named as lost, every later flush, write and change is
//!   refused, and origin reads of a lost range fail instead of returning the old bytes.
//!
//! In front of the queue, the **stage** ([`Writeback::stage`]): a server answers a batch of
//! origin writes once it is staged, before even its copies are made; its preserver thread
//! settles the stage (`Store::settle_staged`: preserve, then queue as above), holding the store
//! alone. Staged writes touch no device, so the crash argument above is unchanged; reads of the
//! origin lay them over what they read ([`Writeback::overlay_staged`]), everything that writes
//! the origin another way or changes the snapshots settles the stage first, and a batch is
//! staged only while the chunks it touches fit in the store's free room, so that a full store
//! still refuses (or makes room for) a write before answering it (docs/DESIGN.md, "Staged
//! origin writes").
//!
//! A process that dies with jobs queued loses writes that were never flushed, which NBD allows;
//! a power cut can leave several journal records whose flush had not returned, and each record
//! says how many came before it in that state so that opening the store checks all of them
//! (see `journal.rs`).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, BlockIo};
use crate::profile::{self, Phase};

/// Data queued or being written (and staged, see [`MAX_STAGED_BYTES`]) above which a new job
/// waits for the worker, so that the queue adds to the server's memory at most this and the
/// job that crossed it (a batch taken the synchronous way is at most 32 MiB; a settle's, at
/// most the stage). Rounds of first writes are 2-10 MiB on this machine's disk.
const MAX_QUEUED_BYTES: usize = 16 << 20;
/// Jobs queued at most.
const MAX_QUEUED_JOBS: usize = 64;
/// Answered writes not yet preserved, at most: enough for the preserver's batches to grow to
/// what the device can take at once (one first-write batch of 4 KiB writes at QD32 is 128 KiB;
/// this is 64 such batches). Staged and queued bytes together also stay within
/// [`MAX_QUEUED_BYTES`], so that staging adds to the server's memory only the batch a settle
/// has taken and not queued yet.
const MAX_STAGED_BYTES: usize = 8 << 20;
/// The copies one settle makes at most (chunks touched times the chunk size; at least one
/// batch): staged batches are taken until this is reached. Larger settles were no faster and
/// kept more memory (a settle's metadata transaction grows with it): 16 MiB held the server at
/// 112 MiB after a first-write pass, this at 92 MiB, at the same rate.
const MAX_SETTLE_BYTES: u64 = 4 << 20;

/// One batch's origin writes, queued after its copies.
pub(crate) struct Job {
    /// Non-overlapping writes, applied together (a batch with overlapping writes is split into
    /// several jobs, in order).
    pub(crate) writes: Vec<(u64, AlignedBuf)>,
    /// The journal record of the batch's copies (written, not flushed): the round writes it,
    /// then flushes the store, before these writes go out.
    pub(crate) record: Option<QueuedRecord>,
}

/// A batch's copy-journal record, left to the queue to write.
pub(crate) struct QueuedRecord {
    /// Its sequence number.
    pub(crate) seq: u64,
    /// Where it goes on the store device.
    pub(crate) at: u64,
    pub(crate) bytes: AlignedBuf,
}

impl Job {
    fn bytes(&self) -> usize {
        self.writes.iter().map(|(_, b)| b.as_slice().len()).sum()
    }
    fn overlaps(&self, off: u64, len: u64) -> bool {
        self.writes
            .iter()
            .any(|(o, b)| meets((*o, b.as_slice().len() as u64), (off, len)))
    }
}

/// Whether two byte ranges (offset, length) share a byte.
fn meets(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// One NBD batch of origin writes, answered and waiting for its preserve (see [`Writeback::stage`]).
struct Staged {
    writes: Vec<(u64, AlignedBuf)>,
    /// The chunks its writes touch: the most copies its preserve can need.
    chunks: u64,
}

impl Staged {
    fn bytes(&self) -> usize {
        self.writes.iter().map(|(_, b)| b.as_slice().len()).sum()
    }
}

#[derive(Default)]
struct State {
    /// Answered writes waiting for their preserve, in order; all older than every job.
    staged: VecDeque<Staged>,
    staged_bytes: usize,
    /// Chunks the staged writes touch, held against `room`.
    staged_chunks: u64,
    /// Free store chunks, as the store last said ([`Writeback::set_room`]): writes are staged
    /// only while their chunks fit, so that a full store's policy is met by a write still
    /// waiting for its answer.
    room: u64,
    queue: VecDeque<Job>,
    /// The ranges of the jobs a round took and is writing.
    busy: Option<Vec<(u64, u64)>>,
    /// Data held by the queue: its jobs' and the busy round's (counted until the round ends,
    /// so that the queue's memory stays within [`MAX_QUEUED_BYTES`] and one job).
    queued_bytes: usize,
    /// The newest journal record whose copies a completed flush covered.
    durable_record: u64,
    /// Why the queue stopped, once it has.
    failed: Option<String>,
    /// Set by [`Writeback::end_staging`].
    staging_over: bool,
    /// Ranges of jobs dropped when the queue stopped: reading them fails.
    lost: Vec<(u64, u64)>,
    stop: bool,
}

/// The queue of origin writes waiting for their copies' flush.
pub struct Writeback {
    state: Mutex<State>,
    changed: Condvar,
    dev: Arc<dyn BlockIo>,
    origin: Arc<dyn BlockIo>,
    store_name: String,
    origin_name: String,
}

impl Writeback {
    pub(crate) fn new(
        dev: Arc<dyn BlockIo>,
        origin: Arc<dyn BlockIo>,
        store_name: &str,
        origin_name: &str,
    ) -> Writeback {
        Writeback {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            dev,
            origin,
            store_name: store_name.to_string(),
            origin_name: origin_name.to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn failure(&self, why: &str) -> Error {
        Error::io(
            format!(
                "store {}: a queued write failed ({why}), so this process writes nothing more; stop it and open the store again",
                self.store_name
            ),
            io::Error::from_raw_os_error(libc::EIO),
        )
    }

    /// Why the queue stopped, if it has: nothing more may be written or changed.
    pub(crate) fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// The newest journal record known durable with its copies.
    pub(crate) fn durable_record(&self) -> u64 {
        self.lock().durable_record
    }

    /// Stages one NBD batch of origin writes, in order: they are answered at once and
    /// preserved later by `Store::settle_staged` (a server's preserver thread runs it), before
    /// any job queued after them. Gives the writes back when the stage is full, or when the
    /// chunks they touch do not fit in the store's room beside what is staged: the caller then
    /// writes them the way that answers only once preserved (settling the stage first), where
    /// a full store meets its on-full policy before the answer. Never waits: whoever stages
    /// need not know whether a preserver runs.
    pub fn stage(
        &self,
        writes: Vec<(u64, AlignedBuf)>,
        chunk_size: u64,
    ) -> Result<Option<Vec<(u64, AlignedBuf)>>> {
        let chunks: u64 = writes
            .iter()
            .filter(|(_, b)| !b.as_slice().is_empty())
            .map(|(o, b)| (o + b.as_slice().len() as u64 - 1) / chunk_size - o / chunk_size + 1)
            .sum();
        let staged = Staged { writes, chunks };
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(self.failure(why));
        }
        // Full, or not enough room: back to the caller, who settles the stage itself.
        let bytes = staged.bytes();
        let full = st.staged_bytes + bytes > MAX_STAGED_BYTES
            || st.staged_bytes + st.queued_bytes + bytes > MAX_QUEUED_BYTES;
        if full || st.staged_chunks.saturating_add(chunks) > st.room || st.staging_over {
            return Ok(Some(staged.writes));
        }
        st.staged_bytes += bytes;
        st.staged_chunks += chunks;
        st.staged.push_back(staged);
        self.changed.notify_all();
        Ok(None)
    }

    /// Waits until a write is staged; false once [`Writeback::end_staging`] was called (what
    /// is staged then is settled by whoever flushes or closes the store).
    pub fn wait_staged(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.staging_over {
                return false;
            }
            if !st.staged.is_empty() && st.failed.is_none() {
                return true;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes staged batches for a preserve, oldest first, until their chunks reach
    /// [`MAX_SETTLE_BYTES`] (at least one batch); their chunks leave the room until the store
    /// says how much is left.
    pub(crate) fn take_staged(&self, chunk_size: u64) -> Vec<(u64, AlignedBuf)> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let mut copies = 0u64;
        while let Some(front) = st.staged.front() {
            let more = front.chunks.saturating_mul(chunk_size);
            if !out.is_empty() && copies.saturating_add(more) > MAX_SETTLE_BYTES {
                break;
            }
            let Some(b) = st.staged.pop_front() else {
                break;
            };
            copies = copies.saturating_add(more);
            st.staged_bytes = st.staged_bytes.saturating_sub(b.bytes());
            st.staged_chunks = st.staged_chunks.saturating_sub(b.chunks);
            st.room = st.room.saturating_sub(b.chunks);
            out.extend(b.writes);
        }
        self.changed.notify_all();
        out
    }

    /// Stages nothing more, and ends [`Writeback::wait_staged`].
    pub fn end_staging(&self) {
        self.lock().staging_over = true;
        self.changed.notify_all();
    }

    /// The store's free chunks, after a change or a preserve.
    pub(crate) fn set_room(&self, free: u64) {
        self.lock().room = free;
        self.changed.notify_all();
    }

    /// Staged writes taken for a preserve that failed: they were answered and are lost, with
    /// everything staged after them; the queue stops as when a round fails.
    pub(crate) fn fail_staged(&self, why: String, lost: &[(u64, u64)]) {
        let mut st = self.lock();
        let behind: Vec<Staged> = st.staged.drain(..).collect();
        st.lost.extend_from_slice(lost);
        st.lost.extend(
            behind
                .iter()
                .flat_map(|b| b.writes.iter())
                .map(|(o, b)| (*o, b.as_slice().len() as u64)),
        );
        st.staged_bytes = 0;
        st.staged_chunks = 0;
        if st.failed.is_none() {
            st.failed = Some(why);
        }
        self.changed.notify_all();
    }

    /// Whether a staged write meets `off..off+len`.
    pub(crate) fn staged_meets(&self, off: u64, len: u64) -> bool {
        let st = self.lock();
        st.staged
            .iter()
            .flat_map(|b| b.writes.iter())
            .any(|(o, b)| meets((*o, b.as_slice().len() as u64), (off, len)))
    }

    /// Lays the staged writes over `off..off+buf.len()` onto `buf` (read from the origin),
    /// oldest first, so that a read sees every answered write. Fails where the queue stopped
    /// with a write there lost. Called with the store held, shared or alone: staged writes
    /// leave the stage only in a preserve, which holds it alone, so none can reach the origin
    /// between the read and this.
    pub(crate) fn overlay_staged(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.lock();
        let len = buf.len() as u64;
        if let Some(why) = &st.failed {
            if st.lost.iter().any(|r| meets(*r, (off, len))) {
                return Err(self.failure(why));
            }
        }
        for (o, b) in st.staged.iter().flat_map(|b| b.writes.iter()) {
            let data = b.as_slice();
            if !meets((*o, data.len() as u64), (off, len)) {
                continue;
            }
            let from = (*o).max(off);
            let to = (o + data.len() as u64).min(off + len);
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&data[(from - o) as usize..(to - o) as usize]);
        }
        Ok(())
    }

    /// Queues a job; waits while the queue is full.
    pub(crate) fn push(&self, job: Job) -> Result<()> {
        let mut st = self.lock();
        loop {
            if let Some(why) = &st.failed {
                return Err(self.failure(why));
            }
            let full = st.queue.len() >= MAX_QUEUED_JOBS
                || (st.queued_bytes >= MAX_QUEUED_BYTES
                    && (!st.queue.is_empty() || st.busy.is_some()));
            if !full {
                break;
            }
            if st.busy.is_none() {
                // No worker is writing (none runs, or it is between rounds): write here.
                st = self.write_round(st);
                continue;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.queued_bytes += job.bytes();
        st.queue.push_back(job);
        self.changed.notify_all();
        Ok(())
    }

    /// Waits until no queued job overlaps `off..off+len`. Fails if the queue stopped with a
    /// job there dropped.
    pub(crate) fn wait_for(&self, off: u64, len: u64) -> Result<()> {
        self.wait(Some((off, len)))
    }

    /// Waits for the jobs over a range, or for every job (`None`).
    fn wait(&self, range: Option<(u64, u64)>) -> Result<()> {
        let mut st = self.lock();
        let (off, len) = range.unwrap_or((0, u64::MAX));
        loop {
            if let Some(why) = &st.failed {
                if st.lost.iter().any(|r| meets(*r, (off, len))) {
                    return Err(self.failure(why));
                }
            }
            let (queued, busy) = match range {
                None => (!st.queue.is_empty(), st.busy.is_some()),
                Some(_) => (
                    st.queue.iter().any(|j| j.overlaps(off, len)),
                    st.busy
                        .as_ref()
                        .is_some_and(|r| r.iter().any(|r| meets(*r, (off, len)))),
                ),
            };
            if !queued && !busy {
                return Ok(());
            }
            if st.busy.is_none() {
                st = self.write_round(st);
            } else {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Waits until every queued job is written; fails if the queue has stopped.
    pub(crate) fn drain(&self) -> Result<()> {
        self.wait(None)?;
        match &self.lock().failed {
            Some(why) => Err(self.failure(why)),
            None => Ok(()),
        }
    }

    /// Writes whatever is queued now, in this thread (tests pump the queue by hand with this;
    /// a server's worker runs [`Writeback::run`]).
    pub fn write_queued(&self) {
        let st = self.lock();
        if st.busy.is_none() && !st.queue.is_empty() {
            drop(self.write_round(st));
        }
    }

    /// The worker: writes rounds until [`Writeback::stop`] and the queue is empty.
    pub fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.queue.is_empty() || st.busy.is_some() {
                if st.stop {
                    return;
                }
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st = self.write_round(st);
        }
    }

    /// Ends [`Writeback::run`] once the queue is empty.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    /// One round: takes every queued job, writes their journal records and flushes the store
    /// once if any has copies waiting, then writes their origin data in order. Called with the
    /// lock held and no round busy; returns with it held again.
    fn write_round<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let jobs: Vec<Job> = st.queue.drain(..).collect();
        if jobs.is_empty() {
            return st;
        }
        let ranges: Vec<(u64, u64)> = jobs
            .iter()
            .flat_map(|j| j.writes.iter())
            .map(|(o, b)| (*o, b.as_slice().len() as u64))
            .collect();
        let round_bytes: usize = jobs.iter().map(Job::bytes).sum();
        // Overlapping writes in the round are written job by job (checked on sorted ranges).
        let mut sorted = ranges.clone();
        sorted.sort_unstable();
        let overlap = sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0);
        st.busy = Some(ranges);
        drop(st);
        let record = jobs
            .iter()
            .filter_map(|j| j.record.as_ref().map(|r| r.seq))
            .max();
        let round = profile::span(Phase::Writeback);
        let outcome = self.write_jobs(&jobs, overlap);
        drop(round);
        let mut st = self.lock();
        st.busy = None;
        st.queued_bytes = st.queued_bytes.saturating_sub(round_bytes);
        match outcome {
            Ok(()) => {
                if let Some(r) = record {
                    st.durable_record = st.durable_record.max(r);
                }
            }
            Err(why) => {
                // Everything not written is lost, and so is what is still queued behind it.
                let behind: Vec<Job> = st.queue.drain(..).collect();
                st.lost.extend(
                    jobs.iter()
                        .chain(behind.iter())
                        .flat_map(|j| j.writes.iter())
                        .map(|(o, b)| (*o, b.as_slice().len() as u64)),
                );
                st.queued_bytes = 0;
                if st.failed.is_none() {
                    st.failed = Some(why);
                }
            }
        }
        self.changed.notify_all();
        st
    }

    fn write_jobs(&self, jobs: &[Job], overlap: bool) -> std::result::Result<(), String> {
        let records: Vec<(u64, &[u8])> = jobs
            .iter()
            .filter_map(|j| j.record.as_ref())
            .map(|r| (r.at, r.bytes.as_slice()))
            .collect();
        if !records.is_empty() {
            let _flush = profile::span(Phase::StoreFlush);
            self.dev
                .write_many(&records)
                .map_err(|e| format!("store {}: write journal: {e}", self.store_name))?;
            self.dev
                .flush()
                .map_err(|e| format!("store {}: flush: {e}", self.store_name))?;
        }
        let _write = profile::span(Phase::RoundWrite);
        let werr = |e: io::Error| format!("origin {}: write: {e}", self.origin_name);
        // One submission for the whole round unless two of its writes overlap: then job by
        // job, in order (each job's own writes never overlap).
        if !overlap {
            let all: Vec<(u64, &[u8])> = jobs
                .iter()
                .flat_map(|j| j.writes.iter())
                .map(|(o, b)| (*o, b.as_slice()))
                .collect();
            return self.origin.write_many(&all).map_err(werr);
        }
        for j in jobs {
            let list: Vec<(u64, &[u8])> =
                j.writes.iter().map(|(o, b)| (*o, b.as_slice())).collect();
            self.origin.write_many(&list).map_err(werr)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testing::MemIo;

    fn job(off: u64, len: usize) -> Job {
        Job {
            writes: vec![(off, AlignedBuf::new(len))],
            record: None,
        }
    }

    /// The data of a round being written counts against the queue's bound: while a round of
    /// MAX_QUEUED_BYTES is busy, a new job waits for it even though the queue itself is empty.
    #[test]
    fn a_new_job_waits_while_the_busy_round_holds_the_bound() {
        let dev: Arc<dyn BlockIo> = Arc::new(MemIo::new(1 << 20));
        let origin: Arc<dyn BlockIo> = Arc::new(MemIo::new(64 << 20));
        let wb = Arc::new(Writeback::new(dev, origin, "store", "origin"));
        {
            let mut st = wb.lock();
            st.busy = Some(vec![(0, MAX_QUEUED_BYTES as u64)]);
            st.queued_bytes = MAX_QUEUED_BYTES;
        }
        let pusher = {
            let wb = wb.clone();
            std::thread::spawn(move || wb.push(job(40 << 20, 4096)))
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            wb.lock().queue.is_empty(),
            "the job went in beside a full round"
        );
        {
            let mut st = wb.lock();
            st.busy = None;
            st.queued_bytes -= MAX_QUEUED_BYTES;
            wb.changed.notify_all();
        }
        assert!(pusher.join().is_ok_and(|r| r.is_ok()));
        let st = wb.lock();
        assert_eq!((st.queue.len(), st.queued_bytes), (1, 4096));
    }

    /// A round's bytes stay counted until it has written them, then are released.
    #[test]
    fn a_round_releases_its_bytes_once_written() {
        let dev: Arc<dyn BlockIo> = Arc::new(MemIo::new(1 << 20));
        let origin: Arc<dyn BlockIo> = Arc::new(MemIo::new(1 << 20));
        let wb = Writeback::new(dev, origin, "store", "origin");
        wb.push(job(0, 8192)).unwrap();
        wb.push(job(65536, 4096)).unwrap();
        assert_eq!(wb.lock().queued_bytes, 12288);
        wb.write_queued();
        let st = wb.lock();
        assert_eq!(
            (st.queue.len(), st.queued_bytes, st.busy.is_none()),
            (0, 0, true)
        );
    }

    fn filled(len: usize, v: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(len);
        b.as_mut_slice().fill(v);
        b
    }

    fn queue() -> Writeback {
        let dev: Arc<dyn BlockIo> = Arc::new(MemIo::new(1 << 20));
        let origin: Arc<dyn BlockIo> = Arc::new(MemIo::new(64 << 20));
        Writeback::new(dev, origin, "store", "origin")
    }

    /// Writes are staged only while the chunks they touch fit in the room the store told, and
    /// while the stage holds less than its bound; otherwise they come back untouched.
    #[test]
    fn staging_gives_writes_back_without_room_or_when_full() {
        let wb = queue();
        // No room told yet: nothing is staged.
        let back = wb.stage(vec![(0, filled(4096, 1))], 4096).unwrap();
        assert!(back.is_some_and(|w| w.len() == 1));
        wb.set_room(3);
        // 8 KiB across a chunk boundary touches 3 chunks of 4 KiB.
        assert!(wb
            .stage(vec![(2048, filled(8192, 1))], 4096)
            .unwrap()
            .is_none());
        assert!(wb
            .stage(vec![(65536, filled(1, 2))], 4096)
            .unwrap()
            .is_some());
        wb.set_room(u64::MAX);
        let mut staged = 0;
        while wb
            .stage(vec![(0, filled(1 << 20, 3))], 4096)
            .unwrap()
            .is_none()
        {
            staged += 1;
        }
        // 8 KiB was staged already: one MiB fewer.
        assert_eq!(staged, (MAX_STAGED_BYTES >> 20) - 1);
        // Taken for a preserve: room for more again, and the room told shrinks by their chunks.
        assert!(!wb.take_staged(4096).is_empty());
        assert!(wb
            .stage(vec![(0, filled(4096, 4))], 4096)
            .unwrap()
            .is_none());
        // Staged and queued bytes share the queue's bound.
        wb.push(job(1 << 30, MAX_QUEUED_BYTES - (1 << 20))).unwrap();
        assert!(wb
            .stage(vec![(0, filled(1 << 20, 5))], 4096)
            .unwrap()
            .is_some());
        wb.end_staging();
        assert!(wb
            .stage(vec![(0, filled(4096, 4))], 4096)
            .unwrap()
            .is_some());
        assert!(!wb.wait_staged());
    }

    /// A read sees the staged writes laid over it oldest first; once a preserve of them failed,
    /// reads of their ranges fail instead of showing the origin's old bytes.
    #[test]
    fn reads_see_staged_writes_newest_last_and_lost_ones_fail() {
        let wb = queue();
        wb.set_room(u64::MAX);
        assert!(wb
            .stage(vec![(100, filled(100, 1)), (150, filled(100, 2))], 4096)
            .unwrap()
            .is_none());
        assert!(wb
            .stage(vec![(120, filled(10, 3))], 4096)
            .unwrap()
            .is_none());
        assert!(wb.staged_meets(240, 20) && !wb.staged_meets(250, 20));
        let mut buf = vec![9u8; 300];
        wb.overlay_staged(0, &mut buf).unwrap();
        let mut want = vec![9u8; 300];
        want[100..150].fill(1);
        want[150..250].fill(2);
        want[120..130].fill(3);
        assert_eq!(buf, want);
        let mut part = vec![0u8; 4];
        wb.overlay_staged(248, &mut part).unwrap();
        assert_eq!(part, [2, 2, 0, 0]);
        let taken = wb.take_staged(4096);
        assert_eq!(taken.len(), 3);
        wb.fail_staged("the copies failed".into(), &[(100, 150)]);
        assert!(wb.overlay_staged(140, &mut part).is_err());
        assert!(wb.overlay_staged(4000, &mut part).is_ok());
        assert!(wb.stage(vec![(0, filled(1, 1))], 4096).is_err());
    }

    /// One preserve takes staged batches up to the settle bound in copies (at least one).
    #[test]
    fn a_settle_takes_batches_up_to_its_bound() {
        let wb = queue();
        wb.set_room(u64::MAX);
        let chunk = 1u64 << 20;
        let per = (MAX_SETTLE_BYTES / chunk) as usize;
        // Batches of one 4 KiB write, each touching one 1 MiB chunk.
        for k in 0..2 * per + 1 {
            assert!(wb
                .stage(vec![(k as u64 * chunk, filled(4096, 1))], chunk)
                .unwrap()
                .is_none());
        }
        assert_eq!(wb.take_staged(chunk).len(), per);
        assert_eq!(wb.take_staged(chunk).len(), per);
        assert_eq!(wb.take_staged(chunk).len(), 1);
        assert!(wb.take_staged(chunk).is_empty());
    }
}
