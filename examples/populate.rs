//! Builds a large store quickly, for benchmarks of `check`, `list`, `info` and of opening after
//! an unclean shutdown (scripts/bench-check.sh).
//!
//! The store is an ordinary one on real files (a sparse store file, a sparse origin file): its
//! superblock and metadata are written for real, through the normal copy-on-write path
//! (`create`, then `write_batch`, for each snapshot). Only the bytes are skipped: the origin
//! reads as zeros and drops writes, and the store's data area drops writes, so the saved chunks
//! are never written. Every byte involved is zero, so every saved chunk's hash is the hash of
//! zeros, which is what a later `snapctl check --data` reads back from the sparse store file:
//! the store stays consistent.
//!
//!   cargo run --release --example populate -- --store S --origin O \
//!       --snapshots 100000 --exceptions-per-snapshot 100 [--chunk-size 4K] \
//!       [--origin-chunks 1000000] [--metadata-size BYTES] [--sync] [--seed N] [--unclean]
//!
//! A store file that already holds a store is opened and N more snapshots are added (its own
//! chunk size and origin); otherwise the files are created (sparse) and formatted first.
//! `--unclean`: exit right after the last commit without closing the metadata database, so the
//! next open takes the recovery path. Without `--sync`, flushes are skipped (the kernel's page
//! cache holds the writes; a machine crash during the run leaves a store to throw away).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use snapctl::io::BlockIo;
use snapctl::store::format::{OnFull, META_OFFSET};
use snapctl::store::{origin_fingerprint, peek_superblock, Store};

/// The store file: everything below `data_offset` (superblock, metadata) goes to the file;
/// writes at or past it are dropped (the area stays a hole and reads as zeros).
struct DataDropIo {
    file: File,
    len: u64,
    data_offset: u64,
    sync: bool,
}

impl BlockIo for DataDropIo {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if off >= self.data_offset {
            return Ok(());
        }
        let keep = ((self.data_offset - off) as usize).min(buf.len());
        self.file.write_all_at(&buf[..keep], off)
    }
    fn flush(&self) -> io::Result<()> {
        if self.sync {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }
    fn engine(&self) -> &'static str {
        "populate (data writes dropped)"
    }
}

/// The origin: reads zeros, drops writes.
struct ZeroIo {
    len: u64,
}

impl BlockIo for ZeroIo {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], _off: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn engine(&self) -> &'static str {
        "zeros"
    }
}

struct Args {
    store: PathBuf,
    origin: PathBuf,
    snapshots: u64,
    per_snapshot: u64,
    chunk_size: u64,
    origin_chunks: u64,
    metadata_size: Option<u64>,
    sync: bool,
    seed: u64,
    unclean: bool,
}

fn size(s: &str) -> u64 {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| fail(&format!("not a size: {s}")))
        * mult
}

fn fail(msg: &str) -> ! {
    eprintln!("populate: {msg}");
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        store: PathBuf::new(),
        origin: PathBuf::new(),
        snapshots: 1000,
        per_snapshot: 100,
        chunk_size: 4096,
        origin_chunks: 1_000_000,
        metadata_size: None,
        sync: false,
        seed: 1,
        unclean: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .unwrap_or_else(|| fail(&format!("{k} needs a value")))
        };
        match k.as_str() {
            "--store" => a.store = v().into(),
            "--origin" => a.origin = v().into(),
            "--snapshots" => a.snapshots = size(&v()),
            "--exceptions-per-snapshot" => a.per_snapshot = size(&v()),
            "--chunk-size" => a.chunk_size = size(&v()),
            "--origin-chunks" => a.origin_chunks = size(&v()),
            "--metadata-size" => a.metadata_size = Some(size(&v())),
            "--seed" => a.seed = size(&v()),
            "--sync" => a.sync = true,
            "--unclean" => a.unclean = true,
            _ => fail(&format!("unknown argument {k} (see examples/populate.rs)")),
        }
    }
    if a.store.as_os_str().is_empty() {
        fail("--store is required");
    }
    a
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", p.display())))
}

/// Real bytes a file holds (sparse files hold less than their size).
fn used_mib(p: &Path) -> f64 {
    std::fs::metadata(p)
        .map(|m| m.blocks() as f64 * 512.0 / 1048576.0)
        .unwrap_or(0.0)
}

