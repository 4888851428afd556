//! Device I/O: one small trait, interchangeable engines.
//!
//! * [`UringIo`]: io_uring, O_DIRECT where the file system allows it, many requests in flight.
//! * [`SyncIo`]: pread/pwrite, chosen automatically where io_uring is refused.
//! * [`MemIo`] and [`CrashIo`]: test engines; `CrashIo` records writes and simulates power loss.
//!
//! Every engine accepts any offset, length and buffer: O_DIRECT engines bounce unaligned requests
//! through aligned buffers, so callers never reason about alignment.

// Defines `file_engine_common!`, used by both file engines: first.
#[macro_use]
mod tail;
mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod uring;

pub use sync::SyncIo;
use tail::Tail;
pub use uring::UringIo;

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Alignment of O_DIRECT buffers and of the bounce path.
pub const DIRECT_ALIGN: usize = 4096;

/// A block device, a file or a test double. All methods take `&self`: engines are shared between
/// threads and do their own synchronisation.
pub trait BlockIo: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads exactly `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Engine name for `info` and `-v`.
    fn engine(&self) -> &'static str;
    /// Many independent reads; engines that can keep them in flight together do so.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (off, buf) in reqs.iter_mut() {
            self.read_at(buf, *off)?;
        }
        Ok(())
    }
    /// The ranges inside `off..off+len` known to read as zeros without being stored (holes of a
    /// sparse file), in order, clipped to the range. Empty when nothing is known: a block
    /// device, or an engine that cannot tell. Never claims a range that holds data.
    fn holes(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let _ = (off, len);
        Ok(Vec::new())
    }
    /// A hint that `off..off+len` will be read soon (a whole-metadata pass: `check`): engines
    /// on a file descriptor ask the kernel to read it ahead, in large sequential requests.
    fn will_need(&self, off: u64, len: u64) {
        let _ = (off, len);
    }
    /// Many independent writes (non-overlapping), possibly in flight together.
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> io::Result<()> {
        for (off, buf) in reqs {
            self.write_at(buf, *off)?;
        }
        Ok(())
    }
}

fn check_range(len: u64, off: u64, n: usize) -> io::Result<()> {
    match off.checked_add(n as u64) {
        Some(end) if end <= len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("I/O of {n} bytes at {off} is beyond the end ({len} bytes)"),
        )),
    }
}

/// A zeroed buffer aligned for O_DIRECT.
///
/// Buffers of [`MAPPED_MIN`] bytes or more (a 1 MiB NBD payload, a large batch's copies) are
/// mapped for themselves and unmapped when dropped. From the allocator they would stay resident
/// after being freed: glibc raises its mmap threshold each time such a block is freed, so later
/// ones come from its arenas, which keep every page they have touched. Serving 1 MiB writes
/// after a snapshot, that left the server's peak at 170-200 MiB against 34 MiB mapped.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    mapped: bool,
}

/// The size from which a buffer is mapped rather than allocated.
const MAPPED_MIN: usize = 1 << 20;

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let size = Self::size(len);
        if size >= MAPPED_MIN {
            // SAFETY: an anonymous private mapping of `size` bytes, no address requested; the
            // pages are zeroed by the kernel and faulted in at once (MAP_POPULATE).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                return AlignedBuf {
                    ptr: p.cast(),
                    len,
                    mapped: true,
                };
            }
        }
        let layout = Layout::from_size_align(size, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf {
            ptr,
            len,
            mapped: false,
        }
    }
    fn size(len: usize) -> usize {
        len.max(1).next_multiple_of(DIRECT_ALIGN)
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let size = Self::size(self.len);
        if self.mapped {
            // SAFETY: mapped in new() with this size; nothing refers to it once dropped.
            unsafe { libc::munmap(self.ptr.cast(), size) };
            return;
        }
        let layout = Layout::from_size_align(size, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.ptr, layout) }
    }
}

fn is_aligned(off: u64, buf: &[u8], align: usize) -> bool {
    off % align as u64 == 0 && buf.len() % align == 0 && (buf.as_ptr() as usize) % align == 0
}

/// Raw positioned I/O on an aligned span; the bounce logic over it is shared by both engines.
trait RawIo {
    fn raw_read(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn raw_write(&self, buf: &[u8], off: u64) -> io::Result<()>;
}

fn bounced_read<R: RawIo + ?Sized>(
    r: &R,
    align: usize,
    buf: &mut [u8],
    off: u64,
) -> io::Result<()> {
    if align <= 1 || is_aligned(off, buf, align) {
        return r.raw_read(buf, off);
    }
    let start = off - off % align as u64;
    let end = (off + buf.len() as u64).next_multiple_of(align as u64);
    let mut tmp = AlignedBuf::new((end - start) as usize);
    r.raw_read(tmp.as_mut_slice(), start)?;
    let skip = (off - start) as usize;
    buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
    Ok(())
}

fn bounced_write<R: RawIo + ?Sized>(r: &R, align: usize, buf: &[u8], off: u64) -> io::Result<()> {
    if align <= 1 || is_aligned(off, buf, align) {
        return r.raw_write(buf, off);
    }
    let start = off - off % align as u64;
    let end = (off + buf.len() as u64).next_multiple_of(align as u64);
    let mut tmp = AlignedBuf::new((end - start) as usize);
    let skip = (off - start) as usize;
    // Read-modify-write only the partial edge blocks.
    if skip != 0 || (off + buf.len() as u64) % align as u64 != 0 {
        let a = align;
        r.raw_read(&mut tmp.as_mut_slice()[..a], start)?;
        let n = tmp.len;
        if n > a {
            let mut last = AlignedBuf::new(a);
            r.raw_read(last.as_mut_slice(), end - a as u64)?;
            tmp.as_mut_slice()[n - a..].copy_from_slice(last.as_slice());
        }
    }
    tmp.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
    r.raw_write(tmp.as_slice(), start)
}

/// The holes of a regular file inside `off..end` (SEEK_DATA/SEEK_HOLE), clipped to the range.
/// A block device has none that the kernel reports: empty.
fn file_holes(file: &File, off: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    if !file.metadata()?.is_file() {
        return Ok(out);
    }
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it changes only the file position, which no
        // engine uses (every transfer is positioned).
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None), // no data (or no hole) at or after pos
            _ => Err(e),
        }
    };
    let mut pos = off;
    while pos < end {
        // The next hole at or after pos (the end of the file is one), then the data after it.
        let Some(hole) = seek(pos, libc::SEEK_HOLE)? else {
            break;
        };
        if hole >= end {
            break;
        }
        let data = seek(hole, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        if data > hole {
            out.push((hole, data - hole));
        }
        pos = data.max(hole + 1);
    }
    Ok(out)
}

/// How a device or file was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    pub write: bool,
    /// O_EXCL on block devices: refused while mounted or held by another exclusive opener.
    pub exclusive: bool,
    /// Through the page cache, not O_DIRECT: for a command that reads the whole metadata once
    /// (`check`), the kernel's readahead turns one small read per page into large ones.
    pub buffered: bool,
}

/// An opened device or file, before an engine is put on it.
pub struct Device {
    pub file: File,
    /// The same file without O_DIRECT, for the bytes past the last whole aligned block (a file
    /// of any size, or a device whose size is not a multiple of [`DIRECT_ALIGN`]): O_DIRECT
    /// cannot transfer a partial block at the end without reading or writing past it.
    pub tail: Option<File>,
    pub size: u64,
    pub is_block: bool,
    pub direct: bool,
    /// Logical block size: the alignment O_DIRECT needs.
    pub block_size: usize,
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);

/// Opens a block device or a regular file, with O_DIRECT where the file system supports it.
pub fn open_device(path: &Path, mode: OpenMode) -> io::Result<Device> {
    let meta = std::fs::metadata(path)?;
    let is_block = meta.file_type().is_block_device();
    if !is_block && !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a block device or a regular file",
        ));
    }
    let want_direct = !mode.buffered && std::env::var("SNAPCTL_NO_DIRECT").is_err();
    let open = |direct: bool| {
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if mode.exclusive && is_block {
            flags |= libc::O_EXCL;
        }
        OpenOptions::new()
            .read(true)
            .write(mode.write)
            .custom_flags(flags)
            .open(path)
    };
    let (file, direct) = match open(want_direct) {
        Ok(f) => (f, want_direct),
        // tmpfs and some FUSE file systems refuse O_DIRECT: fall back to buffered I/O.
        Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false),
        Err(e) => return Err(e),
    };
    // Opened without O_EXCL: the first descriptor already holds the exclusive claim.
    let tail = if direct {
        Some(
            OpenOptions::new()
                .read(true)
                .write(mode.write)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)?,
        )
    } else {
        None
    };
    let (size, block_size) = size_and_block(&file, &meta, is_block)?;
    Ok(Device {
        file,
        tail,
        size,
        is_block,
        direct,
        block_size,
    })
}

/// Opens a device or file for writing without O_DIRECT, with O_EXCL when it is a block device
/// (refused while mounted or held by another exclusive opener).
pub fn open_exclusive(path: &Path) -> io::Result<File> {
    let is_block = std::fs::metadata(path)?.file_type().is_block_device();
    let mut flags = libc::O_CLOEXEC;
    if is_block {
        flags |= libc::O_EXCL;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
}

/// Size in bytes and logical block size: a block device's from its ioctls, a file's from its
/// metadata (512-byte blocks).
fn size_and_block(
    file: &File,
    meta: &std::fs::Metadata,
    is_block: bool,
) -> io::Result<(u64, usize)> {
    if !is_block {
        return Ok((meta.len(), 512));
    }
    let mut size = 0u64;
    let mut ssz: libc::c_int = 0;
    // SAFETY: the ioctls write one u64 / one c_int into the given pointers.
    unsafe {
        blkgetsize64(file.as_raw_fd(), &mut size).map_err(io::Error::from)?;
        blksszget(file.as_raw_fd(), &mut ssz).map_err(io::Error::from)?;
    }
    Ok((size, ssz.max(512) as usize))
}

/// A device or file someone else opened (a descriptor passed over the control socket), used
/// as it is: buffered, without O_DIRECT.
pub fn device_of(file: File) -> io::Result<Device> {
    let meta = file.metadata()?;
    let is_block = meta.file_type().is_block_device();
    if !is_block && !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a block device or a regular file",
        ));
    }
    let (size, block_size) = size_and_block(&file, &meta, is_block)?;
    Ok(Device {
        file,
        tail: None,
        size,
        is_block,
        direct: false,
        block_size,
    })
}

/// What identifies a device or file: a block device by its device number, a file by device and
/// inode (a copy of a store has the same uuid; this tells them apart).
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    id_of(&std::fs::metadata(path).ok()?)
}

/// [`file_id`] of an open file.
pub fn file_id_of(f: &File) -> Option<(u64, u64)> {
    id_of(&f.metadata().ok()?)
}

fn id_of(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    if m.file_type().is_block_device() {
        Some((u64::MAX, m.rdev()))
    } else {
        Some((m.dev(), m.ino()))
    }
}

/// Which engine to put on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else pread/pwrite.
    Auto,
    Uring,
    Sync,
}

impl EngineChoice {
    /// `SNAPCTL_IO_ENGINE=uring|sync|auto`; anything else is auto.
    pub fn from_env() -> Self {
        match std::env::var("SNAPCTL_IO_ENGINE").as_deref() {
            Ok("uring") => EngineChoice::Uring,
            Ok("sync") => EngineChoice::Sync,
            _ => EngineChoice::Auto,
        }
    }
}

/// Puts an engine on an opened device.
pub fn engine_for(dev: Device, choice: EngineChoice) -> io::Result<Arc<dyn BlockIo>> {
    let align = if dev.direct {
        dev.block_size.max(DIRECT_ALIGN)
    } else {
        1
    };
    if choice != EngineChoice::Sync {
        match uring::RingPool::first() {
            Ok(ring) => {
                return Ok(Arc::new(UringIo {
                    file: dev.file,
                    tail: Tail::new(dev.tail, dev.size, align),
                    size: dev.size,
                    align,
                    rings: uring::RingPool::new(ring),
                }))
            }
            Err(e) if choice == EngineChoice::Uring => return Err(e),
            Err(_) => {} // seccomp, kernel.io_uring_disabled: pread/pwrite instead.
        }
    }
    Ok(Arc::new(SyncIo {
        file: dev.file,
        tail: Tail::new(dev.tail, dev.size, align),
        size: dev.size,
        align,
    }))
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn crash_io_keeps_only_flushed_writes_when_told_to_drop_the_rest() {
        let p = Power::new();
        let d = CrashIo::new(vec![0; 8192], p.clone());
        d.write_at(&[1; 512], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2; 1024], 512).unwrap();
        let mut b = [0u8; 1536];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[1; 512]);
        assert_eq!(&b[512..], &[2; 1024]);
        let img = d.after_crash(|_, _| 0);
        assert_eq!(&img[512..1536], &[0; 1024]);
        let torn = d.after_crash(|_, n| n / 2);
        assert_eq!(&torn[512..1024], &[2; 512]);
        assert_eq!(&torn[1024..1536], &[0; 512]);
    }

    #[test]
    fn large_buffers_are_mapped_small_ones_allocated_all_zeroed_and_aligned() {
        for (len, mapped) in [
            (1, false),
            (4096, false),
            ((1 << 20) - 4096, false),
            (1 << 20, true),
            ((8 << 20) + 5, true),
        ] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.mapped, mapped, "{len} bytes");
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0), "{len} bytes zeroed");
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn power_cut_fails_the_chosen_write_and_all_later_ones() {
        let p = Power::new();
        let d = CrashIo::new(vec![0; 4096], p.clone());
        p.cut_after(1);
        d.write_at(&[1; 8], 0).unwrap();
        assert!(d.write_at(&[1; 8], 8).is_err());
        assert!(d.flush().is_err());
    }

    #[test]
    fn a_recording_power_journals_writes_and_flushes_of_all_its_devices_in_order() {
        let p = Power::recording();
        let a = CrashIo::new(vec![0; 4096], p.clone());
        let b = ImageIo::new(Image::zeroed(10_000), p.clone());
        a.write_at(&[1; 8], 0).unwrap();
        b.write_at(&[2; 3], 4094).unwrap();
        b.flush().unwrap();
        a.flush().unwrap();
        let j = p.journal();
        assert_eq!(j.len(), 4);
        assert!(matches!(&j[0], Event::Write { dev: 0, off: 0, data } if data[..] == [1; 8]));
        assert!(matches!(&j[1], Event::Write { dev: 1, off: 4094, data } if data[..] == [2; 3]));
        assert!(matches!(j[2], Event::Flush { dev: 1 }));
        assert!(matches!(j[3], Event::Flush { dev: 0 }));
        assert_eq!(p.journal_since(3).len(), 1);
        // Not recording: nothing kept.
        let q = Power::new();
        CrashIo::new(vec![0; 512], q.clone())
            .write_at(&[1], 0)
            .unwrap();
        assert_eq!(q.journal_len(), 0);
    }

    #[test]
    fn images_share_blocks_and_hash_by_content() {
        let mut a = Image::zeroed(3 * 4096 + 100);
        a.write(4000, &[7; 200]); // across a block boundary
        let b = a.clone();
        a.write(3 * 4096 + 50, &[9; 50]); // into the partial last block
        let mut buf = [0u8; 300];
        a.read(3950, &mut buf);
        assert_eq!(&buf[..50], &[0; 50]);
        assert_eq!(&buf[50..250], &[7; 200]);
        assert_eq!(&buf[250..], &[0; 50]);
        assert_ne!(a.hash(), b.hash());
        let mut c = b.clone();
        c.write(3 * 4096 + 50, &[9; 50]);
        assert_eq!(a.hash(), c.hash(), "same bytes by another path, same hash");
        // Writing zeros back gives the zero image's hash.
        c.write(0, &vec![0; c.len() as usize]);
        assert_eq!(c.hash(), Image::zeroed(c.len()).hash());
        assert_eq!(Image::from_bytes(&a.to_vec()).hash(), a.hash());
    }

    fn roundtrip(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let dev = open_device(
            &path,
            OpenMode {
                write: true,
                exclusive: true,
                buffered: false,
            },
        )
        .unwrap();
        let io = engine_for(dev, choice).unwrap();
        // unaligned write and read through the bounce path
        io.write_at(b"hello world", 4090).unwrap();
        let mut b = [0u8; 20];
        io.read_at(&mut b, 4085).unwrap();
        assert_eq!(&b[..5], &[7; 5]);
        assert_eq!(&b[5..16], b"hello world");
        // batched aligned I/O
        let a = AlignedBuf::new(8192);
        let mut x = AlignedBuf::new(8192);
        x.as_mut_slice().fill(9);
        io.write_many(&[(65536, x.as_slice()), (131072, a.as_slice())])
            .unwrap();
        let mut r1 = AlignedBuf::new(8192);
        let mut r2 = AlignedBuf::new(8192);
        io.read_many(&mut [(65536, r1.as_mut_slice()), (131072, r2.as_mut_slice())])
            .unwrap();
        assert!(r1.as_slice().iter().all(|&v| v == 9));
        assert!(r2.as_slice().iter().all(|&v| v == 0));
        assert!(io.read_at(&mut b, (1 << 20) - 4).is_err());
        io.flush().unwrap();
    }

    #[test]
    fn sync_engine_reads_and_writes_any_alignment() {
        roundtrip(EngineChoice::Sync);
    }

    #[test]
    fn auto_engine_reads_and_writes_any_alignment() {
        roundtrip(EngineChoice::Auto);
    }
}
