//! Engines for tests only (the `testing` feature, on for this crate's own tests): an
//! in-memory device, a crash-recording one that loses unflushed writes when power is cut, and a
//! journalling one over a cheaply cloned block image (for the crash-state explorer,
//! tests/explore.rs).

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

/// The power supply shared by every [`CrashIo`] and [`ImageIo`] of one simulated machine: it
/// counts writes across all devices and cuts power after a chosen number of them. Made with
/// [`Power::recording`], it also keeps a journal: every write (device, offset, bytes) and every
/// flush of every attached device, in the one order they were issued in, which is what a crash
/// explorer needs to rebuild any state the disks could be left in.
#[derive(Default)]
pub struct Power {
    state: Mutex<PowerState>,
}

#[derive(Default)]
pub(super) struct PowerState {
    writes: u64,
    cut_after: Option<u64>,
    devices: usize,
    journal: Option<Vec<Event>>,
}

/// One entry of a [`Power`]'s journal. Devices are numbered in the order they were attached to
/// the power (made with it), from 0.
#[derive(Clone, Debug)]
pub enum Event {
    /// `data` was written at `off` on device `dev` (volatile until that device's next flush).
    Write {
        dev: usize,
        off: u64,
        data: Arc<[u8]>,
    },
    /// Device `dev` made every write it had completed durable.
    Flush { dev: usize },
}

impl Power {
    pub fn new() -> Arc<Self> {
        Arc::new(Power::default())
    }
    /// A power supply that journals every write and flush of its devices (see [`Event`]).
    pub fn recording() -> Arc<Self> {
        let p = Power::default();
        if let Ok(mut s) = p.state.lock() {
            s.journal = Some(Vec::new());
        }
        Arc::new(p)
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
    /// Everything journalled so far (empty unless made with [`Power::recording`]).
    pub fn journal(&self) -> Vec<Event> {
        self.journal_since(0)
    }
    /// The journal from entry `from` on.
    pub fn journal_since(&self, from: usize) -> Vec<Event> {
        self.state
            .lock()
            .ok()
            .and_then(|s| {
                s.journal
                    .as_ref()
                    .map(|j| j.get(from..).unwrap_or(&[]).to_vec())
            })
            .unwrap_or_default()
    }
    /// How many entries the journal holds.
    pub fn journal_len(&self) -> usize {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.journal.as_ref().map(|j| j.len()))
            .unwrap_or(0)
    }
    /// A number for a new device on this power.
    fn attach(&self) -> usize {
        self.state
            .lock()
            .map(|mut s| {
                s.devices += 1;
                s.devices - 1
            })
            .unwrap_or(0)
    }
    /// Counts a write or flush, refuses it once power is cut, and journals it (`event` is only
    /// built when recording).
    fn admit(&self, event: impl FnOnce() -> Event) -> io::Result<()> {
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        if let Some(n) = s.cut_after {
            if s.writes >= n {
                return Err(io::Error::other("simulated power loss"));
            }
        }
        s.writes += 1;
        if let Some(j) = s.journal.as_mut() {
            j.push(event());
        }
        Ok(())
    }
}

