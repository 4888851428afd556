//! The io_uring engine: a small pool of rings per engine, so that callers on several threads
//! (connections, the writeback worker) never wait for each other's I/O; each call's requests go
//! in flight together on one ring.

use super::*;

/// Rings an engine makes at most: one per thread doing I/O at the same moment, beyond which a
/// caller waits for a ring to come back.
const MAX_RINGS: usize = 4;
/// Submission queue entries per ring.
const RING_DEPTH: u32 = 64;

/// io_uring engine: batches go in flight together, on a ring of the engine's pool.
pub struct UringIo {
    pub(super) file: File,
    pub(super) tail: Tail,
    pub(super) size: u64,
    pub(super) align: usize,
    pub(super) rings: RingPool,
}

/// Idle rings, taken by a call for its whole duration and given back after.
pub(super) struct RingPool {
    idle: Mutex<(Vec<io_uring::IoUring>, usize)>,
    back: std::sync::Condvar,
}

impl RingPool {
    /// A pool holding `first` (made by the caller, which proves io_uring is allowed here).
    pub(super) fn new(first: io_uring::IoUring) -> RingPool {
        RingPool {
            idle: Mutex::new((vec![first], 1)),
            back: std::sync::Condvar::new(),
        }
    }

    pub(super) fn first() -> io::Result<io_uring::IoUring> {
        io_uring::IoUring::new(RING_DEPTH)
    }

    fn take(&self) -> io::Result<Ring<'_>> {
        let mut idle = self
            .idle
            .lock()
            .map_err(|_| io::Error::other("io_uring pool lock poisoned"))?;
        loop {
            if let Some(r) = idle.0.pop() {
                return Ok(Ring {
                    pool: self,
                    ring: Some(r),
                });
            }
            if idle.1 < MAX_RINGS {
                // Another ring, made outside the lock; should the kernel refuse it, wait for
                // one of those already made.
                idle.1 += 1;
                drop(idle);
                match io_uring::IoUring::new(RING_DEPTH) {
                    Ok(r) => {
                        return Ok(Ring {
                            pool: self,
                            ring: Some(r),
                        })
                    }
                    Err(_) => {
                        idle = self
                            .idle
                            .lock()
                            .map_err(|_| io::Error::other("io_uring pool lock poisoned"))?;
                        idle.1 = MAX_RINGS;
                        continue;
                    }
                }
            }
            idle = self
                .back
                .wait(idle)
                .map_err(|_| io::Error::other("io_uring pool lock poisoned"))?;
        }
    }
}

/// A ring taken from the pool; given back when dropped.
struct Ring<'a> {
    pool: &'a RingPool,
    ring: Option<io_uring::IoUring>,
}

impl std::ops::Deref for Ring<'_> {
    type Target = io_uring::IoUring;
    fn deref(&self) -> &io_uring::IoUring {
        self.ring
            .as_ref()
            .expect("a taken ring holds one until dropped")
    }
}

impl std::ops::DerefMut for Ring<'_> {
    fn deref_mut(&mut self) -> &mut io_uring::IoUring {
        self.ring
            .as_mut()
            .expect("a taken ring holds one until dropped")
    }
}

impl Drop for Ring<'_> {
    fn drop(&mut self) {
        if let (Some(r), Ok(mut idle)) = (self.ring.take(), self.pool.idle.lock()) {
            idle.0.push(r);
            self.pool.back.notify_one();
        }
    }
}

