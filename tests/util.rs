#![allow(dead_code)]
use std::sync::Arc;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use snapctl::io::testing::MemIo;
use snapctl::io::BlockIo;
use snapctl::store::format::OnFull;
use snapctl::store::Store;

pub const META: u64 = 4 << 20;

/// A fresh in-memory origin (random bytes) and store.
pub fn mem_store(
    origin_size: u64,
    store_size: u64,
    chunk: u64,
    on_full: OnFull,
    seed: u64,
) -> (Store, Arc<MemIo>, Arc<MemIo>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut img = vec![0u8; origin_size as usize];
    rng.fill(&mut img[..]);
    let origin = Arc::new(MemIo::from_vec(img));
    let dev = Arc::new(MemIo::new(store_size));
    Store::init_io(dev.clone(), origin_size, chunk, META, on_full).expect("init");
    let s = Store::open_io(dev.clone(), origin.clone(), "mem").expect("open");
    (s, origin, dev)
}

pub fn read_all(s: &Store, view: &str) -> Vec<u8> {
    let mut b = vec![0u8; s.sb.origin_size as usize];
    s.read_view(view, 0, &mut b).expect("read view");
    b
}

pub fn bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_snapctl"))
}

pub fn as_io(m: &Arc<MemIo>) -> Arc<dyn BlockIo> {
    m.clone()
}

/// Counts the bytes read through it.
pub struct Counting {
    pub inner: Arc<dyn BlockIo>,
    pub read: std::sync::atomic::AtomicU64,
}

impl BlockIo for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn engine(&self) -> &'static str {
        "counting"
    }
}

/// Passes everything through until told to fail its writes (and flushes).
pub struct Failing {
    pub inner: Arc<dyn BlockIo>,
    pub fail: std::sync::atomic::AtomicBool,
}

impl Failing {
    pub fn new(inner: Arc<dyn BlockIo>) -> Failing {
        Failing {
            inner,
            fail: Default::default(),
        }
    }
    fn check(&self) -> std::io::Result<()> {
        match self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            false => Ok(()),
        }
    }
}

impl BlockIo for Failing {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.flush()
    }
    fn engine(&self) -> &'static str {
        "failing"
    }
}
