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

/// Data queued or being written above which a new job waits for the worker: one batch's worth
/// (a batch is at most 32 MiB), so that the queue adds at most twice that to the server's
/// memory (this, and the job that crossed it); the client's queue, not ours, is what should be
/// deep.
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// Jobs queued at most.
const MAX_QUEUED_JOBS: usize = 64;

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

#[derive(Default)]
struct State {
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
}