/// A recording device: writes land in a volatile cache until `flush`; after a simulated power
/// cut, [`CrashIo::after_crash`] builds what the disk may hold: everything flushed, plus any
/// subset of the writes since the last flush, some of them torn.
pub struct CrashIo {
    power: Arc<Power>,
    dev: usize,
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
            dev: power.attach(),
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
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        check_range(s.durable.len() as u64, off, buf.len())?;
        let dev = self.dev;
        self.power.admit(|| Event::Write {
            dev,
            off,
            data: buf.into(),
        })?;
        s.pending.push((off, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let dev = self.dev;
        self.power.admit(|| Event::Flush { dev })?;
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

/// Bytes per block of an [`Image`].
pub const IMAGE_BLOCK: usize = 4096;

/// A device's contents as shared, copy-on-write 4 KiB blocks: cloning an image costs one pointer
/// per block, a write copies only the blocks it touches, and all-zero blocks take no memory.
/// Each block keeps its hash, so the image's [`Image::hash`] costs a pass over pointers, not
/// over bytes. Tests build thousands of crash states from one base image this way.
#[derive(Clone)]
pub struct Image {
    len: u64,
    blocks: Vec<Option<Arc<Block>>>,
}

struct Block {
    data: Box<[u8]>,
    hash: [u8; 16],
}

impl Image {
    /// `len` zero bytes.
    pub fn zeroed(len: u64) -> Image {
        Image {
            len,
            blocks: vec![None; len.div_ceil(IMAGE_BLOCK as u64) as usize],
        }
    }
    pub fn from_bytes(b: &[u8]) -> Image {
        let mut img = Image::zeroed(b.len() as u64);
        img.write(0, b);
        img
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        self.read(0, &mut v);
        v
    }
    /// Reads `buf.len()` bytes at `off` (the caller keeps within the image).
    pub fn read(&self, off: u64, buf: &mut [u8]) {
        let mut pos = 0usize;
        while pos < buf.len() {
            let abs = off as usize + pos;
            let (b, within) = (abs / IMAGE_BLOCK, abs % IMAGE_BLOCK);
            let n = (IMAGE_BLOCK - within).min(buf.len() - pos);
            match &self.blocks[b] {
                Some(blk) => buf[pos..pos + n].copy_from_slice(&blk.data[within..within + n]),
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }
    /// Writes `data` at `off` (the caller keeps within the image).
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = off as usize + pos;
            let (b, within) = (abs / IMAGE_BLOCK, abs % IMAGE_BLOCK);
            let n = (IMAGE_BLOCK - within).min(data.len() - pos);
            let mut blk = match &self.blocks[b] {
                Some(old) if n < IMAGE_BLOCK => old.data.clone(),
                _ => vec![0u8; IMAGE_BLOCK].into_boxed_slice(),
            };
            blk[within..within + n].copy_from_slice(&data[pos..pos + n]);
            self.blocks[b] = if blk.iter().all(|&x| x == 0) {
                None
            } else {
                let mut hash = [0u8; 16];
                hash.copy_from_slice(&blake3::hash(&blk).as_bytes()[..16]);
                Some(Arc::new(Block { data: blk, hash }))
            };
            pos += n;
        }
    }
    /// A hash of the contents (equal images, equal hashes, however they were built).
    pub fn hash(&self) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        h.update(&self.len.to_le_bytes());
        for (i, b) in self.blocks.iter().enumerate() {
            if let Some(b) = b {
                h.update(&(i as u64).to_le_bytes());
                h.update(&b.hash);
            }
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }
}

/// A device over an [`Image`]: writes apply at once (reads see them, as a volatile write cache
/// would show them), and every write and flush goes through its [`Power`], which can cut power
/// and, when recording, journals them. What a crash leaves is for the caller to build from the
/// journal: see tests/explore.rs.
pub struct ImageIo {
    power: Arc<Power>,
    dev: usize,
    image: Mutex<Image>,
}

impl ImageIo {
    /// A device holding `image`, attached to `power` as its next device number.
    pub fn new(image: Image, power: Arc<Power>) -> Self {
        ImageIo {
            dev: power.attach(),
            power,
            image: Mutex::new(image),
        }
    }
    /// The number this device's events carry in the journal.
    pub fn dev(&self) -> usize {
        self.dev
    }
    /// The contents now (every write, flushed or not).
    pub fn image(&self) -> Image {
        self.image
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|_| Image::zeroed(0))
    }
}

impl BlockIo for ImageIo {
    fn len(&self) -> u64 {
        self.image.lock().map(|i| i.len).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let img = self.image.lock().map_err(|_| poisoned())?;
        check_range(img.len, off, buf.len())?;
        img.read(off, buf);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut img = self.image.lock().map_err(|_| poisoned())?;
        check_range(img.len, off, buf.len())?;
        let dev = self.dev;
        self.power.admit(|| Event::Write {
            dev,
            off,
            data: buf.into(),
        })?;
        img.write(off, buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let dev = self.dev;
        self.power.admit(|| Event::Flush { dev })
    }
    fn engine(&self) -> &'static str {
        "image"
    }
}