/// Formats a new store: sparse files of the sizes asked, the metadata and superblock written as
/// `Store::init_io` writes them (`Store::init` would preallocate the whole file), then the
/// superblock given the origin's real path and identity, as `init` gives it.
fn format(a: &Args) {
    if a.origin.as_os_str().is_empty() {
        fail("--origin is required to make a new store");
    }
    let cs = a.chunk_size;
    let exceptions = a.snapshots * a.per_snapshot;
    // Measured with random single-chunk exceptions: redb's file reached 2560 MiB at 10,000,000
    // exceptions and 50,000 snapshots (about 256 bytes each), and it grows by doubling, so the
    // region must hold twice that and more: 1 KiB per exception, 4 KiB per snapshot. Sparse, so
    // room costs nothing.
    let meta = a
        .metadata_size
        .unwrap_or((exceptions * 1024 + a.snapshots * 4096).max(64 << 20))
        .next_multiple_of(1 << 20);
    let data_offset = (META_OFFSET + meta).next_multiple_of(cs.max(1 << 20));
    let data_chunks = exceptions + exceptions / 10 + 1024;
    let store_len = data_offset + data_chunks * cs;
    let origin_len = a.origin_chunks * cs;
    let o = open_rw(&a.origin);
    o.set_len(0).and_then(|_| o.set_len(origin_len)).unwrap();
    let f = open_rw(&a.store);
    f.set_len(0).and_then(|_| f.set_len(store_len)).unwrap();
    let dev: Arc<dyn BlockIo> = Arc::new(DataDropIo {
        file: f.try_clone().unwrap(),
        len: store_len,
        data_offset,
        sync: true,
    });
    let mut sb = Store::init_io(dev.clone(), origin_len, cs, meta, OnFull::DropOldest)
        .unwrap_or_else(|e| fail(&format!("init: {e}")));
    assert_eq!(sb.data_offset, data_offset);
    let origin = std::fs::canonicalize(&a.origin).unwrap();
    sb.fingerprint = origin_fingerprint(&origin).unwrap_or_else(|e| fail(&e.to_string()));
    sb.origin_path = origin.to_string_lossy().into_owned();
    dev.write_at(&sb.encode(), 0).unwrap();
    dev.flush().unwrap();
    eprintln!(
        "populate: formatted {}: {} chunks of {} bytes, metadata region {} MiB, origin {} ({} chunks)",
        a.store.display(),
        data_chunks,
        cs,
        meta >> 20,
        origin.display(),
        a.origin_chunks
    );
}

fn main() {
    let a = args();
    let fresh = peek_superblock(&a.store).is_none();
    if fresh {
        format(&a);
    }
    let sb = peek_superblock(&a.store).unwrap_or_else(|| fail("the store did not format"));
    let file = open_rw(&a.store);
    let len = file.metadata().unwrap().len();
    let dev: Arc<dyn BlockIo> = Arc::new(DataDropIo {
        file,
        len,
        data_offset: sb.data_offset,
        sync: a.sync,
    });
    let origin: Arc<dyn BlockIo> = Arc::new(ZeroIo {
        len: sb.origin_size,
    });
    let t_open = Instant::now();
    let mut store = Store::open_io(dev, origin, &a.store.display().to_string())
        .unwrap_or_else(|e| fail(&format!("open: {e}")));
    let have = store.snapshots().count() as u64;
    eprintln!(
        "populate: opened in {:.3} s, {have} snapshots; adding {} with {} exceptions each",
        t_open.elapsed().as_secs_f64(),
        a.snapshots,
        a.per_snapshot
    );
    let cs = sb.chunk_size;
    let chunks = sb.origin_chunks();
    if a.per_snapshot > chunks {
        fail("more exceptions per snapshot than the origin has chunks");
    }
    let zeros = vec![0u8; cs as usize];
    let mut rng = SmallRng::seed_from_u64(a.seed ^ have.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut picked: Vec<u64> = Vec::with_capacity(a.per_snapshot as usize);
    let t0 = Instant::now();
    let (mut t_create, mut t_write) = (0f64, 0f64);
    let step = (a.snapshots / 20).max(1);
    let mut t_step = Instant::now();
    for i in 0..a.snapshots {
        let t = Instant::now();
        store
            .create(&format!("p{}", have + i), None, Default::default(), None)
            .unwrap_or_else(|e| fail(&format!("create: {e}")));
        t_create += t.elapsed().as_secs_f64();
        // K distinct chunks anywhere in the origin: each one a first write since the snapshot,
        // so each one copy-on-write exception.
        picked.clear();
        while (picked.len() as u64) < a.per_snapshot {
            let c = rng.gen_range(0..chunks);
            if !picked.contains(&c) {
                picked.push(c);
            }
        }
        let writes: Vec<(u64, &[u8])> = picked.iter().map(|c| (c * cs, &zeros[..])).collect();
        let t = Instant::now();
        store
            .write_batch(&writes, false)
            .unwrap_or_else(|e| fail(&format!("write: {e}")));
        t_write += t.elapsed().as_secs_f64();
        if (i + 1) % step == 0 || i + 1 == a.snapshots {
            let n = (i + 1) % step;
            let n = if n == 0 { step } else { n };
            eprintln!(
                "populate: {:>9} snapshots {:>12} exceptions  {:>7.1} s  {:>8.0} snapshots/s lately  metadata file {:.0} MiB",
                have + i + 1,
                (have + i + 1) * a.per_snapshot,
                t0.elapsed().as_secs_f64(),
                n as f64 / t_step.elapsed().as_secs_f64(),
                used_mib(&a.store)
            );
            t_step = Instant::now();
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let n = a.snapshots.max(1) as f64;
    eprintln!(
        "populate: {} snapshots in {total:.1} s: {:.0} snapshots/s, {:.0} exceptions/s; per snapshot {:.3} ms create + {:.3} ms write",
        a.snapshots,
        n / total,
        n * a.per_snapshot as f64 / total,
        t_create / n * 1e3,
        t_write / n * 1e3
    );
    // Machine-readable, for scripts.
    println!(
        "populate_s={total:.3} per_snapshot_ms={:.4} create_ms={:.4} write_ms={:.4} store_used_mib={:.0}",
        total / n * 1e3,
        t_create / n * 1e3,
        t_write / n * 1e3,
        used_mib(&a.store)
    );
    if a.unclean {
        // The last commit is on disk (the page cache, which the next process reads); the
        // database is never closed, so its header still says a writer had it open.
        eprintln!("populate: exiting without closing the store (--unclean)");
        std::process::exit(0);
    }
    drop(store);
}
