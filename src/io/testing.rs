//! Engines for tests only (the `testing` feature, on for this crate's own tests): an
//! in-memory device, and a crash-recording one that loses unflushed writes when power is cut.

use super::*;

/// An in-memory device.
pub struct MemIo {
    data: Mutex<Vec<u8>>,
}

impl MemIo {
    pub fn new(size: u64) -> Self {
        MemIo {
            data: Mutex::new(vec![0; size as usize]),
        }
    }
    pub fn from_vec(v: Vec<u8>) -> Self {
        MemIo {
            data: Mutex::new(v),
        }
    }
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

pub(super) fn poisoned() -> io::Error {
    io::Error::other("lock poisoned")
}

impl BlockIo for MemIo {
    fn len(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.data.lock().map_err(|_| poisoned())?;
        check_range(d.len() as u64, off, buf.len())?;
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut d = self.data.lock().map_err(|_| poisoned())?;
        check_range(d.len() as u64, off, buf.len())?;
        d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn engine(&self) -> &'static str {
        "memory"
    }
}

/// The power supply shared by every [`CrashIo`] of one simulated machine: it counts writes across
/// all devices and cuts power after a chosen number of them.
#[derive(Default)]
pub struct Power {
    state: Mutex<PowerState>,
}

#[derive(Default)]
pub(super) struct PowerState {
    writes: u64,
    cut_after: Option<u64>,
}

impl Power {
    pub fn new() -> Arc<Self> {
        Arc::new(Power::default())
    }
    /// Power fails when the write numbered `n` (0-based, across all devices) is issued:
    /// that write and every later one fail.
    pub fn cut_after(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.cut_after = Some(n);
        }
    }
    pub fn writes(&self) -> u64 {
        self.state.lock().map(|s| s.writes).unwrap_or(0)
    }
    fn admit(&self) -> io::Result<()> {
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        if let Some(n) = s.cut_after {
            if s.writes >= n {
                return Err(io::Error::other("simulated power loss"));
            }
        }
        s.writes += 1;
        Ok(())
    }
}

/// A recording device: writes land in a volatile cache until `flush`; after a simulated power
/// cut, [`CrashIo::after_crash`] builds what the disk may hold: everything flushed, plus any
/// subset of the writes since the last flush, some of them torn.
pub struct CrashIo {
    power: Arc<Power>,
    state: Mutex<CrashState>,
}

pub(super) struct CrashState {
    durable: Vec<u8>,
    /// Writes since the last completed flush, in order.
    pending: Vec<(u64, Vec<u8>)>,
}

impl CrashIo {
    pub fn new(image: Vec<u8>, power: Arc<Power>) -> Self {
        CrashIo {
            power,
            state: Mutex::new(CrashState {
                durable: image,
                pending: Vec::new(),
            }),
        }
    }

    /// The disk contents after power loss. `keep(i, len)` decides for pending write `i` how many
    /// of its bytes reached the medium (0 = lost, len = whole, in between = torn at a 512-byte
    /// sector boundary rounded down).
    pub fn after_crash(&self, mut keep: impl FnMut(usize, usize) -> usize) -> Vec<u8> {
        let s = match self.state.lock() {
            Ok(s) => s,
            Err(_) => return Vec::new(),
        };
        let mut img = s.durable.clone();
        for (i, (off, data)) in s.pending.iter().enumerate() {
            let n = keep(i, data.len()).min(data.len());
            let n = if n < data.len() { n - n % 512 } else { n };
            let o = *off as usize;
            img[o..o + n].copy_from_slice(&data[..n]);
        }
        img
    }

    /// The image as it is now, cache included (what a reader sees without a crash).
    pub fn current(&self) -> Vec<u8> {
        self.after_crash(|_, n| n)
    }

    pub fn pending_writes(&self) -> usize {
        self.state.lock().map(|s| s.pending.len()).unwrap_or(0)
    }
}

impl BlockIo for CrashIo {
    fn len(&self) -> u64 {
        self.state
            .lock()
            .map(|s| s.durable.len() as u64)
            .unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let s = self.state.lock().map_err(|_| poisoned())?;
        check_range(s.durable.len() as u64, off, buf.len())?;
        let o = off as usize;
        buf.copy_from_slice(&s.durable[o..o + buf.len()]);
        // Later writes win: overlay the cache in order.
        let end = off + buf.len() as u64;
        for (woff, data) in &s.pending {
            let wend = woff + data.len() as u64;
            if *woff < end && wend > off {
                let a = (*woff).max(off);
                let b = wend.min(end);
                buf[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&data[(a - woff) as usize..(b - woff) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.power.admit()?;
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        check_range(s.durable.len() as u64, off, buf.len())?;
        s.pending.push((off, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.power.admit()?;
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            let o = off as usize;
            s.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
    fn engine(&self) -> &'static str {
        "crash-recording"
    }
}