pub(super) enum Op<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl UringIo {
    /// Submits every request and waits for all of them; each must transfer its full length
    /// (short transfers are continued, not mistaken for success).
    fn run(&self, ops: &mut [(u64, Op<'_>)]) -> io::Result<()> {
        use io_uring::{opcode, types};
        if ops.is_empty() {
            return Ok(());
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let mut ring = self.rings.take()?;
        let depth = ring.params().sq_entries() as usize;
        // progress[i]: bytes done for request i.
        let mut progress = vec![0usize; ops.len()];
        let mut pending: Vec<usize> = (0..ops.len()).collect();
        while !pending.is_empty() {
            let batch: Vec<usize> = pending.drain(..pending.len().min(depth)).collect();
            for &i in &batch {
                let (off, op) = &mut ops[i];
                let done = progress[i];
                let entry = match op {
                    Op::Read(b) => {
                        let rest = &mut b[done..];
                        opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                            .offset(*off + done as u64)
                            .build()
                    }
                    Op::Write(b) => {
                        let rest = &b[done..];
                        opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                            .offset(*off + done as u64)
                            .build()
                    }
                }
                .user_data(i as u64);
                // SAFETY: the buffers outlive the wait below; the queue has room (batch <= depth).
                unsafe { ring.submission().push(&entry) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
            ring.submit_and_wait(batch.len())?;
            let mut seen = 0;
            while seen < batch.len() {
                let cqes: Vec<_> = ring.completion().collect();
                if cqes.is_empty() {
                    ring.submit_and_wait(1)?;
                    continue;
                }
                for cqe in cqes {
                    seen += 1;
                    let i = cqe.user_data() as usize;
                    let res = cqe.result();
                    if res < 0 {
                        return Err(io::Error::from_raw_os_error(-res));
                    }
                    let total = match &ops[i].1 {
                        Op::Read(b) => b.len(),
                        Op::Write(b) => b.len(),
                    };
                    if res == 0 && progress[i] < total {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "short transfer at end of device",
                        ));
                    }
                    progress[i] += res as usize;
                    if progress[i] < total {
                        pending.push(i);
                    }
                }
            }
        }
        Ok(())
    }
}

impl RawIo for UringIo {
    fn raw_read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.run(&mut [(off, Op::Read(buf))])
    }
    fn raw_write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.run(&mut [(off, Op::Write(buf))])
    }
}

impl BlockIo for UringIo {
    file_engine_common!();
    fn engine(&self) -> &'static str {
        if self.align > 1 {
            "io_uring (O_DIRECT)"
        } else {
            "io_uring (buffered)"
        }
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        let align = self.align.max(1) as u64;
        // Requests whose offset and length are aligned go in flight together; those misaligned
        // only in memory read into an aligned bounce buffer first. Anything else (a partial
        // block) takes the read-modify-write path on its own.
        let mut bounce: Vec<(usize, AlignedBuf)> = Vec::new();
        let mut direct: Vec<usize> = Vec::new();
        let partial = |off: u64, n: usize| {
            off % align != 0 || n as u64 % align != 0 || self.tail.touches(off, n)
        };
        for (i, (off, buf)) in reqs.iter().enumerate() {
            check_range(self.size, *off, buf.len())?;
            if partial(*off, buf.len()) {
                continue;
            }
            if (buf.as_ptr() as u64) % align == 0 {
                direct.push(i);
            } else {
                bounce.push((i, AlignedBuf::new(buf.len())));
            }
        }
        {
            let mut ops: Vec<(u64, Op<'_>)> = Vec::with_capacity(direct.len() + bounce.len());
            let mut bi = bounce.iter_mut().peekable();
            for (i, (off, buf)) in reqs.iter_mut().enumerate() {
                if direct.contains(&i) {
                    ops.push((*off, Op::Read(&mut buf[..])));
                } else if bi.peek().is_some_and(|(j, _)| *j == i) {
                    if let Some((_, b)) = bi.next() {
                        ops.push((*off, Op::Read(b.as_mut_slice())));
                    }
                }
            }
            self.run(&mut ops)?;
        }
        for (i, b) in &bounce {
            reqs[*i].1.copy_from_slice(b.as_slice());
        }
        for (off, buf) in reqs.iter_mut() {
            if partial(*off, buf.len()) {
                self.read_at(buf, *off)?;
            }
        }
        Ok(())
    }
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> io::Result<()> {
        let align = self.align.max(1) as u64;
        let mut bounce: Vec<AlignedBuf> = Vec::new();
        let mut ops: Vec<(u64, Op<'_>)> = Vec::with_capacity(reqs.len());
        let partial = |off: u64, n: usize| {
            off % align != 0 || n as u64 % align != 0 || self.tail.touches(off, n)
        };
        for (off, buf) in reqs {
            check_range(self.size, *off, buf.len())?;
            if partial(*off, buf.len()) {
                continue;
            }
            if (buf.as_ptr() as u64) % align != 0 {
                let mut b = AlignedBuf::new(buf.len());
                b.as_mut_slice().copy_from_slice(buf);
                bounce.push(b);
            }
        }
        let mut bi = bounce.iter();
        for (off, buf) in reqs {
            if partial(*off, buf.len()) {
                continue;
            }
            if (buf.as_ptr() as u64) % align == 0 {
                ops.push((*off, Op::Write(buf)));
            } else if let Some(b) = bi.next() {
                ops.push((*off, Op::Write(b.as_slice())));
            }
        }
        self.run(&mut ops)?;
        for (off, buf) in reqs {
            if partial(*off, buf.len()) {
                self.write_at(buf, *off)?;
            }
        }
        Ok(())
    }
}
